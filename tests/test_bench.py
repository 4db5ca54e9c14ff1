"""The benchmark harness: FLOP counting, interleaved timing, the engine-faithful method step, the data throughput
and process-tree helpers, the benchmark scripts' option checks, and the SplitBatchNorm2d autograd fix they led to."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from semssl.bench import (
    BenchError,
    MethodStep,
    ProcessTreeSampler,
    SupervisedStep,
    count_flops,
    data_batch,
    data_throughput,
    markdown_table,
    patch_view_recipes,
    process_tree,
    random_views,
    summarize,
    time_interleaved,
    tree_cpu_seconds,
)
from semssl.models.backbones import SplitBatchNorm2d

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- measurement
def test_count_flops_of_a_linear_layer_forward_and_backward():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    fwd = count_flops(lambda: layer(x))
    assert fwd.total == 2 * 2 * 8 * 4 and set(fwd.by_op) == {"addmm"}
    both = count_flops(lambda: layer(x).sum().backward())
    assert both.total == 3 * fwd.total  # forward + grad input + grad weight


def test_time_interleaved_alternates_and_skips_warmup():
    calls: list[str] = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_interleaved(steps, n_steps=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    with pytest.raises(BenchError, match="--steps"):
        time_interleaved(steps, n_steps=0)


def test_summarize_and_markdown_table():
    s = summarize([3.0, 1.0, 2.0, 10.0, 4.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 10.0 and s["n"] == 5
    table = markdown_table(["step", "ms"], [("a", 1), ("b", 2)])
    assert table.splitlines() == ["| step | ms |", "|---|---:|", "| a | 1 |", "| b | 2 |"]
    with pytest.raises(BenchError):
        markdown_table(["a", "b"], [("only one",)])


def test_supervised_step_trains():
    images = torch.randn(4, 3, 32, 32)
    step = SupervisedStep(images, arch="resnet18", num_classes=5, small_input=True)
    before = step.classifier.weight.detach().clone()
    loss = step()
    assert torch.isfinite(loss) and not torch.equal(before, step.classifier.weight)
    with pytest.raises(BenchError, match="num-classes"):
        SupervisedStep(images, num_classes=1)


def test_method_step_does_what_the_engine_does(tiny_cfg):
    views = random_views(tiny_cfg, tiny_cfg.data.batch_size)
    assert views["q"].shape == (16, 3, 32, 32)
    step = MethodStep(tiny_cfg, {"views": views})
    method = step.method
    teacher = next(method.encoder_k.parameters()).detach().clone()
    student = next(method.encoder_q.parameters()).detach().clone()
    step()
    step()
    assert step.step == 2 and int(method.queue.ptr) == 2 * 16 % method.queue.size
    assert not torch.equal(student, next(method.encoder_q.parameters()))  # optimiser step
    assert not torch.equal(teacher, next(method.encoder_k.parameters()))  # EMA update
    assert step.optimizer.param_groups[0]["lr"] > 0  # the schedule's value was set


def test_method_step_flops_add_one_key_forward_to_supervised(tiny_cfg):
    views = random_views(tiny_cfg, tiny_cfg.data.batch_size)
    moco = count_flops(MethodStep(tiny_cfg, {"views": views}))
    model = tiny_cfg.model  # the main recipe's trunk (width 16, small-input stem)
    sup = count_flops(SupervisedStep(views["q"], arch="resnet18", num_classes=10, small_input=model.small_input,
                                     width=model.width))
    # same trunk and batch: MoCo runs the trunk forward twice (query, key) and backward once
    assert moco.by_op["convolution"] == 2 * sup.by_op["convolution"]
    assert moco.by_op["convolution_backward"] == sup.by_op["convolution_backward"]
    assert moco.total > sup.total


def test_method_step_on_a_real_batch(tiny_cfg):
    batch = data_batch(tiny_cfg, 16)
    assert batch["views"]["q"].shape == (16, 3, 32, 32) and batch["geometry"]["k"].shape[0] == 16
    step = MethodStep(tiny_cfg, batch)
    assert torch.isfinite(step())
    with pytest.raises(BenchError, match="only 96 images"):
        data_batch(tiny_cfg, 128)


def test_method_step_names_missing_views(tiny_cfg):
    with pytest.raises(BenchError, match="needs views"):
        MethodStep(tiny_cfg, {"views": {"q": torch.randn(16, 3, 32, 32)}})


def test_data_throughput_counts_samples_and_reports_running_out():
    batch = {"views": {"q": torch.zeros(4, 3, 8, 8), "k": torch.zeros(4, 3, 8, 8)}, "index": torch.arange(4)}
    res = data_throughput([batch] * 5, batches=3, warmup_batches=2)
    assert res["samples"] == 12 and res["views_per_s"] == pytest.approx(2 * res["samples_per_s"])
    with pytest.raises(BenchError, match="ran out"):
        data_throughput([batch] * 2, batches=3, warmup_batches=1)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_process_tree_memory_and_cpu():
    assert process_tree(os.getpid())[0] == os.getpid()
    sampler = ProcessTreeSampler(os.getpid())
    sampler.sample()
    mem = sampler.result_mb()
    assert mem["tree_peak_pss_mb"] > 0 and mem["tree_peak_rss_sum_mb"] >= mem["tree_peak_pss_mb"]
    assert tree_cpu_seconds(os.getpid()) > 0


# ---------------------------------------------------------------------------------------------- the fix
def test_split_batchnorm_with_inplace_relu_matches_per_split_reference():
    """The regrouped output is not an autograd view (no CopySlices after an in-place ReLU) and its gradients
    equal those of plain BatchNorm applied to each split."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    split = SplitBatchNorm2d(4, num_splits=2).train()
    out = torch.relu_(split(x))
    assert type(out.grad_fn).__name__ != "CopySlices"
    (out * torch.arange(out.numel()).view_as(out).float().sin()).sum().backward()

    ref_x = x.detach().clone().requires_grad_()
    refs = [torch.nn.BatchNorm2d(4).train() for _ in range(2)]
    ref_out = torch.stack([F.relu(refs[k](ref_x[k::2])) for k in range(2)], 1).reshape_as(ref_x)
    (ref_out * torch.arange(ref_out.numel()).view_as(ref_out).float().sin()).sum().backward()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(split.weight.grad, refs[0].weight.grad + refs[1].weight.grad)


# ---------------------------------------------------------------------------------------------- scripts
def test_step_time_refuses_small_images_and_bad_batches(capsys):
    step_time = load_script("step_time")
    assert step_time.main(["--size", "64"]) == 2
    assert "use >= 96 px" in capsys.readouterr().err
    assert step_time.main(["--batch", "12"]) == 2  # the main recipe has bn_splits 8
    assert "is not divisible by model.bn_splits = 8" in capsys.readouterr().err  # the config check
    assert step_time.main(["model.nope=1"]) == 2
    assert "model.nope" in capsys.readouterr().err


def test_step_time_end_to_end(tmp_path, capsys):
    step_time = load_script("step_time")
    out = tmp_path / "st.json"
    assert step_time.main(["--batch", "8", "--size", "96", "--steps", "1", "--warmup", "0",
                           "--num-classes", "10", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "mocov2" and res["queue_size"] == 1024 and res["bn_splits"] == 8
    assert 1.2 < res["flop_ratio"] < 1.5  # one extra trunk forward on top of forward + backward
    assert res["time_over_flop_ratio"] == pytest.approx(res["time_ratio"] / res["flop_ratio"], abs=2e-3)
    assert "| time ratio | FLOP ratio |" in capsys.readouterr().out


def test_method_step_ratio_small_sizes_need_allow_small(tiny_synth, tmp_path):
    script = load_script("method_step_ratio")
    common = [f"data.synthetic.root={tiny_synth}", "data.num_workers=0", "model.width=8", "model.bn_splits=1"]
    recipe = "mocov2_resnet18_1x64-400it_synthetic"
    args = ["--recipes", recipe, f"{recipe}@model.channels_last=true", "--batch", "4", "--size", "32", "--steps", "1",
            "--warmup", "0"]
    with pytest.raises(script.BenchError, match="--allow-small"):
        script.run(script.parse_args([*args, *common]))
    out = tmp_path / "small.json"
    assert script.main([*args, "--allow-small", "--out", str(out), *common]) == 0
    res = json.loads(out.read_text())
    assert res["size"] == 32 and list(res["rows"]) == [recipe, f"{recipe}@model.channels_last=true"]
    assert res["rows"][f"{recipe}@model.channels_last=true"]["flop_ratio"] == pytest.approx(1.0, abs=0.02)


def test_data_throughput_script_on_tiny_data(tiny_synth, tmp_path, capsys):
    script = load_script("data_throughput")
    out = tmp_path / "dt.json"
    overrides = tiny_overrides(tiny_synth, tmp_path / "runs")
    assert script.main(["--workers", "0", "--batches", "2", "--warmup", "1", "--out", str(out), *overrides]) == 0
    res = json.loads(out.read_text())
    assert res["results"][0]["workers"] == 0 and res["results"][0]["samples"] == 32
    assert res["results"][0]["samples_per_s"] > 0
    assert script.main(["--batches", "50", *overrides]) == 2
    assert "Lower --batches" in capsys.readouterr().err


def test_main_job_helpers(tmp_path):
    main_job = load_script("main_job")
    assert main_job.with_run_name(["trainer.run_name=x"]) == ["trainer.run_name=x"]
    assert main_job.with_run_name([])[0].startswith("trainer.run_name=main_job-bench-")
    (tmp_path / "taken").mkdir()
    with pytest.raises(BenchError, match="exists already"):
        main_job.run_dir_of(None, [f"trainer.out_dir={tmp_path}", "trainer.run_name=taken"])
    assert main_job.run_dir_of(None, [f"trainer.out_dir={tmp_path}", "trainer.run_name=new"]) == tmp_path / "new"
    rows = main_job.accuracy_rows({"trained": {"knn_top1": 50.0, "linear_top1": 60.0},
                                   "random_init": {"knn_top1": 40.0, "linear_top1": 45.5}})
    assert rows[-1] == ("gain", "+10.00", "+14.50")
    assert main_job.semssl_command()[-1].endswith(("semssl", "semssl.cli"))


def test_method_step_ratio_per_recipe_overrides_and_real_batches(tiny_synth, tmp_path, capsys):
    script = load_script("method_step_ratio")
    assert script.split_spec("mocov2_x@method.queue_size=64@model.width=8") == (
        "mocov2_x", ["method.queue_size=64", "model.width=8"])
    with pytest.raises(script.BenchError, match="RECIPE@KEY=VALUE"):
        script.split_spec("mocov2_x@queue")
    with pytest.raises(script.BenchError, match="before --recipes"):  # an override swallowed by --recipes
        script.split_spec("data.views.1.size=32")
    out = tmp_path / "msr.json"
    common = [f"data.synthetic.root={tiny_synth}", *[o for o in tiny_overrides(tiny_synth, tmp_path / "runs")
                                                      if o.startswith("data.synthetic.")],
              "data.num_workers=0", "model.width=8", "model.bn_splits=1"]
    recipe = "mocov2_resnet18_1x64-400it_synthetic"
    assert script.main(["--recipes", recipe, f"{recipe}@method.queue_size=128@method.temperature=0.1", "--data",
                        "--batch", "4", "--size", "96", "--steps", "1", "--warmup", "0", "--out", str(out),
                        *common]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == [recipe, f"{recipe}@method.queue_size=128@method.temperature=0.1"]
    assert all(r["flop_ratio"] == pytest.approx(1.0, abs=0.02) for r in rows.values())  # same work
    assert "| time ratio | FLOP ratio |" in capsys.readouterr().out


def test_patch_view_recipes_replaces_fields_of_every_view_recipe(tiny_cfg, monkeypatch):
    from semssl.data import augment

    monkeypatch.setattr(augment, "RECIPES", dict(augment.RECIPES))  # the patch is process-wide: undo it
    names = {v.recipe for v in tiny_cfg.data.views}
    assert patch_view_recipes(tiny_cfg, "hue=0.5,grayscale_p=1") == {"hue": 0.5, "grayscale_p": 1.0}
    assert all(augment.RECIPES[n].hue == 0.5 and augment.RECIPES[n].grayscale_p == 1.0 for n in names)
    with pytest.raises(BenchError, match="--aug 'nope=1'"):
        patch_view_recipes(tiny_cfg, "nope=1")
    with pytest.raises(BenchError, match="FIELD=VALUE"):
        patch_view_recipes(tiny_cfg, "hue")


def test_seed_spread_pairs_runs_and_reads_feature_evals(tmp_path, capsys):
    seed_spread = load_script("seed_spread")

    def run(name: str, knn: float, lin: float, fg: float | None = None) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"trained": {"k20_top1": knn, "k200_top1": knn - 1,
                                                                "linear_top1": lin}}))
        if fg is not None:
            (d / "eval_knn_fg.json").write_text(json.dumps({"knn": {"k20_top1": fg, "k200_top1": fg}}))
        return str(d)

    a = ",".join([run("a0", 40.0, 50.0, 44.0), run("a1", 42.0, 48.0, 38.0)])
    b = ",".join([run("b0", 41.0, 49.0), run("b1", 41.0, 49.0)])
    assert seed_spread.main([f"A={a}", f"B={b}", "--diff", "A", "B", "--features", "fg"]) == 0
    out = capsys.readouterr().out
    assert "| **A** | mean ± std (2) | 41.0 ± 1.4 | 40.0 ± 1.4 | 49.0 ± 1.4 | 41.0 ± 4.2 | 41.0 ± 4.2 |" in out
    assert "| **A − B** | paired | 0.0 ± 1.4 | 0.0 ± 1.4 | 0.0 ± 1.4 | - | - |" in out
    with pytest.raises(SystemExit, match="metrics.json does not exist"):
        seed_spread.main([f"A={tmp_path / 'missing'}"])


def test_seed_spread_reads_scene_evals_without_image_metrics(tmp_path, capsys):
    seed_spread = load_script("seed_spread")

    def run(name: str, top1: float, cr4: float, miou: float) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"run": {"name": name}}))  # scene recipes: no "trained"
        oknn = {"oknn_top1": top1, "oknn_top5": 50.0, "oknn_disturbed_top1": top1, "oknn_disturbed_top5": 50.0}
        (d / "eval_objects.json").write_text(json.dumps({"objects": oknn, "size": 128}))
        stages = {"layer3": 1.0, "layer4": cr4}
        (d / "eval_bias.json").write_text(json.dumps({"coupling_rate": stages, "positional_mcs": stages}))
        (d / "eval_dense.json").write_text(json.dumps({"trained": {"dense_miou": miou, "dense_pixel_acc": 20.0},
                                                       "random_init": {"dense_miou": 99.0}}))
        return str(d)

    a = ",".join([run("a0", 36.0, 1.002, 5.0), run("a1", 38.0, 1.006, 7.0)])
    b = ",".join([run("b0", 35.0, 1.010, 4.0), run("b1", 35.0, 1.010, 4.0)])
    assert seed_spread.main([f"A={a}", f"B={b}", "--evals", "objects", "bias", "dense", "--diff", "A", "B"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| recipe | seeds | O-KNN top-1 | O-KNN top-5 |") and "| CR layer4 |" in out[0]
    assert out[0].endswith("| mIoU | pixel acc |")
    assert out[4] == ("| **A** | mean ± std (2) | 37.0 ± 1.4 | 50.0 ± 0.0 | 37.0 ± 1.4 | 50.0 ± 0.0 | "
                      "1.000 ± 0.000 | 1.004 ± 0.003 | 1.000 ± 0.000 | 1.004 ± 0.003 | 6.00 ± 1.41 | 20.0 ± 0.0 |")
    assert out[-1].startswith("| **A − B** | paired | 2.0 ± 1.4 |") and "| -0.006 ± 0.003 |" in out[-1]
    with pytest.raises(SystemExit, match="eval_dense_super.json does not exist"):
        seed_spread.main([f"A={a}", "--evals", "dense_super"])
    (Path(b.split(",")[0]) / "eval_dense.json").write_text(json.dumps({"miou": 3.0}))
    with pytest.raises(SystemExit, match="has no 'trained' section"):
        seed_spread.main([f"B={b}", "--evals", "dense"])
    for d in a.split(","):  # `semssl eval objects --roi c4 --out <run>/eval_objects_c4.json`: its own columns
        (Path(d) / "eval_objects_c4.json").write_text(json.dumps({"objects": {"oknn_top1": 41.0, "oknn_top5": 52.0}}))
    assert seed_spread.main([f"A={a}", "--evals", "objects", "objects_c4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("| O-KNN C4 top-1 | O-KNN C4 top-5 |") and out[-1].endswith("| 41.0 ± 0.0 | 52.0 ± 0.0 |")


def test_region_table_reads_run_folders_and_random_init_files(tmp_path, capsys):
    region_table = load_script("region_table")
    oknn = {"oknn_top1": 33.13, "oknn_top5": 53.26, "oknn_disturbed_top1": 35.6, "oknn_disturbed_top5": 51.7}
    stages = {f"layer{i}": 1.0 + i / 1000 for i in range(1, 5)}
    run = tmp_path / "soco"
    run.mkdir()
    (run / "eval_objects.json").write_text(json.dumps({"objects": oknn, "size": 128}))
    (run / "eval_bias.json").write_text(json.dumps({"coupling_rate": stages, "positional_mcs": stages}))
    rnd_objects = tmp_path / "random_objects.json"
    rnd_objects.write_text(json.dumps({"random_init": {"objects": oknn}, "pixels": {"objects": oknn}}))
    rnd_bias = tmp_path / "random_bias.json"
    rnd_bias.write_text(json.dumps({"random_init": {"coupling_rate": stages, "positional_mcs": stages}}))
    assert region_table.main([f"SoCo={run}", f"random={rnd_objects},{rnd_bias}"]) == 0
    out = capsys.readouterr().out.splitlines()
    per_stage = "1.001 / 1.002 / 1.003 / 1.004"
    assert out[2] == f"| SoCo | 33.1 | 53.3 | 35.6 | 51.7 | {per_stage} | {per_stage} |"
    assert out[3].startswith("| random: random_init | 33.1 |") and out[3].endswith("1.003 / 1.004 |")
    assert out[4] == "| random: pixels | 33.1 | 53.3 | 35.6 | 51.7 | - / - / - / - | - / - / - / - |"
    with pytest.raises(SystemExit, match="does not exist"):
        region_table.main([f"X={tmp_path / 'missing.json'}"])
    # --by-supercategory files add thing / stuff columns; a file without them leaves its cells empty
    by_super = tmp_path / "d3ssl.json"
    by_super.write_text(json.dumps({"objects": {**oknn, "n_queries_stuff": 3, "oknn_stuff_top1": 60.0,
                                                "oknn_disturbed_stuff_top1": 59.0, "n_queries_thing": 2,
                                                "oknn_thing_top1": 13.0, "oknn_disturbed_thing_top1": 11.5}}))
    assert region_table.main([f"D3SSL={by_super}", f"SoCo={run}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("| stuff top-1 | disturbed stuff top-1 | thing top-1 | disturbed thing top-1 | "
                           "CR 1 / 2 / 3 / 4 | MCS 1 / 2 / 3 / 4 |")
    assert out[2].startswith("| D3SSL | 33.1 | 53.3 | 35.6 | 51.7 | 60.0 | 59.0 | 13.0 | 11.5 | - / - / - / - |")
    assert out[3].startswith("| SoCo | 33.1 | 53.3 | 35.6 | 51.7 | - | - | - | - | 1.001")


def test_saliency_overlap_auroc_and_a_tiny_scd_on_scenes(tiny_synth, tmp_path, capsys):
    overlap = load_script("saliency_overlap")
    hi, lo = torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2, 0.3])
    assert overlap.auroc(hi, lo) == 1.0 and overlap.auroc(lo, hi) == 0.0
    assert overlap.auroc(torch.tensor([0.5, 0.5]), torch.tensor([0.5])) == 0.5           # ties count half
    assert overlap.auroc(torch.tensor([0.2, 0.6]), torch.tensor([0.4])) == 0.5

    from semssl.config import load_config, to_dict
    from semssl.methods import build_method

    cfg = load_config("scd_mocov2_resnet18_1x64-400it_synthetic",
                      ["model.arch=resnet18", "method.queue_size=16", "model.bn_splits=2"])
    torch.manual_seed(0)
    method = build_method(cfg)
    ckpt = tmp_path / "scd.ckpt"
    torch.save({"semssl_config": to_dict(cfg), "global_step": 7,
                "state_dict": {f"method.{k}": v for k, v in method.state_dict().items()}}, ckpt)
    scenes = tiny_synth / "scenes" / "test" / "annotations.json"
    r = overlap.measure(str(ckpt), str(scenes), 64, None)
    assert r["images"] + r["skipped"] == len(json.loads(scenes.read_text())["images"]) and r["step"] == 7
    assert 0 < r["m_objects"] < 1 and 0 < r["m_background"] < 1 and 0 <= r["auroc"] <= 1
    assert overlap.main(["--checkpoint", str(ckpt), "--json", str(scenes), "--size", "64"]) == 0
    assert "| 7 | 64 |" in capsys.readouterr().out


def test_env_fingerprint_is_deterministic_and_names_every_piece():
    fp = load_script("env_fingerprint")
    a, b = fp.fingerprint(n_images=2, size=32, batch=8), fp.fingerprint(n_images=2, size=32, batch=8)
    assert a == b
    assert {"backbone/forward", "backbone/grad", "rng/torch", "rng/numpy"} <= set(a)
    assert all(len(v) == 16 for v in a.values())
    assert fp.digest(torch.zeros(2)) != fp.digest(torch.zeros(3))  # the shape is part of the digest
    assert set(fp.versions()) >= {"python", "torch", "numpy"}


def test_supervised_ceiling_trains_both_tasks_and_writes_an_evaluable_backbone(tiny_synth, tmp_path, capsys):
    ceiling = load_script("supervised_ceiling")
    boxes = torch.tensor([[2.0, 3.0, 10.0, 7.0]])
    assert torch.equal(ceiling.flip_boxes(boxes, 32), torch.tensor([[22.0, 3.0, 30.0, 7.0]]))
    assert torch.equal(ceiling.flip_boxes(ceiling.flip_boxes(boxes, 32), 32), boxes)
    x = torch.arange(6.0).view(2, 1, 3)
    assert torch.equal(ceiling.flip_batch(x, torch.tensor([True, False])), torch.tensor([[[2.0, 1, 0]], [[3.0, 4, 5]]]))

    from semssl.checkpoints import load_model
    from semssl.models.backbones import BackboneModel

    scenes = str(tiny_synth / "scenes" / "train" / "annotations.json")
    for task in ("dense", "objects"):
        out = tmp_path / f"{task}.pth"
        assert ceiling.main([task, "--train", scenes, "--out", str(out), "--width", "8", "--size", "64",
                             "--steps", "3", "--batch-size", "4", "--ignore-index", "0"]) == 0
        printed = capsys.readouterr().out
        assert "trained 3 steps" in printed and f"wrote {out}" in printed
        model, info, cfg = load_model(out)
        assert isinstance(model, BackboneModel) and cfg is None and info["width"] == 8
