"""From a config to data loaders: sources -> views (with geometry) -> batch dicts.

Reproducibility: the training sampler yields ``(epoch, index)`` keys and the dataset seeds each sample's
augmentation from ``(seed, epoch, index)``. A sample's views therefore do not depend on the worker that made
them, on the number of workers or processes, or on whether the run was resumed — which is what makes
``--resume`` reproduce an uninterrupted run.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from semssl.data.regions import build_batch_transform
from semssl.data.root import missing_dataset
from semssl.data.sources import build_source
from semssl.data.synthetic import synth_config
from semssl.data.synthetic.build import ensure_synthetic
from semssl.data.views import Collate, MultiViewTransform
from semssl.errors import DataError

log = logging.getLogger("semssl.data")

_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (splitmix-style mixing)."""
    x = (seed * _MIX + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return (x ^ (x >> 29)) & (2**63 - 1)


class EpochSampler(Sampler):
    """Shuffles per epoch from ``seed + epoch``, shards across ranks (like DistributedSampler) and yields
    ``(epoch, index)`` keys. Drops the tail so every rank gets the same number of samples."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        if size < num_replicas:
            raise ValueError(f"dataset of {size} samples is smaller than the number of processes ({num_replicas})")
        self.size, self.num_replicas, self.rank, self.seed, self.shuffle = size, num_replicas, rank, seed, shuffle
        self.epoch = 0
        self.per_rank = size // num_replicas
        self._skip: tuple[int, int] = (-1, 0)  # (epoch, samples of this rank's order already trained on)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """Resume mid-epoch: in ``epoch`` only, skip the first ``samples_done`` samples of the epoch's *global*
        order (all ranks together: the ones the checkpoint already trained on), so a resumed run replays exactly
        what the checkpoint did not hold. ``len(self)`` stays the whole epoch, which is what the trainer's batch
        counting expects.

        Decision: counted in global terms, so a run may resume on another number of processes. Rank ``r`` of
        ``W`` takes ``order[r::W]`` (of the first ``per_rank x W``), so the first ``k`` batches of ``b`` of all
        ranks together are exactly ``order[:k x W x b]`` — the same samples as one process's first ``k`` batches
        of ``W x b``, in another order within each batch. Skipping ``samples_done / W`` of this rank's samples
        therefore leaves ``order[samples_done:]`` to the ranks together, whatever the layout that trained the
        first part (``samples_done`` is a multiple of ``W``: a resume keeps the global batch,
        :func:`semssl.engine.resume.check_layout`)."""
        total = self.per_rank * self.num_replicas
        if not 0 <= samples_done <= total or samples_done % self.num_replicas:
            raise ValueError(f"resume_at: {samples_done} samples done is not a multiple of {self.num_replicas} "
                             f"processes within this epoch's {total}")
        self._skip = (epoch, samples_done // self.num_replicas)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        mine = order[: self.per_rank * self.num_replicas][self.rank:: self.num_replicas]
        skip_epoch, skip = self._skip
        if self.epoch == skip_epoch:
            mine = mine[skip:]
        return iter((self.epoch, int(i)) for i in mine)


class ViewDataset(Dataset):
    """A source whose samples are turned into views; ``__getitem__((epoch, index))``."""

    def __init__(self, source: Dataset, transform: MultiViewTransform, seed: int = 0) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed = sample_seed(self.seed, epoch, index)
        sample = {**self.source[index], "seed": seed}  # batch transforms seed from their samples' seeds
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(sample)


def build_view_transform(cfg: Any) -> MultiViewTransform:
    """The per-sample view transform of ``cfg.data`` (views, proposal sampling)."""
    return MultiViewTransform(cfg.data.views, blur_reference_size=cfg.data.blur_reference_size,
                              region_sampling=cfg.data.region_sampling)


def build_collate(cfg: Any) -> Collate:
    """Collation into the Batch contract, then ``cfg.data.batch_transforms`` (seeded per batch from its samples)."""
    transforms = [build_batch_transform(**dict(item)) for item in cfg.data.batch_transforms]
    return Collate(transforms, seed=cfg.trainer.seed)


def resolve_paths(cfg: Any) -> dict[str, Optional[str]]:
    """Concrete paths of the training and evaluation data; generates the built-in data when it is used.

    ``synthetic`` = the built-in objects split; ``synthetic:scenes`` = its scenes (COCO JSON). A path under the
    data root that does not exist is a DataError of one line naming the key and ``semssl data get NAME``."""
    train, eval_train, eval_test = cfg.data.train, cfg.data.eval_train, cfg.data.eval_test
    uses_synth = train.startswith("synthetic") or any(
        p and p.startswith("synthetic") for p in (eval_train, eval_test))
    if uses_synth:
        root = ensure_synthetic(Path(cfg.data.synthetic.root) if cfg.data.synthetic.root else None,
                                synth_config(cfg))
        alias = {"synthetic": str(root / "objects" / "train"),
                 "synthetic:objects": str(root / "objects" / "train"),
                 "synthetic:scenes": str(root / "scenes" / "train" / "annotations.json")}
        if train.startswith("synthetic"):
            if train not in alias:
                from semssl.config import ConfigError

                raise ConfigError(f"data.train: unknown built-in split '{train}' ({', '.join(alias)})")
            eval_train = eval_train or str(root / "objects" / "train")
            eval_test = eval_test or str(root / "objects" / "test")
        train = alias.get(train, train)
        eval_train = alias.get(eval_train, eval_train) if eval_train else None
        eval_test = {"synthetic": str(root / "objects" / "test")}.get(eval_test, eval_test) if eval_test else None
    paths = {"train": train, "eval_train": eval_train, "eval_test": eval_test}
    for key, path in {**paths, "train_root": cfg.data.train_root}.items():
        problem = missing_dataset(path, f"data.{key}") if path else None
        if problem:
            raise DataError(problem)
    return paths


def build_train_dataset(cfg: Any, path: str) -> ViewDataset:
    regions = ({"proposals": True, "proposal_params": dict(cfg.data.proposal_params) or None}
               if cfg.data.proposals else {})
    if cfg.data.train_root:
        regions["root"] = cfg.data.train_root  # a file list's root; any other source refuses it by name
    source = build_source(path, on_error=cfg.data.on_error, **regions)
    if cfg.data.check_files and len(source) <= 20000 and hasattr(source, "check"):
        bad = source.check()
        if bad and cfg.data.on_error == "skip":
            log.warning("%d unreadable file(s) in %s will be skipped", len(bad), path)
        elif bad:  # on_error=raise: fail now, before any folder or step, naming the files
            reasons = source.bad_files
            shown = "; ".join(f"{f}: {reasons[f]}" for f in bad[:3]) + ("; ..." if len(bad) > 3 else "")
            raise DataError(f"{len(bad)} unreadable file(s) in {path} with data.on_error=raise ({shown}); "
                            "fix or remove them, or set data.on_error=skip to skip them")
    return ViewDataset(source, build_view_transform(cfg), seed=cfg.trainer.seed)


def ignore_requeue_signal(worker_id: int) -> None:
    """A training loader's ``worker_init_fn``: its workers ignore SIGUSR1, which SLURM sends to every process of a
    job and the training process handles (:mod:`semssl.engine.preempt`); by default it would kill them."""
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def train_loader(dataset: ViewDataset, cfg: Any, world_size: int = 1, rank: int = 0, epoch: int = 0,
                 batches_done: int = 0) -> DataLoader:
    """The training loader: ``(epoch, index)`` keys from an :class:`EpochSampler` already set to ``epoch``.

    Decision: the sampler starts at ``epoch`` (the epoch the run is at; > 0 on resume) and, when the run
    resumes from a checkpoint written mid-epoch, skips the ``batches_done`` global batches of that epoch the
    checkpoint already trained on (only in that epoch; ``batches_done x data.batch_size x world_size`` samples
    of the epoch's order, :meth:`EpochSampler.resume_at`). Lightning creates the loader's first iterator before
    it calls ``set_epoch``, and with workers the iterator prefetches indices at creation, so a resumed run would
    otherwise replay epoch 0's order in its first epoch.

    Decision: the loader has its own ``torch.Generator``. A DataLoader draws a base seed for its workers from
    ``loader.generator`` — the global RNG when none is given — each time it creates an iterator (every epoch,
    or once with persistent workers). Augmentations are seeded per sample, so that draw only disturbed the
    global RNG the method uses (shuffle-BN permutations), differently with and without workers and after a
    resume; with a private generator the method's random stream depends on neither.
    """
    batch = step_batch(cfg)
    steps_per_epoch(len(dataset), batch, world_size)  # a DataError when not one batch is full
    sampler = EpochSampler(len(dataset), world_size, rank, seed=cfg.trainer.seed)
    sampler.set_epoch(epoch)
    if batches_done:
        sampler.resume_at(epoch, batches_done * batch * world_size)  # in global terms
    workers = cfg.data.num_workers
    generator = torch.Generator().manual_seed(sample_seed(cfg.trainer.seed, epoch, -1 - rank))
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                      num_workers=workers, collate_fn=build_collate(cfg), persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers > 0 else None,
                      generator=generator, worker_init_fn=ignore_requeue_signal if workers > 0 else None)


def step_batch(cfg: Any) -> int:
    """Images per process and optimisation step: ``data.batch_size`` x ``trainer.accumulate_grad_batches`` (the
    loader's batch; the step splits it into micro-batches of ``data.batch_size``, semssl.engine.step)."""
    return cfg.data.batch_size * max(1, int(getattr(cfg.trainer, "accumulate_grad_batches", 1)))


def steps_per_epoch(dataset_size: int, batch_size: int, world_size: int) -> int:
    """Full batches per process and epoch (the loader drops the last partial one); a DataError if there are none."""
    steps = (dataset_size // world_size) // batch_size
    if steps == 0:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise DataError(f"data.train: {dataset_size} images are fewer than one batch (data.batch_size="
                        f"{batch_size}{processes}), so an epoch would have 0 steps; lower data.batch_size")
    return steps
