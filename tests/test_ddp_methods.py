"""DDP parity of every method: 2 gloo processes on CPU with 4 images each give the loss and the updated weights of
one process with all 8 (issue 30, point 1), and every multi-GPU recipe builds Lightning's DDP with SyncBN where
its method needs it.

The 2 ranks are spawned once for the module and run every case of ``ddp_methods_worker.CASES`` in turn (2 engine
steps each: ``engine.step.optimisation_step`` with DDP's gradient averaging as the backward, the methods' own
all-gathers and all-reduces); the single-process references run once in this process. A case is a method's small
recipe at ResNet-18 width 8 and 32 px (DINO and SCFS also at ViT-Tiny), batch 8 globally, with a GroupNorm
ResNet backbone and the heads' BatchNorm in eval mode (frozen statistics, trainable affine), so nothing depends on
how the batch is split (docs/design.md §Quality bar). The ``byol_train_bn`` control keeps BYOL's head BatchNorm in
training mode and must *not* agree: the comparison is sharp enough to see per-rank batch statistics.

Tolerance: the runs are in float64. The one computation that differs between the two settings is the order of
the sums (a mean over 8 rows against the mean of two means over 4, then the gradients' average over 2 ranks), about
1e-16 relative per operation. After the 2 steps the largest differences measured are 9e-16 (loss) and 5e-16
(weight or buffer) for the ResNet cases with SGD, and 1e-14 and 1.1e-12 for the ViT cases: AdamW divides by
``sqrt(v) + eps``, which turns a gradient's absolute rounding error into lr / eps = 1e5 times as much in a weight
whose gradient is near 0. ``rtol=1e-8, atol=1e-10`` leaves a margin of 100 or more above all of these, while a
coupling between the halves of the batch is far larger: a DINO centre updated from the rank's own teacher outputs
instead of the all-reduced ones moves the loss by 1e-5 and the centre by 2e-3 (measured by breaking it on purpose),
dropping the world-size factor of ``cluster_means`` moves DSC-KM's loss by 0.35, and the control's per-rank
BatchNorm by 0.21. A float32 tolerance (rtol 1e-4, atol 1e-5) would miss the first in the loss; and in float64 the
argmax decisions inside the steps (dense correspondence, k-means assignments) cannot flip on rounding, which could
make a float32 comparison flaky.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_methods_worker import CASES, STEPS, WORLD, rank_main, run_cases
from ddp_testing import load, spawn

from semssl.methods import available_methods

TOL = {"rtol": 1e-8, "atol": 1e-10}
PARITY = [name for name, case in CASES.items() if case.freeze_bn]
CONTROL = "byol_train_bn"
SPAWN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_methods")
    spawn(rank_main, str(out), list(CASES), timeout_s=SPAWN_TIMEOUT_S)
    return [load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict[str, dict]:
    """Every case in this process on the full batch (no process group: the distributed helpers are no-ops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cases(list(CASES), None)
    finally:
        torch.set_num_threads(threads)


def _results(name: str, ranks: list[dict], single: dict) -> tuple[dict, dict, dict]:
    r0, r1, one = ranks[0][name], ranks[1][name], single[name]
    for who, res in (("rank 0", r0), ("rank 1", r1), ("one process", one)):
        assert "error" not in res, f"{name} failed on {who}:\n{res['error']}"
    return r0, r1, one


def test_every_method_has_a_parity_case() -> None:
    assert {CASES[name].method for name in PARITY} == set(available_methods())


@pytest.mark.parametrize("name", PARITY)
def test_two_ranks_equal_one_process(name: str, ranks: list[dict], single: dict) -> None:
    """Loss of each step (the ranks' mean) and every parameter and buffer after 2 steps (student, EMA teacher,
    optimiser-free state: queues and their pointers, DINO/SCFS centres, k-means centroids, prototypes): the two
    ranks hold the same values bit for bit, and those equal one process on the full batch to ``TOL``."""
    r0, r1, one = _results(name, ranks, single)
    for res in (r0, r1, one):  # Lightning's "ddp" (find_unused_parameters=False) would stop on these
        assert res["unused"] == [], f"{name}: trainable parameters without a gradient: {res['unused']}"
    for step in range(STEPS):
        assert torch.equal(r0[f"loss{step}"], r1[f"loss{step}"])
        torch.testing.assert_close(r0[f"loss{step}"], one[f"loss{step}"], **TOL,
                                   msg=lambda m, s=step: f"{name} step {s} loss: {m}")
    keys = [k for k in one if k.startswith("state.")]
    assert keys and keys == [k for k in r0 if k.startswith("state.")]
    for key in keys:
        assert torch.equal(r0[key], r1[key]), f"{name} {key}: the ranks differ"
        torch.testing.assert_close(r0[key], one[key], **TOL, msg=lambda m, k=key: f"{name} {k}: {m}")
    # the steps did train: something moved by more than 1e-3, far beyond the tolerance, so the comparison matters
    moved = max(float((one[k] - one["initial." + k[6:]]).abs().max()) for k in keys if one[k].is_floating_point())
    assert moved > 1e-3, f"{name}: nothing moved ({moved})"
    changed = {k for k in keys if not torch.equal(one[k], one["initial." + k[6:]])}
    assert changed == {k for k in keys if not torch.equal(r0[k], r0["initial." + k[6:]])}


def test_batchnorm_in_training_mode_breaks_parity(ranks: list[dict], single: dict) -> None:
    """The control: BYOL with its projector's and predictor's BatchNorm normalising each rank's 4 images, not the 8
    of one process (what SyncBN would restore on GPUs). The loss differs far beyond ``TOL``, so the parity cases
    would see a rank-local batch statistic."""
    r0, r1, one = _results(CONTROL, ranks, single)
    assert torch.equal(r0["loss0"], r1["loss0"])
    gap = float((r0["loss0"] - one["loss0"]).abs() / one["loss0"].abs())
    assert gap > 1e-3, gap
    assert single["byol"]["frozen_bn"] and not one["frozen_bn"]


# -- the recipes' DDP ------------------------------------------------------------------------------------------------
#: How each method's paper code normalises across GPUs (docs/methods/<method>.md): SyncBN of the whole model (DINO
#: converts when the model has any BatchNorm, SCFS and SoCo always, D3SSL follows SoCo); shuffle-BN of the key batch
#: with per-GPU BatchNorm (MoCo-v2, DenseCL and DSC on it, SCD-MoCo; SCD-BYOL and BYOL-asym as MSF); per-GPU
#: BatchNorm without shuffle (BYOL as released in OpenSelfSup).
SYNC_BN = {"dino", "scfs", "soco", "d3ssl"}
SHUFFLE_BN = {"mocov2", "densecl", "dsc", "scd_mocov2", "scd_byol"}


def _multi_gpu_recipes() -> list[str]:
    from semssl.config import load_config
    from semssl.engine.run import world_size_of

    root = Path(__import__("semssl").__file__).parent / "configs"
    return [p.stem for p in sorted(root.glob("*.yaml")) if world_size_of(load_config(p.stem)) > 1]


def _has_batchnorm(cfg) -> bool:
    """Whether the recipe's method holds a BatchNorm (built on a narrow backbone of the same family)."""
    from semssl.config import load_config
    from semssl.methods import build_method
    from semssl.models.vit import is_vit

    small = ["model.arch=vit_tiny", "model.img_size=32", "model.patch_size=16"] if is_vit(cfg.model.arch) else \
        ["model.arch=resnet18", "model.width=8"]
    method = build_method(load_config(cfg.name, [*small, "method.out_dim=64"] if "out_dim" in vars(cfg.method)
                                      else small))
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules())


@pytest.mark.filterwarnings("ignore:You passed `Trainer:UserWarning")  # 16-mixed becomes bf16 on CPU
def test_multi_gpu_recipes_build_ddp_with_syncbn_where_the_method_needs_it(tmp_path: Path) -> None:
    """Every recipe for more than one device: the Trainer ``engine.run.build_trainer`` makes from it (on CPU here, not
    launched) is Lightning's DDP over devices x nodes processes, with SyncBatchNorm exactly when ``model.sync_bn``;
    ``model.sync_bn`` is on where the method's code converts to SyncBN and the model has a BatchNorm, and shuffle-BN
    is on for the methods that rely on it instead (SyncBN with BatchNorm over sub-batches would be a contradiction)."""
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
    from lightning.pytorch.strategies import DDPStrategy

    from semssl.config import load_config
    from semssl.engine.run import build_trainer, world_size_of

    names = _multi_gpu_recipes()
    assert {load_config(n).method.name for n in names} == set(available_methods())  # every method has one
    for name in names:
        cfg = load_config(name, ["trainer.accelerator=cpu", "trainer.progress_bar=false"])
        trainer = build_trainer(cfg, tmp_path / name, 1, [])
        strategy = trainer.strategy
        assert isinstance(strategy, DDPStrategy), (name, type(strategy).__name__)
        assert trainer.world_size == world_size_of(cfg) == cfg.trainer.devices * cfg.trainer.num_nodes > 1, name
        assert isinstance(strategy._layer_sync, TorchSyncBatchNorm) == cfg.model.sync_bn, name
        method = cfg.method.name
        if method in SYNC_BN and not cfg.model.sync_bn:
            assert not _has_batchnorm(cfg), f"{name}: {method} converts its BatchNorm to SyncBN; model.sync_bn is off"
        if method in SHUFFLE_BN:
            assert cfg.method.shuffle_bn and not cfg.model.sync_bn, name
        if cfg.model.sync_bn:
            assert cfg.model.bn_splits == 1, name


#: one ResNet case per method (ViTs have no BatchNorm in the backbone; DSC-KM has DSC's modules)
RESNET_CASE = {CASES[n].method: n for n in PARITY if not n.endswith(("_vit", "_kmeans"))}


@pytest.mark.parametrize("method", sorted(RESNET_CASE))
def test_syncbn_conversion_reaches_every_batchnorm(method: str) -> None:
    """Lightning's ``sync_batchnorm`` (``TorchSyncBatchNorm.apply``, what ``model.sync_bn`` switches on) converts
    every BatchNorm of the method — backbone (split BatchNorm included), projector, predictor, saliency net, search
    heads, and the EMA teachers' copies — and the EMA still pairs each student parameter with its teacher's."""
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    from ddp_methods_worker import case_config
    from semssl.methods import build_method
    from semssl.methods.base import ema_update
    from semssl.models.backbones import SplitBatchNorm2d

    case = CASES[RESNET_CASE[method]]
    cfg = case_config(case, 4)
    cfg.model.norm, cfg.model.bn_splits = "bn", 2
    m = build_method(cfg)
    assert any(isinstance(x, SplitBatchNorm2d) for x in m.modules())
    before = sum(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert before > 0
    m = TorchSyncBatchNorm().apply(m)
    kinds = [type(x) for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(kinds) == before and set(kinds) == {torch.nn.SyncBatchNorm}, method
    for student, teacher in m.momentum_pairs():
        assert any(isinstance(x, torch.nn.SyncBatchNorm) for x in teacher.modules()) == \
            any(isinstance(x, torch.nn.SyncBatchNorm) for x in student.modules())
        ema_update(student, teacher, 0.5)
