"""Typed configuration tree: dataclasses, YAML recipes and dotted command-line overrides.

A run is described by one :class:`Config`. Recipes are YAML files (``configs/*.yaml``) that may name a ``base``
recipe to start from; command-line overrides such as ``optim.lr=0.1 data.batch_size=64`` are applied last.
Every key is checked against the dataclasses: an unknown key or a value of the wrong type is a
:class:`ConfigError` that names the dotted key and suggests the closest valid one.

The ``method`` section is typed by the method itself: ``method.name`` selects a registered method whose
config dataclass validates the remaining keys (see :mod:`semssl.methods`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from semssl.data.regions import RegionSampling
from semssl.data.root import expand as expand_data_root
from semssl.data.synthetic import SynthConfig
from semssl.data.views import ViewSpec
from semssl.errors import ConfigError
from semssl.methods import available_methods, check_views, method_config_class

PACKAGE_CONFIGS = Path(__file__).parent / "configs"

#: the recipe `semssl pretrain` runs when given none (the main job on the built-in data)
DEFAULT_RECIPE = "mocov2_resnet18-w16_1x128-800it_synthetic"



# --------------------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticConfig(SynthConfig):
    """The built-in dataset (fields of :class:`semssl.data.synthetic.SynthConfig`) and where it lives
    (``root``; default ``<data root>/synthetic``: ``$SEMSSL_DATA_DIR/synthetic``, or ``~/.cache/semssl/synthetic``
    when the variable is unset; :mod:`semssl.data.root`)."""

    root: Optional[str] = None


@dataclass
class DataConfig:
    """Where images come from and how views are made.

    ``train`` is a path (image folder, file list or COCO JSON) or ``synthetic`` (the built-in objects split).
    Paths may start at the data root, ``$SEMSSL_DATA_DIR/<dataset>/...`` (expanded when the config is read, the
    default root ``~/.cache/semssl`` included; :mod:`semssl.data.root`): the packaged recipes name their real
    datasets so, and ``semssl data get <dataset>`` writes them there.
    ``eval_train`` / ``eval_test`` are labelled image folders for the kNN monitor and the final evaluation; with
    ``synthetic`` they default to the built-in objects' train/test folders. ``views`` are
    :class:`~semssl.data.views.ViewSpec` entries (name, size, crops, recipe, geometry, box augmentations);
    ``region_sampling`` keeps proposals visible in two views (:class:`~semssl.data.regions.RegionSampling`);
    ``batch_transforms`` are registered batch-level augmentations (``semssl.data.regions``), each
    ``{name: ..., <argument>: <value>}``, run after collation.
    """

    train: str = "synthetic"
    train_root: Optional[str] = None  # a file-list train: the folder its relative entries start at (default: its own)
    eval_train: Optional[str] = None
    eval_test: Optional[str] = None
    batch_size: int = 64  # per device
    num_workers: int = 2
    views: list[ViewSpec] = field(default_factory=lambda: [ViewSpec(name="q"), ViewSpec(name="k")])
    region_sampling: Optional[RegionSampling] = None  # proposal sampling of SoCo/D3SSL (data/regions.py)
    batch_transforms: list[dict] = field(default_factory=list)  # [{name: ..., arg: value}] after collation
    proposals: bool = False  # attach selective-search proposals to every training sample (data/proposals.py)
    proposal_params: dict = field(default_factory=dict)  # ProposalParams fields, e.g. {reference_size: null}
    blur_reference_size: Optional[int] = 224
    eval_size: int = 224
    eval_resize_ratio: float = 256 / 224
    on_error: Literal["skip", "raise"] = "skip"
    check_files: bool = True  # decode every file once before training when the dataset is small
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """Backbone (see :mod:`semssl.models.backbones`): a ResNet, or a ViT (:mod:`semssl.models.vit`; for the
    methods ``dino`` and ``scfs``) with ``patch_size``, ``img_size`` and ``drop_path``; the ResNet-only fields
    (``small_input``, ``zero_init_residual``, ``norm``, ``bn_splits``, ``width``, ``channels_last``) must keep
    their defaults with a ViT."""

    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "vit_tiny", "vit_small", "vit_base"] = "resnet50"
    patch_size: int = 16  # ViT only: patch side in pixels (every crop side a multiple of it)
    img_size: int = 224  # ViT only: the side the position embeddings are made for (other sides interpolate)
    drop_path: float = 0.0  # ViT only: stochastic-depth rate of the student (DINO's ViTs: 0.1)
    small_input: bool = False
    zero_init_residual: bool = False
    norm: Literal["bn", "gn", "frozen_bn"] = "bn"
    bn_splits: int = 1  # >1: BatchNorm over sub-batches (single-process stand-in for shuffle-BN)
    width: int = 64  # ResNet base width: 64 = torchvision's; 32 / 16 for small runs (channels scale with it)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP (needs CUDA)
    channels_last: bool = False


@dataclass
class OptimConfig:
    """Optimiser and its lr / weight-decay schedules. ``lr`` is per 256 images (scaled by the global batch);
    ``min_lr`` is absolute. ``per: epoch`` looks the lr up once per epoch (MoCo's ``--cos``), ``step`` per
    iteration (DINO, SoCo, BYOL). The method's own schedules (EMA momentum, teacher temperature) are declared
    by the method (``Method.schedules``)."""

    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = 0.03
    lr_scaling: Literal["linear", "none"] = "linear"
    min_lr: float = 0.0  # absolute: the cosine's end value, not scaled by the batch (DINO/SCFS min_lr)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    per: Literal["step", "epoch"] = "step"  # lr looked up per iteration (DINO) or per epoch (MoCo's --cos)
    milestones: list[float] = field(default_factory=list)  # for "step": epochs or fractions
    warmup: Union[float, str] = 0  # epochs (>= 1), or a fraction of the run (< 1), or "5%"
    warmup_start: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    weight_decay_end: Optional[float] = None  # cosine wd schedule end (DINO)
    exclude_norm_and_bias: bool = True
    clip_grad: float = 0.0  # 0 disables
    clip_mode: Literal["global", "per_param"] = "global"


@dataclass
class TrainerConfig:
    """Run length, devices, precision, logging and checkpoints."""

    max_epochs: int = 200
    max_steps: int = 0  # > 0: stop after this many optimisation steps (overrides max_epochs)
    accelerator: str = "auto"
    devices: Union[int, str] = 1
    num_nodes: int = 1
    strategy: str = "auto"
    # > 1: each optimisation step runs k micro-batches of data.batch_size and sums their gradients, so the
    # effective batch is k x data.batch_size x processes (semssl.engine.step)
    accumulate_grad_batches: int = 1
    precision: str = "32-true"  # "16-mixed" / "bf16-mixed" for mixed precision
    seed: int = 0
    out_dir: str = "runs"
    run_name: Optional[str] = None
    log_every_n_steps: int = 10
    knn_every_n_epochs: int = 0  # online kNN monitor; 0 disables
    # RankMe of the training batch's embeddings (monitor/rankme, _dense, _region: semssl.eval.rankme) every this
    # many steps, from step 0; 0 disables
    rankme_every_n_steps: int = 20
    checkpoint_every_n_epochs: int = 1
    checkpoint_every_n_steps: int = 0  # > 0: also every this many steps (a long epoch loses less when killed)
    progress_bar: bool = True
    num_threads: int = 0  # torch intra-op threads; 0 = torch default
    # figures drawn during training into <run>/figures/: [{name: saliency, every_n_epochs: 5, <option>: ...}],
    # name = a figure of `semssl viz` that supports it (see semssl/viz/__init__.py)
    figures: list[dict] = field(default_factory=list)


@dataclass
class FastProbeConfig:
    epochs: int = 100
    lrs: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0, 10.0])
    holdout: float = 0.1


@dataclass
class EvalConfig:
    """Evaluation after pre-training (kNN + fast linear probe vs random init)."""

    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    linear: FastProbeConfig = field(default_factory=FastProbeConfig)
    batch_size: int = 256
    random_init: bool = True
    enabled: bool = True


@dataclass
class Config:
    name: str = "run"
    method: Any = None  # a method's own config dataclass, chosen by method.name
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------------------
# dict <-> dataclass with validation
# --------------------------------------------------------------------------------------------------------------
def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return expand_data_root(value)  # $SEMSSL_DATA_DIR -> the data root (semssl.data.root)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)  # resolved in the module that defines each field
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{dotted}'{_suggest(str(key), names)}")
        if cls is Config and key == "method":
            kwargs[key] = method_config_from_dict(value, dotted)
            continue
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        obj = cls(**kwargs)
    except ConfigError as err:  # a dataclass that validates itself (ViewSpec, RegionSampling, ...)
        raise ConfigError(f"{prefix}: {err}" if prefix else str(err)) from None
    except TypeError as err:  # a required field without a default
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"{prefix or cls.__name__}: missing key(s) {missing} ({err})") from None
    if cls is Config:
        if obj.method is None:
            raise ConfigError("method: a recipe must name a method (method.name); see `semssl methods`")
        _check_data(obj.data)
        check_views(obj)
        check_values(obj)
    return obj


def check_values(cfg: Config) -> None:
    """Every value that would only fail once training starts (a division by zero, an empty crop range, an
    unparsable schedule length...), checked when the config is read, before any folder is created. All faults
    at once, one line each naming the key and the allowed values."""
    import math

    from semssl.schedules import resolve_length

    faults: list[str] = []

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            faults.append(f"{key} = {value!r}: must be {allowed}")

    def number(key: str, value: Any, low: float = 0.0, low_open: bool = False, high: Optional[float] = None) -> None:
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if low_open else value >= low)
        ok = ok and (high is None or value < high)
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
        need(ok, key, value, f"a finite number {bound}")

    d, m, o, t, e = cfg.data, cfg.model, cfg.optim, cfg.trainer, cfg.eval
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1 (per device)")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    need(d.eval_size >= 8, "data.eval_size", d.eval_size, "an integer >= 8")
    number("data.eval_resize_ratio", d.eval_resize_ratio, 1.0)
    need(m.bn_splits >= 1, "model.bn_splits", m.bn_splits, "an integer >= 1")
    if m.bn_splits > 1 and d.batch_size >= 1 and d.batch_size % m.bn_splits:
        faults.append(f"data.batch_size = {d.batch_size} is not divisible by model.bn_splits = {m.bn_splits}: "
                      f"use a multiple of {m.bn_splits}, or set model.bn_splits to a divisor of the batch")
    need(m.width >= 1, "model.width", m.width, "an integer >= 1 (64 = torchvision's ResNet)")
    _check_vit(cfg, faults)
    number("optim.lr", o.lr, 0.0, low_open=True)
    number("optim.min_lr", o.min_lr)
    number("optim.warmup_start", o.warmup_start)
    number("optim.momentum", o.momentum, 0.0, high=1.0)
    number("optim.weight_decay", o.weight_decay)
    if o.weight_decay_end is not None:
        number("optim.weight_decay_end", o.weight_decay_end)
    number("optim.clip_grad", o.clip_grad)
    for key, value in [("optim.warmup", o.warmup)] + [(f"optim.milestones[{i}]", v) for i, v in
                                                       enumerate(o.milestones)]:
        try:
            resolve_length(value, 1, 1_000_000)
        except ConfigError as err:
            faults.append(f"{key}: {err}")
    need(t.max_epochs >= 0, "trainer.max_epochs", t.max_epochs, "an integer >= 0")
    need(t.max_steps >= 0, "trainer.max_steps", t.max_steps, "an integer >= 0 (0 = use max_epochs)")
    need(t.max_epochs > 0 or t.max_steps > 0, "trainer.max_epochs", t.max_epochs,
         "> 0 when trainer.max_steps is 0 (the run would have no step)")
    devices_ok = (isinstance(t.devices, int) and t.devices >= 1) or (isinstance(t.devices, int) and t.devices == -1) \
        or (isinstance(t.devices, str) and t.devices != "")
    need(devices_ok, "trainer.devices", t.devices, "a count >= 1, -1 (all), 'auto' or a device list string")
    need(t.num_nodes >= 1, "trainer.num_nodes", t.num_nodes, "an integer >= 1")
    need(isinstance(t.accumulate_grad_batches, int) and t.accumulate_grad_batches >= 1,
         "trainer.accumulate_grad_batches", t.accumulate_grad_batches, "an integer >= 1 (1 = no accumulation)")
    need(t.seed >= 0, "trainer.seed", t.seed, "an integer >= 0")
    need(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps, "an integer >= 1")
    for key in ("knn_every_n_epochs", "rankme_every_n_steps", "checkpoint_every_n_epochs", "checkpoint_every_n_steps",
                "num_threads"):
        need(getattr(t, key) >= 0, f"trainer.{key}", getattr(t, key), "an integer >= 0 (0 = off / default)")
    need(e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer >= 1")
    number("eval.knn_temperature", e.knn_temperature, 0.0, low_open=True)
    need(bool(e.knn_k) and all(k >= 1 for k in e.knn_k), "eval.knn_k", e.knn_k, "a non-empty list of integers >= 1")
    for key in ("momentum", "momentum_end"):
        value = getattr(cfg.method, key, None)
        if value is not None:
            number(f"method.{key}", value, 0.0, high=1.0 + 1e-12)
    for key, value in vars(cfg.method).items():
        if key.endswith("temperature") or key.endswith("temp"):
            if isinstance(value, (int, float)):
                number(f"method.{key}", value, 0.0, low_open=True)
    if faults:
        raise ConfigError("\n".join(faults) if len(faults) == 1 else
                          f"{len(faults)} invalid values:\n  " + "\n  ".join(faults))


#: the methods a ViT backbone serves (they read only ``pooled`` and stages chosen by name)
VIT_METHODS = ("dino", "scfs")


def _check_vit(cfg: Config, faults: list[str]) -> None:
    """The model fields that belong to one backbone family only (ModelConfig's docstring), and a ViT's image
    sides: every view and ``data.eval_size`` a multiple of ``model.patch_size``."""
    m, defaults = cfg.model, ModelConfig()
    if not m.arch.startswith("vit_"):
        for key in ("patch_size", "img_size", "drop_path"):
            if getattr(m, key) != getattr(defaults, key):
                faults.append(f"model.{key} = {getattr(m, key)!r}: a ViT setting, but model.arch is {m.arch}")
        return
    name = getattr(cfg.method, "name", "")
    if name not in VIT_METHODS:
        faults.append(f"model.arch = {m.arch!r}: ViT backbones serve the methods {list(VIT_METHODS)}, not '{name}' "
                      f"(its heads read ResNet stage maps)")
    for key in ("small_input", "zero_init_residual", "norm", "bn_splits", "width", "channels_last"):
        if getattr(m, key) != getattr(defaults, key):
            faults.append(f"model.{key} = {getattr(m, key)!r}: a ResNet setting; leave it at "
                          f"{getattr(defaults, key)!r} with model.arch {m.arch}")
    p = m.patch_size
    if p < 1 or m.img_size < 1 or m.img_size % max(p, 1):
        faults.append(f"model.img_size = {m.img_size}: must be a positive multiple of model.patch_size = {p}")
        return
    if not 0.0 <= m.drop_path < 1.0:
        faults.append(f"model.drop_path = {m.drop_path!r}: must be in [0, 1)")
    sides = [(f"data.views[{i}].size ({v.name})", v.size) for i, v in enumerate(cfg.data.views)]
    for key, side in [*sides, ("data.eval_size", cfg.data.eval_size)]:
        if side % p:
            faults.append(f"{key} = {side}: not a multiple of model.patch_size = {p} (a ViT cuts images into "
                          f"whole patches)")


def _check_data(data: DataConfig) -> None:
    """What the data section's pieces check only together: view references, proposal sampling, batch transforms."""
    from semssl.data.regions import build_batch_transform
    from semssl.data.views import MultiViewTransform

    try:
        MultiViewTransform(data.views, blur_reference_size=data.blur_reference_size,
                           region_sampling=data.region_sampling)
    except ConfigError as err:
        raise ConfigError(f"data.views: {err}") from None
    if data.proposal_params:
        from semssl.data.proposals import as_params

        try:
            as_params(data.proposal_params)
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"data.proposal_params: {err}") from None
    for i, item in enumerate(data.batch_transforms):
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"data.batch_transforms[{i}]: expected a mapping with a 'name', got {item!r}")
        try:
            build_batch_transform(**item)
        except ConfigError as err:
            raise ConfigError(f"data.batch_transforms[{i}]: {err}") from None


def method_config_from_dict(value: Any, key: str = "method") -> Any:
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{key}: expected a mapping with a 'name' (one of {available_methods()})")
    cls = method_config_class(value["name"])
    return from_dict(cls, value, prefix=key)


def to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-safe) nested dict of a config tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------------------------
# YAML recipes and overrides
# --------------------------------------------------------------------------------------------------------------
def recipe_path(name_or_path: str) -> Path:
    """A recipe given as a path, or as the name of a packaged recipe (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    packaged = PACKAGE_CONFIGS / f"{stem}.yaml"
    if packaged.exists():
        return packaged
    known = sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yaml"))
    close = difflib.get_close_matches(stem, known, n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else f"; packaged recipes: {', '.join(known)}"
    raise ConfigError(f"recipe '{name_or_path}' not found (no such file, no packaged recipe){hint}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yaml"))


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats, so ``1e-4`` and ``5E-4`` are numbers, not strings.

    Decision: PyYAML follows YAML 1.1, whose float pattern needs a dot (``1.0e-4``); recipes and command-line
    overrides are written by people who expect ``optim.weight_decay=1e-4`` to work.
    """


_YamlLoader.add_implicit_resolver(  # copies the inherited resolver table first; SafeLoader is untouched
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text as recipes and overrides are parsed (safe, YAML 1.2 floats)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: Path, _seen: tuple = ()) -> dict:
    """Read a recipe, resolving ``base:`` (a recipe it extends) recursively."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: recipe 'base' chain loops back on itself")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read recipe ({err.strerror})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.exists():
            base_path = recipe_path(str(base))
        data = _deep_merge(load_yaml(base_path, _seen + (path.resolve(),)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], parsed value); values are parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict; list items are addressed by index (``data.views.0.size=96``)."""
    data = _deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, parts[: i + 1])
                continue
            nxt = node.get(part)
            if nxt is None:
                nxt = {}
                node[part] = nxt
            elif isinstance(nxt, dict):
                nxt = dict(nxt)
                node[part] = nxt
            elif isinstance(nxt, list):
                nxt = [dict(v) if isinstance(v, dict) else v for v in nxt]
                node[part] = nxt
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last) if last.isdigit() else None
            if idx is None or idx >= len(node):
                raise ConfigError(f"override '{text}': '{'.'.join(parts[:-1])}' is a list of {len(node)} items")
            node[idx] = value
        else:
            node[last] = value
    return data


def _list_item(node: list, part: str, parts: list[str]) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"'{'.'.join(parts)}': '{'.'.join(parts[:-1])}' is a list of {len(node)} items; "
                          f"address its items by index")
    return node[int(part)]


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe (path or packaged name; None = the default recipe) and apply dotted overrides."""
    path = recipe_path(str(recipe) if recipe is not None else DEFAULT_RECIPE)
    data = apply_overrides(load_yaml(path), list(overrides or []))
    data.setdefault("name", path.stem)
    return from_dict(Config, data)


def dump_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
