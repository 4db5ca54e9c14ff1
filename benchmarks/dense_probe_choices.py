"""Which dense-probe reading separates trained backbones from random ones at CPU scale (issue 27, part 2)?

The default probe (``semssl eval dense``) reads layer4 at 128 px: a 4x4 map for a standard-stem ResNet, too coarse
for the classes of a scene photograph. This script measures, with the unchanged probe protocol
(:func:`semssl.eval.dense.probe_maps`: per-channel standardisation, 1x1-conv head, Adam, 50 epochs), every
reading in ``--stages`` x ``--output-strides`` x ``--sizes`` on:

* the three random baselines of the architecture (``random_init``, ``random_init_bn``, ``pixels``: the RGB values
  pooled to the same grid), seeded as ``semssl eval dense --random-init``;
* each ``NAME=CHECKPOINT`` given (a run folder, a .ckpt, or a plain state_dict such as the supervised ceiling of
  ``benchmarks/supervised_ceiling.py``).

Maps are extracted once per model, output stride and size (``layer3`` and ``layer4`` together) and every stage
reading is cut from them, so the whole grid costs a few extractions per model. Prints a table of mIoU per reading
and model with the margin ``trained - best baseline`` for each checkpoint, and writes it as JSON::

    S=$SEMSSL_DATA_DIR/stanford-background
    python benchmarks/dense_probe_choices.py --arch resnet18 --width 32 --ignore-index 15 \\
        --train $S/images:$S/labels:$S/splits/train.txt --test $S/images:$S/labels:$S/splits/val.txt \\
        dsc=runs/dsc ceiling=runs/ceiling/backbone.pth --out runs/dense_probe_choices.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from semssl.checkpoints import load_model
from semssl.eval.dense import (
    DenseProbeConfig,
    PixelMaps,
    SegmentationDataset,
    concat_maps,
    dilated_view,
    extract_maps,
    probe_maps,
    reestimate_bn,
    segmentation_source,
    stage_kinds,
)
from semssl.models.backbones import BackboneModel, ResNetBackbone


def readings(maps: dict[str, torch.Tensor], stages: list[str]) -> dict[str, torch.Tensor]:
    """Each stage reading (``layer4``, ``layer3+layer4``, ...) from the extracted ``maps`` of one split."""
    return {stage: concat_maps([maps[k] for k in stage_kinds(stage)]) for stage in stages}


def probe_model(model, train, test, stages, output_stride, config, branch=None) -> dict[str, dict]:
    """mIoU / pixel accuracy of every stage reading of ``model`` dilated to ``output_stride``."""
    model = dilated_view(model, output_stride, branch)
    kinds = sorted({k for s in stages for k in stage_kinds(s)})
    tr = {k: extract_maps(model, train, k, branch, num_workers=config.num_workers) for k in kinds}
    te = {k: extract_maps(model, test, k, branch, num_workers=config.num_workers) for k in kinds}
    tr_x, te_x = readings({k: v[0] for k, v in tr.items()}, stages), readings({k: v[0] for k, v in te.items()}, stages)
    tr_m, te_m = next(iter(tr.values()))[1], next(iter(te.values()))[1]
    return {s: probe_maps(tr_x[s], tr_m, te_x[s], te_m, config) for s in stages}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="NAME=CHECKPOINT (run folder, .ckpt or plain state_dict)")
    p.add_argument("--train", required=True, help="as semssl eval dense --train")
    p.add_argument("--test", required=True, help="as semssl eval dense --test")
    p.add_argument("--arch", default="resnet18", help="the random baselines' architecture")
    p.add_argument("--width", type=int, default=32, help="the random baselines' base width")
    p.add_argument("--ignore-index", type=int, default=255, help="mask value excluded from loss and scores")
    p.add_argument("--stages", default="layer4,layer3,layer3+layer4", help="comma-separated stage readings")
    p.add_argument("--output-strides", default="0,16,8", help="comma-separated (0: as trained, 32 for ResNet)")
    p.add_argument("--sizes", default="128", help="comma-separated probe resolutions")
    p.add_argument("--epochs", type=int, default=50, help="passes of the head (the probe's default 50)")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baselines and the heads")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stages = args.stages.split(",")
    strides = [int(v) for v in args.output_strides.split(",")]
    named = dict(m.split("=", 1) for m in args.models)
    results: dict[str, dict] = {}
    for size in [int(v) for v in args.sizes.split(",")]:
        train = SegmentationDataset(segmentation_source(args.train, "train"), size)
        test = SegmentationDataset(segmentation_source(args.test, "test"), size)
        config = DenseProbeConfig(size=size, epochs=args.epochs, ignore_index=args.ignore_index,
                                  num_workers=args.workers, seed=args.seed)
        torch.manual_seed(args.seed)
        random_net = ResNetBackbone(args.arch, width=args.width).eval()
        models = {"random_init": BackboneModel(random_net),
                  "random_init_bn": BackboneModel(reestimate_bn(random_net, train, num_workers=args.workers))}
        for name, path in named.items():
            models[name] = load_model(path, arch=args.arch)[0]
        for stride in strides:
            for name, model in models.items():
                start = time.perf_counter()
                scores = probe_model(model, train, test, stages, stride, config)
                for stage, r in scores.items():
                    key = f"{stage} {f'os{stride}' if stride else 'as trained'} {size}px"
                    results.setdefault(key, {})[name] = r
                    if name == "random_init":  # the pixels baseline at this reading's grid
                        grid = tuple(r["feature_shape"][1:])
                        pix = DenseProbeConfig(**{**asdict(config), "stage": "rgb"})
                        results[key]["pixels"] = probe_model(PixelMaps(grid), train, test, ["rgb"], 0, pix)["rgb"]
                print(f"{size}px os{stride or '-'} {name}: "
                      + ", ".join(f"{s} {scores[s]['dense_miou']:.2f}" for s in stages)
                      + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    names = ["random_init", "random_init_bn", "pixels", *named]
    columns = ["reading", "map", *names, *(f"{n} - best baseline" for n in named)]
    print("\n| " + " | ".join(columns) + " |\n|---|---|" + "---:|" * (len(columns) - 2))
    for key, row in results.items():
        best = max(row[n]["dense_miou"] for n in ("random_init", "random_init_bn", "pixels"))
        shape = "x".join(str(v) for v in row["random_init"]["feature_shape"][1:])
        cells = [key, shape, *(f"{row[n]['dense_miou']:.2f}" for n in names),
                 *(f"{row[n]['dense_miou'] - best:+.2f}" for n in named)]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=float))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
