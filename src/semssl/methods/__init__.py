"""Method registry: ``semssl methods`` lists these names; ``method.name`` in a recipe selects one.

Every module of this package (but ``base``) is a method file that registers its class with :func:`register`;
the registry imports them all the first time it is asked, so a new method is one new file, listed nowhere else.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any

from semssl.errors import ConfigError
from semssl.methods.base import Method, MethodConfig

_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False


def register(name: str):
    """Class decorator: make a :class:`Method` selectable as ``method.name: <name>``."""
    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name '{name}' is registered twice ({_REGISTRY[name].__module__}, "
                             f"{cls.__module__})")
        _REGISTRY[name] = cls
        return cls
    return deco


def _load_all() -> None:
    """Import every method module of this package once (importing one registers it)."""
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def available_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"method.name: unknown method '{name}' (available: {', '.join(sorted(_REGISTRY))}){hint}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return method_class(name).config_class


def check_views(cfg: Any) -> None:
    """The method's required views must all be in ``data.views`` (a ConfigError naming both lists)."""
    required = method_class(cfg.method.name).required_views(cfg.method)
    have = [v.name for v in cfg.data.views]
    missing = [v for v in required if v not in have]
    if missing:
        raise ConfigError(f"data.views: method '{cfg.method.name}' reads views {list(required)} but data.views "
                          f"has {have} (missing: {missing}); rename the views or set method.views")


def build_method(cfg: Any) -> Method:
    """The method of a full :class:`semssl.config.Config` (its views checked against ``data.views``)."""
    check_views(cfg)
    return method_class(cfg.method.name)(cfg.method, cfg.model)


__all__ = ["Method", "MethodConfig", "register", "available_methods", "method_class", "build_method",
           "method_config_class", "check_views"]
