"""Real 2-process DDP on CPU (gloo), started from the test with torch.multiprocessing (spawn, 1 thread per rank).

Two process groups are spawned:

* ``_method_rank``: the MoCo-v2 method without Lightning, each rank on its half of a fixed global batch with
  gradients averaged by hand (what DDP does): the queue and pointer must be identical on both ranks and equal
  to a single process on the full batch, and so must the weights after 2 steps (the backbone uses frozen
  BatchNorm, so nothing depends on how the batch is split); the cross-rank shuffle-BN permutation must round
  trip; ``extract_features`` under a ``DistributedSampler`` over an odd-sized dataset and ``knn_evaluate`` must
  give every rank the single-process result.
* ``_engine_rank``: ``semssl.engine.run.pretrain`` in two already-launched processes (the environment torchrun
  sets; Lightning then uses them instead of launching its own), with the online kNN monitor and the final
  evaluation on.

Each rank writes its results to a file; the parent process loads them and asserts, so failures read plainly.
The same parity for every method (through the engine's step, 2 steps, float64) is in test_ddp_methods.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_overrides
from ddp_testing import free_port, load, spawn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from semssl.config import Config, load_config
from semssl.distributed import (
    all_reduce_mean,
    batch_shuffle,
    batch_unshuffle,
    concat_all_gather,
)
from semssl.engine.step import build_schedules
from semssl.eval.features import extract_features
from semssl.eval.knn import knn_evaluate
from semssl.methods import build_method
from semssl.methods.base import ema_update
from semssl.schedules import Progress

WORLD = 2
GLOBAL_BATCH = 8  # 4 images per rank
QUEUE = 12  # 2 steps x 8 keys: the second step wraps around
STEPS = 2
LR = 0.1
SPAWN_TIMEOUT_S = 50


# -- the method without Lightning -----------------------------------------------------------------------------------
def _method_config() -> Config:
    return load_config(None, ["model.arch=resnet18", "model.norm=frozen_bn", "model.bn_splits=1",
                              f"method.queue_size={QUEUE}", "method.proj_dim=16", "method.shuffle_bn=true"])


def _global_batch(step: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {name: torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g) for name in ("q", "k")}


def _moco_steps(rows: slice) -> dict[str, Tensor]:
    """Build the method (seed 0) and run ``STEPS`` steps on ``rows`` of each global batch: training_step, backward,
    gradients averaged over ranks, SGD step, EMA. Returns queue/pointer/loss after each step and the final state."""
    torch.manual_seed(0)
    cfg = _method_config()
    method = build_method(cfg)
    momentum = build_schedules(cfg, method, STEPS, STEPS, GLOBAL_BATCH)["momentum"]
    params = [p for _, p in method.named_trainable_parameters()]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    out: dict[str, Tensor] = {}
    for step in range(STEPS):
        views = {name: x[rows] for name, x in _global_batch(step).items()}
        torch.manual_seed(100 + step)  # the shuffle-BN permutation: same stream on every rank and process
        progress = Progress(epoch=0, step=step, steps_per_epoch=STEPS, total_steps=STEPS)
        res = method.training_step({"views": views}, progress)
        optimizer.zero_grad(set_to_none=True)
        res["loss"].backward()
        for p in params:
            p.grad.copy_(all_reduce_mean(p.grad))
        optimizer.step()
        for student, teacher in method.momentum_pairs():
            ema_update(student, teacher, momentum(progress))
        out[f"queue{step}"] = method.queue.queue.clone()
        out[f"ptr{step}"] = method.queue.ptr.clone()
        out[f"loss{step}"] = all_reduce_mean(res["loss"].detach())
    out.update({f"state.{k}": v.clone() for k, v in method.state_dict().items()})
    return out


def _first_keys() -> Tensor:
    """The keys a single process computes for the first global batch (initial key encoder, no shuffle)."""
    torch.manual_seed(0)
    method = build_method(_method_config())
    with torch.no_grad():
        return method.encoder_k(_global_batch(0)["k"])["z"]


def _shuffle_round_trip(rank: int) -> dict[str, Tensor]:
    torch.manual_seed(7)
    local = (torch.arange(4, dtype=torch.float32) + 4 * rank).view(4, 1).repeat(1, 3)
    shuffled, unshuffle = batch_shuffle(local)
    return {"shuffle.local": local, "shuffle.mine": shuffled, "shuffle.index": unshuffle,
            "shuffle.all": concat_all_gather(shuffled), "shuffle.back": batch_unshuffle(shuffled, unshuffle)}


# -- kNN -----------------------------------------------------------------------------------------------------------
class _Labelled(Dataset):
    """``n`` random 16-px images with labels (and, optionally, their index)."""

    def __init__(self, n: int, seed: int, with_index: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 16, 16, generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i], "label": int(self.labels[i])}
        if self.with_index:
            item["index"] = i
        return item


def _encoder() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _knn_features(rank: int | None) -> dict[str, Any]:
    """Features of an odd-sized train (13) and test (7) set; sharded when ``rank`` is given. The test set's
    items carry no index and its sampler shuffles: the order then comes from the sampler itself."""
    encoder, out = _encoder(), {}
    for split, n, seed, with_index in (("train", 13, 1, True), ("test", 7, 2, False)):
        dataset = _Labelled(n, seed, with_index)
        sampler = None
        if rank is not None:
            sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=not with_index, seed=5)
        loader = DataLoader(dataset, batch_size=3, sampler=sampler)
        out[f"{split}_x"], out[f"{split}_y"] = extract_features(encoder, loader)
    out["knn"] = knn_evaluate(out["train_x"], out["train_y"], out["test_x"], out["test_y"], ks=(3, 5))
    return out


def _method_rank(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg_init", rank=rank, world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        results.update(_shuffle_round_trip(rank))
        results.update(_moco_steps(slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)))
        results.update({f"knn.{k}": v for k, v in _knn_features(rank).items()})
        torch.save(results, Path(out_dir) / f"method_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def method_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_method")
    spawn(_method_rank, str(out), timeout_s=SPAWN_TIMEOUT_S)
    return [load(out / f"method_rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process() -> dict[str, Tensor]:
    """The same steps in one process on the full global batch."""
    torch.set_num_threads(1)
    return _moco_steps(slice(None))


def test_shuffle_bn_permutation_round_trips_across_ranks(method_ranks: list[dict]) -> None:
    r0, r1 = method_ranks
    everything = torch.cat([r0["shuffle.local"], r1["shuffle.local"]])
    assert torch.equal(r0["shuffle.all"], r1["shuffle.all"])  # one permutation, shared by both ranks
    assert sorted(r0["shuffle.all"][:, 0].tolist()) == everything[:, 0].tolist()  # a permutation of the batch
    assert not torch.equal(r0["shuffle.all"], everything)  # and not the identity
    assert set(r0["shuffle.mine"][:, 0].tolist()) & set(r1["shuffle.local"][:, 0].tolist())  # crosses ranks
    assert torch.equal(r0["shuffle.index"], r1["shuffle.index"])
    for r in method_ranks:
        assert torch.equal(r["shuffle.back"], r["shuffle.local"])


def test_queue_is_identical_on_both_ranks_and_equals_one_process(method_ranks: list[dict],
                                                                single_process: dict[str, Tensor]) -> None:
    single = single_process
    r0, r1 = method_ranks
    for step in range(STEPS):
        assert torch.equal(r0[f"queue{step}"], r1[f"queue{step}"]), f"step {step}: queues differ between ranks"
        assert int(r0[f"ptr{step}"]) == int(r1[f"ptr{step}"]) == int(single[f"ptr{step}"])
        torch.testing.assert_close(r0[f"queue{step}"], single[f"queue{step}"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r0[f"loss{step}"], single[f"loss{step}"], rtol=1e-5, atol=1e-6)
    assert [int(r0[f"ptr{s}"]) for s in range(STEPS)] == [8, 4]  # 8 keys per step into 12 slots
    # after step 0 the first 8 slots hold the global batch's keys in rank-major order (= single-process order)
    torch.testing.assert_close(r0["queue0"][:GLOBAL_BATCH], _first_keys(), rtol=1e-5, atol=1e-6)
    # step 1 wrapped: slots 8..11 and 0..3 are new, 4..7 still hold step 0's last 4 keys
    assert torch.equal(r0["queue1"][4:8], r0["queue0"][4:8])
    assert not torch.equal(r0["queue1"][:4], r0["queue0"][:4])


def test_weights_after_two_steps_match_one_process_on_the_full_batch(method_ranks: list[dict],
                                                                     single_process: dict[str, Tensor]) -> None:
    single = single_process
    r0, r1 = method_ranks
    state_keys = [k for k in single if k.startswith("state.")]
    assert any(".encoder_q." in k for k in state_keys) and any(".encoder_k." in k for k in state_keys)
    for key in state_keys:
        assert torch.equal(r0[key], r1[key]), f"{key}: ranks differ"
        torch.testing.assert_close(r0[key], single[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    conv = "state.encoder_q.backbone.conv1.weight"
    torch.manual_seed(0)
    initial = build_method(_method_config()).encoder_q.backbone.conv1.weight
    assert not torch.allclose(single[conv], initial)  # the steps did train


def test_knn_features_and_accuracy_are_the_same_on_every_rank(method_ranks: list[dict]) -> None:
    single = _knn_features(None)
    for rank, r in enumerate(method_ranks):
        for split, n in (("train", 13), ("test", 7)):
            x, y = r[f"knn.{split}_x"], r[f"knn.{split}_y"]
            assert x.shape == (n, 8), f"rank {rank} {split}: the sampler's padding duplicate was not dropped"
            assert torch.equal(y, single[f"{split}_y"]), f"rank {rank} {split}: not in dataset order"
            torch.testing.assert_close(x, single[f"{split}_x"], rtol=1e-5, atol=1e-6)
        assert r["knn.knn"] == single["knn"]
    assert method_ranks[0]["knn.knn"] == method_ranks[1]["knn.knn"]


# -- the engine under DDP ------------------------------------------------------------------------------------------
def _engine_overrides(synth_root: Path, out_dir: Path) -> list[str]:
    return tiny_overrides(synth_root, out_dir) + [
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=1",
        "data.batch_size=8", "trainer.knn_every_n_epochs=1", "trainer.num_threads=1",
        "eval.random_init=false", "eval.linear.epochs=3",
    ]


def _engine_rank(rank: int, port: int, overrides: list[str], out_dir: str) -> None:
    """One already-launched process, as torchrun starts it: the environment names the job, then pretrain()."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    from semssl.engine import monitor, run

    modules, evaluations, json_writes = [], [], []
    real_module, real_evaluate, real_write = run.SSLModule, run.evaluate, run.write_json

    class RecordedModule(real_module):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            modules.append(self)

    def evaluate(*args: Any, **kwargs: Any) -> dict:
        result = real_evaluate(*args, **kwargs)
        evaluations.append(result)
        return result

    def write_json(path: Path, data: Any) -> None:
        json_writes.append(str(path))
        real_write(path, data)

    run.SSLModule, run.evaluate, run.write_json = RecordedModule, evaluate, write_json
    monitor.evaluate = evaluate  # what the online kNN monitor calls
    cfg = load_config(None, overrides)
    if rank == 1:  # rank 1 names another folder, as it does when it starts a second later (a new timestamp)
        run.new_run_dir = lambda _: Path(cfg.trainer.out_dir) / "rank1-own-name"
    run_dir = run.pretrain(cfg)
    (module,) = modules
    torch.save({"run_dir": str(run_dir), "queue": module.method.queue.queue.clone(),
                "ptr": module.method.queue.ptr.clone(), "global_step": module.global_step,
                "state": {k: v.clone() for k, v in module.method.state_dict().items()},
                "evaluations": json.dumps(evaluations), "json_writes": json_writes},
               Path(out_dir) / f"engine_rank{rank}.pt")


@pytest.fixture(scope="module")
def engine_ranks(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp_engine")
    runs = out / "runs"
    spawn(_engine_rank, free_port(), _engine_overrides(tiny_synth, runs), str(out), timeout_s=SPAWN_TIMEOUT_S)
    return runs, [load(out / f"engine_rank{r}.pt") for r in range(WORLD)]


def test_engine_ranks_share_one_run_folder(engine_ranks: tuple[Path, list[dict]]) -> None:
    runs, (r0, r1) = engine_ranks
    assert r0["run_dir"] == r1["run_dir"]
    assert Path(r0["run_dir"]).name != "rank1-own-name"
    assert [p for p in runs.iterdir()] == [Path(r0["run_dir"])]  # no stray folder from rank 1
    run_dir = Path(r0["run_dir"])
    for name in ("config.yaml", "checkpoints/last.ckpt", "metrics.json", "logs/csv/metrics.csv"):
        assert (run_dir / name).is_file(), name
    assert r0["json_writes"] == [str(run_dir / "metrics.json")] and r1["json_writes"] == []
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["world_size"] == 2
    assert metrics["run"]["global_step"] == r0["global_step"] == r1["global_step"] == 6  # 96 / (2 x 8)


def test_engine_knn_is_identical_on_both_ranks(engine_ranks: tuple[Path, list[dict]], tiny_synth: Path) -> None:
    runs, (r0, r1) = engine_ranks
    evaluations = json.loads(r0["evaluations"])
    assert evaluations == json.loads(r1["evaluations"])  # kNN (and fast linear) numbers, bit for bit
    monitor, final = evaluations  # the online monitor after epoch 1, then the end-of-run evaluation
    assert monitor["knn_top1"] == final["knn_top1"]  # the same weights, evaluated twice
    metrics = json.loads((Path(r0["run_dir"]) / "metrics.json").read_text())
    assert metrics["trained"] == final
    assert metrics["run"]["knn_monitor"] == [{"epoch": 1, "knn_top1": monitor["knn_top1"]}]
    # the same checkpoint evaluated by one process gives the same kNN accuracy
    from semssl.checkpoints import load_model
    from semssl.eval.evaluate import evaluate

    model, _, _ = load_model(Path(r0["run_dir"]))
    cfg = load_config(None, _engine_overrides(tiny_synth, runs))
    single = evaluate(model, cfg, metrics["run"]["eval_train"], metrics["run"]["eval_test"],
                               linear=False)
    for key in ("knn_top1", "knn_top5", "k20_top1"):
        assert single[key] == final[key], key


def test_engine_checkpoint_holds_what_both_ranks_held(engine_ranks: tuple[Path, list[dict]]) -> None:
    """The queue, and every other parameter and buffer after the final evaluation. Regression: each rank kept
    the BatchNorm statistics of its own last batch, so the ranks evaluated their shards with different models,
    neither of them the checkpointed one (the kNN accuracy was 15.0 under DDP, 17.5 from the checkpoint)."""
    from semssl.checkpoints import safe_load

    _, (r0, r1) = engine_ranks
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["ptr"], r1["ptr"])
    state = safe_load(Path(r0["run_dir"]) / "checkpoints" / "last.ckpt")["state_dict"]
    assert torch.equal(state["method.queue.queue"], r0["queue"])
    assert int(state["method.queue.ptr"]) == int(r0["ptr"]) == (6 * 16) % 64  # 6 steps x 16 keys into 64 slots
    assert torch.allclose(state["method.queue.queue"].norm(dim=1), torch.ones(64))
    assert any(k.endswith("running_mean") for k in r0["state"])
    for rank, r in enumerate((r0, r1)):
        assert r["state"].keys() == {k.removeprefix("method.") for k in state}
        for key, value in r["state"].items():
            assert torch.equal(value, state[f"method.{key}"]), f"rank {rank}: {key} differs from the checkpoint"
