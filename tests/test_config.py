"""Config tree: recipes, overrides, typed validation with suggestions."""

import re
from pathlib import Path

import pytest

from semssl.config import (
    DEFAULT_RECIPE,
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    list_recipes,
    load_config,
    load_yaml,
    parse_override,
    to_dict,
)


def test_every_packaged_recipe_loads():
    names = list_recipes()
    assert DEFAULT_RECIPE in names
    for name in names:
        cfg = load_config(name)
        assert cfg.method.name
        assert from_dict(Config, to_dict(cfg)) == cfg  # round trip


def test_overrides_are_typed_and_applied():
    cfg = load_config(DEFAULT_RECIPE, ["optim.lr=0.1", "data.batch_size=32", "data.views.0.size=48",
                                       "method.queue_size=512", "trainer.devices=2", "optim.warmup=5%"])
    assert cfg.optim.lr == 0.1 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 32
    assert cfg.data.views[0].size == 48 and cfg.data.views[1].size != 48
    assert cfg.method.queue_size == 512
    assert cfg.trainer.devices == 2
    assert cfg.optim.warmup == "5%"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "did you mean 'lr'"),
    ("optimm.lr=0.1", "did you mean 'optim'"),
    ("method.queue_sise=3", "did you mean 'queue_size'"),
    ("data.batch_size=abc", "data.batch_size: expected an integer"),
    ("optim.name=sgdd", "did you mean 'sgd'"),
    ("model.arch=resnet19", "model.arch"),
    ("data.views.5.size=3", "list of 2 items"),
    ("trainer.progress_bar=3", "expected true/false"),
    ("method.name=mocov3", "unknown method 'mocov3'"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(DEFAULT_RECIPE, [override])


def test_unknown_recipe_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(DEFAULT_RECIPE[:-2])


def test_recipe_base_and_bad_yaml(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("method: {name: mocov2, queue_size: 256}\noptim: {lr: 0.5}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\noptim: {weight_decay: 0.001}\n")
    data = load_yaml(child)
    assert data["optim"] == {"lr": 0.5, "weight_decay": 0.001}
    cfg = load_config(child)
    assert cfg.method.queue_size == 256 and cfg.optim.lr == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_yaml(loop)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        apply_overrides({}, ["optim..lr=1"])


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path):
    # PyYAML (YAML 1.1) reads "1e-4" as a string; recipes and overrides read it as a number.
    cfg = load_config(None, ["optim.weight_decay=1e-4", "optim.lr=5E-2", "method.temperature=.2e0"])
    assert cfg.optim.weight_decay == pytest.approx(1e-4)
    assert cfg.optim.lr == pytest.approx(0.05)
    assert cfg.method.temperature == pytest.approx(0.2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {DEFAULT_RECIPE}\noptim: {{weight_decay: 2e-5}}\nname: e1\n")
    assert load_config(str(recipe), []).optim.weight_decay == pytest.approx(2e-5)
    assert parse_override("name=1e")[1] == "1e"  # not a number: stays a string


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=12", "not divisible by model.bn_splits"),  # the main recipe splits BN 8 ways
    ("optim.lr=-0.1", "optim.lr"),
    ("data.views.0.scale=[0.9,0.2]", "scale"),
    ("data.views.0.scale=[0,0]", "scale"),
    ("data.views.1.name=q", "repeated: q"),
    ("optim.warmup=soon", "optim.warmup"),
    ("trainer.devices=-3", "trainer.devices"),
    ("eval.knn_temperature=0", "eval.knn_temperature"),
    ("method.temperature=0", "method.temperature"),
])
def test_bad_values_are_config_errors_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(DEFAULT_RECIPE, [override])


def test_every_fault_is_reported_at_once_and_no_run_folder_is_made(tmp_path) -> None:
    from semssl.cli import main

    code = main(["pretrain", "data.batch_size=0", "optim.lr=-1", "trainer.devices=-3",
                 f"trainer.out_dir={tmp_path / 'runs'}"])
    assert code == 2
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_RECIPE, ["data.batch_size=0", "optim.lr=-1", "trainer.devices=-3"])
    assert str(err.value).count("\n") == 3 and "3 invalid values" in str(err.value)


@pytest.mark.parametrize("base, method", [
    ("mocov2_resnet18-w16_1x128-1800it_cifar10-6k", "scd_mocov2_resnet18-w16_1x128-1800it_cifar10-6k"),
    ("byol-asym_resnet18-w16_1x128-1800it_cifar10-6k", "scd_byol_resnet18-w16_1x128-1800it_cifar10-6k"),
    ("dino_resnet18-w16_1x64-1000it_cifar10-6k", "scfs_resnet18-w16_1x64-1000it_cifar10-6k"),
])
def test_same_budget_pairs_differ_only_in_the_method(base: str, method: str) -> None:
    """docs/results.md section 7 compares these pairs step for step: same data, model, optimiser and length."""
    a, b = to_dict(load_config(base)), to_dict(load_config(method))
    for section in ("data", "model", "optim", "eval"):
        assert a[section] == b[section], section
    a["trainer"].pop("figures"), b["trainer"].pop("figures"), a["trainer"].pop("run_name", None), \
        b["trainer"].pop("run_name", None)
    assert a["trainer"] == b["trainer"]
    assert a["model"]["width"] == 16 and a["model"]["small_input"] is True


@pytest.mark.parametrize(("recipe", "base", "overrides", "steps", "channels_last"), [
    # section 7.2d: the 1,800-step recipe run with trainer.max_steps=3600
    ("scd_mocov2_resnet18-w16_1x128-3600it_cifar10-6k", "scd_mocov2_resnet18-w16_1x128-1800it_cifar10-6k",
     ["trainer.max_steps=3600"], 3600, False),
    # section 7.2f: channels-last, 4,000 steps and lighter monitoring; same data, optimiser and method
    ("scd_byol_resnet18-w16_1x128-4000it_cifar10-6k", "scd_byol_resnet18-w16_1x128-1800it_cifar10-6k",
     ["model.channels_last=true", "trainer.max_steps=4000", "trainer.max_epochs=110",
      "trainer.knn_every_n_epochs=10", "trainer.figures=[]"], 4000, True),
    # section 7.3b: SCFS's learning check, the run scfs_w16_cm0_t02_l2_m99_3800_s0
    ("scfs_resnet18-w16_1x64-3800it_cifar10-6k", "scfs_resnet18-w16_1x64-1000it_cifar10-6k",
     ["method.center_momentum=0", "method.warmup_teacher_temp=0.02", "method.teacher_temp=0.02",
      "model.channels_last=true", "data.views.1.n_crops=2", "method.momentum_end=0.99", "trainer.max_steps=3800",
      "trainer.max_epochs=100", "trainer.knn_every_n_epochs=10", "trainer.figures=[]"], 3800, True),
])
def test_learning_check_recipes_are_the_same_budget_recipe_with_only_their_overrides(
        recipe: str, base: str, overrides: list[str], steps: int, channels_last: bool) -> None:
    """docs/results.md sections 7.2d / 7.2f / 7.3b: the recipe file that names a learning-check run must be exactly the
    same-budget recipe with the overrides that run used."""
    a = to_dict(load_config(recipe))
    b = to_dict(load_config(base, overrides))
    a.pop("name"), b.pop("name")
    assert a == b
    assert a["trainer"]["max_steps"] == steps and a["model"]["channels_last"] is channels_last
