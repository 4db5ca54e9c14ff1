"""Command-line paths no other test ran, each checked by its effect on tiny data: ``semssl recipes``,
``pretrain --print-config`` on a good config, ``eval linear --protocol standard`` (``--lr``, ``--schedule``,
``--weight-decay``) and the fast protocol's ``--lrs``, ``--branch`` / ``--features`` on ``eval knn``, ``linear``,
``dense``, ``objects`` and ``bias``, ``eval dense --random-init / --class-map / --ignore-index``,
``eval objects --roi / --disturb``, and ``data proposals --force``.

Where a result is checked against the library called directly with the same setting, the test also checks that
the other setting gives a different result, so a command that ignored the option would fail."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_overrides

from semssl.cli import main
from semssl.config import DEFAULT_RECIPE, load_config, to_dict

TRAIN_OPTS = ["--size", "32", "--workers", "0"]


def save_method(cfg, method, path: Path) -> Path:
    """A semssl checkpoint holding only what ``load_model`` reads: the config and the method's weights."""
    torch.save({"semssl_config": to_dict(cfg), "state_dict": {f"method.{k}": v for k, v in
                                                              method.state_dict().items()}}, path)
    return path


def reinit_teacher(method, seed: int) -> None:
    """Give the teacher (key / target) network other random weights, so the two branches differ."""
    torch.manual_seed(seed)
    teacher = method.encoder_k
    for module in teacher.modules():
        if module is not teacher and hasattr(module, "reset_parameters"):
            module.reset_parameters()


@pytest.fixture(scope="module")
def checkpoints(tiny_synth: Path, tmp_path_factory) -> dict[str, Path]:
    """A tiny MoCo-v2 and a tiny SCD-MoCo (ResNet-18 width 16, small-input stem) with teachers unlike their
    online networks, and a plain torchvision state_dict of the same ResNet."""
    from semssl.methods import build_method
    from semssl.models.backbones import ResNetBackbone

    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    moco = load_config(None, tiny_overrides(tiny_synth, root / "runs"))
    torch.manual_seed(0)
    method = build_method(moco)
    reinit_teacher(method, 1)
    out["moco"] = save_method(moco, method, root / "moco.ckpt")
    scd = load_config(DEFAULT_RECIPE, tiny_overrides(tiny_synth, root / "runs") + ["method.name=scd_mocov2"])
    torch.manual_seed(0)
    method = build_method(scd)
    reinit_teacher(method, 2)
    with torch.no_grad():  # a saliency map far from constant, so the fg features differ from the pooled ones
        for p in method.sem.saliency.parameters():
            p.mul_(5)
    out["scd"] = save_method(scd, method, root / "scd.ckpt")
    torch.manual_seed(0)
    out["plain"] = root / "r18.pth"
    torch.save(ResNetBackbone("resnet18", small_input=True, width=16).torchvision_state_dict(), out["plain"])
    return out


def objects(tiny_synth: Path) -> tuple[str, str]:
    return str(tiny_synth / "objects" / "train"), str(tiny_synth / "objects" / "test")


def eval_cfg(cfg):
    """The evaluation config ``semssl eval knn|linear`` makes of a run's config with ``--size 32 --workers 0``
    (and the default ``--batch-size 256``)."""
    cfg.data.eval_size, cfg.data.num_workers, cfg.eval.batch_size = 32, 0, 256
    return cfg


# ----------------------------------------------------------------------------------------- lists and configs
def test_recipes_lists_the_packaged_recipes_one_per_line(capsys, monkeypatch, tmp_path: Path) -> None:
    import semssl.cli
    import semssl.config

    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out.splitlines()
    folder = Path(semssl.config.__file__).parent / "configs"
    assert listed == sorted(p.stem for p in folder.glob("*.yaml")) and DEFAULT_RECIPE in listed
    for name in listed:  # every name it prints is one `pretrain -c NAME` accepts
        assert load_config(name).name == name
    # it reads the package's folder: another folder gives its own YAML files, sorted, and nothing else
    for name in ("zeta.yaml", "alpha.yaml", "notes.txt"):
        (tmp_path / name).write_text("name: x\n")
    monkeypatch.setattr(semssl.cli, "RECIPE_FOLDER", tmp_path)  # the config's PACKAGE_CONFIGS (test_cli_quick.py)
    assert main(["recipes"]) == 0
    assert capsys.readouterr().out.splitlines() == ["alpha", "zeta"]


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path: Path, capsys) -> None:
    recipe = "dino_resnet18_1x64-200it_synthetic"
    overrides = ["optim.lr=0.123", "data.views.1.n_crops=4", f"trainer.out_dir={tmp_path / 'runs'}"]
    assert main(["pretrain", "-c", recipe, *overrides, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(recipe, overrides))
    assert printed["method"]["name"] == "dino" and printed["optim"]["lr"] == 0.123
    assert printed["data"]["views"][1]["n_crops"] == 4 and printed["optim"]["warmup"] == 0.05  # recipe kept
    assert not (tmp_path / "runs").exists()  # no run folder, nothing trained
    # the printed tree is a recipe itself: loaded back it is the same config
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed, sort_keys=False))
    assert to_dict(load_config(str(tmp_path / "printed.yaml"))) == printed


# ----------------------------------------------------------------------------------------- eval linear
class RecordingSGD(torch.optim.SGD):
    """torch's SGD, recording its weight decay and the lr of every step (the standard probe's head optimiser)."""

    made: list["RecordingSGD"] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lrs: list[float] = []
        RecordingSGD.made.append(self)

    def step(self, closure=None):
        self.lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


@pytest.mark.parametrize("schedule, epochs, weight_decay", [("cosine", 3, 0.001), ("step", 5, None)])
def test_eval_linear_standard_protocol_uses_lr_schedule_and_weight_decay(
        schedule: str, epochs: int, weight_decay, checkpoints, tiny_synth: Path, tmp_path: Path,
        monkeypatch) -> None:
    """96 training images in batches of 32: 3 head steps per epoch, each epoch at the schedule's lr (the base lr
    0.5 scaled to 0.5 x 32 / 256); the step schedule divides by 10 at 60 % and 80 % of the epochs (MoCo)."""
    RecordingSGD.made = []
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    train, test = objects(tiny_synth)
    out = tmp_path / "lin.json"
    extra = ["--weight-decay", str(weight_decay)] if weight_decay is not None else []
    assert main(["eval", "linear", "--checkpoint", str(checkpoints["moco"]), "--protocol", "standard", "--train",
                 train, "--test", test, *TRAIN_OPTS, "--batch-size", "32", "--epochs", str(epochs), "--lr", "0.5",
                 "--schedule", schedule, *extra, "--out", str(out)]) == 0
    res = json.loads(out.read_text())["linear"]
    base = 0.5 * 32 / 256
    assert res["protocol"] == "standard" and res["schedule"] == schedule and res["epochs"] == epochs
    assert res["lr"] == pytest.approx(base) and 0 <= res["linear_top1"] <= 100
    [sgd] = RecordingSGD.made
    assert sgd.defaults["weight_decay"] == (weight_decay or 0.0)  # --weight-decay, default 0
    if schedule == "cosine":
        per_epoch = [base * 0.5 * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)]
    else:  # milestones at epochs 3 and 4 of 5
        per_epoch = [base, base, base, base / 10, base / 100]
    assert sgd.lrs == pytest.approx([lr for lr in per_epoch for _ in range(3)])


def test_eval_linear_fast_lrs_branch_and_features(checkpoints, tiny_synth: Path, tmp_path: Path) -> None:
    """``--lrs`` is the grid the fast probe searches; ``--branch teacher --features fg`` probes SCD's foreground
    features of the teacher: the command's numbers are the library's on exactly those features."""
    from semssl.checkpoints import load_model
    from semssl.eval.evaluate import split_features
    from semssl.eval.linear import FastLinearConfig, linear_fast

    train, test = objects(tiny_synth)
    out = tmp_path / "fast.json"
    assert main(["eval", "linear", "--checkpoint", str(checkpoints["scd"]), "--train", train, "--test", test,
                 *TRAIN_OPTS, "--epochs", "3", "--lrs", "0.5", "7", "--branch", "teacher", "--features", "fg",
                 "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    res = payload["linear"]
    assert set(res["val_top1_per_lr"]) == {"0.5", "7"} and res["best_lr"] in (0.5, 7.0)
    assert payload["model"]["branch"] == "teacher" and payload["model"]["features"] == "fg"
    model, _, cfg = load_model(checkpoints["scd"])
    config = FastLinearConfig(epochs=3, seed=0, lrs=(0.5, 7.0))
    probe = lambda branch, kind: linear_fast(*split_features(model, eval_cfg(cfg), train, test, branch, kind),  # noqa
                                             config=config)
    direct = probe("teacher", "fg")
    assert res["linear_top1"] == direct["linear_top1"] and res["val_top1_per_lr"] == direct["val_top1_per_lr"]
    for other in (probe("online", "fg"), probe("teacher", "pooled")):
        assert other["val_loss_per_lr"] != direct["val_loss_per_lr"]


# ----------------------------------------------------------------------------------------- eval knn
def test_eval_knn_branch_and_features(checkpoints, tiny_synth: Path, tmp_path: Path, capsys) -> None:
    from semssl.checkpoints import load_model
    from semssl.eval.evaluate import split_features
    from semssl.eval.knn import knn_evaluate

    train, test = objects(tiny_synth)
    out = tmp_path / "knn.json"
    assert main(["eval", "knn", "--checkpoint", str(checkpoints["scd"]), "--train", train, "--test", test,
                 *TRAIN_OPTS, "--k", "5", "20", "--branch", "teacher", "--features", "fg", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["model"]["branch"] == "teacher" and payload["model"]["features"] == "fg"
    model, _, cfg = load_model(checkpoints["scd"])

    def knn(branch: str, kind: str) -> tuple[torch.Tensor, dict]:
        train_x, train_y, test_x, test_y = split_features(model, eval_cfg(cfg), train, test, branch, kind)
        return train_x, knn_evaluate(train_x, train_y, test_x, test_y, ks=(5, 20), temperature=0.07)

    features, direct = knn("teacher", "fg")
    assert payload["knn"] == pytest.approx(direct) and "k20_top1" in direct
    for other, _ in (knn("online", "fg"), knn("teacher", "pooled")):
        assert not torch.allclose(other, features)  # other features than the ones evaluated
    # a kind the model does not have is a config error naming the ones it has
    assert main(["eval", "knn", "--checkpoint", str(checkpoints["scd"]), "--train", train, "--test", test,
                 *TRAIN_OPTS, "--features", "dense"]) == 2
    assert "--features dense: this model has ['pooled', 'layer1', 'layer2', 'layer3', 'layer4', 'fg']" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------------------- eval dense
def _scene_splits(tiny_synth: Path) -> tuple[str, str]:
    return (str(tiny_synth / "scenes" / "train" / "annotations.json"),
            str(tiny_synth / "scenes" / "test" / "annotations.json"))


def _dense_data(tiny_synth: Path, size: int = 32):
    from semssl.eval.dense import SegmentationDataset, segmentation_source

    train, test = _scene_splits(tiny_synth)
    return (SegmentationDataset(segmentation_source(train, "train"), size),
            SegmentationDataset(segmentation_source(test, "test"), size))


DENSE_OPTS = ["--size", "32", "--epochs", "2", "--workers", "0"]


def test_eval_dense_branch(checkpoints, tiny_synth: Path, tmp_path: Path) -> None:
    from semssl.checkpoints import load_model
    from semssl.eval.dense import DenseProbeConfig, dense_probe

    train, test = _scene_splits(tiny_synth)
    out = tmp_path / "dense.json"
    assert main(["eval", "dense", "--checkpoint", str(checkpoints["moco"]), "--branch", "teacher", "--train", train,
                 "--test", test, *DENSE_OPTS, "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["model"]["branch"] == "teacher"
    model, _, _ = load_model(checkpoints["moco"])
    config = DenseProbeConfig(size=32, epochs=2, num_workers=0)
    data = _dense_data(tiny_synth)
    teacher, online = (dense_probe(model, *data, config, branch=b) for b in ("teacher", "online"))
    got = payload["trained"]
    assert (got["dense_miou"], got["dense_pixel_acc"]) == (teacher["dense_miou"], teacher["dense_pixel_acc"])
    assert got["per_class_iou"] == teacher["per_class_iou"] != online["per_class_iou"]


def test_eval_dense_random_init_probes_the_three_baselines_of_the_seeded_network(tiny_synth: Path,
                                                                                 tmp_path: Path) -> None:
    from semssl.eval.dense import DenseProbeConfig, dense_probe
    from semssl.models.backbones import BackboneModel, ResNetBackbone

    train, test = _scene_splits(tiny_synth)
    out = tmp_path / "rand.json"
    assert main(["eval", "dense", "--random-init", "--arch", "resnet18", "--width", "16", "--small-input",
                 "--seed", "3", "--train", train, "--test", test, *DENSE_OPTS, "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert set(payload) >= {"random_init", "random_init_bn", "pixels"} and "trained" not in payload
    assert payload["model"] == {"source": "random init", "arch": "resnet18", "small_input": True, "width": 16,
                                "seed": 3}
    assert payload["random_init"]["feature_shape"] == [128, 4, 4]  # width 16 -> 128 channels at stride 8
    assert payload["pixels"]["feature_shape"] == [3, 4, 4]
    torch.manual_seed(3)
    net = ResNetBackbone("resnet18", small_input=True, width=16).eval()
    direct = dense_probe(BackboneModel(net), *_dense_data(tiny_synth), DenseProbeConfig(size=32, epochs=2,
                                                                                         num_workers=0, seed=3))
    assert payload["random_init"]["per_class_iou"] == direct["per_class_iou"]
    assert payload["random_init_bn"]["per_class_iou"] != direct["per_class_iou"]  # BN statistics re-estimated


def test_eval_dense_class_map_and_ignore_index_change_the_classes(checkpoints, tiny_synth: Path,
                                                                  tmp_path: Path) -> None:
    """The built-in scenes' masks: 0 = background, 1-4 = the 4 object classes."""
    train, test = _scene_splits(tiny_synth)
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"1": 1, "2": 1, "3": 2, "4": 2}))  # 4 classes merged into 2

    def probe(*options: str) -> dict:
        out = tmp_path / "dense.json"
        assert main(["eval", "dense", "--checkpoint", str(checkpoints["plain"]), "--train", train, "--test", test,
                     *DENSE_OPTS, "--epochs", "1", *options, "--out", str(out)]) == 0
        payload = json.loads(out.read_text())
        return {**payload["trained"], "protocol": payload["protocol"]}

    plain = probe()
    assert plain["class_values"] == [0, 1, 2, 3, 4] and plain["num_classes"] == 5
    ignored = probe("--ignore-index", "0")
    assert ignored["class_values"] == [1, 2, 3, 4] and ignored["num_classes"] == 4
    assert ignored["protocol"]["ignore_index"] == 0
    assert ignored["dense_pixel_acc"] != plain["dense_pixel_acc"]  # the background pixels are not scored
    merged = probe("--class-map", str(cmap), "--ignore-index", "0")
    assert merged["class_values"] == [1, 2] and merged["num_classes"] == 2
    assert merged["protocol"]["class_map"] == {"1": 1, "2": 1, "3": 2, "4": 2}
    assert len(merged["per_class_iou"]) == 2


# ----------------------------------------------------------------------------------------- eval objects
def test_eval_objects_roi_disturb_and_branch(checkpoints, tiny_synth: Path, tmp_path: Path, monkeypatch) -> None:
    """The object features the command extracts (memory, queries, disturbed memory, disturbed queries) are the
    library's with ``roi="c4"``, ``disturb="test"`` on the teacher, and differ from those of each other setting.
    (The O-KNN scores of 13 queries are too coarse to tell the settings apart.)"""
    import semssl.eval.objects as eval_objects
    from semssl.checkpoints import load_model

    scenes = tiny_synth / "scenes"
    train, test = str(scenes / "train"), str(scenes / "test" / "annotations.json")
    seen: list[torch.Tensor] = []
    real = eval_objects.extract_object_features

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out[0])
        return out

    monkeypatch.setattr(eval_objects, "extract_object_features", recording)
    out = tmp_path / "oknn.json"
    assert main(["eval", "objects", "--checkpoint", str(checkpoints["moco"]), "--branch", "teacher", "--roi", "c4",
                 "--disturbed", "--disturb", "test", "--train", train, "--test", test, "--size", "64",
                 "--min-side", "8", "--batch-size", "4", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    res = payload["objects"]
    assert payload["model"]["branch"] == "teacher"
    assert res["roi"] == "RoIAlign 14x14 on layer3, then layer4 (C4)" and res["disturb"] == "test"
    assert len(seen) == 4
    from_cli = list(seen)
    model, _, _ = load_model(checkpoints["moco"])

    def direct(branch: str = "teacher", **options) -> tuple[list[torch.Tensor], dict]:
        seen.clear()
        cfg = eval_objects.ObjectsConfig(size=64, min_side=8, batch_size=4, disturbed=True,
                                         **{"roi": "c4", "disturb": "test", **options})
        got = eval_objects.evaluate_objects(model, eval_objects.open_coco(train), eval_objects.open_coco(test), cfg,
                                            branch=branch)
        return list(seen), got

    feats, expected = direct()
    assert all(torch.equal(a, b) for a, b in zip(from_cli, feats))
    assert {k: res[k] for k in expected if k.startswith("oknn")} == {k: v for k, v in expected.items()
                                                                     if k.startswith("oknn")}
    assert not torch.allclose(direct(roi="c5")[0][0], from_cli[0])  # other object features
    both = direct(disturb="both")[0]  # the same memory, then a disturbed memory instead of the plain one
    assert torch.equal(both[0], from_cli[0]) and not torch.allclose(both[2], from_cli[2])
    assert torch.equal(from_cli[2], from_cli[0])  # disturb=test: the disturbed pass's memory is the plain one
    assert not torch.allclose(direct("online")[0][0], from_cli[0])


def test_eval_bias_branch(checkpoints, tiny_synth: Path, tmp_path: Path, branches_read: list[str]) -> None:
    """``eval bias --branch``: every feature the measures read comes from the asked branch, and the two branches
    (different networks here) give different coupling rates."""
    seen = branches_read

    def bias(branch: str) -> dict:
        out = tmp_path / f"bias-{branch}.json"
        seen.clear()
        assert main(["eval", "bias", "--checkpoint", str(checkpoints["moco"]), "--branch", branch, "--data",
                     str(tiny_synth / "scenes" / "test"), "--size", "64", "--pairs", "4", "--objects", "3",
                     "--min-side", "8", "--batch-size", "4", "--out", str(out)]) == 0
        assert seen and set(seen) == {branch}
        payload = json.loads(out.read_text())
        assert payload["model"]["branch"] == branch
        return payload["coupling_rate"]

    assert bias("teacher") != bias("online")


# ----------------------------------------------------------------------------------------- data proposals
def test_data_proposals_force_recomputes_a_fresh_cache(tmp_path: Path, capsys) -> None:
    from test_proposals import write_images

    write_images(tmp_path / "imgs", 3)
    cache = tmp_path / "cache.json"
    command = ["data", "proposals", str(tmp_path / "imgs"), "--workers", "1", "--cache", str(cache)]
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 3
    original = json.loads(cache.read_text())
    # a cache entry altered by hand: the cache is still fresh (same files, same parameters), so a plain run
    # keeps it as it is, and --force computes every image again
    doc = json.loads(cache.read_text())
    doc["images"][0]["boxes"] = [[0, 0, 1, 1]]
    cache.write_text(json.dumps(doc))
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 0
    assert json.loads(cache.read_text())["images"][0]["boxes"] == [[0, 0, 1, 1]]
    assert main([*command, "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 3
    assert json.loads(cache.read_text())["images"] == original["images"]
