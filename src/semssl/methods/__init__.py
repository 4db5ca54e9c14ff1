"""Method registry: ``semssl methods`` lists these names; ``method.name`` in a recipe selects one."""

from __future__ import annotations

from typing import Any

from semssl.methods.base import Method, MethodConfig

_REGISTRY: dict[str, type[Method]] = {}

#: the recipe `semssl pretrain` runs when given none (the main job on the built-in data)
DEFAULT_RECIPE = "mocov2_resnet18_1x64-400it_synthetic"


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        _REGISTRY[name] = cls
        return cls
    return deco


def _load_all() -> None:
    # importing a method module registers it
    from semssl.methods import mocov2  # noqa: F401


def available_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        import difflib

        from semssl.config import ConfigError

        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"method.name: unknown method '{name}' (available: {', '.join(sorted(_REGISTRY))}){hint}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return method_class(name).config_class


def build_method(cfg: Any) -> Method:
    """The method of a full :class:`semssl.config.Config`."""
    return method_class(cfg.method.name)(cfg.method, cfg.model)


__all__ = ["Method", "MethodConfig", "register", "available_methods", "method_class", "build_method",
           "method_config_class", "DEFAULT_RECIPE"]
