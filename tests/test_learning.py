"""A learning test for every method besides MoCo-v2 (whose own is ``test_contracts.py::test_a_tiny_run_learns``):
on a trivially easy set — 32 fixed images of smoothed noise, every view the image itself (resized to the view's
size) plus a little noise — a few dozen steps of the engine's own step (:class:`semssl.bench.MethodStep`) make
the loss fall and the method's own pretext accuracy or similarity rise, each by a stated margin.

Every threshold was measured on seeds 0-4 (``python tests/test_learning.py`` prints the values: the early and
late means of each measured quantity for every method and seed); the tests run seed 0. Each comment gives the
range over the 5 seeds and the threshold leaves room below the worst one.

Measures that the methods do not log are computed here from the networks' outputs in each step (a wrapper
records them before the loss pairs anything, so a pairing mistake in the loss shows as a falling measure):
* retrieval accuracy (BYOL, SCD-BYOL, SoCo, D3SSL): the share of the batch's images (SoCo, D3SSL: regions, the 4
  quadrants of each image) whose prediction is most similar, among the batch's target projections of the other
  view, to their own — what the loss pulls together, and a collapsed network cannot score above chance (1/16
  images, 1/64 regions);
* the same retrieval of DINO's logits (DINO, SCFS): the student's output of a crop against the teacher's outputs
  of the other crops of the batch;
* dense retrieval (DenseCL, DSC): the same over every position of the batch's dense projections (query position
  against every key position of every image; chance 1/256), what the dense InfoNCE pulls together;
* D3SSL's four NCE terms, each on its own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers of the other tests, also as a script

from semssl.bench import MethodStep  # noqa: E402
from semssl.config import DEFAULT_RECIPE, load_config  # noqa: E402

STEPS = 40
EARLY, LATE = slice(2, 10), slice(STEPS - 8, STEPS)  # as test_a_tiny_run_learns: after the queues hold real keys
N_IMAGES, BATCH = 32, 16
# A small network for every method: ResNet-18 at width 16 with the small-input stem (32 px -> layer4 4x4).
SMALL_NET = ["model.arch=resnet18", "model.width=16", "model.small_input=true", "optim.warmup=0",
             "optim.weight_decay=0", f"trainer.max_steps={STEPS}"]


def easy_images(seed: int = 0, size: int = 32) -> torch.Tensor:
    """The trivially easy set: ``N_IMAGES`` fixed images of smoothed Gaussian noise (as the MoCo-v2 test)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return F.avg_pool2d(torch.randn(N_IMAGES, 3, size, size, generator=g), 3, 1, 1) * 3


def easy_views(cfg: Any, images: torch.Tensor, i: int, g: torch.Generator, noise: float = 0.1) -> dict:
    """Batch ``i``: images ``16 * (i % 2)`` to ``+ 16``, every crop of every view of ``cfg.data.views`` the image
    resized to the view's size plus Gaussian noise (crop-major, as the data pipeline)."""
    idx = torch.arange(BATCH) + BATCH * (i % 2)
    views = {}
    for view in cfg.data.views:
        x = images[idx]
        if x.shape[-1] != view.size:
            x = F.interpolate(x, size=(view.size, view.size), mode="bilinear", align_corners=False, antialias=True)
        views[view.name] = torch.cat([x + noise * torch.randn(x.shape, generator=g) for _ in range(view.n_crops)])
    return {"views": views}


def train(cfg: Any, make_batch: Callable[[int, torch.Generator], dict], seed: int = 0,
          setup: Callable[[Any], None] | None = None) -> list[dict]:
    """``STEPS`` engine steps on ``make_batch(i, generator)``; ``setup(method)`` installs recorders first."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    step = MethodStep(cfg, make_batch(0, g), steps_per_epoch=2)
    if setup is not None:
        setup(step.method)
    return [step.run(make_batch(i, g)) for i in range(STEPS)]


def series(outs: list[dict], key: str) -> list[float]:
    return [float(torch.as_tensor(o[key]).detach()) for o in outs]


def mean(values: list[float], part: slice) -> float:
    chunk = values[part]
    return sum(chunk) / len(chunk)


def record(obj: Any, name: str, measure: Callable[[Any, tuple], float], into: list[float]) -> None:
    """Wrap ``obj.name`` so that every call appends ``measure(result, args)`` to ``into`` (no gradient)."""
    real = getattr(obj, name)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        with torch.no_grad():
            into.append(float(measure(result, args)))
        return result

    setattr(obj, name, wrapped)


def per_step(values: list[float], calls_per_step: int) -> list[float]:
    """Average the recorded values of each step (a symmetric method records one value per direction)."""
    return [sum(values[k:k + calls_per_step]) / calls_per_step for k in range(0, len(values), calls_per_step)]


def retrieval_accuracy(p: torch.Tensor, z: torch.Tensor) -> float:
    """Percent of rows ``i`` of ``p`` ``[N, D]`` whose most similar row of ``z`` (cosine) is row ``i``."""
    sim = F.normalize(p.float(), dim=1) @ F.normalize(z.float(), dim=1).t()
    return float((sim.argmax(dim=1) == torch.arange(p.shape[0])).float().mean() * 100)


# ----------------------------------------------------------------------------------------- BYOL, SCD
BYOL_RECIPE = "byol_resnet18_1x64-400it_synthetic"
SCD_MOCO = "scd_mocov2_resnet18_1x64-400it_synthetic"
SCD_BYOL = "scd_byol_resnet18_1x64-400it_synthetic"
TWO_VIEWS_32 = [f"data.batch_size={BATCH}", "data.views.0.size=32", "data.views.1.size=32"]
SMALL_BYOL_HEADS = ["method.proj_hidden_dim=256", "method.pred_hidden_dim=256", "method.proj_dim=64"]


def run_byol(seed: int = 0) -> dict[str, list[float]]:
    cfg = load_config(BYOL_RECIPE, [*SMALL_NET, *TWO_VIEWS_32, *SMALL_BYOL_HEADS, "optim.lr=0.8"])
    images, retrieval = easy_images(seed), []
    setup = lambda m: record(m, "regress", lambda out, _: retrieval_accuracy(out["p"], out["target"]["z"]),  # noqa
                             retrieval)
    outs = train(cfg, lambda i, g: easy_views(cfg, images, i, g), seed, setup)
    return {"loss": series(outs, "loss"), "retrieval": per_step(retrieval, 2)}


def run_scd(recipe: str, seed: int = 0) -> dict[str, list[float]]:
    """SCD-MoCo with ``proj_batch_norm`` (so H^s, a fresh copy of the projector, has a BatchNorm, as SCD-BYOL's):
    with MoCo-v2's BN-free projector the fg and bg embeddings stayed alike (both cosines about 0.9) and L_d moved
    0.499 -> 0.498 in the 40 steps (seeds 0-4); lambda_d 2, margin 0.3 or lr 3.2 moved it by < 0.02 (seeds 0-1)."""
    extra = (["method.queue_size=32", "model.bn_splits=2", "optim.lr=1.6", "method.proj_batch_norm=true"]
             if "mocov2" in recipe else [*SMALL_BYOL_HEADS, "optim.lr=0.8"])
    cfg = load_config(recipe, [*SMALL_NET, *TWO_VIEWS_32, *extra])
    images, retrieval = easy_images(seed), []
    setup = None
    if "byol" in recipe:
        setup = lambda m: record(m, "regress", lambda out, _: retrieval_accuracy(out["p"], out["target"]["z"]),  # noqa
                                 retrieval)
    outs = train(cfg, lambda i, g: easy_views(cfg, images, i, g), seed, setup)
    res = {"loss": series(outs, "loss"), "loss_d": series(outs, "loss_d"),
           "fg_gap": [a - b for a, b in zip(series(outs, "cos_fg_fg"), series(outs, "cos_fg_bg"))]}
    if "mocov2" in recipe:
        res["acc1"] = series(outs, "acc1")
    else:
        res["retrieval"] = retrieval
    return res


# ----------------------------------------------------------------------------------------- DenseCL, DSC
def run_dense(name: str, seed: int = 0, *overrides: str) -> dict[str, list[float]]:
    cfg = load_config(DEFAULT_RECIPE, [f"method.name={name}", *SMALL_NET, *TWO_VIEWS_32, "method.queue_size=32",
                                       "method.dense_queue_size=32", "model.bn_splits=2", "optim.lr=1.6",
                                       *overrides])
    images, retrieval = easy_images(seed), []

    def measure(out, _):  # dense_contrast: query and key dense projections [B, S, D], same positions (no warp)
        return retrieval_accuracy(out["q"]["dense"].flatten(0, 1), out["k"]["dense"].flatten(0, 1))

    outs = train(cfg, lambda i, g: easy_views(cfg, images, i, g), seed,
                 lambda m: record(m, "dense_contrast", measure, retrieval))
    res = {**{k: series(outs, k) for k in ("loss", "acc1", "acc_dense", "loss_pix")}, "dense_retrieval": retrieval}
    if name == "dsc":
        res["loss_sem"] = series(outs, "loss_sem")
    return res


# ----------------------------------------------------------------------------------------- DINO, SCFS
def dino_cfg(name: str, **method: Any):
    """test_dino's tiny config (2 global crops of 32 px, 2 local crops of 16 px) at batch 16 on the small network.

    Decision: BatchNorm in the head (``use_bn_in_head``). With DINO's default head the tiny set collapses at once:
    for lr 0.2-0.8, teacher temperature 0.02-0.07, EMA momentum 0.9-0.996 and center momentum 0.5-0.9 (seeds
    0-1) the retrieval below fell from 35 % to chance (6 %) within 4 steps and the loss rose to log(out_dim)
    (uniform targets) — the pooled features of the 32 images are too alike at initialisation for the centering
    alone."""
    from test_dino import tiny_cfg

    cfg = tiny_cfg(name, n_local=2, method={"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 32,
                                             "use_bn_in_head": True, "freeze_last_layer": 0,
                                             "warmup_teacher_temp": 0.04, "teacher_temp": 0.04,
                                             "warmup_teacher_temp_epochs": 0, "momentum": 0.99,
                                             "momentum_end": None, **method},
                   optim={"lr": 0.8, "warmup": 0, "weight_decay": 0.0, "weight_decay_end": 0.0},
                   trainer={"max_steps": STEPS})
    cfg.data.batch_size = BATCH
    cfg.model.width, cfg.model.small_input = 16, True
    return cfg


def crop_retrieval(s_logits: torch.Tensor, t_logits: torch.Tensor) -> float:
    """:func:`retrieval_accuracy` of the student logits of crop v against the teacher logits of crop i, over the
    pairs (i, v != i) the DINO loss compares (``[V, B, K]``, ``[G, B, K]``)."""
    accs = [retrieval_accuracy(s_logits[v], t_logits[i]) for i in range(t_logits.shape[0])
            for v in range(s_logits.shape[0]) if v != i]
    return sum(accs) / len(accs)


def run_dino(name: str = "dino", seed: int = 0, **method: Any) -> dict[str, list[float]]:
    cfg = dino_cfg(name, **method)
    images, student, teacher = easy_images(seed), [], []

    def setup(m):  # the logits as the two networks return them, before the loss pairs any crops
        real_student, real_teacher = m.student.forward_crops, m.teacher.forward

        def student_crops(xs):
            outs = real_student(xs)
            student.append(torch.cat([o["logits"] for o in outs]).detach())
            return outs

        def teacher_forward(x):
            out = real_teacher(x)
            teacher.append(out["logits"].detach())
            return out

        m.student.forward_crops, m.teacher.forward = student_crops, teacher_forward

    outs = train(cfg, lambda i, g: easy_views(cfg, images, i, g), seed, setup)
    retrieval = [crop_retrieval(s.view(-1, BATCH, s.shape[-1]), t.view(-1, BATCH, t.shape[-1]))
                 for s, t in zip(student, teacher)]  # crop-major: [crops * B, K]
    res = {"loss": series(outs, "loss"), "retrieval": retrieval}
    if name == "scfs":
        res["loss_search"] = series(outs, "loss_search")
    return res


# ----------------------------------------------------------------------------------------- SoCo, D3SSL
QUADRANTS = torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]], dtype=torch.float32)


def region_views(cfg: Any, images: torch.Tensor, i: int, g: torch.Generator) -> dict:
    """:func:`easy_views` plus proposals: the 4 quadrants of every view (ids 0-3, all valid), scaled to its size."""
    batch = easy_views(cfg, images, i, g)
    batch["proposals"], batch["proposal_ids"], batch["proposal_valid"] = {}, {}, {}
    names = [v.name for v in cfg.data.views] + (["x3"] if cfg.method.name == "d3ssl" else [])
    if "x3" in names:  # D3SSL's de-positioning view, here one more noisy copy of x2 with its boxes
        batch["views"]["x3"] = batch["views"]["x2"] + 0.1 * torch.randn(batch["views"]["x2"].shape, generator=g)
    for name in names:
        size = batch["views"][name].shape[-1]
        batch["proposals"][name] = (QUADRANTS * size / 32).expand(BATCH, 4, 4).clone()
        batch["proposal_ids"][name] = torch.arange(4).expand(BATCH, 4).clone()
        batch["proposal_valid"][name] = torch.ones(BATCH, 4, dtype=torch.bool)
    return batch


def region_cfg(recipe: str, *overrides: str):
    from region_testing import load_region_recipe

    small = ["data.views.2.size=16", "method.bank_size=128"] if "d3ssl" in recipe else []
    return load_region_recipe(recipe, [*SMALL_NET, *TWO_VIEWS_32, *small, "method.roi_size=4",
                                       "method.roi_size_small=2", "method.proj_hidden_dim=256",
                                       "method.proj_dim=64", "model.bn_splits=2", *overrides])


def region_retrieval(result: Any, args: tuple) -> float:
    """``pair_loss(student slots, teacher slots)``: :func:`retrieval_accuracy` of every student slot among all 64
    teacher slots of the batch (the quadrants hold the same ids in every view, so slot i's match is slot i)."""
    s, t = args
    return retrieval_accuracy(s["q"].reshape(-1, s["q"].shape[-1]), t["z"].reshape(-1, t["z"].shape[-1]))


def run_soco(seed: int = 0) -> dict[str, list[float]]:
    cfg = region_cfg("soco_resnet18_1x32-300it_scenes", "method.pred_hidden_dim=256", "optim.lr=0.8")
    images, retrieval = easy_images(seed), []
    outs = train(cfg, lambda i, g: region_views(cfg, images, i, g), seed,
                 lambda m: record(m, "pair_loss", region_retrieval, retrieval))
    return {"loss": series(outs, "loss"), "retrieval": per_step(retrieval, 2)}


def run_d3ssl(seed: int = 0) -> dict[str, list[float]]:
    cfg = region_cfg("d3ssl_resnet18_1x32-300it_scenes", "optim.lr=0.8")
    images, terms, retrieval = easy_images(seed), [], []

    def setup(m):  # pair_loss calls: NCE(z_s1, z_t2), NCE(z_s2, z_t1) (L_dc), NCE(z_s3, z_t2), NCE(z_s3, z_t1) (L_dp)
        record(m, "pair_loss", lambda result, _: result[0], terms)
        record(m, "pair_loss", region_retrieval, retrieval)

    outs = train(cfg, lambda i, g: region_views(cfg, images, i, g), seed, setup)
    res = {k: series(outs, k) for k in ("loss", "acc1", "loss_dc", "loss_dp")}
    res.update({f"nce{i + 1}": terms[i::4] for i in range(4)})
    res["retrieval"] = per_step(retrieval, 4)
    return res


RUNS: dict[str, Callable[[int], dict[str, list[float]]]] = {
    "byol": run_byol,
    "scd_mocov2": lambda seed: run_scd(SCD_MOCO, seed),
    "scd_byol": lambda seed: run_scd(SCD_BYOL, seed),
    "densecl": lambda seed: run_dense("densecl", seed),
    "dsc": lambda seed: run_dense("dsc", seed, "method.semantic=prototypes", "method.num_prototypes=16",
                                  "method.freeze_prototypes_iters=0"),
    "dino": lambda seed: run_dino("dino", seed),
    "scfs": lambda seed: run_dino("scfs", seed, stages=["layer2", "layer3", "layer4"], stage_hidden_dim=32,
                                  stage_mid_channels=16, stage_out_dim=16),
    "soco": run_soco,
    "d3ssl": run_d3ssl,
}


# ----------------------------------------------------------------------------------------- the tests
# Each threshold: the range of early -> late means measured over seeds 0-4 (python tests/test_learning.py, the
# CPU of 2026-12-07), then a bound below the worst seed. "ratio" = late / early.
def falls(values: list[float], ratio: float) -> bool:
    return mean(values, LATE) < ratio * mean(values, EARLY)


def rises(values: list[float], by: float) -> bool:
    return mean(values, LATE) > mean(values, EARLY) + by


def test_byol_learns() -> None:
    res = run_byol()
    assert falls(res["loss"], 0.92), res["loss"]  # ratio 0.76-0.85 (1.49-1.73 -> 1.25-1.37)
    assert rises(res["retrieval"], 10), res["retrieval"]  # +18-36 points (18-23 % -> 38-59 %; chance 6 %)


def test_scd_mocov2_learns() -> None:
    res = run_scd(SCD_MOCO)
    assert falls(res["loss"], 0.6), res["loss"]  # ratio 0.45-0.48
    assert rises(res["acc1"], 30), res["acc1"]  # MoCo's pretext accuracy: +48-58 points (5-14 % -> 57-67 %)
    # SCD's own term: L_d falls by 0.031-0.097 (0.500-0.505 -> 0.403-0.474) and the foreground anchor moves
    # towards view 2's foreground rather than its background: cos(fg, fg) - cos(fg, bg) +0.056-0.180
    assert mean(res["loss_d"], LATE) < mean(res["loss_d"], EARLY) - 0.015, res["loss_d"]
    assert rises(res["fg_gap"], 0.03), res["fg_gap"]


def test_scd_byol_learns() -> None:
    res = run_scd(SCD_BYOL)
    assert falls(res["loss"], 0.92), res["loss"]  # ratio 0.80-0.87 (1.07-1.20 -> 0.90-0.99)
    assert rises(res["retrieval"], 8), res["retrieval"]  # +13-31 points (13-24 % -> 27-53 %)
    # L_d falls by 0.022-0.071 (0.498-0.505 -> 0.431-0.482); cos(fg, fg) - cos(fg, bg) +0.049-0.133
    assert mean(res["loss_d"], LATE) < mean(res["loss_d"], EARLY) - 0.01, res["loss_d"]
    assert rises(res["fg_gap"], 0.025), res["fg_gap"]


def test_densecl_learns() -> None:
    res = run_dense("densecl")
    assert falls(res["loss"], 0.8), res["loss"]  # ratio 0.48-0.68
    assert rises(res["acc1"], 15), res["acc1"]  # +25-41 points (26-42 % -> 59-72 %)
    # acc_dense is 96-100 % from the start (the pooled dense queue is an easy set of negatives), no room; the
    # dense retrieval (query position -> its own key position among all 256) does: +15-44 points (35-51 % ->
    # 50-92 %)
    assert rises(res["dense_retrieval"], 8), res["dense_retrieval"]


def test_dsc_learns() -> None:
    res = RUNS["dsc"](0)  # DSC-PM (the default semantic term), prototypes trained from the first step
    assert falls(res["loss"], 0.6), res["loss"]  # ratio 0.44-0.51 (10.3-10.9 -> 4.7-5.5)
    assert falls(res["loss_sem"], 0.6), res["loss_sem"]  # DSC's own term, L_PM: ratio 0.41-0.47 (5.4-5.6 -> 2.2-2.6)
    assert rises(res["acc1"], 20), res["acc1"]  # +35-50 points
    assert rises(res["dense_retrieval"], 12), res["dense_retrieval"]  # +20-43 points (10-19 % -> 30-61 %)


def test_dino_learns() -> None:
    res = run_dino("dino")
    assert falls(res["loss"], 0.65), res["loss"]  # ratio 0.28-0.48 (4.5-4.9 -> 1.3-2.4)
    assert rises(res["retrieval"], 30), res["retrieval"]  # +49-67 points (26-44 % -> 93-99 %)


def test_scfs_learns() -> None:
    res = RUNS["scfs"](0)
    assert falls(res["loss"], 0.65), res["loss"]  # ratio 0.39-0.50 (13.2-14.4 -> 5.2-7.2)
    assert falls(res["loss_search"], 0.55), res["loss_search"]  # SCFS's own local-vs-searched term: 0.34-0.41
    assert rises(res["retrieval"], 30), res["retrieval"]  # +50-66 points (20-30 % -> 78-93 %)


def test_soco_learns() -> None:
    res = run_soco()
    # the loss is -2 cos summed over the two directions (bounded below by -4): -2.66..-2.82 -> -3.12..-3.25,
    # down by 0.33-0.56
    assert mean(res["loss"], LATE) < mean(res["loss"], EARLY) - 0.2, res["loss"]
    assert rises(res["retrieval"], 20), res["retrieval"]  # regions: +35-56 points (25-38 % -> 61-90 %; chance 2 %)


def test_d3ssl_learns() -> None:
    res = run_d3ssl()
    assert falls(res["loss"], 0.7), res["loss"]  # ratio 0.58-0.60 (10.4-11.3 -> 6.0-6.6)
    assert rises(res["acc1"], 10), res["acc1"]  # the region NCE's accuracy against the bank: +19-22 points
    assert rises(res["retrieval"], 10), res["retrieval"]  # regions, as SoCo's: +17-20 points (77-80 % -> 97-99 %)
    # each of Eq. 10's four NCE terms on its own (L_dc: s1-t2, s2-t1; L_dp: s3-t2, s3-t1): ratio 0.61-0.62,
    # 0.51-0.56, 0.60-0.62, 0.61-0.62
    for i in range(1, 5):
        assert falls(res[f"nce{i}"], 0.75), (i, res[f"nce{i}"])


if __name__ == "__main__":  # the measurements behind the thresholds: python tests/test_learning.py [method ...]
    import time

    torch.set_num_threads(1)
    for name in sys.argv[1:] or list(RUNS):
        for seed in range(5):
            start = time.perf_counter()
            res = RUNS[name](seed)
            cells = ", ".join(f"{k} {mean(v, EARLY):.3f} -> {mean(v, LATE):.3f}" for k, v in res.items())
            print(f"{name} seed {seed} ({time.perf_counter() - start:.1f} s): {cells}", flush=True)
