"""The data root (semssl.data.root): ``$SEMSSL_DATA_DIR`` in recipes and path options, its default, the one-line
message for a missing dataset, and every packaged recipe's data reachable through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from semssl.cli import main
from semssl.config import PACKAGE_CONFIGS, list_recipes, load_config, load_yaml
from semssl.data import get
from semssl.data.root import DATA_ENV, GETTABLE, data_root, expand, missing_dataset
from semssl.data.synthetic import default_root
from semssl.engine.data import resolve_paths
from semssl.errors import DataError

DATA_KEYS = ("train", "train_root", "eval_train", "eval_test")
NAMED = re.compile(r"\$\{?SEMSSL_DATA_DIR\}?/([A-Za-z0-9_.-]+)")


def test_the_root_and_its_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path and default_root() == tmp_path / "synthetic"
    assert expand("$SEMSSL_DATA_DIR/a:${SEMSSL_DATA_DIR}/b") == f"{tmp_path}/a:{tmp_path}/b"
    assert expand("$SEMSSL_DATA_DIRX/a $HOME") == "$SEMSSL_DATA_DIRX/a $HOME"  # only this variable
    monkeypatch.delenv(DATA_ENV)
    assert data_root() == Path.home() / ".cache" / "semssl"  # the cache folder the built-in data always used
    assert expand("$SEMSSL_DATA_DIR/x") == str(Path.home() / ".cache" / "semssl" / "x")


def test_the_get_registry_is_the_root_list() -> None:
    assert tuple(get.DATASETS) == GETTABLE


def _recipe_names(path: Path) -> set[str]:
    return set(NAMED.findall(path.read_text()))


def test_every_packaged_recipe_resolves_its_data_through_the_root(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """No recipe names data beside the repository; every dataset a recipe (keys and commented commands alike) names
    under the root has a `semssl data get` entry; the config expands the root in every data path."""
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    used: set[str] = set()
    for path in sorted(PACKAGE_CONFIGS.glob("*.yaml")):
        assert "../shared" not in path.read_text(), path.name
        names = _recipe_names(path)
        assert names <= set(GETTABLE), f"{path.name} names {sorted(names - set(GETTABLE))}: no `semssl data get`"
        used |= names
    for recipe in list_recipes():
        cfg = load_config(recipe)
        raw = load_yaml(PACKAGE_CONFIGS / f"{recipe}.yaml").get("data", {})
        for key in DATA_KEYS:
            value = getattr(cfg.data, key)
            assert value is None or "$" not in value, (recipe, key, value)
            if isinstance(raw.get(key), str) and "SEMSSL_DATA_DIR" in raw[key]:
                assert Path(value).parent.is_relative_to(tmp_path), (recipe, key, value)
    assert {"cifar10-6k", "coco128"} <= used


def test_the_recipes_data_exist_under_the_tests_root() -> None:
    """With the tests' data root (the shared copies beside the repository, conftest.py), every recipe's data path
    exists; skipped where that root is absent."""
    missing = [name for name in ("cifar10-6k", "coco128", "stanford-background", "msrc-v2")
               if not (data_root() / name).is_dir()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not under the data root {data_root()}")
    for recipe in list_recipes():
        cfg = load_config(recipe)
        for key in DATA_KEYS:
            value = getattr(cfg.data, key)
            if value and not value.startswith("synthetic") and str(data_root()) in value:
                assert Path(value).exists(), (recipe, key, value)


def test_a_missing_dataset_is_one_line_naming_the_key_and_the_command(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    cfg = load_config("mocov2_resnet18_1x64-20e_cifar10-6k")
    with pytest.raises(DataError) as err:
        resolve_paths(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.train: ")
    assert str(tmp_path / "cifar10-6k" / "train") in message and "`semssl data get cifar10-6k`" in message
    assert DATA_ENV in message
    unknown = missing_dataset(tmp_path / "imagenet" / "train", "data.eval_test")
    assert unknown.startswith("data.eval_test: ") and "does not know it" in unknown and "cifar10" in unknown
    assert missing_dataset("/definitely/not/under/the/root") is None  # not under the root: the usual error


def test_path_options_expand_the_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert main(["data", "check", "$SEMSSL_DATA_DIR/coco128/images/train2017"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "coco128" / "images" / "train2017") in err
    assert "semssl data get coco128" in err
    (tmp_path / "coco128" / "images" / "train2017").mkdir(parents=True)
    main(["data", "check", "${SEMSSL_DATA_DIR}/coco128/images/train2017"])  # expanded: found, then read
    assert "not found" not in capsys.readouterr().err
