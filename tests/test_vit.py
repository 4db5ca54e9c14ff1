"""Backbones beyond ResNet-50 (issue 28): ResNet-101 and the ViTs against torchvision's and timm's networks, the
position-embedding interpolation, the token grids, DINO and SCFS on a ViT (training steps, the token search on a
hand-made case, the token-wise heads), the attention figure and the export of a ViT checkpoint, the recipes.

Every network that runs is a ViT-tiny at 32 px (4 or 8 px patches); the larger ones are built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import TINY_SYNTH
from test_dino import B, random_batch, tiny_cfg

from semssl.bench import MethodStep
from semssl.checkpoints import _infer_arch, load_model
from semssl.config import Config, from_dict, load_config, to_dict
from semssl.errors import ConfigError
from semssl.losses.scfs import feature_search, search_attention
from semssl.methods import build_method
from semssl.models.backbones import ResNetBackbone
from semssl.models.heads import SearchHead
from semssl.models.vit import TIMM_NAMES, VIT_ARCHS, ViTBackbone, interpolate_pos_embed
from semssl.schedules import Progress

SMALL_HEADS = {"stage_hidden_dim": 32, "stage_mid_channels": 16, "stage_out_dim": 16}
VIT_STAGES = ["block4", "block8", "block12"]


def vit_cfg(name: str = "dino", patch: int = 4, drop_path: float = 0.1, **method) -> Config:
    """test_dino's tiny config (2 x 32 px + 3 x 16 px crops, batch 4) on a ViT-tiny native at 32 px."""
    if name == "scfs":
        method = {"stages": VIT_STAGES, **SMALL_HEADS, **method}
    data = to_dict(tiny_cfg(name, method=method))
    data["model"] = {"arch": "vit_tiny", "patch_size": patch, "img_size": 32, "drop_path": drop_path}
    return from_dict(Config, data)


def same_keys_and_shapes(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}


# ------------------------------------------------------------------------------------------------ ResNet-101
def test_resnet101_has_torchvisions_keys_and_shapes_and_is_recognised_from_them() -> None:
    from semssl.transfer.export import DEPTHS, _timm_model, detectron2_config

    with torch.device("meta"):
        ours, theirs = ResNetBackbone("resnet101").state_dict(), torchvision.models.resnet101().state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.startswith("fc.")}
    same_keys_and_shapes(ours, theirs)
    assert set(ours) == set(_timm_model("resnet101").state_dict())  # the timm export's identity map holds
    assert _infer_arch(theirs, Path("r101.pth")) == "resnet101"
    with torch.device("meta"):
        assert _infer_arch(torchvision.models.resnet50().state_dict(), Path("r50.pth")) == "resnet50"
    assert DEPTHS["resnet101"] == 101
    assert detectron2_config({"arch": "resnet101", "width": 64})["MODEL.RESNETS.DEPTH"] == 101
    cfg = load_config("dino_resnet18_1x64-200it_synthetic", ["model.arch=resnet101"])  # every method may use it
    assert build_method(cfg).student.backbone.channels["layer4"] == 2048


# ------------------------------------------------------------------------------------------------ ViT vs timm
@pytest.mark.parametrize("arch", list(VIT_ARCHS))
def test_each_vit_has_the_keys_and_shapes_of_timms_model_of_that_name_and_loads_strictly(arch: str) -> None:
    with torch.device("meta"):
        ours = ViTBackbone(arch)
        theirs = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0)
    same_keys_and_shapes(ours.state_dict(), theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    assert ours.dim == VIT_ARCHS[arch][0] and list(ours.channels) == [f"block{i}" for i in range(1, 13)]


def test_a_vit_is_timms_network_value_for_value_and_gives_timms_tokens_at_the_native_size() -> None:
    torch.manual_seed(0)
    ours = ViTBackbone("vit_tiny", patch_size=4, img_size=32).eval()
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, patch_size=4,
                               img_size=32).eval()
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), k  # the same seed, the same initial weights
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = theirs.forward_features(x)  # [B, 1 + 64, C] after the final norm
        out = ours(x)
    torch.testing.assert_close(out["pooled"], tokens[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out["block12"], tokens[:, 1:].transpose(1, 2).reshape(2, 192, 8, 8), rtol=0, atol=0)
    torch.testing.assert_close(theirs(x), ours.features(x), rtol=0, atol=0)


def test_position_embeddings_follow_dinos_rule_at_other_sizes() -> None:
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 14 * 14, 8)
    assert interpolate_pos_embed(table, (14, 14), (14, 14)) is table  # native: unchanged
    for grid in ((6, 6), (2, 2), (20, 14)):  # 96 px and 32 px crops of a /16 ViT at 224; a larger, oblong one
        got = interpolate_pos_embed(table, grid, (14, 14))
        assert got.shape == (1, 1 + grid[0] * grid[1], 8)
        torch.testing.assert_close(got[:, 0], table[:, 0])  # the CLS entry is kept
        patch = table[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
        # DINO: bicubic, no antialiasing, scale factor (n + 0.1) / N
        expected = F.interpolate(patch, scale_factor=((grid[0] + 0.1) / 14, (grid[1] + 0.1) / 14), mode="bicubic")
        torch.testing.assert_close(got[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, -1, 8))
    # not timm's own resampling, which antialiases when it shrinks the table (documented decision)
    timm_96 = timm.layers.resample_abs_pos_embed(table, new_size=(6, 6), old_size=(14, 14), num_prefix_tokens=1)
    assert not torch.allclose(timm_96, interpolate_pos_embed(table, (6, 6), (14, 14)))
    # a ViT-S/16 runs at DINO's 96 px local crops and at 32 px (meta: shapes only)
    with torch.device("meta"):
        vit = ViTBackbone("vit_small")
        for side, cells in ((96, 6), (32, 2), (224, 14)):
            out = vit(torch.empty(2, 3, side, side))
            assert out["block7"].shape == (2, 384, cells, cells) and out["pooled"].shape == (2, 384)


def test_token_grids_per_block_and_dinos_evaluation_features() -> None:
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", patch_size=4, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = vit(x)
        assert sorted(out) == sorted(["pooled", *vit.stage_names])
        assert all(out[f"block{i}"].shape == (2, 192, 8, 8) for i in range(1, 13))
        assert vit(torch.randn(2, 3, 16, 16))["block3"].shape == (2, 192, 4, 4)  # a 16 px local crop: 4 x 4
        assert vit(x, stages=("block8",))["block8"].shape == (2, 192, 8, 8) and "block7" not in vit(x, stages=())
        torch.testing.assert_close(vit.features(x, "block4"), out["block4"])  # runs only up to block 4
        last4 = vit.features(x, "cls_last4")
        assert last4.shape == (2, 4 * 192)
        torch.testing.assert_close(last4[:, -192:], out["pooled"])  # the last of the four CLS tokens is pooled
        avg = vit.features(x, "cls_avgpool")
        torch.testing.assert_close(avg, torch.cat([out["pooled"], out["block12"].mean((2, 3))], 1))
    with pytest.raises(ConfigError, match="unknown feature kind"):
        vit.features(x, "layer4")


def test_last_selfattention_is_the_attention_the_last_block_applies() -> None:
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", patch_size=8, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        attn = vit.last_selfattention(x)
        assert attn.shape == (1, 3, 17, 17)
        torch.testing.assert_close(attn.sum(-1), torch.ones(1, 3, 17))
        h, _ = vit.tokens(x)
        for block in vit.blocks[:-1]:
            h = block(h)
        block = vit.blocks[-1]
        y = block.norm1(h)
        v = block.attn.qkv(y).reshape(1, 17, 3, 3, 64).permute(2, 0, 3, 1, 4)[2]
        by_hand = block.attn.proj((attn @ v).transpose(1, 2).reshape(1, 17, 192))
        torch.testing.assert_close(by_hand, block.attn(y))


# ------------------------------------------------------------------------------------------------ DINO / SCFS
@pytest.mark.parametrize("name", ["dino", "scfs"])
def test_dino_and_scfs_on_a_vit_train_three_steps_with_gradients_to_the_student_only(name: str) -> None:
    torch.manual_seed(0)
    step = MethodStep(vit_cfg(name), random_batch(), steps_per_epoch=2)
    method = step.method
    before = method.teacher.backbone.pos_embed.detach().clone()
    outs = [step.run(random_batch(seed=i)) for i in range(3)]
    assert all(torch.isfinite(o["loss"]) for o in outs)
    teachers = [*method.teacher.parameters(), *getattr(method, "teacher_heads", torch.nn.Module()).parameters()]
    assert teachers and all(p.grad is None and not p.requires_grad for p in teachers)
    student = method.student.backbone
    assert student.pos_embed.grad is not None and student.blocks[0].attn.qkv.weight.grad is not None
    assert not torch.equal(before, method.teacher.backbone.pos_embed)  # the EMA moved the teacher
    # drop path in the student only (DINO builds its teacher without it)
    assert student.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert method.teacher.backbone.blocks[-1].drop_path1.drop_prob == 0.0
    with torch.no_grad():
        teacher_out = method.teacher(random_batch()["views"]["global"])
    assert not teacher_out["logits"].requires_grad
    if name == "scfs":
        assert {k for k in outs[0] if k.startswith("loss_block")} == {"loss_block4", "loss_block8", "loss_block12"}
        assert all(p.grad is not None for p in method.student_heads.parameters())
        assert method.student.stages == tuple(VIT_STAGES) and sorted(teacher_out) == sorted(
            ["pooled", "logits", *VIT_STAGES])
    else:
        assert method.student.stages == () and sorted(teacher_out) == ["logits", "pooled"]
    method.eval()
    x = torch.randn(2, 3, 32, 32)
    assert set(method.feature_kinds) >= {"pooled", "cls_last4", "cls_avgpool", "block12"}
    torch.testing.assert_close(method.features(x), method.teacher.backbone(x)["pooled"])
    assert method.features(x, kind="block8").shape == (2, 192, 8, 8)


def test_scfs_vit_search_on_a_hand_made_token_grid() -> None:
    """The local crop's tokens all equal one token of global crop 0's grid: its query (their mean) attends with
    cosine 1 to that token, and the searched map is the raw cosine times the teacher's grid (the ResNet case of
    test_scfs, through SCFS's own target maps on block names)."""
    torch.manual_seed(0)
    method = build_method(vit_cfg("scfs", stages=["block4"]))
    c = 192
    t_map = torch.relu(torch.randn(2 * B, c, 8, 8)) + 0.1  # teacher grids of the 2 global crops, crop-major
    spots = [(0, 0), (3, 5), (7, 2), (5, 5)]
    local = torch.stack([t_map[b, :, y, x].view(c, 1, 1).expand(c, 4, 4) * 2.0 for b, (y, x) in enumerate(spots)])
    maps = method._target_maps("block4", {}, [{"block4": local}], {"block4": t_map}, B, None)
    assert maps.shape == (B, c, 8, 8)
    for b, (y, x) in enumerate(spots):
        attn = search_attention(local[b:b + 1].mean((2, 3)), t_map[b:b + 1])[0]
        assert divmod(int(attn.argmax()), 8) == (y, x) and float(attn[y, x]) == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(maps[b], attn * t_map[b])
    torch.testing.assert_close(maps, feature_search(local.mean((2, 3)), t_map[:B]))
    # the heads are token-wise: the 3x3 convolution became a 1x1, so shuffling the tokens changes nothing
    head = method.student_heads["block4"].eval()
    assert head.bottleneck[3].kernel_size == (1, 1)
    order = torch.randperm(64)
    shuffled = maps.flatten(2)[:, :, order].view_as(maps)
    torch.testing.assert_close(head(shuffled), head(maps))
    resnet_head = SearchHead(c, 16, 32, 16).eval()
    assert not torch.allclose(resnet_head(shuffled), resnet_head(maps))


def test_config_checks_of_the_backbone_families() -> None:
    with pytest.raises(ConfigError, match="not stages of model.arch vit_tiny.*block4,block8,block12"):
        build_method(vit_cfg("scfs", stages=["layer2", "layer3", "layer4"]))
    with pytest.raises(ConfigError, match="ViT backbones serve the methods"):
        load_config("mocov2_resnet18_1x64-400it_synthetic", ["model.arch=vit_small", "model.bn_splits=1"])
    with pytest.raises(ConfigError, match=r"data.views\[1\].size \(local\) = 40: not a multiple"):
        load_config("dino_vit-s16_8x64-100e_imagenet", ["data.views.1.size=40"])
    with pytest.raises(ConfigError, match="model.drop_path = 0.1: a ViT setting"):
        load_config("dino_resnet18_1x64-200it_synthetic", ["model.drop_path=0.1"])
    with pytest.raises(ConfigError, match="model.small_input = True: a ResNet setting"):
        load_config("dino_vit-s16_8x64-100e_imagenet", ["model.small_input=true"])


# ------------------------------------------------------------------------------------------------ figure, export
def test_the_attention_figure_of_a_vit_checkpoint_and_dinos_threshold(tmp_path: Path, capsys) -> None:
    import PIL.Image

    from semssl.cli import main
    from semssl.viz.attention import default_stage, self_attention_maps

    torch.manual_seed(0)
    cfg = vit_cfg("scfs")
    method = build_method(cfg).eval()
    assert default_stage(method) == "block12"
    PIL.Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(tmp_path / "img.png")
    ckpt = {"semssl_config": to_dict(cfg), "state_dict": {f"method.{k}": v for k, v in method.state_dict().items()}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert main(["viz", "attention", "--checkpoint", str(tmp_path / "last.ckpt"), "--image", str(tmp_path / "img.png"),
                 "--size", "32", "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["viz", "attention", "--checkpoint", str(tmp_path / "last.ckpt"), "--image", str(tmp_path / "img.png"),
                 "--size", "32", "--stage", "layer4", "--out", str(tmp_path / "b.png")]) == 2
    assert "--stage: 'layer4' is not one of" in capsys.readouterr().err

    class Fixed:  # a hand-made last-block attention: head 0 puts 0.5, 0.3, 0.2 on patches 2, 0, 1 (of 4)
        patch_size = 16

        def last_selfattention(self, image):
            a = torch.zeros(1, 1, 5, 5)
            a[0, 0, 0, 1:] = torch.tensor([0.3, 0.2, 0.5, 0.0])
            return a

    attn, masks = self_attention_maps(Fixed(), torch.zeros(1, 3, 32, 32), threshold=0.6)
    assert attn.shape == (1, 2, 2)
    # keep the largest patches until 60 % of the mass: 0.5 alone is not enough, 0.5 + 0.3 is
    assert masks[0].flatten().tolist() == [1.0, 0.0, 1.0, 0.0]


def test_a_vit_run_evaluates_checkpoints_and_exports_to_timm(tiny_synth: Path, tmp_path: Path, capsys) -> None:
    """DINO on a ViT-tiny/8 through the whole engine (one epoch of 6 steps, the online kNN monitor, the attention
    figure, the final evaluation with its baselines), then its checkpoint in `semssl eval` and `semssl export`."""
    from semssl.cli import main

    s = TINY_SYNTH
    synth = [f"data.synthetic.{k}={getattr(s, k)}" for k in ("object_size", "scene_size", "n_train_objects",
                                                             "n_test_objects", "n_train_scenes", "n_test_scenes",
                                                             "num_classes", "workers")]
    out_dir = tmp_path / "runs"
    assert main(["pretrain", "-c", "dino_resnet18_1x64-200it_synthetic", f"data.synthetic.root={tiny_synth}", *synth,
                 "model.arch=vit_tiny", "model.patch_size=8", "model.img_size=32", "model.drop_path=0.1",
                 "data.batch_size=16", "data.num_workers=0", "data.views.0.size=32", "data.views.1.size=16",
                 "data.views.1.n_crops=2", "data.eval_size=32", "method.out_dim=64", "method.hidden_dim=32",
                 "method.bottleneck_dim=16", "trainer.max_steps=0", "trainer.max_epochs=1",
                 "trainer.knn_every_n_epochs=1",
                 "trainer.figures=[{name: attention, every_n_epochs: 1}]", "trainer.progress_bar=false",
                 f"trainer.out_dir={out_dir}", "trainer.run_name=vit", "trainer.log_every_n_steps=1",
                 "eval.linear.epochs=2", "eval.knn_k=[5]",
                 "eval.batch_size=64"]) == 0
    run = out_dir / "vit"
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(0.0 <= metrics[b]["knn_top1"] <= 100.0 for b in ("trained", "random_init", "random_init_bn", "pixels"))
    assert list((run / "figures").glob("attention-epoch*.png"))
    assert "knn" in (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0]  # the online monitor ran
    model, info, cfg = load_model(run)
    assert info["arch"] == "vit_tiny" and cfg.model.patch_size == 8
    train, test = str(tiny_synth / "objects" / "train"), str(tiny_synth / "objects" / "test")
    assert main(["eval", "knn", "--checkpoint", str(run), "--train", train, "--test", test, "--k", "5",
                 "--features", "cls_last4", "--workers", "0", "--out", str(tmp_path / "knn.json")]) == 0
    assert "knn" in json.loads((tmp_path / "knn.json").read_text())
    # export: the timm file only (the default for a ViT), loaded strictly by timm's builder
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp")]) == 0
    side = json.loads((tmp_path / "exp" / "vit.json").read_text())
    assert [f["format"] for f in side["files"]] == ["timm"] and side["complete"]
    assert side["timm_kwargs"] == {"pretrained": False, "num_classes": 0, "patch_size": 8, "img_size": 32}
    state = torch.load(tmp_path / "exp" / "vit.timm.pth", weights_only=True)
    net = timm.create_model("vit_tiny_patch16_224", **side["timm_kwargs"]).eval()
    net.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), model.features(x))
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp2"), "--format", "torchvision"]) == 2
    assert "cannot hold a vit_tiny" in capsys.readouterr().err
    # the plain state_dict (timm's names, also DINO's; DINO's `backbone.` prefix stripped) evaluates as a backbone
    torch.save({f"backbone.{k}": v for k, v in state.items()}, tmp_path / "plain.pth")
    plain, plain_info, _ = load_model(tmp_path / "plain.pth")
    assert (plain_info["arch"], plain_info["patch_size"], plain_info["img_size"]) == ("vit_tiny", 8, 32)
    torch.testing.assert_close(plain.features(x), model.features(x))
    assert "cls_avgpool" in plain.feature_kinds


# ------------------------------------------------------------------------------------------------ recipes
def test_vit_recipes_dino_as_released_and_scfs_pairs_differing_only_by_the_stage_heads() -> None:
    stage_keys = {"variant", "stages", "search_views", "global_term", "stage_weight", "stage_out_dim",
                  "stage_hidden_dim", "stage_mid_channels", "roi_output_size"}
    for size in ("s", "b"):
        s = to_dict(load_config(f"scfs_vit-{size}16_8x32-200e_imagenet"))
        d = to_dict(load_config(f"dino_vit-{size}16_8x32-200e_imagenet"))
        assert {k: v for k, v in s["method"].items() if k not in stage_keys | {"name"}} == \
            {k: v for k, v in d["method"].items() if k != "name"}
        assert all(s[k] == d[k] for k in ("data", "model", "optim", "trainer", "eval"))
        assert s["method"]["stages"] == VIT_STAGES
        assert d["data"]["batch_size"] * d["trainer"]["devices"] == 256 and d["trainer"]["max_epochs"] == 200
    s = to_dict(load_config("scfs_vit-t4_1x64-500it_cifar10-6k"))
    d = to_dict(load_config("dino_vit-t4_1x64-500it_cifar10-6k"))
    assert {k: v for k, v in s["method"].items() if k not in stage_keys | {"name"}} == \
        {k: v for k, v in d["method"].items() if k != "name"}
    assert all(s[k] == d[k] for k in ("data", "model", "optim", "trainer", "eval"))
    assert (d["model"]["arch"], d["model"]["patch_size"], d["model"]["img_size"]) == ("vit_tiny", 4, 32)
    assert d["data"]["train"].endswith("cifar10-6k/train")
    for name, arch, norm_last, batch in (("dino_vit-s16_8x64-100e_imagenet", "vit_small", False, 512),
                                         ("dino_vit-b16_16x64-100e_imagenet", "vit_base", True, 1024)):
        cfg = load_config(name)
        m, o, v, t = cfg.method, cfg.optim, cfg.data.views, cfg.trainer
        assert (cfg.model.arch, cfg.model.patch_size, cfg.model.drop_path) == (arch, 16, 0.1)
        assert (o.name, o.lr, o.min_lr, o.warmup, o.weight_decay, o.weight_decay_end, o.clip_grad, o.clip_mode) == \
            ("adamw", 0.0005, 1e-6, 10, 0.04, 0.4, 3.0, "per_param")
        assert (m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs, m.freeze_last_layer) == \
            (0.04, 0.07, 30, 1)
        assert (m.norm_last_layer, m.out_dim, m.momentum, m.momentum_end) == (norm_last, 65536, 0.996, 1.0)
        assert [(x.size, x.n_crops, x.scale) for x in v] == [(224, 2, (0.25, 1.0)), (96, 10, (0.05, 0.25))]
        assert cfg.data.batch_size * t.devices * t.num_nodes == batch and t.max_epochs == 100
        assert t.precision == "16-mixed"
