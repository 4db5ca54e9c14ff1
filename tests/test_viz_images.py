"""How every ``semssl viz`` command gathers its images (``semssl.viz.images``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides

from semssl.data.sources import load_image
from semssl.errors import DataError
from semssl.viz.images import gather, image_files, spread


def test_a_scene_folder_is_read_through_images_not_its_masks(tiny_synth: Path) -> None:
    split = tiny_synth / "scenes" / "test"            # images/ beside semantic/ (class-index masks)
    assert (split / "semantic").is_dir()
    files = image_files([split], 1000)
    assert files and all(f.parent.name == "images" for f in files)
    assert [name for name, _ in gather([split], 1000)] == [f.name for f in files]


def test_coco_json_and_synthetic_scenes_give_the_same_pictures(tiny_synth: Path) -> None:
    from semssl.config import DEFAULT_RECIPE, load_config

    cfg = load_config(DEFAULT_RECIPE, tiny_overrides(tiny_synth, tiny_synth / "runs"))
    by_json = gather([tiny_synth / "scenes" / "train" / "annotations.json"], 3)
    by_name = gather(["synthetic:scenes"], 3, cfg)
    assert len(by_json) == 3 and [n for n, _ in by_json] == [n for n, _ in by_name]
    images = tiny_synth / "scenes" / "train" / "images"
    for (name, a), (_, b) in zip(by_json, by_name):
        pixels = np.asarray(load_image(images / name))
        assert np.array_equal(np.asarray(a), pixels) and np.array_equal(np.asarray(b), pixels), name
    assert not np.array_equal(np.asarray(by_json[0][1]), np.asarray(by_json[1][1]))  # three different pictures


def test_spread_keeps_the_ends_and_bad_input_names_the_path(tmp_path: Path) -> None:
    assert spread(list(range(10)), 3) == [0, 4, 9] and spread([1, 2], 5) == [1, 2]
    with pytest.raises(DataError, match="nowhere"):
        image_files([tmp_path / "nowhere"], 2)
    with pytest.raises(DataError, match="no image files"):
        image_files([tmp_path], 2)
