"""One GPU check of the nine methods, three peers and the data pipeline, in one process, into one JSON file.

Why: the CPU benchmarks (``step_time.py``, ``method_step_ratio.py``, ``data_throughput.py``) measure ratios on a
shared 2-core machine; whether semssl is fast where it will train — one CUDA GPU, ResNet-50, 224 px, bf16 —
needs one short run there. This script is that run: it installs nothing, downloads nothing, reads only data it
generates itself, and keeps a running clock so it stays within about 8 minutes (``--budget-s``, default 450;
a part that would not fit is skipped and named under ``skipped`` in the JSON).

What it measures (``--out DIR`` gets ``gpu_check.json``; a compact table goes to stdout):

1. **Per method** (mocov2, byol, dino, densecl, soco, scfs, scd = SCD-MoCo, dsc = DSC-PM, d3ssl): the paper
   recipe (``src/semssl/configs/*_resnet50_*``) with batch 64, 224 px (DINO and SCFS: 2 x 224 + 6 x 96 px
   crops; D3SSL's x2-s keeps half of x2's side), ``model.channels_last``, one process (no SyncBatchNorm).
   The step is the engine's own (:class:`semssl.bench.MethodStep`: schedules, ``training_step``, backward,
   clipping, optimiser, EMA), its forward (``training_step``) under bf16 autocast as Lightning's
   ``bf16-mixed`` does. Image methods get random normalised views (the cost does not depend on pixel values);
   SoCo and D3SSL get one real batch through their views, region sampling and batch transforms, made from
   built-in synthetic scenes with the scenes' ground-truth boxes standing in for selective-search proposals
   (no OpenCV contrib needed). After a warm-up, 30 timed steps (3 blocks of 10, the GPU synchronised around
   each block) give the step time, images/s (source images per second: batch / step time) and the peak GPU
   memory (``torch.cuda.max_memory_allocated``, reset per method), and the ratio to a supervised ResNet-50
   step (trunk + linear classifier, cross-entropy, SGD, same batch, bf16, channels-last) timed at the start
   and at the end of the run.
2. **Ours / peer** for MoCo-v2, BYOL and DINO: semssl's step against an independent minimal implementation on
   the same inputs (``benchmarks/ssl_peers.py``: torchvision ResNet-50 + the paper's heads and loss written from
   the formulas; lightly's heads, losses and LARS instead when ``lightly`` imports), timed alternately (blocks
   of ``--peer-steps`` steps, A B B A ...), median of ``--rounds`` (>= 5) per-round ratios.
3. **Pipeline** from JPEG files written to a temporary folder (built-in synthetic scenes, rendered here):
   (a) semssl's own training loader (``semssl.engine.data.train_loader``, CPU workers) for the 2-view MoCo-v2
   and the multi-crop DINO recipes; (b) GPU decode (``torchvision.io.decode_jpeg(..., device="cuda")`` on
   batches) followed by torchvision.transforms.v2 augmentation on the GPU (random resized crop, flip, colour
   jitter, grayscale, blur, normalisation; two 224 px views) — a measurement of GPU decode + augmentation
   throughput, *not* semssl's training pipeline (which decodes and augments on the CPU). ``per_image``
   applies the v2 pipeline to each image (per-sample random parameters); ``batched`` crops per image and runs
   the photometric ops once on the stacked batch (one random draw per batch, so not per-sample augmentation).

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out DIR          # on the GPU machine, from the repo root
    PYTHONPATH=src python3 benchmarks/gpu_check.py --out DIR --dry-run   # anywhere: tiny CPU run, same JSON

Exit codes: 0 = everything measured; 1 = some item failed (its entry in the JSON holds ``error`` and the run
went on with the next one); 2 = no CUDA device and no ``--dry-run``: the script prints one line and stops at
once, before importing semssl. ``--dry-run`` runs the same code on the CPU at tiny settings (ResNet-18, 64 px,
batch 4, small heads and queues, 2 timed steps per method, peers included, the pipeline on a handful of images)
so that it can be tested without a GPU; its numbers mean nothing. ``--parts`` / ``--methods`` /
``--peer-methods`` run a subset (e.g. a rerun of the peers alone).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

SCHEMA = "semssl.gpu_check/1"
JSON_NAME = "gpu_check.json"
NO_CUDA_EXIT = 2

#: method -> its paper recipe (SCD: SCD-MoCo; DSC: DSC-PM, the recipe's default)
RECIPES = {
    "mocov2": "mocov2_resnet50_8x32-200e_imagenet",
    "byol": "byol_resnet50_8x32-200e_imagenet",
    "dino": "dino_resnet50_8x32-200e_imagenet",
    "densecl": "densecl_resnet50_8x32-200e_imagenet",
    "soco": "soco_resnet50_8x128-400e_imagenet",
    "scfs": "scfs_resnet50_8x32-200e_imagenet",
    "scd": "scd_mocov2_resnet50_2x128-200e_imagenet",
    "dsc": "dsc_resnet50_8x32-200e_imagenet",
    "d3ssl": "d3ssl_resnet50_8x128-800e_coco",
}
REGION_METHODS = ("soco", "d3ssl")  # need proposals: a real batch of synthetic scenes, GT boxes as proposals
MULTI_CROP = ("dino", "scfs")
PIPELINE_RECIPES = {"two_view": "mocov2", "multi_crop": "dino"}
PARTS = ("methods", "peers", "pipeline")
AMP_DTYPE = torch.bfloat16  # forward under bf16 autocast, as Lightning's "bf16-mixed"
#: seconds an item of each kind is assumed to take before the first one has been timed (GPU run)
FIRST_ESTIMATE_S = {"method": 40.0, "peer": 60.0, "loader": 45.0, "gpu_decode": 30.0, "supervised": 20.0}


# --------------------------------------------------------------------------------------------------------------
# Settings, clock, output
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything the numbers depend on besides the machine; ``--dry-run`` shrinks it to a CPU smoke test."""

    dry_run: bool
    device: str
    arch: str = "resnet50"
    size: int = 224
    local_size: int = 96
    local_crops: int = 6
    batch: int = 64
    precision: str = "bf16-autocast"
    channels_last: bool = True
    warmup: int = 5
    steps: int = 30
    block: int = 10
    peer_rounds: int = 5
    peer_steps: int = 10
    scene_size: int = 320  # side of the rendered synthetic images (region batches and JPEG files)
    unique_images: int = 256
    jpeg_quality: int = 90
    loader_workers: int = 8
    loader_warmup: int = 9
    loader_batches: int = 24
    gpu_decode_batches: int = 20
    budget_s: float = 450.0
    #: overrides every recipe gets on top of arch, batch, view sizes and channels-last
    extra_overrides: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        workers = args.workers if args.workers is not None else max(1, min(16, _cpu_count() - 1))
        if args.dry_run:
            # tiny: heads and queues shrunk too, so the CPU steps take well under a second
            tiny = ["method.queue_size=256", "method.dense_queue_size=256", "method.bank_size=256",
                    "method.out_dim=1024", "method.proj_hidden_dim=512", "method.pred_hidden_dim=512",
                    "method.hidden_dim=512", "method.stage_hidden_dim=512", "method.num_prototypes=16",
                    "method.num_clusters=4", "method.roi_size=4", "method.roi_size_small=2"]
            return cls(dry_run=True, device="cpu", arch="resnet18", size=64, local_size=32, batch=4, warmup=1,
                       steps=2, block=1, peer_rounds=5, peer_steps=1, scene_size=96, unique_images=8,
                       loader_workers=1, loader_warmup=1, loader_batches=2, gpu_decode_batches=2,
                       budget_s=args.budget_s, extra_overrides=tiny)
        # loader: one warm-up round (a batch per worker, each worker makes whole batches), then three rounds
        return cls(dry_run=False, device="cuda", batch=args.batch, steps=args.steps, peer_rounds=args.rounds,
                   peer_steps=args.peer_steps, loader_workers=workers, loader_warmup=workers,
                   loader_batches=max(12, 3 * workers), budget_s=args.budget_s)


class Clock:
    """Seconds since the start and what is left of the budget; items that would not fit are skipped."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s
        self.durations: dict[str, list[float]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def estimate(self, kind: str) -> float:
        """1.2 x the longest item of this kind so far, or :data:`FIRST_ESTIMATE_S` before the first one."""
        done = self.durations.get(kind)
        return 1.2 * max(done) if done else FIRST_ESTIMATE_S[kind]

    def fits(self, kind: str) -> bool:
        return self.elapsed() + self.estimate(kind) <= self.budget_s

    @contextmanager
    def item(self, kind: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.durations.setdefault(kind, []).append(time.perf_counter() - t0)


class Report:
    """The JSON document, rewritten after every part so an interrupted run still leaves what it measured."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path, self.clock = path, clock
        self.doc: dict[str, Any] = {"schema": SCHEMA, "methods": {}, "peers": {}, "pipeline": {}, "skipped": [],
                                    "notes": []}

    def skip(self, what: str, kind: str) -> None:
        """Record that ``what`` was left out: it would have ended after the budget."""
        self.doc["skipped"].append({"item": what, "elapsed_s": round(self.clock.elapsed(), 1),
                                    "estimated_s": round(self.clock.estimate(kind), 1),
                                    "budget_s": self.clock.budget_s})

    def errors(self) -> list[str]:
        """The items that failed (their entries hold ``error`` instead of numbers)."""
        found = [f"methods.{k}" for k, v in self.doc["methods"].items() if "error" in v]
        found += [f"peers.{k}" for k, v in self.doc["peers"].items() if isinstance(v, dict) and "error" in v]
        pipe = self.doc["pipeline"]
        found += [f"pipeline.cpu_loader.{k}" for k, v in pipe.get("cpu_loader", {}).items() if "error" in v]
        found += ["pipeline.gpu_decode_augment"] if "error" in pipe.get("gpu_decode_augment", {}) else []
        return found

    def write(self) -> None:
        self.doc["elapsed_s"] = round(self.clock.elapsed(), 1)
        self.doc["durations_s"] = {k: [round(x, 1) for x in v] for k, v in self.clock.durations.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=2))
        tmp.replace(self.path)


def error_entry(err: BaseException) -> dict[str, Any]:
    """What a failed item records instead of numbers (the run goes on with the next item)."""
    tail = traceback.format_exception(type(err), err, err.__traceback__)[-3:]
    return {"error": f"{type(err).__name__}: {err}"[:2000], "traceback_tail": "".join(tail)[-2000:]}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_info(s: Settings) -> dict[str, Any]:
    import torchvision

    from ssl_peers import lightly_version

    try:
        from semssl.engine.run import cpu_model

        cpu = cpu_model()
    except Exception:  # noqa: BLE001 — only a label
        cpu = platform.processor() or None
    info: dict[str, Any] = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                            "python": platform.python_version(), "cpu": cpu, "cpu_count": _cpu_count(),
                            "cuda": torch.version.cuda, "lightly": lightly_version()}
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                     "gpu_capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version(),
                     "gpu_count": torch.cuda.device_count()})
    else:
        info.update({"gpu": None, "torch_threads": torch.get_num_threads()})
    info["shm_gb"] = _shm_gb()  # the loader's workers hand batches over in shared memory; a small /dev/shm fails
    return info


def _shm_gb() -> Optional[float]:
    import shutil

    try:
        return round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------------------
# Timing on the device
# --------------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_block(fn: Callable[[], Any], n: int, device: str) -> float:
    """Seconds per call of ``fn`` over ``n`` calls, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def time_steps(fn: Callable[[], Any], s: Settings) -> list[float]:
    """``s.warmup`` untimed calls, then ``s.steps`` timed ones in blocks of ``s.block``: seconds per step of
    each block."""
    for _ in range(s.warmup):
        fn()
    blocks, left = [], s.steps
    while left > 0:
        n = min(s.block, left)
        blocks.append(time_block(fn, n, s.device))
        left -= n
    return blocks


def block_summary(blocks: list[float], n_steps: int) -> dict[str, Any]:
    """Mean step time over all timed steps (blocks weighted by their sizes are equal here) and the blocks."""
    mean = statistics.fmean(blocks)
    return {"step_ms": round(1000 * mean, 2), "step_ms_blocks": [round(1000 * b, 2) for b in blocks],
            "timed_steps": n_steps}


def free_device(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def peak_mb(device: str) -> Optional[float]:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def to_device(obj: Any, device: str) -> Any:
    """The tensors of a nested batch (dicts, lists) moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def device_batch(batch: dict, s: Settings) -> dict:
    """``batch`` on the device, its views channels-last when ``s.channels_last`` (as the engine's step makes
    them; converting here keeps the copy out of the timed steps, as for the supervised step's images)."""
    out = to_device(batch, s.device)
    if s.channels_last:
        out["views"] = {k: v.contiguous(memory_format=torch.channels_last) for k, v in out["views"].items()}
    return out


# --------------------------------------------------------------------------------------------------------------
# Recipes, batches and steps
# --------------------------------------------------------------------------------------------------------------
def method_config(method: str, s: Settings) -> Any:
    """The method's paper recipe at ``s``: arch, batch, view sizes (the first view ``s.size``, the multi-crop
    local view ``s.local_size`` x ``s.local_crops``, other views keeping their size ratio to the first),
    channels-last, no SyncBatchNorm."""
    from semssl.config import load_config

    recipe = RECIPES[method]
    base = load_config(recipe, [])
    first = base.data.views[0].size
    views = []
    for i, v in enumerate(base.data.views):
        if method in MULTI_CROP and i > 0:
            views += [f"data.views.{i}.size={s.local_size}", f"data.views.{i}.n_crops={s.local_crops}"]
        else:
            views.append(f"data.views.{i}.size={max(1, round(s.size * v.size / first))}")
    overrides = [f"model.arch={s.arch}", f"data.batch_size={s.batch}", "model.channels_last=true",
                 "model.sync_bn=false", *views]
    known = _known_method_fields(base)
    overrides += [o for o in s.extra_overrides if o.split("=", 1)[0].split(".", 1)[1] in known]
    return load_config(recipe, overrides)


def _known_method_fields(cfg: Any) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cfg.method)}


def view_summary(cfg: Any) -> dict[str, str]:
    return {v.name: f"{v.n_crops} x {v.size} px" for v in cfg.data.views}


class SceneSource(torch.utils.data.Dataset):
    """Rendered synthetic scenes as source samples, the ground-truth boxes of their objects as ``proposals``
    (what SoCo / D3SSL's region sampling reads; selective search needs OpenCV contrib)."""

    def __init__(self, scenes: list[Any]) -> None:
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        scene = self.scenes[index]
        return {"image": Image.fromarray(scene.image), "label": -1, "index": index,
                "proposals": torch.tensor(mask_boxes(scene.masks), dtype=torch.float32).reshape(-1, 4)}


def mask_boxes(masks: list[Any]) -> list[list[float]]:
    """Tight xyxy boxes (continuous pixels, x2 exclusive) of non-empty masks."""
    import numpy as np

    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        if xs.size:
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
    return boxes


def render_scenes(n: int, size: int, seed: int = 0) -> list[Any]:
    """``n`` built-in synthetic scenes (cluttered style: textured like photographs, not flat) at ``size`` px."""
    import numpy as np

    from semssl.data.synthetic.render import render_scene

    return [render_scene(np.random.default_rng([seed, i]), size, style="cluttered") for i in range(n)]


def region_batch(cfg: Any, scenes: list[Any]) -> dict:
    """One batch of ``cfg.data.batch_size`` scenes through the recipe's views, region sampling and batch
    transforms (semssl's own data path), on the CPU."""
    from semssl.engine.data import ViewDataset, build_collate, build_view_transform

    dataset = ViewDataset(SceneSource(scenes), build_view_transform(cfg), seed=cfg.trainer.seed)
    return build_collate(cfg)([dataset[(0, i % len(scenes))] for i in range(cfg.data.batch_size)])


def method_batch(method: str, cfg: Any, s: Settings, scenes: list[Any]) -> dict:
    from semssl.bench import random_views

    batch = region_batch(cfg, scenes) if method in REGION_METHODS else {"views": random_views(cfg, s.batch)}
    return device_batch(batch, s)


def autocast_forward(method: Any, s: Settings) -> None:
    """Run ``method.training_step`` under autocast (as Lightning's ``bf16-mixed``: forward and loss only)."""
    forward = method.training_step

    def training_step(batch: dict, progress: Any) -> dict:
        with torch.autocast(s.device, dtype=AMP_DTYPE):
            return forward(batch, progress)

    method.training_step = training_step


def ours_step(cfg: Any, batch: dict, s: Settings) -> Any:
    """semssl's engine step on the device: :class:`semssl.bench.MethodStep`, forward under autocast."""
    from semssl.bench import MethodStep

    torch.manual_seed(0)
    step = MethodStep(cfg, batch)
    step.method.to(s.device)  # in place: the optimiser keeps the same parameter objects
    autocast_forward(step.method, s)
    return step


def supervised_step(images: Any, s: Settings) -> Callable[[], Any]:
    """:class:`semssl.bench.SupervisedStep` on the device, forward and loss under autocast."""
    import torch.nn.functional as F

    from semssl.bench import SupervisedStep

    ref = SupervisedStep(images.cpu(), arch=s.arch, channels_last=s.channels_last)
    ref.model.to(s.device)
    ref.images, ref.labels = ref.images.to(s.device), ref.labels.to(s.device)

    def step() -> Any:
        with torch.autocast(s.device, dtype=AMP_DTYPE):
            loss = F.cross_entropy(ref.classifier(ref.backbone(ref.images)["pooled"]), ref.labels)
        ref.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ref.optimizer.step()
        return loss

    return step


# --------------------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------------------
def measure_supervised(s: Settings) -> list[float]:
    from semssl.bench import random_views

    cfg = method_config("mocov2", s)
    images = random_views(cfg, s.batch)[cfg.data.views[0].name][: s.batch]
    images = images.contiguous(memory_format=torch.channels_last) if s.channels_last else images
    step = supervised_step(images, s)
    try:
        return time_steps(step, s)
    finally:
        del step
        free_device(s.device)


def measure_method(method: str, s: Settings, scenes: list[Any], supervised_ms: float) -> dict[str, Any]:
    cfg = method_config(method, s)
    batch = method_batch(method, cfg, s, scenes)
    step = ours_step(cfg, batch, s)
    reset_peak(s.device)
    try:
        blocks = time_steps(step, s)
        loss = float(step())
    finally:
        peak = peak_mb(s.device)
        del step, batch
        free_device(s.device)
    res = block_summary(blocks, s.steps)
    res.update({"recipe": cfg.name, "views": view_summary(cfg),
                "inputs": ("synthetic scenes through the recipe's views, ground-truth boxes as proposals"
                           if method in REGION_METHODS else "random normalised views"),
                "images_per_s": round(s.batch / statistics.fmean(blocks), 1), "peak_mem_mb": peak,
                "ratio_to_supervised": round(res["step_ms"] / supervised_ms, 3), "last_loss": round(loss, 4)})
    return res


def alternate(ours: Callable[[], Any], peer: Callable[[], Any], s: Settings) -> tuple[list[float], list[float]]:
    """Warm both up, then ``s.peer_rounds`` rounds of one block each, the order flipping every round (A B, B A,
    ...) so a drift of the clock speed hits both alike. Returns seconds per step of each round, per side."""
    for _ in range(s.warmup):
        ours()
        peer()
    t_ours, t_peer = [], []
    for r in range(s.peer_rounds):
        if r % 2 == 0:
            t_ours.append(time_block(ours, s.peer_steps, s.device))
            t_peer.append(time_block(peer, s.peer_steps, s.device))
        else:
            t_peer.append(time_block(peer, s.peer_steps, s.device))
            t_ours.append(time_block(ours, s.peer_steps, s.device))
    return t_ours, t_peer


def measure_peer(method: str, s: Settings, implementation: str) -> dict[str, Any]:
    from semssl.bench import random_views
    from ssl_peers import build_peer

    cfg = method_config(method, s)
    batch = device_batch({"views": random_views(cfg, s.batch)}, s)
    ours = ours_step(cfg, batch, s)
    torch.manual_seed(0)
    peer = build_peer(method, cfg, batch["views"], torch.device(s.device), AMP_DTYPE, implementation,
                      s.channels_last)
    try:
        t_ours, t_peer = alternate(ours, peer, s)
    finally:
        del ours, peer, batch
        free_device(s.device)
    ratios = [a / b for a, b in zip(t_ours, t_peer)]
    return {"recipe": cfg.name, "views": view_summary(cfg), "implementation": implementation,
            "ours_ms": round(1000 * statistics.median(t_ours), 2),
            "peer_ms": round(1000 * statistics.median(t_peer), 2),
            "ratios": [round(r, 4) for r in ratios], "ratio_median": round(statistics.median(ratios), 4),
            "rounds": s.peer_rounds, "steps_per_round": s.peer_steps}


# ------------------------------------------------------------------------------------------------ pipeline
def write_jpegs(scenes: list[Any], folder: Path, n_files: int, quality: int) -> list[Path]:
    """``n_files`` JPEG files in ``folder`` (flat: an unlabelled image folder), cycling through the scenes:
    each scene is encoded once and its bytes written under several names."""
    from PIL import Image

    encoded = []
    for scene in scenes:
        buf = io.BytesIO()
        Image.fromarray(scene.image).save(buf, format="JPEG", quality=quality)
        encoded.append(buf.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(encoded[i % len(encoded)])
        paths.append(path)
    return paths


def measure_cpu_loader(method: str, folder: Path, s: Settings) -> dict[str, Any]:
    """semssl's training loader over the JPEG folder with ``s.loader_workers`` workers (steady state)."""
    from semssl.bench import data_throughput
    from semssl.engine.data import build_train_dataset, train_loader

    cfg = method_config(method, s)
    cfg.data.num_workers, cfg.data.check_files = s.loader_workers, False
    loader = train_loader(build_train_dataset(cfg, str(folder)), cfg)
    res = data_throughput(loader, s.loader_batches, s.loader_warmup)
    del loader
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}
    out["images_per_s"] = out.pop("samples_per_s")
    return {"recipe": cfg.name, "views": view_summary(cfg), "workers": s.loader_workers,
            "warmup_batches": s.loader_warmup, "timed_batches": s.loader_batches, **out}


def gpu_augmentations(size: int) -> tuple[Any, Any, Any]:
    """MoCo-v2's augmentation with torchvision.transforms.v2: (geometry, photometric, whole pipeline)."""
    from torchvision.transforms import v2

    from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD

    geometry = v2.Compose([v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                           v2.RandomHorizontalFlip()])
    photometric = v2.Compose([v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                              v2.RandomGrayscale(p=0.2),
                              v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
                              v2.ToDtype(torch.float32, scale=True),
                              v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
    return geometry, photometric, v2.Compose([geometry, photometric])


def decode_batch(data: list[Any], device: str) -> list[Any]:
    """``decode_jpeg`` on a list of byte tensors (one call; torchvision >= 0.19), else one call per image."""
    from torchvision.io import decode_jpeg

    try:
        return list(decode_jpeg(data, device=device))
    except (TypeError, RuntimeError, ValueError):
        return [decode_jpeg(d, device=device) for d in data]


def measure_gpu_decode(paths: list[Path], s: Settings) -> dict[str, Any]:
    """GPU decode of batches of ``s.batch`` JPEG files (already read into memory), then two augmented views."""
    from torchvision.io import read_file

    data = [read_file(str(p)) for p in paths[: s.batch * s.gpu_decode_batches]]
    batches = [data[i:i + s.batch] for i in range(0, len(data) - s.batch + 1, s.batch)]
    geometry, photometric, full = gpu_augmentations(s.size)

    def decode_only(chunk: list[Any]) -> Any:
        return decode_batch(chunk, s.device)

    def per_image(chunk: list[Any]) -> Any:
        images = decode_batch(chunk, s.device)
        return [torch.stack([full(im) for im in images]) for _ in range(2)]

    def batched(chunk: list[Any]) -> Any:
        images = decode_batch(chunk, s.device)
        return [photometric(torch.stack([geometry(im) for im in images])) for _ in range(2)]

    res: dict[str, Any] = {"label": "GPU decode + augmentation throughput (torchvision.io.decode_jpeg on the "
                                    "device + transforms.v2), not yet the training pipeline",
                           "device": s.device, "batch": s.batch, "batches": len(batches), "views": "2 x "
                           f"{s.size} px, MoCo-v2 augmentation (RRC 0.2-1, flip, jitter p 0.8, grayscale 0.2, "
                           "blur p 0.5)"}
    for name, fn in (("decode_only", decode_only), ("per_image", per_image), ("batched", batched)):
        for chunk in batches[:2]:  # warm-up: nvJPEG / kernel initialisation
            fn(chunk)
        sync(s.device)
        t0 = time.perf_counter()
        for chunk in batches:
            fn(chunk)
        sync(s.device)
        seconds = time.perf_counter() - t0
        res[name] = {"images_per_s": round(len(batches) * s.batch / seconds, 1), "seconds": round(seconds, 3)}
    res["batched"]["note"] = "crops per image, photometric ops once per batch (one random draw for all images)"
    res["per_image"]["note"] = "the whole v2 pipeline per image (per-sample random parameters)"
    return res


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
def peer_implementation(choice: str) -> str:
    from ssl_peers import lightly_version

    if choice == "auto":
        return "lightly" if lightly_version() else "plain"
    if choice == "lightly" and not lightly_version():
        raise SystemExit("gpu_check: --peers lightly, but lightly does not import here")
    return choice


def run_methods(rep: Report, clock: Clock, s: Settings, methods: list[str], scenes: list[Any]) -> None:
    sup = rep.doc["supervised"]
    for method in methods:
        if not clock.fits("method"):
            rep.skip(f"methods.{method}", "method")
            continue
        with clock.item("method"):
            try:
                rep.doc["methods"][method] = measure_method(method, s, scenes, sup["step_ms"])
            except Exception as err:  # noqa: BLE001 — one failing method must not cost the others
                rep.doc["methods"][method] = {"recipe": RECIPES[method], **error_entry(err)}
                free_device(s.device)
        rep.write()


def run_peers(rep: Report, clock: Clock, s: Settings, implementation: str, peers: list[str]) -> None:
    from ssl_peers import lightly_version

    rep.doc["peers"] = {"implementation": implementation,
                        "lightly": lightly_version() if implementation == "lightly" else None,
                        "description": ("torchvision ResNet trunk + " + (
                            "lightly's heads, losses, LARS and update_momentum" if implementation == "lightly"
                            else "heads, losses and LARS written in benchmarks/ssl_peers.py from the papers")),
                        "ratio": "ours step time / peer step time (median of per-round ratios)",
                        "same_on_both_sides": "inputs (the same channels-last tensors), batch, trunk, head widths, "
                                              "queue, temperatures, optimiser and its lr / weight decay, bf16 "
                                              "autocast on the forward, EMA after the optimiser step"}
    for name in peers:
        if not clock.fits("peer"):
            rep.skip(f"peers.{name}", "peer")
            continue
        with clock.item("peer"):
            try:
                rep.doc["peers"][name] = measure_peer(name, s, implementation)
            except Exception as err:  # noqa: BLE001
                rep.doc["peers"][name] = error_entry(err)
                free_device(s.device)
        rep.write()


def run_pipeline(rep: Report, clock: Clock, s: Settings, scenes: list[Any], tmp: Path) -> None:
    n_files = max(s.batch * (s.loader_warmup + s.loader_batches), s.batch * s.gpu_decode_batches)
    paths = write_jpegs(scenes[: s.unique_images], tmp / "jpeg", n_files, s.jpeg_quality)
    sizes = [p.stat().st_size for p in paths[: len(scenes)]]
    pipe = rep.doc["pipeline"]
    pipe["images"] = {"files": len(paths), "unique": min(len(scenes), s.unique_images), "side_px": s.scene_size,
                      "jpeg_quality": s.jpeg_quality, "mean_kb": round(statistics.fmean(sizes) / 1024, 1),
                      "source": "built-in synthetic scenes (cluttered style), rendered in this run"}
    pipe["cpu_loader"] = {}
    for kind, method in PIPELINE_RECIPES.items():
        if not clock.fits("loader"):
            rep.skip(f"pipeline.cpu_loader.{kind}", "loader")
            continue
        with clock.item("loader"):
            try:
                pipe["cpu_loader"][kind] = measure_cpu_loader(method, tmp / "jpeg", s)
            except Exception as err:  # noqa: BLE001
                pipe["cpu_loader"][kind] = error_entry(err)
        rep.write()
    if not clock.fits("gpu_decode"):
        rep.skip("pipeline.gpu_decode_augment", "gpu_decode")
        return
    with clock.item("gpu_decode"):
        try:
            pipe["gpu_decode_augment"] = measure_gpu_decode(paths, s)
        except Exception as err:  # noqa: BLE001
            pipe["gpu_decode_augment"] = error_entry(err)
    rep.write()


def run(args: argparse.Namespace) -> Report:
    s = Settings.from_args(args)
    clock = Clock(s.budget_s)
    rep = Report(Path(args.out) / JSON_NAME, clock)
    if s.device == "cuda":
        torch.backends.cudnn.benchmark = True
    implementation = peer_implementation(args.peers)
    rep.doc.update({"dry_run": s.dry_run, "machine": machine_info(s), "settings": {
        **{k: v for k, v in vars(s).items()}, "cudnn_benchmark": s.device == "cuda",
        "recipes": RECIPES, "forward_under_autocast": "method.training_step / supervised forward + loss"}})
    if s.dry_run:
        rep.doc["notes"].append("dry run: tiny CPU settings; the numbers only show that every part runs")
    rep.write()
    scenes = render_scenes(max(s.batch, s.unique_images), s.scene_size) if {"methods", "pipeline"} & set(
        args.parts) else []
    with clock.item("supervised"):
        start_blocks = measure_supervised(s)
    rep.doc["supervised"] = {"arch": s.arch, **block_summary(start_blocks, s.steps),
                             "images_per_s": round(s.batch / statistics.fmean(start_blocks), 1)}
    rep.write()
    if "methods" in args.parts:
        run_methods(rep, clock, s, args.methods, scenes)
    if "peers" in args.parts:
        run_peers(rep, clock, s, implementation, args.peer_methods)
    if "pipeline" in args.parts:
        with tempfile.TemporaryDirectory(prefix="semssl-gpu-check-") as tmp:
            run_pipeline(rep, clock, s, scenes, Path(tmp))
    if clock.fits("supervised"):
        end_blocks = measure_supervised(s)
        rep.doc["supervised"]["step_ms_blocks_end"] = [round(1000 * b, 2) for b in end_blocks]
        rep.doc["supervised"]["drift_end_vs_start"] = round(statistics.fmean(end_blocks)
                                                            / statistics.fmean(start_blocks), 3)
    rep.write()
    return rep


# --------------------------------------------------------------------------------------------------------------
# Output and command line
# --------------------------------------------------------------------------------------------------------------
def table(doc: dict[str, Any]) -> str:
    from semssl.bench import markdown_table

    m = doc["machine"]
    head = (f"gpu_check{' (dry run)' if doc['dry_run'] else ''}: {m.get('gpu') or 'CPU'}, torch {m['torch']}, "
            f"{doc['settings']['arch']} batch {doc['settings']['batch']}, {doc['settings']['size']} px, "
            f"supervised {doc['supervised']['step_ms']} ms/step, {doc['elapsed_s']} s")
    rows = [[k, *(_cell(r, key) for key in ("step_ms", "images_per_s", "peak_mem_mb", "ratio_to_supervised")),
             r.get("error", "")[:60]] for k, r in doc["methods"].items()]
    parts = [head, "", markdown_table(["method", "ms/step", "img/s", "peak MB", "/ supervised", "error"], rows)]
    peers = [[k, *(_cell(r, key) for key in ("ours_ms", "peer_ms", "ratio_median")), r.get("error", "")[:60]]
             for k, r in doc["peers"].items() if isinstance(r, dict)]
    if peers:
        parts += ["", f"peers: {doc['peers']['implementation']}",
                  markdown_table(["method", "ours ms", "peer ms", "ours/peer", "error"], peers)]
    parts += ["", "pipeline images/s: " + ", ".join(_pipeline_cells(doc["pipeline"]))]
    if doc["skipped"]:
        parts.append("skipped (budget): " + ", ".join(x["item"] for x in doc["skipped"]))
    return "\n".join(parts)


def _cell(row: dict[str, Any], key: str) -> Any:
    value = row.get(key)
    return "-" if value is None else value


def _pipeline_cells(pipe: dict[str, Any]) -> list[str]:
    cells = [f"cpu loader {k} {v.get('images_per_s', v.get('error', '?'))}" for k, v in pipe.get("cpu_loader",
                                                                                                  {}).items()]
    gpu = pipe.get("gpu_decode_augment", {})
    cells += [f"gpu {k} {gpu[k]['images_per_s']}" for k in ("decode_only", "per_image", "batched") if k in gpu]
    return cells


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help=f"folder for {JSON_NAME}")
    p.add_argument("--dry-run", action="store_true", help="tiny settings on the CPU (tests the script)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip parts that would end later (default 450)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps per method (default 30)")
    p.add_argument("--rounds", type=int, default=5, help="alternating ours/peer rounds, >= 5 (default 5)")
    p.add_argument("--peer-steps", type=int, default=10, help="steps per ours/peer round (default 10)")
    p.add_argument("--workers", type=int, default=None, help="CPU loader workers (default: cores - 1, <= 16)")
    p.add_argument("--peers", choices=["auto", "plain", "lightly"], default="auto",
                   help="peer building blocks: lightly's if it imports (auto), or the plain ones")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS),
                   help="what to measure besides the supervised reference (default: all)")
    p.add_argument("--methods", nargs="*", default=list(RECIPES), choices=list(RECIPES), metavar="METHOD")
    p.add_argument("--peer-methods", nargs="*", default=["mocov2", "byol", "dino"], choices=["mocov2", "byol", "dino"],
                   metavar="METHOD")
    args = p.parse_args(argv)
    if args.rounds < 5:
        p.error("--rounds must be >= 5")
    if args.batch < 2 or args.steps < 1 or args.peer_steps < 1:
        p.error("--batch must be >= 2, --steps and --peer-steps >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing measured (--dry-run runs the tiny CPU check)")
        return NO_CUDA_EXIT
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # ssl_peers beside this file
    rep = run(args)
    print(table(rep.doc))
    print(f"\nwrote {rep.path}")
    failed = rep.errors()
    if failed:
        print(f"gpu_check: {len(failed)} item(s) failed, see their 'error' in the JSON: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
