"""Measurement code behind ``benchmarks/``: step time as a ratio to a supervised step, whole-step FLOPs,
data-pipeline throughput and the peak memory of a process tree.

docs/design.md §Quality bar ("Fast"): a method's step time is reported as a *ratio* to a supervised step on the same
backbone, batch and resolution, next to the ratio of their whole-step FLOPs. Ratios measured in one run, with
the two steps interleaved (A B A B ...), cancel most of the noise of a shared machine; absolute times do not.

* :class:`SupervisedStep` — the reference: the torchvision trunk (:class:`ResNetBackbone`) + a linear
  classifier, cross-entropy, SGD step, on one view of the batch.
* :class:`MethodStep` — exactly what :class:`semssl.engine.module.SSLModule` does per iteration, minus
  Lightning: schedules -> ``method.training_step`` -> finite check -> backward -> (clip) -> optimiser step ->
  EMA of ``momentum_pairs()``. The method, optimiser and schedules are built by ``SSLModule`` itself.
* :func:`count_flops` — FLOPs of one whole step with ``torch.utils.flop_counter.FlopCounterMode``. It counts
  matrix products and convolutions (forward and backward), so heads, queue matmuls and losses are included;
  elementwise work (BatchNorm, ReLU, pooling, the optimiser and the EMA update) counts zero FLOPs on both sides.
* :func:`time_interleaved` — wall time per step of several steps, interleaved, after a warm-up.
* :func:`data_throughput` — samples/s of a training loader (steady state, start-up reported separately).
* :class:`ProcessTreeSampler` — peak RSS and PSS of a process and all its descendants, sampled from ``/proc``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semssl.errors import BenchError


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------
def random_views(cfg: Any, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
    """One random tensor per view of ``cfg.data.views``: ``[n_crops*B, 3, size, size]`` (crop-major layout).

    Decision: the step benchmark feeds random normalised images, not decoded ones — the step's cost does not
    depend on pixel values, and the data pipeline is measured on its own (:func:`data_throughput`)."""
    if batch_size < 1:
        raise BenchError(f"--batch must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    return {v.name: torch.randn(v.n_crops * batch_size, 3, v.size, v.size, generator=g) for v in cfg.data.views}


def patch_view_recipes(cfg: Any, spec: str) -> dict[str, float]:
    """Replace fields of the photometric recipe of every view of ``cfg`` for this process (a diagnostic, e.g.
    ``"hue=0.5,grayscale_p=0.5"``: ``FIELD=VALUE`` pairs of :class:`~semssl.data.augment.PhotometricRecipe`).

    Patches ``augment.RECIPES`` in place, so call it before the data loader's workers fork. Returns the patch."""
    import dataclasses

    from semssl.data import augment

    try:
        patch = {k: float(v) for k, v in (item.split("=", 1) for item in spec.split(","))}
        names = {r for view in cfg.data.views for r in ([view.recipe] if isinstance(view.recipe, str)
                                                         else view.recipe)}
        for name in names:
            augment.RECIPES[name] = dataclasses.replace(augment.RECIPES[name], **patch)
    except (ValueError, TypeError) as err:
        raise BenchError(f"--aug {spec!r}: expected FIELD=VALUE,... with PhotometricRecipe fields and numbers "
                         f"({err})") from None
    return patch


def data_batch(cfg: Any, batch_size: int) -> dict:
    """The first ``batch_size`` samples of the recipe's training data through its views, collated: a real batch
    with geometry (and boxes for scene data), for methods that read more than the images."""
    from semssl.engine.data import build_collate, build_train_dataset, resolve_paths

    dataset = build_train_dataset(cfg, resolve_paths(cfg)["train"])
    if len(dataset) < batch_size:
        raise BenchError(f"--batch {batch_size}: the training data has only {len(dataset)} images")
    return build_collate(cfg)([dataset[(0, i)] for i in range(batch_size)])


class SupervisedStep:
    """One supervised SGD step: ``ResNetBackbone`` (or ``ViTBackbone``, CLS token) + ``Linear(dim, num_classes)``,
    cross-entropy, SGD.

    The trunk is the one methods use (plain BatchNorm), on one view of the batch; ``channels_last`` should follow
    the method's ``model.channels_last`` so both steps use the same memory format. Decision: SGD with momentum
    0.9 and weight decay on every parameter (the torchvision ImageNet reference recipe); its cost is elementwise
    and does not change the FLOP count.
    """

    def __init__(self, images: Tensor, arch: str = "resnet18", num_classes: int = 1000, small_input: bool = False,
                 lr: float = 0.1, weight_decay: float = 1e-4, seed: int = 0, channels_last: bool = False,
                 width: int = 64, patch_size: int = 16, img_size: int = 224) -> None:
        from semssl.models.backbones import ResNetBackbone
        from semssl.models.vit import ViTBackbone, is_vit

        if num_classes < 2:
            raise BenchError(f"--num-classes must be >= 2, got {num_classes}")
        torch.manual_seed(seed)
        if is_vit(arch):  # a ViT's supervised step: the CLS token into the classifier (patch_size, img_size)
            self.backbone = ViTBackbone(arch, patch_size=patch_size, img_size=img_size).train()
        else:
            self.backbone = ResNetBackbone(arch, small_input=small_input, width=width).train()
        self.classifier = nn.Linear(self.backbone.dim, num_classes)
        self.model = nn.ModuleDict({"backbone": self.backbone, "classifier": self.classifier})
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        g = torch.Generator().manual_seed(seed)
        self.images = images
        self.labels = torch.randint(0, num_classes, (images.shape[0],), generator=g)

    def __call__(self) -> Tensor:
        logits = self.classifier(self.backbone(self.images)["pooled"])
        loss = F.cross_entropy(logits, self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class MethodStep:
    """One iteration of the engine without Lightning: the same :func:`semssl.engine.step.optimisation_step`
    that :class:`semssl.engine.module.SSLModule` runs per batch.

    Built from a full config: ``SSLModule(cfg, global_batch)`` makes the method (and applies
    ``model.channels_last``), its optimiser (``configure_optimizers``) and its schedules, so the step runs the
    engine's own objects. Left out: Lightning's logging of the scalars and AMP (benchmarks run in fp32, as the
    CPU recipes do).
    """

    def __init__(self, cfg: Any, batch: dict, steps_per_epoch: int = 100) -> None:
        from semssl.engine.data import step_batch
        from semssl.engine.module import SSLModule

        if steps_per_epoch < 1:
            raise BenchError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.cfg = cfg
        self.module = SSLModule(cfg, global_batch=step_batch(cfg))
        self.module.build_schedules(steps_per_epoch)
        self.method = self.module.method.train()
        self.optimizer = self.module.configure_optimizers()
        self.batch = batch
        self.step = 0
        missing = [v for v in self.method.required_views(cfg.method) if v not in batch["views"]]
        if missing:
            raise BenchError(f"method '{cfg.method.name}' needs views {missing}; the batch has "
                             f"{sorted(batch['views'])}")

    def progress(self) -> Any:
        from semssl.engine.step import with_values
        from semssl.schedules import Progress

        spe, total = self.module.steps_per_epoch, self.module.total
        step = self.step % total
        return with_values(Progress(epoch=step // spe, step=step, steps_per_epoch=spe, total_steps=total),
                           self.module.schedules)

    def __call__(self, batch: Optional[dict] = None) -> Tensor:
        """One step on ``batch`` (default: the batch given at construction); returns the loss."""
        return self.run(batch)["loss"].detach()

    def run(self, batch: Optional[dict] = None) -> dict[str, Any]:
        """One step on ``batch``; returns the method's outputs and the schedule values used."""
        from semssl.engine.step import optimisation_step

        out = optimisation_step(self.method, self.optimizer, self.batch if batch is None else batch,
                                self.progress(), self.cfg)
        self.step += 1
        return out


# --------------------------------------------------------------------------------------------------------------
# FLOPs and time
# --------------------------------------------------------------------------------------------------------------
@dataclass
class FlopCount:
    """FLOPs of one call: the total and per aten op (``convolution``, ``convolution_backward``, ``mm``, ...)."""

    total: int
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def count_flops(fn: Callable[[], Any]) -> FlopCount:
    """Run ``fn`` once under ``FlopCounterMode`` and return what it counted.

    One multiply-add = 2 FLOPs; backward passes are counted when ``fn`` calls ``backward``. Elementwise ops
    have no FLOP formula in the counter and count 0 (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    by_op: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        name = str(op).removeprefix("aten.")
        by_op[name] = by_op.get(name, 0) + int(n)
    return FlopCount(total=int(counter.get_total_flops()), by_op=dict(sorted(by_op.items())))


def time_interleaved(steps: Mapping[str, Callable[[], Any]], n_steps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each step, run in rounds (A B A B ...) after ``warmup`` untimed rounds.

    Interleaving spreads the load of other processes on a shared machine over all steps alike, so the ratio of
    the medians is far steadier than either absolute time."""
    if n_steps < 1:
        raise BenchError(f"--steps must be >= 1, got {n_steps}")
    if warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {warmup}")
    if not steps:
        raise BenchError("time_interleaved: no steps given")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + n_steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min and max of a list of step times (seconds)."""
    xs = sorted(times)
    if not xs:
        raise BenchError("summarize: no times")
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0], xs[0], xs[0]]
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": xs[0], "max": xs[-1], "n": len(xs)}


def profile_steps(step: Callable[[], Any], n_steps: int = 3, row_limit: int = 20) -> tuple[str, dict[str, float]]:
    """Profile ``n_steps`` calls of ``step`` with ``torch.profiler`` (CPU).

    Returns the key-averages table sorted by self CPU time and ``{op name: self CPU ms per step}``, so two steps'
    op profiles can be compared to find where extra time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            step()
    averages = prof.key_averages()
    per_step = {e.key: e.self_cpu_time_total / 1000 / n_steps for e in averages}
    return averages.table(sort_by="self_cpu_time_total", row_limit=row_limit), per_step


# --------------------------------------------------------------------------------------------------------------
# Data pipeline
# --------------------------------------------------------------------------------------------------------------
def data_throughput(loader: Any, batches: int, warmup_batches: int = 2) -> dict[str, float]:
    """Samples/s of a loader yielding batch dicts (``batch["views"]``), in steady state: timed over ``batches``
    batches after ``warmup_batches`` (at least 1) untimed ones.

    The time to the first batch (worker start-up, first prefetch) is reported separately as ``startup_s``.
    ``cpu_ms_per_sample`` (main process + workers, from ``/proc``) does not depend on how much of the machine
    other processes leave us, unlike samples/s; ``cores_used`` = CPU seconds / wall seconds.
    """
    if batches < 1:
        raise BenchError(f"--batches must be >= 1, got {batches}")
    warmup_batches = max(1, warmup_batches)
    start = time.perf_counter()
    it = iter(loader)
    startup = 0.0
    for i in range(warmup_batches):
        _next_batch(it, i, warmup_batches + batches)
        if i == 0:
            startup = time.perf_counter() - start
    samples = views = 0
    cpu_from = tree_cpu_seconds(os.getpid())
    timed_from = time.perf_counter()
    for i in range(batches):
        batch = _next_batch(it, warmup_batches + i, warmup_batches + batches)
        samples += _batch_samples(batch)
        views += sum(int(v.shape[0]) for v in batch["views"].values())
    elapsed = time.perf_counter() - timed_from
    cpu = tree_cpu_seconds(os.getpid()) - cpu_from if cpu_from is not None else None
    del it
    return {"samples_per_s": samples / elapsed, "views_per_s": views / elapsed, "startup_s": startup,
            "seconds": elapsed, "samples": samples,
            "cpu_ms_per_sample": cpu * 1000 / samples if cpu is not None else None,
            "cores_used": cpu / elapsed if cpu is not None else None}


def _next_batch(it: Any, i: int, wanted: int) -> dict:
    try:
        return next(it)
    except StopIteration as err:
        raise BenchError(f"the loader ran out after {i} batches ({wanted} wanted: warm-up + timed); "
                         f"lower --batches or --batch") from err


def _batch_samples(batch: dict) -> int:
    if "index" in batch:
        return int(batch["index"].shape[0])
    first = next(iter(batch["views"].values()))
    return int(first.shape[0])


# --------------------------------------------------------------------------------------------------------------
# Memory of a process tree
# --------------------------------------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (Linux ``/proc``)."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds used so far by ``pid`` and its live descendants (e.g. data-loader workers);
    None without Linux ``/proc``. Unlike ``getrusage(RUSAGE_CHILDREN)`` it counts children that still run."""
    if not Path(f"/proc/{pid}/stat").exists():
        return None
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[-1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
    return ticks / os.sysconf("SC_CLK_TCK")


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; (0, 0) if it has gone. PSS splits shared pages among their users."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return rss, pss


class ProcessTreeSampler:
    """Samples the summed RSS and PSS of a process tree every ``interval`` seconds in a thread; keeps the peaks.

    Why both: ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is the peak of the *largest single* process, while the
    tree's total is what the machine has to hold. Summed RSS counts pages shared by forked data workers once
    per worker (an over-estimate); summed PSS shares them out (the better total). Sampling can miss a peak
    shorter than ``interval``.
    """

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss_kb = self.peak_pss_kb = self.max_processes = 0
        self.available = Path(f"/proc/{os.getpid()}/smaps_rollup").exists()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcessTreeSampler":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def sample(self) -> None:
        pids = process_tree(self.pid)
        rss = pss = 0
        for p in pids:
            r, s = _memory_kb(p)
            rss, pss = rss + r, pss + s
        self.peak_rss_kb, self.peak_pss_kb = max(self.peak_rss_kb, rss), max(self.peak_pss_kb, pss)
        self.max_processes = max(self.max_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def result_mb(self) -> dict[str, Optional[float]]:
        if not self.available:
            return {"tree_peak_rss_sum_mb": None, "tree_peak_pss_mb": None, "tree_max_processes": None}
        return {"tree_peak_rss_sum_mb": round(self.peak_rss_kb / 1024, 1),
                "tree_peak_pss_mb": round(self.peak_pss_kb / 1024, 1), "tree_max_processes": self.max_processes}


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    if any(len(r) != len(header) for r in rows):
        raise BenchError("markdown_table: every row needs one cell per header column")
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What a benchmark number depends on besides the code: versions, threads, CPU model, load."""
    import platform

    import torchvision

    from semssl.engine.run import cpu_model

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def script_main(name: str, args: Any, run: Callable[[Any], dict], report: Callable[[dict], str]) -> int:
    """The shared ending of a benchmark script: run, print the report, write ``--out`` JSON; clear errors."""
    from semssl.config import ConfigError

    try:
        res = run(args)
    except (BenchError, ConfigError) as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    print(report(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"\nwrote {args.out}")
    return 0
