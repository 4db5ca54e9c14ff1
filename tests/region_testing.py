"""Helpers of the region-method tests (test_soco, test_d3ssl, test_region_augs): recipes on the tiny built-in
scenes and real collated batches with selective-search proposals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from conftest import TINY_SYNTH

from semssl.config import (
    Config,
    DataConfig,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    recipe_path,
)


def tiny_scene_overrides(synth_root: Path, out_dir: Path, small_view: bool = False) -> list[str]:
    s = TINY_SYNTH
    views = ["data.views.0.size=64", "data.views.1.size=64"] + (["data.views.2.size=32"] if small_view else [])
    return [
        f"data.synthetic.root={synth_root}", f"data.synthetic.object_size={s.object_size}",
        f"data.synthetic.scene_size={s.scene_size}", f"data.synthetic.n_train_objects={s.n_train_objects}",
        f"data.synthetic.n_test_objects={s.n_test_objects}", f"data.synthetic.n_train_scenes={s.n_train_scenes}",
        f"data.synthetic.n_test_scenes={s.n_test_scenes}", f"data.synthetic.num_classes={s.num_classes}",
        f"data.synthetic.workers={s.workers}", "data.batch_size=4", "data.num_workers=0", *views,
        "data.eval_size=32", "model.arch=resnet18", "model.width=16", "method.roi_size=4", "method.roi_size_small=2",
        "method.proj_hidden_dim=32", "method.proj_dim=16", f"trainer.out_dir={out_dir}", "trainer.progress_bar=false",
    ]


PROPOSAL_KEYS = ("proposals", "proposal_params")


def has_proposals_key() -> bool:
    return set(PROPOSAL_KEYS) <= {f.name for f in dataclasses.fields(DataConfig)}


def recipe_data(name: str) -> dict:
    """The recipe's ``data`` section as written (YAML, ``base`` resolved)."""
    return load_yaml(recipe_path(name))["data"]


def load_region_recipe(name: str, overrides: list[str]) -> Config:
    """``load_config``, tolerating a config tree without ``data.proposals`` / ``data.proposal_params`` yet (the
    keys the region recipes set; until the engine reads them the tests attach proposals themselves, see
    :func:`region_batch`)."""
    if has_proposals_key():
        return load_config(name, overrides)
    data = apply_overrides(load_yaml(recipe_path(name)), overrides)
    for key in PROPOSAL_KEYS:
        data["data"].pop(key, None)
    data.setdefault("name", name)
    return from_dict(Config, data)


def region_batch(cfg: Config, batch_size: int) -> dict:
    """A real collated batch of the recipe's training scenes, their proposals attached (cache computed on first
    use), through the recipe's views, region sampling and batch transforms."""
    from semssl.data.sources import CocoSource
    from semssl.engine.data import (
        ViewDataset,
        build_collate,
        build_view_transform,
        resolve_paths,
    )

    source = CocoSource(resolve_paths(cfg)["train"], proposals=True)
    dataset = ViewDataset(source, build_view_transform(cfg), seed=cfg.trainer.seed)
    return build_collate(cfg)([dataset[(0, i)] for i in range(batch_size)])
