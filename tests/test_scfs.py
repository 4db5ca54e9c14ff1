"""SCFS: the feature search and stage loss on hand-computed cases, the ROI-crop geometry, every Table 7 variant
training through the engine's step on a tiny backbone, gradients to the student only, BatchNorm call grouping,
centers fed by the global outputs only, the attention figure, and the recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_dino import B, random_batch, tiny_cfg

from semssl.bench import MethodStep
from semssl.config import load_config, to_dict
from semssl.errors import ConfigError
from semssl.losses.scfs import feature_search, scfs_stage_loss, search_attention
from semssl.methods import build_method
from semssl.methods.scfs import VARIANTS, roi_regions
from semssl.schedules import Progress

SMALL_HEADS = {"stage_hidden_dim": 32, "stage_mid_channels": 16, "stage_out_dim": 16}


def scfs_cfg(variant: str = "scfs", n_local: int = 3, **method):
    return tiny_cfg("scfs", n_local=n_local, method={"variant": variant, **SMALL_HEADS, **method})


def geometry_batch(n_local: int = 3, seed: int = 0) -> dict:
    """Random images plus recorded geometry: global crop 0 = source [0, 100]^2, crop 1 = [50, 150]^2 (flipped);
    local crop 0 inside crop 0, local crop 1 only inside crop 1, local crop 2 in neither."""
    batch = random_batch(n_local, seed)
    g = torch.tensor([[0, 0, 100, 100, 0]] * B + [[50, 50, 150, 150, 1]] * B, dtype=torch.float32)
    boxes = [[10, 10, 40, 40, 1], [120, 120, 140, 140, 0], [300, 300, 320, 320, 0]]
    loc = torch.tensor([boxes[c % 3] for c in range(n_local) for _ in range(B)], dtype=torch.float32)
    batch["geometry"] = {"global": g, "local": loc}
    return batch


# ------------------------------------------------------------------------------------------------ feature search
def test_attention_is_the_raw_cosine_on_a_tiny_map() -> None:
    key = torch.tensor([[[1.0, 0.0], [2.0, -1.0]], [[0.0, 1.0], [2.0, 0.0]]]).unsqueeze(0)  # [1, C=2, 2, 2]
    query = torch.tensor([[3.0, 3.0]])
    attn = search_attention(query, key)
    # cos((1,1), (1,0)) = 1/sqrt2, ((0,1)) = 1/sqrt2, ((2,2)) = 1, ((-1,0)) = -1/sqrt2: no softmax, no clamp
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(attn, torch.tensor([[[r, r], [1.0, -r]]]))
    # searched map = A (.) F with the un-normalised map, broadcast over channels
    torch.testing.assert_close(feature_search(query, key), attn.unsqueeze(1) * key)


def test_feature_search_is_crop_major_over_images() -> None:
    torch.manual_seed(0)
    key = torch.randn(2, 5, 3, 4)  # 2 images
    query = torch.randn(6, 5)  # 3 crops x 2 images: row n searches image n % 2
    out = feature_search(query, key)
    assert out.shape == (6, 5, 3, 4)
    for n in range(6):
        k = key[n % 2]
        cos = F.cosine_similarity(query[n].view(5, 1, 1), k, dim=0)
        torch.testing.assert_close(out[n], cos * k)
    value = torch.randn(2, 7, 3, 4)  # another map weighted by the same attention
    torch.testing.assert_close(feature_search(query, key, value)[3], search_attention(query, key)[3] * value[1])
    with pytest.raises(ValueError, match="multiple"):
        search_attention(torch.randn(5, 5), key)


def test_a_crop_of_the_global_map_attends_most_to_its_own_place() -> None:
    torch.manual_seed(1)
    key = torch.relu(torch.randn(1, 16, 4, 4)) + 0.1  # post-ReLU-like stage map
    for y, x in [(0, 0), (2, 3), (3, 1)]:
        query = key[:, :, y, x] * 3.0  # the pooled feature of a crop covering exactly that cell
        attn = search_attention(query, key)[0]
        assert divmod(int(attn.argmax()), 4) == (y, x)
        assert float(attn[y, x]) == pytest.approx(1.0)


def test_viz_attention_peaks_on_each_jigsaw_quadrant() -> None:
    """Through the figure's own pipeline (jigsaw crops -> pooled queries -> attention over the global map), with a
    hand-made network whose stage map is the image itself pooled to 2x2: each quadrant attends most to itself."""
    from semssl.viz.attention import attention_maps, jigsaw_crops

    colours = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, -1.0]])
    image = torch.zeros(1, 3, 32, 32)
    for i, (y, x) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        image[0, :, 16 * y:16 * y + 16, 16 * x:16 * x + 16] = colours[i].view(3, 1, 1)

    class Pool:
        def features(self, x, branch=None, kind="pooled"):
            return F.adaptive_avg_pool2d(x, 2)

    crops = jigsaw_crops(image, 12)
    assert crops.shape == (4, 3, 12, 12)
    maps, mean_map = attention_maps(Pool(), image, crops, "layer4")
    assert [int(m.argmax()) for m in maps] == [0, 1, 2, 3]
    torch.testing.assert_close(maps.flatten(1)[range(4), range(4)], torch.ones(4))  # cosine 1 at its own cell
    q = crops.mean((2, 3)).mean(0, keepdim=True)  # the mean query (the caption), not the mean of the maps
    torch.testing.assert_close(mean_map, search_attention(q, F.adaptive_avg_pool2d(image, 2))[0])


# ------------------------------------------------------------------------------------------------ stage loss
def test_stage_loss_by_hand() -> None:
    torch.manual_seed(0)
    d, b, tau_s, tau_t = 6, 3, 0.1, 0.05
    s_g, t_g = torch.randn(2, b, d), torch.randn(2, b, d)
    s_l, targets = torch.randn(4, b, d), torch.randn(2, 4, b, d)  # 2 searched global crops
    c = torch.randn(1, d)
    ce = lambda t, s: -(t * torch.log_softmax(s / tau_s, -1)).sum(-1).mean()
    glob = 0.5 * (ce(torch.softmax((t_g[0] - c) / tau_t, -1), s_g[1]) + ce(torch.softmax((t_g[1] - c) / tau_t, -1),
                                                                           s_g[0]))
    local_first = sum(ce(torch.softmax(targets[0, i] / tau_t, -1), s_l[i]) for i in range(4)) / 4  # not centred
    local_both = (local_first + sum(ce(torch.softmax(targets[1, i] / tau_t, -1), s_l[i]) for i in range(4)) / 4) / 2
    out = scfs_stage_loss(s_g, t_g, c, s_l, targets[:1], tau_s, tau_t)
    torch.testing.assert_close(out["loss"], 0.5 * (glob + local_first))
    torch.testing.assert_close(out["global"], glob)
    torch.testing.assert_close(scfs_stage_loss(s_g, t_g, c, s_l, targets, tau_s, tau_t)["loss"],
                               0.5 * (glob + local_both))
    torch.testing.assert_close(scfs_stage_loss(None, None, None, s_l, targets[:1], tau_s, tau_t)["loss"],
                               0.5 * local_first)
    torch.testing.assert_close(scfs_stage_loss(s_g, t_g, c, None, None, tau_s, tau_t, weight=1.0)["loss"], glob)


# ------------------------------------------------------------------------------------------------ ROI crop
def test_roi_regions_map_local_crops_into_the_global_crops() -> None:
    b = 1
    glob = torch.tensor([[0, 0, 100, 100, 0], [50, 50, 150, 150, 1]], dtype=torch.float32)  # 2 global crops, 50 px
    local = torch.tensor([[10, 20, 30, 40, 0], [120, 120, 140, 140, 1], [300, 300, 320, 320, 0],
                          [90, 90, 110, 110, 0]], dtype=torch.float32)  # 4 local crops, 16 px
    boxes, source = roi_regions(local, glob, local_size=16, global_size=50, batch_size=b)
    assert source.tolist() == [0, 1, -1, 0]
    torch.testing.assert_close(boxes[0], torch.tensor([5.0, 10.0, 15.0, 20.0]))  # source / 2
    # crop 1 is flipped: source x 120..140 -> (70..90) / 2 = 35..45 -> mirrored 5..15
    torch.testing.assert_close(boxes[1], torch.tensor([5.0, 35.0, 15.0, 45.0]))
    torch.testing.assert_close(boxes[2], torch.tensor([0.0, 0.0, 50.0, 50.0]))  # fallback: the whole crop 0
    torch.testing.assert_close(boxes[3], torch.tensor([45.0, 45.0, 50.0, 50.0]))  # clipped to crop 0


def test_roi_crop_targets_are_roi_aligned_teacher_maps() -> None:
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    cfg = scfs_cfg("roi_crop", n_local=3, stages=["layer2"])
    method = build_method(cfg).train()
    batch = geometry_batch()
    plan = method._roi_plan(batch, B)
    assert plan["source"].view(3, B)[:, 0].tolist() == [0, 1, -1] and plan["mirror"].view(3, B)[:, 0].tolist() == [
        True, True, False]
    t_map = torch.randn(2 * B, 128, 4, 4)
    queries = torch.randn(3 * B, 128)
    maps = method._roi_maps(queries, t_map, B, plan)
    assert maps.shape == (3 * B, 128, 5, 5)
    # local crop 0 of image 1: its box in global crop 0 (scale 4/32), mirrored (flips differ)
    box = plan["boxes"][1]
    expected = roi_align(t_map, torch.cat([torch.tensor([[1.0]]), box.view(1, 4)], 1), 5, spatial_scale=4 / 32,
                         sampling_ratio=-1, aligned=True)[0].flip(-1)
    torch.testing.assert_close(maps[1], expected)
    # local crop 1 (image 0) comes from global crop 1 (batch row B)
    box = plan["boxes"][B]
    expected = roi_align(t_map, torch.cat([torch.tensor([[float(B)]]), box.view(1, 4)], 1), 5, spatial_scale=4 / 32,
                         sampling_ratio=-1, aligned=True)[0].flip(-1)
    torch.testing.assert_close(maps[B], expected)
    # local crop 2 falls back to the searched map of global crop 0 over the whole crop
    searched = feature_search(queries[2 * B:2 * B + 1], t_map[:1])
    expected = roi_align(searched, torch.tensor([[0.0, 0.0, 0.0, 32.0, 32.0]]), 5, spatial_scale=4 / 32,
                         sampling_ratio=-1, aligned=True)[0]
    torch.testing.assert_close(maps[2 * B], expected)
    with pytest.raises(ConfigError, match="geometry"):
        method.training_step(random_batch(), Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1))


# ------------------------------------------------------------------------------------------------ the method
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_with_gradients_to_the_student_only(variant: str) -> None:
    torch.manual_seed(0)
    no_mc = "no_multicrop" in variant
    cfg = scfs_cfg(variant, n_local=0 if no_mc else 3)
    step = MethodStep(cfg, geometry_batch(0 if no_mc else 3), steps_per_epoch=2)
    method = step.method
    outs = [step.run(geometry_batch(0 if no_mc else 3, seed=i)) for i in range(2)]
    assert all(torch.isfinite(o["loss"]) for o in outs)
    stage_keys = {k for k in outs[0] if k.startswith("loss_layer")}
    with_heads = variant not in ("dino", "dino_no_multicrop")
    assert stage_keys == ({"loss_layer2", "loss_layer3", "loss_layer4"} if with_heads else set())
    teachers = [*method.teacher.parameters(), *method.teacher_heads.parameters()]
    assert all(p.grad is None for p in teachers)
    if with_heads:
        assert all(p.grad is not None for p in method.student_heads.parameters())
        assert len(method.momentum_pairs()) == 2
    assert method.default_branch == "teacher"
    x = torch.randn(2, 3, 32, 32)
    method.eval()
    torch.testing.assert_close(method.features(x), method.teacher.backbone(x)["pooled"])
    assert method.features(x, kind="layer2").shape == (2, 128, 4, 4)


def test_search_targets_are_detached_and_bn_calls_follow_the_released_grouping() -> None:
    torch.manual_seed(0)
    method = build_method(scfs_cfg("scfs", n_local=3)).train()
    calls: dict[str, list[int]] = {"student": [], "teacher": []}
    for side, heads in (("student", method.student_heads), ("teacher", method.teacher_heads)):
        heads["layer3"].register_forward_hook(lambda m, i, o, side=side: calls[side].append(i[0].shape[0]))
    captured: dict[str, torch.Tensor] = {}
    real = method._target_maps

    def spy(stage, *args, **kw):
        captured[stage] = real(stage, *args, **kw)
        return captured[stage]

    method._target_maps = spy
    out = method.training_step(random_batch(), Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1))
    assert calls == {"student": [2 * B, 3 * B], "teacher": [2 * B, 3 * B]}  # global maps, then the searched ones
    assert list(captured) == ["layer2", "layer3", "layer4"]
    assert not any(m.requires_grad for m in captured.values())
    # full global-crop maps (32 px: layer2 4x4, layer3 2x2), not the local crops' (16 px: 2x2, 1x1)
    assert captured["layer2"].shape == (3 * B, 128, 4, 4) and captured["layer3"].shape == (3 * B, 256, 2, 2)
    out["loss"].backward()
    assert method.student.backbone.layer1[0].conv1.weight.grad is not None


def test_stage_centers_are_fed_by_the_teacher_global_outputs_only() -> None:
    torch.manual_seed(0)
    method = build_method(scfs_cfg("scfs")).train()
    batch = random_batch()
    method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1))
    with torch.no_grad():  # train-mode BatchNorm: the same batch gives the same outputs
        maps = method.teacher.backbone(batch["views"]["global"])
        for stage in ("layer2", "layer3", "layer4"):
            z = method.teacher_heads[stage](maps[stage])
            torch.testing.assert_close(method.stage_centers[stage].center, 0.1 * z.mean(0, keepdim=True))
    # no global term -> no center update
    method = build_method(scfs_cfg("scfs", global_term=False))
    method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1))
    assert all(float(c.center.abs().sum()) == 0 for c in method.stage_centers.values())


def test_scfs_total_by_hand() -> None:
    """L = L_DINO + sum over layer2/3/4 of 1/2 (L_glob + L_loc) (docs/methods/scfs.md §Losses), every term written out
    here from the networks' outputs: L_glob = 1/2 [CE(t_0, s_1) + CE(t_1, s_0)] on the stage heads' outputs of the
    global crops (teacher centred with the stage center); L_loc = mean over local crops of CE(target_i, s_i),
    target_i = softmax(teacher head(A_i * F'_g0) / tau_t), not centred, A_i = the cosine of the pooled student
    map of local crop i with every position of the teacher's map of global crop 0."""
    from test_dino import cross_entropy_by_hand, dino_by_hand

    torch.manual_seed(0)
    method = build_method(scfs_cfg("scfs", n_local=3)).train()
    with torch.no_grad():
        for p in [*method.teacher.parameters(), *method.teacher_heads.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
        for c in [method.dino_loss.center, *method.stage_centers.values()]:
            c.center.copy_(0.5 * torch.randn_like(c.center))
    centers = {s: method.stage_centers[s].center.clone() for s in ("layer2", "layer3", "layer4")}
    dino_center = method.dino_loss.center.center.clone()
    batch = random_batch(seed=5)
    out = method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1))
    tau_t, tau_s = 0.07, 0.1  # a bare Progress: the final teacher temperature
    l_dino, t_out, (s_global, s_local) = dino_by_hand(method, batch, dino_center, tau_t)
    total = l_dino
    with torch.no_grad():
        for stage in ("layer2", "layer3", "layer4"):
            head_s, head_t = method.student_heads[stage], method.teacher_heads[stage]
            z_sg, z_tg = head_s(s_global[stage]).view(2, B, -1), head_t(t_out[stage]).view(2, B, -1)
            l_glob = 0.5 * (cross_entropy_by_hand(z_tg[0], z_sg[1], centers[stage], tau_t, tau_s)
                            + cross_entropy_by_hand(z_tg[1], z_sg[0], centers[stage], tau_t, tau_s))
            key = t_out[stage][:B]  # the teacher's map of global crop 0, [B, C, H, W]
            searched = []
            for n in range(3 * B):  # local crops, crop-major: row n is image n % B
                query = F.normalize(s_local[stage][n].mean(dim=(1, 2)), dim=0)
                attention = torch.einsum("c,chw->hw", query, F.normalize(key[n % B], dim=0))
                searched.append(attention * key[n % B])
            targets = head_t(torch.stack(searched))
            l_loc = cross_entropy_by_hand(targets, head_s(s_local[stage]), None, tau_t, tau_s)
            stage_loss = 0.5 * (l_glob + l_loc)
            assert float(out[f"loss_{stage}"]) == pytest.approx(float(stage_loss), rel=1e-5), stage
            total = total + stage_loss
    assert float(out["loss_dino"]) == pytest.approx(float(l_dino), rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(float(total), rel=1e-5)


def test_options_stages_and_search_views() -> None:
    torch.manual_seed(0)
    method = build_method(scfs_cfg("scfs", stages=["layer2"], search_views="both"))
    assert list(method.student_heads) == ["layer2"] and method._searched_crops() == (0, 1)
    out = method.training_step(random_batch(), Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1))
    assert {k for k in out if k.startswith("loss_layer")} == {"loss_layer2"}
    with pytest.raises(ConfigError, match="unknown stage"):
        scfs_cfg(stages=["layer5"])
    with pytest.raises(ConfigError, match="local view"):
        scfs_cfg("scfs", n_local=0)


def test_variant_dino_is_the_dino_method() -> None:
    batch = random_batch()
    progress = Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1)
    losses, keys = [], []
    for cfg in (tiny_cfg("dino"), scfs_cfg("dino")):
        torch.manual_seed(0)
        method = build_method(cfg)
        keys.append(sorted(method.state_dict()))
        losses.append(method.training_step(batch, progress)["loss"])
    assert keys[0] == keys[1]
    torch.testing.assert_close(losses[0], losses[1])


# ------------------------------------------------------------------------------------------------ figure, recipes
def test_attention_figure_from_a_fresh_method_and_from_a_checkpoint(tmp_path: Path) -> None:
    import PIL.Image

    from semssl.cli import main

    torch.manual_seed(0)
    cfg = scfs_cfg("scfs")
    method = build_method(cfg).eval()
    image = PIL.Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy())
    image.save(tmp_path / "img.png")
    from semssl.viz.attention import draw_attention, during_training

    out = draw_attention(method, tmp_path / "img.png", tmp_path / "a.png", stage="layer3", size=32, cfg=cfg)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    during_training(method, cfg, {"eval_test": str(tmp_path), "train": None}, tmp_path / "d.png", stage="layer2")
    assert (tmp_path / "d.png").stat().st_size > 0
    ckpt = {"semssl_config": to_dict(cfg), "state_dict": {f"method.{k}": v for k, v in method.state_dict().items()}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert main(["viz", "attention", "--checkpoint", str(tmp_path / "last.ckpt"), "--image", str(tmp_path / "img.png"),
                 "--size", "32", "--stage", "layer4", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_attention_title_names_the_table7_variant() -> None:
    from semssl.viz.attention import figure_title

    assert figure_title({"method": "scfs"}, scfs_cfg("dino_ml"), "teacher", "layer3") == "scfs (dino_ml) teacher layer3"
    assert figure_title({"method": "scfs"}, scfs_cfg("scfs"), "teacher", "layer4") == "scfs teacher layer4"
    assert figure_title({"method": "dino"}, None, "teacher", "layer4") == "dino teacher layer4"


def test_recipes_scfs_and_its_dino_baseline_differ_only_by_the_stage_heads() -> None:
    stage_keys = {"variant", "stages", "search_views", "global_term", "stage_weight", "stage_out_dim",
                  "stage_hidden_dim", "stage_mid_channels", "roi_output_size"}
    for scfs_name, dino_name in (("scfs_resnet50_8x32-200e_imagenet", "dino_resnet50_8x32-200e_imagenet"),
                                 ("scfs_resnet18_1x64-200it_synthetic", "dino_resnet18_1x64-200it_synthetic"),
                                 ("scfs_resnet18_1x64-300it_cifar10-6k", "dino_resnet18_1x64-300it_cifar10-6k")):
        s, d = to_dict(load_config(scfs_name)), to_dict(load_config(dino_name))
        assert {k: v for k, v in s["method"].items() if k not in stage_keys | {"name"}} == \
            {k: v for k, v in d["method"].items() if k != "name"}, scfs_name
        for section in ("data", "model", "optim", "trainer", "eval"):
            assert s[section] == d[section], (scfs_name, section)
    paper = load_config("scfs_resnet50_8x32-200e_imagenet")
    m, o, v = paper.method, paper.optim, paper.data.views
    assert (m.teacher_temp, m.warmup_teacher_temp, m.warmup_teacher_temp_epochs, m.momentum) == (0.07, 0.04, 50, 0.996)
    assert (o.lr, o.min_lr, o.warmup, o.weight_decay, o.clip_grad, o.clip_mode) == (0.1, 0.0048, 10, 1e-4, 3.0,
                                                                                    "per_param")
    assert [(x.size, x.n_crops, x.scale) for x in v] == [(224, 2, (0.25, 1.0)), (96, 8, (0.05, 0.25))]
    assert paper.data.batch_size * paper.trainer.devices == 256 and paper.trainer.max_epochs == 200
    assert paper.trainer.precision == "16-mixed" and m.stages == ("layer2", "layer3", "layer4")
