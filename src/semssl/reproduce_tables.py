"""The papers' ablation tables as data, for ``semssl reproduce`` (:mod:`semssl.reproduce`).

A :class:`Table` is one ablation table of a paper: its rows (each a packaged recipe plus overrides), the paper's
numbers per row and column, and for each column the evaluation that stands for the paper's measure at small scale.
Every row of a table shares the same small recipe family, budget and seeds, so the rows compare step for step.

Small scale (``--scale small``, the default): the learning-check recipes of docs/results.md, on the data sets of
``$SEMSSL_DATA_DIR`` (``semssl data get cifar10-6k | stanford-background | msrc-v2``):

* SCFS (Tables 7-9; the paper: ImageNet-100, 200 epochs, k-NN and linear probing): the learning check
  ``scfs_resnet18-w16_1x64-3800it_cifar10-6k`` on the CIFAR-10 slice, read by the run's own kNN (k 20) and fast
  linear probe. DINO rows are the same recipe with ``method.variant=dino`` (exactly the ``dino`` method).
* SCD (Tables 3-4; IN-100 linear and VOC 07+12 detection, SCD-BYOL): ``scd_byol_resnet18-w16_1x128-1800it_cifar10-6k``
  and its same-budget BYOL (``byol-asym_...``: "SC is exactly the objective used in BYOL", §5.4.1), read by the
  linear probe (IN-100) and ``semssl transfer segment`` on Stanford Background (fine-tuned, in place of VOC AP).
* DSC (Tables 4-5; VOC detection AP / AP50 / AP75 and fine-tuned VOC segmentation mIoU): the 1,600-step Stanford
  Background recipes, read by ``semssl transfer segment`` (the mIoU column) and the frozen dense probe.
* D3SSL (Tables 5-7; VOC AP, coupling rate CR, positional MCS): the 450-step MSRC-v2 recipes, read by O-KNN
  (frozen, in place of VOC AP) and ``semssl eval bias`` (CR and MCS of layer4, the backbone's output).

Detection AP (``semssl transfer detect --recipe msrc-v2_small``) is opt-in (``--detect``): at this scale it is the
slowest evaluation (300 iterations in 127-188 s on the 32 px small-input backbones, 329-372 s on the width-32 scene
ones, docs/results.md section 9), so by default the AP columns are read through the frozen probe each table names,
and the printed table says so.

Decisions where the papers are silent, here so the tables and docs/reproduction.md say the same:

* SCFS Table 9 varies the *local* crop scale (its first range, 0.05-0.14, is the setting of Table 7's SCFS row,
  89.2 in both); the global crops keep the recipe's (0.25, 1).
* SCD Tables 3-4: the first row (SC only, λ = 0) is the same-budget BYOL recipe, not SCD with both terms off.
* D3SSL Table 5 reads its flattened columns (Random Cutout, Box Jittering, PRC, RBJ, PRM) as: none; cutout;
  PRC + box jittering ("box jittering does not contribute to our PRC"); PRC; PRC + RBJ; PRC + RBJ + PRM, all
  without L_dp (§6: "we pretrain ... without L_dp"). SoCo's box jittering is the jitter that may grow the box
  (``box_jitter_grow: true``), RBJ the one that never does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DATA = "$SEMSSL_DATA_DIR"


# ------------------------------------------------------------------------------------------------ evaluations
@dataclass(frozen=True)
class Evaluation:
    """One evaluation command run on every pre-trained row: ``argv`` (``{run}`` = the run folder) writes
    ``output`` (relative to the run folder). ``kind`` says what it is beside the paper's protocol."""

    name: str
    kind: str  # "own" (the pre-training's kNN / linear), "frozen probe", "transfer"
    argv: tuple[str, ...]
    output: str
    seconds: float  # measured on this project's 2-core machine (one thread); refined by the runs themselves
    optional: bool = False  # run only when asked (--detect)


@dataclass(frozen=True)
class Measure:
    """One column: ``path`` into the JSON of evaluation ``evaluation``; ``paper`` names the paper's column it
    stands for (None: a column of ours with no paper value)."""

    key: str
    header: str
    evaluation: str
    path: tuple[str, ...]
    paper: Optional[str] = None
    higher_is_better: bool = True
    digits: int = 1


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    recipe: str
    overrides: tuple[str, ...] = ()
    paper: dict[str, float] = field(default_factory=dict)  # the paper's value per Measure.key
    baseline: Optional[str] = None  # the row its deltas are taken against (default: the table's)
    paper_recipe: Optional[str] = None  # --scale paper (default: the table's)
    paper_overrides: Optional[tuple[str, ...]] = None  # --scale paper (default: ``overrides``)


@dataclass(frozen=True)
class Table:
    paper: str
    name: str
    title: str
    protocol: str  # the paper's protocol, one line
    small: str  # what stands for it at small scale, one line
    rows: tuple[Row, ...]
    measures: tuple[Measure, ...]
    evaluations: tuple[str, ...]  # names in EVALUATIONS, in the order they run
    baseline: str  # row key
    paper_scale: tuple[str, ...]  # --scale paper: the commands of one row (templates, see PAPER_PLACEHOLDERS)
    paper_recipe: str

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def baseline_of(self, row: Row) -> Row:
        return self.row(row.baseline or self.baseline)


CIFAR = f"{DATA}/cifar10-6k"
SB = f"{DATA}/stanford-background"
SB_TRAIN, SB_VAL = f"{SB}/images:{SB}/labels:{SB}/splits/train.txt", f"{SB}/images:{SB}/labels:{SB}/splits/val.txt"
MSRC = f"{DATA}/msrc-v2"

EVALUATIONS: dict[str, Evaluation] = {
    # the pre-training's own evaluation (the recipe's eval section: kNN k 20 / 200, fast linear probe)
    "pretrain": Evaluation("pretrain", "own", (), "metrics.json", 0.0),
    "segment_sb": Evaluation(
        "segment_sb", "transfer",
        ("transfer", "segment", "--checkpoint", "{run}", "--recipe", "stanford-background_small", "--train",
         SB_TRAIN, "--test", SB_VAL, "--workers", "0", "--out", "{run}/transfer_segment"),
        "transfer_segment/result.json", 120.0),
    "dense_sb": Evaluation(
        "dense_sb", "frozen probe",
        ("eval", "dense", "--checkpoint", "{run}", "--train", SB_TRAIN, "--test", SB_VAL, "--ignore-index", "15",
         "--workers", "0", "--out", "{run}/eval_dense.json"),
        "eval_dense.json", 60.0),
    "objects_msrc": Evaluation(
        "objects_msrc", "frozen probe",
        ("eval", "objects", "--checkpoint", "{run}", "--train", f"{MSRC}/instances_train.json", "--test",
         f"{MSRC}/instances_test.json", "--size", "128", "--workers", "1", "--out", "{run}/eval_objects.json"),
        "eval_objects.json", 30.0),
    "bias_msrc": Evaluation(
        "bias_msrc", "frozen probe",
        ("eval", "bias", "--checkpoint", "{run}", "--data", f"{MSRC}/instances_test.json", "--size", "128",
         "--out", "{run}/eval_bias.json"),
        "eval_bias.json", 30.0),
    "detect_msrc": Evaluation(
        "detect_msrc", "transfer",
        ("transfer", "detect", "--checkpoint", "{run}", "--recipe", "msrc-v2_small", "--train",
         f"{MSRC}/instances_train.json", "--test", f"{MSRC}/instances_test.json", "--workers", "0", "--out",
         "{run}/transfer_detect"),
        "transfer_detect/result.json", 400.0, optional=True),
}

#: measured training seconds of each small recipe (one run at a time unless said; docs/results.md section),
#: the first estimate of the ETA before a table's own runs refine it
RECIPE_SECONDS: dict[str, float] = {
    "scfs_resnet18-w16_1x64-3800it_cifar10-6k": 1597.0,  # 7.3b, alone
    "scd_byol_resnet18-w16_1x128-1800it_cifar10-6k": 2886.0,  # 7.2b, beside another run
    "byol-asym_resnet18-w16_1x128-1800it_cifar10-6k": 2779.0,  # 7.2b, beside another run
    "mocov2_resnet18-w32_1x32-1600it_stanford-background": 673.0,  # 10.1, one thread, beside another run
    "densecl_resnet18-w32_1x32-1600it_stanford-background": 1406.0,  # 10.1
    "dsc_resnet18-w32_1x32-1600it_stanford-background": 1397.0,  # 10.1
    "soco_resnet18-w32_1x32-450it_msrc-v2": 970.0,  # 10.2
    "d3ssl_resnet18-w32_1x32-450it_msrc-v2": 1044.0,  # 10.2
}

#: the placeholders of --scale paper commands: where the user's copies of the papers' data live
PAPER_PLACEHOLDERS = {
    "$IMAGENET100": "ImageNet-100 (train/ and val/ class folders; the 100-class subset of CPC / CMC)",
    "$IMAGENET": "ImageNet-1k (train/ and val/ class folders)",
    "$COCO": "COCO 2017 (train2017/, annotations/instances_train2017.json)",
    "$OPENIMAGE_MINI": "D3SSL's OpenImage-MINI: train/ images and annotations.json (COCO boxes, for CR / MCS)",
    "$VOC": "PASCAL VOC 07+12 as COCO JSON (trainval0712.json, test2007.json)",
    "$VOCAUG": "PASCAL VOC 2012 + SBD augmented segmentation (images:masks:list folders)",
}



# ------------------------------------------------------------------------------------------------ measures
def _own(key: str, header: str, metric: str, paper: Optional[str]) -> Measure:
    return Measure(key, header, "pretrain", ("trained", metric), paper)


KNN = _own("knn", "kNN k20", "knn_top1", "k-NN")
LINEAR = _own("linear", "linear (fast)", "linear_top1", "LP")
SEG_MIOU = Measure("seg_miou", "seg. mIoU (fine-tuned SB)", "segment_sb", ("model", "miou"), "mIoU")
DENSE_MIOU = Measure("dense_miou", "dense probe mIoU (frozen SB)", "dense_sb", ("trained", "dense_miou"))
OKNN_AP = Measure("oknn", "O-KNN top-1 (frozen, for AP)", "objects_msrc", ("objects", "oknn_top1"), "AP")
CR = Measure("cr", "CR layer4", "bias_msrc", ("coupling_rate", "layer4"), "CR", higher_is_better=False, digits=3)
MCS = Measure("mcs", "MCS layer4", "bias_msrc", ("positional_mcs", "layer4"), "MCS", digits=3)


def _ap(suffix: str, paper: str) -> Measure:
    return Measure(f"ap{suffix}", f"box AP{suffix} (msrc-v2, --detect)", "detect_msrc", ("model", f"box_ap{suffix}"),
                   paper)


AP, AP50, AP75 = _ap("", "AP"), _ap("50", "AP50"), _ap("75", "AP75")


# ------------------------------------------------------------------------------------------------ SCFS
SCFS_SMALL = "scfs_resnet18-w16_1x64-3800it_cifar10-6k"
SCFS_PAPER = "scfs_resnet50_8x32-200e_imagenet"
GLOBAL_ONLY = ("method.views=[global]", "data.views=[{name: global, size: 32, n_crops: 2, scale: [0.25, 1.0], "
               "recipe: [dino_global1, dino_global2], interpolation: bicubic}]")
GLOBAL_ONLY_PAPER = ("method.views=[global]", "data.views=[{name: global, size: 224, n_crops: 2, scale: [0.25, 1.0], "
                     "recipe: [dino_global1, dino_global2], interpolation: bicubic}]")
IN100_EVAL = (
    "semssl eval knn --checkpoint {run} --train $IMAGENET100/train --test $IMAGENET100/val --size 224 --workers 8 "
    "--out {run}/eval_knn.json",
    "semssl eval linear --checkpoint {run} --protocol standard --train $IMAGENET100/train --test $IMAGENET100/val "
    "--size 224 --workers 8 --out {run}/eval_linear.json",
)
SCFS_PAPER_SCALE = (
    "semssl pretrain -c {recipe} {overrides} trainer.seed={seed} data.train=$IMAGENET100/train eval.enabled=false "
    "trainer.out_dir={out} trainer.run_name={run_name}",
    *IN100_EVAL,
)
SCFS_DESC = ("ImageNet-100, ResNet-50, batch 256, 200 epochs; k-NN and linear probing top-1",
             f"CIFAR-10 slice, {SCFS_SMALL} (3,800 steps); the run's kNN k 20 and fast linear probe")


def _scfs_row(key: str, label: str, overrides: tuple[str, ...], knn: Optional[float], lp: float,
              baseline: Optional[str] = None, paper_overrides: Optional[tuple[str, ...]] = None) -> Row:
    paper = {"linear": lp} if knn is None else {"knn": knn, "linear": lp}
    return Row(key, label, SCFS_SMALL, overrides, paper, baseline=baseline, paper_overrides=paper_overrides)


SCFS_TABLE7 = Table(
    "scfs", "table7", "Influence of different contrast modes", *SCFS_DESC,
    rows=(
        _scfs_row("dino_no_mc", "DINO w/o MC", ("method.variant=dino_no_multicrop", *GLOBAL_ONLY), 78.1, 83.7,
                  paper_overrides=("method.variant=dino_no_multicrop", *GLOBAL_ONLY_PAPER)),
        _scfs_row("dino", "DINO", ("method.variant=dino",), 81.1, 87.0),
        _scfs_row("dino_ml", "DINO w ML", ("method.variant=dino_ml",), 82.2, 87.4),
        _scfs_row("scfs", "SCFS", (), 84.8, 89.2),
        _scfs_row("roi_crop", "ROI Crop", ("method.variant=roi_crop",), 83.9, 88.1),
        _scfs_row("scfs_no_mc", "SCFS w/o MC", ("method.variant=no_multicrop", *GLOBAL_ONLY), 79.7, 86.3,
                  baseline="dino_no_mc", paper_overrides=("method.variant=no_multicrop", *GLOBAL_ONLY_PAPER)),
    ),
    measures=(KNN, LINEAR), evaluations=("pretrain",), baseline="dino",
    paper_scale=SCFS_PAPER_SCALE, paper_recipe=SCFS_PAPER)

SCFS_TABLE8 = Table(
    "scfs", "table8", "Influence of different feature augmentation layer", *SCFS_DESC,
    rows=(
        _scfs_row("res2", "Res2", ("method.stages=[layer2]",), 82.0, 86.1),
        _scfs_row("res2_3", "Res2 + Res3", ("method.stages=[layer2, layer3]",), 84.3, 87.5),
        _scfs_row("res2_3_4", "Res2 + Res3 + Res4", (), 84.8, 89.2),
    ),
    measures=(KNN, LINEAR), evaluations=("pretrain",), baseline="res2",
    paper_scale=SCFS_PAPER_SCALE, paper_recipe=SCFS_PAPER)

_SCALES = (("005_014", (0.05, 0.14), 87.0, 89.2), ("014_025", (0.14, 0.25), 87.2, 88.7),
           ("025_04", (0.25, 0.4), 85.6, 87.0), ("04_06", (0.4, 0.6), 82.6, 83.1))
SCFS_TABLE9 = Table(
    "scfs", "table9", "Influence of random cropping scale (local crops; linear probing)", *SCFS_DESC,
    rows=tuple(row for key, (lo, hi), dino_lp, scfs_lp in _SCALES for row in (
        _scfs_row(f"dino_{key}", f"DINO, local {lo}-{hi}", ("method.variant=dino", f"data.views.1.scale=[{lo}, {hi}]"),
                  None, dino_lp),
        _scfs_row(f"scfs_{key}", f"SCFS, local {lo}-{hi}", (f"data.views.1.scale=[{lo}, {hi}]",), None, scfs_lp,
                  baseline=f"dino_{key}"),
    )),
    measures=(KNN, LINEAR), evaluations=("pretrain",), baseline="dino_005_014",
    paper_scale=SCFS_PAPER_SCALE, paper_recipe=SCFS_PAPER)


# ------------------------------------------------------------------------------------------------ SCD
SCD_SMALL = "scd_byol_resnet18-w16_1x128-1800it_cifar10-6k"
BYOL_SMALL = "byol-asym_resnet18-w16_1x128-1800it_cifar10-6k"
SCD_DESC = ("SCD-BYOL, ImageNet-100, 200 epochs; IN-100 linear top-1 and VOC 07+12 Faster R-CNN R50-C4 AP",
            f"CIFAR-10 slice, {SCD_SMALL} (1,800 steps); fast linear probe for IN-100, fine-tuned Stanford "
            "Background segmentation (transfer segment) for VOC AP")
SCD_LINEAR = _own("linear", "linear (fast)", "linear_top1", "IN-100")
SCD_SEG = Measure("seg_miou", "seg. mIoU (fine-tuned SB, for VOC AP)", "segment_sb", ("model", "miou"), "VOC 07+12")
SCD_AP = Measure("ap", "box AP (msrc-v2, --detect)", "detect_msrc", ("model", "box_ap"), "VOC 07+12")
SCD_PAPER_SCALE = (
    "semssl pretrain -c {recipe} {overrides} trainer.seed={seed} data.train=$IMAGENET100/train trainer.max_epochs=200 "
    "eval.enabled=false trainer.out_dir={out} trainer.run_name={run_name}",
    IN100_EVAL[1],
    "semssl transfer detect --checkpoint {run} --recipe voc0712_c4 --train $VOC/trainval0712.json "
    "--test $VOC/test2007.json --out {run}/transfer_detect",
)
SCD_BYOL_ROW = dict(recipe=BYOL_SMALL, paper_recipe="byol-asym_resnet50_1x256-200e_imagenet", paper_overrides=())

SCD_TABLE3 = Table(
    "scd", "table3", "Effect of components in the semantic discrimination loss", *SCD_DESC,
    rows=(
        Row("sc", "SC (BYOL)", paper={"linear": 81.4, "seg_miou": 52.9, "ap": 52.9}, **SCD_BYOL_ROW),
        Row("sc_fg", "SC + FG", SCD_SMALL, ("method.bg_term=false",), {"linear": 83.6, "seg_miou": 53.5, "ap": 53.5}),
        Row("sc_bg", "SC + BG", SCD_SMALL, ("method.fg_term=false",), {"linear": 83.3, "seg_miou": 53.0, "ap": 53.0}),
        Row("sc_fg_bg", "SC + FG + BG (SCD)", SCD_SMALL, (), {"linear": 83.8, "seg_miou": 53.6, "ap": 53.6}),
    ),
    measures=(KNN, SCD_LINEAR, SCD_SEG, SCD_AP), evaluations=("pretrain", "segment_sb", "detect_msrc"), baseline="sc",
    paper_scale=SCD_PAPER_SCALE, paper_recipe="scd_byol_resnet50_2x256-200e_imagenet")

_LAMBDAS = ((0.1, 83.8, 53.4), (0.5, 83.8, 53.6), (1.0, 83.7, 53.9), (2.0, 82.5, 53.2))
SCD_TABLE4 = Table(
    "scd", "table4", "Effect of the semantic discrimination loss weight λ", *SCD_DESC,
    rows=(Row("lambda_0", "λ = 0 (BYOL)", paper={"linear": 81.4, "seg_miou": 52.9, "ap": 52.9}, **SCD_BYOL_ROW),
          *(Row(f"lambda_{lam:g}".replace(".", "_"), f"λ = {lam:g}", SCD_SMALL, (f"method.lambda_d={lam:g}",),
                {"linear": lin, "seg_miou": voc, "ap": voc}) for lam, lin, voc in _LAMBDAS)),
    measures=(KNN, SCD_LINEAR, SCD_SEG, SCD_AP), evaluations=("pretrain", "segment_sb", "detect_msrc"),
    baseline="lambda_0", paper_scale=SCD_PAPER_SCALE, paper_recipe="scd_byol_resnet50_2x256-200e_imagenet")


# ------------------------------------------------------------------------------------------------ DSC
def _sb(method: str) -> str:
    return f"{method}_resnet18-w32_1x32-1600it_stanford-background"


DSC_DESC = ("MS COCO pre-training, ResNet-50; VOC 07+12 Faster R-CNN AP / AP50 / AP75 and fine-tuned VOC "
            "segmentation mIoU",
            "Stanford Background, the 1,600-step recipes (ResNet-18 width 32, 128 px); fine-tuned segmentation "
            "(transfer segment) for mIoU, the frozen dense probe beside it")
DSC_PAPER_SCALE = (
    "semssl pretrain -c {recipe} {overrides} trainer.seed={seed} data.train=$COCO/train2017 "
    "eval.enabled=false trainer.out_dir={out} trainer.run_name={run_name}",
    "semssl transfer detect --checkpoint {run} --recipe voc0712_c4 --train $VOC/trainval0712.json "
    "--test $VOC/test2007.json --out {run}/transfer_detect",
    "semssl transfer segment --checkpoint {run} --recipe voc-aug_fcn --train $VOCAUG/train --test $VOCAUG/val "
    "--out {run}/transfer_segment",
)
DSC_MEASURES = (AP, AP50, AP75, SEG_MIOU, DENSE_MIOU)
DSC_EVALS = ("segment_sb", "dense_sb", "detect_msrc")


def _dsc(ap: float, ap50: float, ap75: float, miou: float) -> dict[str, float]:
    return {"ap": ap, "ap50": ap50, "ap75": ap75, "seg_miou": miou}


_STRATEGIES = (("neighbor", "Neighbor", "neighbor", _dsc(56.6, 81.6, 63.0, 57.5)),
               ("triplet", "Triplet", "triplet", _dsc(55.5, 80.9, 61.4, 53.5)),
               ("ce", "CE", "ce", _dsc(56.8, 81.9, 63.0, 58.1)),
               ("km", "KM", "kmeans", _dsc(56.8, 81.9, 62.8, 57.7)),
               ("pm", "PM", "prototypes", _dsc(57.1, 82.2, 63.3, 57.9)))
DSC_TABLE4 = Table(
    "dsc", "table4", "Comparison of different semantic strategies", *DSC_DESC,
    rows=(Row("none", "- (DenseCL)", _sb("densecl"), (), _dsc(56.4, 81.8, 62.7, 56.7),
              paper_recipe="densecl_resnet50_8x32-800e_coco"),
          *(Row(key, label, _sb("dsc"), (f"method.semantic={name}",), paper)
            for key, label, name, paper in _STRATEGIES)),
    measures=DSC_MEASURES, evaluations=DSC_EVALS, baseline="none",
    paper_scale=DSC_PAPER_SCALE, paper_recipe="dsc_resnet50_8x32-800e_coco")

DSC_TABLE5 = Table(
    "dsc", "table5", "The influence of different granularities", *DSC_DESC,
    rows=(Row("instance", "instance (MoCo-v2)", _sb("mocov2"), (), _dsc(54.7, 81.0, 60.6, 48.6),
              paper_recipe="mocov2_resnet50_8x32-200e_imagenet", paper_overrides=("trainer.max_epochs=800",)),
          Row("instance_pixel", "instance + pixel (DenseCL)", _sb("densecl"), (), _dsc(56.4, 81.8, 62.7, 56.7),
              paper_recipe="densecl_resnet50_8x32-800e_coco"),
          Row("all", "instance + pixel + semantics (DSC-PM)", _sb("dsc"), (), _dsc(57.1, 82.2, 63.3, 57.9))),
    measures=DSC_MEASURES, evaluations=DSC_EVALS, baseline="instance",
    paper_scale=DSC_PAPER_SCALE, paper_recipe="dsc_resnet50_8x32-800e_coco")


# ------------------------------------------------------------------------------------------------ D3SSL
D3SSL_SMALL, SOCO_SMALL = "d3ssl_resnet18-w32_1x32-450it_msrc-v2", "soco_resnet18-w32_1x32-450it_msrc-v2"
D3SSL_DESC = ("COCO (Tables 5, 7) or OpenImage-MINI (Table 6) pre-training, 200 epochs; VOC 07+12 AP, CR and MCS",
              "MSRC-v2, the 450-step recipes (ResNet-18 width 32, 128 px); O-KNN (frozen) for VOC AP, "
              "CR / MCS of layer4 (semssl eval bias)")


D3SSL_PAPER_EVAL = (
    "semssl transfer detect --checkpoint {run} --recipe voc0712_c4 --train $VOC/trainval0712.json "
    "--test $VOC/test2007.json --out {run}/transfer_detect",
    "semssl eval bias --checkpoint {run} --data $OPENIMAGE_MINI/annotations.json --size 224 "
    "--out {run}/eval_bias.json",
)


def _d3ssl_paper_scale(images: str) -> tuple[str, ...]:
    """Tables 5 and 7 pre-train on COCO, Table 6 on OpenImage-MINI; 200 epochs each."""
    return (f"semssl pretrain -c {{recipe}} {{overrides}} trainer.seed={{seed}} data.train={images} "
            "trainer.max_epochs=200 eval.enabled=false trainer.out_dir={out} trainer.run_name={run_name}",
            *D3SSL_PAPER_EVAL)


D3SSL_EVALS = ("objects_msrc", "bias_msrc", "detect_msrc")
NO_DP = "method.depositioning=false"
PRC = "{name: prc, views: [x1, x2s], area: [0.2, 0.5]}"
PRM = "{name: prm, views: [x1, x2s], scale: [0.2, 0.6], aspect: [0.75, 1.3333333333333333]}"
NO_JITTER, RBJ = "data.views.0.box_jitter_p=0", "data.views.0.box_jitter_p=0.5"
JITTER = ("data.views.0.box_jitter_p=0.5", "data.views.0.box_jitter_grow=true")
CUTOUT = ("data.views.1.box_cutout_p=0.5", "data.views.1.box_cutout_area=[0.1, 0.3]")


def _transforms(*entries: str) -> str:
    return f"data.batch_transforms=[{', '.join(entries)}]"


D3SSL_TABLE5 = Table(
    "d3ssl", "table5", "Combinations of the region-level augmentations (de-coupling branch, without L_dp)",
    *D3SSL_DESC,
    rows=(Row("none", "none", D3SSL_SMALL, (NO_DP, _transforms(), NO_JITTER), {"oknn": 54.5, "ap": 54.5}),
          Row("cutout", "random cutout", D3SSL_SMALL, (NO_DP, _transforms(), NO_JITTER, *CUTOUT),
              {"oknn": 54.6, "ap": 54.6}),
          Row("prc_jitter", "PRC + box jittering", D3SSL_SMALL, (NO_DP, _transforms(PRC), *JITTER),
              {"oknn": 54.9, "ap": 54.9}),
          Row("prc", "PRC", D3SSL_SMALL, (NO_DP, _transforms(PRC), NO_JITTER), {"oknn": 54.9, "ap": 54.9}),
          Row("prc_rbj", "PRC + RBJ", D3SSL_SMALL, (NO_DP, _transforms(PRC), RBJ), {"oknn": 55.2, "ap": 55.2}),
          Row("prc_rbj_prm", "PRC + RBJ + PRM", D3SSL_SMALL, (NO_DP, _transforms(PRC, PRM)),
              {"oknn": 55.5, "ap": 55.5})),
    measures=(OKNN_AP, CR, AP), evaluations=D3SSL_EVALS, baseline="none",
    paper_scale=_d3ssl_paper_scale("$COCO/train2017"), paper_recipe="d3ssl_resnet50_8x128-800e_coco")

SOCO_AUG = ("data.views.0.box_jitter_p=0.5", "data.views.0.box_jitter_grow=false", "data.views.1.box_cutout_p=0",
            _transforms("{name: prc, views: [x1, x2]}", "{name: prm, views: [x1, x2]}"))
D3SSL_TABLE6 = Table(
    "d3ssl", "table6", "D3SSL's augmentations applied to SoCo", *D3SSL_DESC,
    rows=(Row("soco", "SoCo", SOCO_SMALL, (), {"oknn": 55.3, "ap": 55.3, "ap50": 80.4, "ap75": 61.6, "cr": 1.31},
              paper_recipe="soco_resnet50_8x128-400e_imagenet"),
          Row("soco_aug", "SoCo + Aug (D3SSL)", SOCO_SMALL, SOCO_AUG,
              {"oknn": 55.8, "ap": 55.8, "ap50": 81.2, "ap75": 62.1, "cr": 1.20},
              paper_recipe="soco_resnet50_8x128-400e_imagenet")),
    measures=(OKNN_AP, CR, AP, AP50, AP75), evaluations=D3SSL_EVALS, baseline="soco",
    paper_scale=_d3ssl_paper_scale("$OPENIMAGE_MINI/train"), paper_recipe="soco_resnet50_8x128-400e_imagenet")

D3SSL_TABLE7 = Table(
    "d3ssl", "table7", "Ablation of the training modules (L_dp)", *D3SSL_DESC,
    rows=(Row("wo_dp", "w/o L_dp", D3SSL_SMALL, (NO_DP, _transforms(PRC, PRM)),
              {"oknn": 55.5, "ap": 55.5, "cr": 1.33, "mcs": 0.68}),
          Row("w_dp", "w/ L_dp (D3SSL)", D3SSL_SMALL, (), {"oknn": 57.0, "ap": 57.0, "cr": 1.17, "mcs": 0.82})),
    measures=(OKNN_AP, CR, MCS, AP), evaluations=D3SSL_EVALS, baseline="wo_dp",
    paper_scale=_d3ssl_paper_scale("$COCO/train2017"), paper_recipe="d3ssl_resnet50_8x128-800e_coco")


TABLES: dict[tuple[str, str], Table] = {(t.paper, t.name): t for t in (
    SCFS_TABLE7, SCFS_TABLE8, SCFS_TABLE9, SCD_TABLE3, SCD_TABLE4, DSC_TABLE4, DSC_TABLE5,
    D3SSL_TABLE5, D3SSL_TABLE6, D3SSL_TABLE7)}
