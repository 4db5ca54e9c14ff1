"""Dense (segmentation) probe: a linear 1x1-conv head on frozen stage maps -> mIoU and pixel accuracy
(docs/design.md §Evaluation protocols; the small-scale stand-in for DSC's VOC/Cityscapes FCN transfer).

Protocol (``semssl eval dense``):

1. every image and its class-index mask are resized to ``size x size`` (image: bilinear, antialiased, ImageNet
   normalisation; mask: nearest) — Decision: the whole image, aspect not kept (SoCo's view 1 does the same), so
   no pixel of the mask is cropped away;
2. the frozen model's map of kind ``stage`` (``layer4`` by default; any kind ``Method.features`` offers, e.g.
   DenseCL/DSC ``dense``) is computed once per image in eval mode and kept in memory (float32);
3. Decision: each channel is standardised with the training split's mean and standard deviation over all
   positions (a fixed affine map the head could absorb, but it makes one learning rate fit every model: a
   random network's un-normalised features and a trained one's differ in scale by orders of magnitude);
4. a ``Conv2d(C, K, 1)`` head is trained with Adam (lr ``lr`` 0.01, cosine to 0, ``epochs`` 50 passes over
   the training split in random order); its logits are upsampled bilinearly (``align_corners=False``) to the
   mask size and trained with cross-entropy, ``ignore_index`` pixels excluded. Decision: each step scores
   ``pixels_per_image`` (1024) random pixels of each image, with exactly the upsampled logits there, instead of
   all of them (an unbiased estimate of the full loss at a fraction of the cost; 0 = every pixel). The lr
   matters little after step 3: a random ResNet-18's layer4 on 300 built-in scenes gave mIoU 9.4-10.0 for
   lr 0.003-0.1;
5. on the test split: ``dense_miou`` = mean over classes of TP / (TP + FP + FN), over the classes present in
   the test masks or the predictions (as mmseg's nan-mean), and ``dense_pixel_acc``, in percent.

Classes are the mask values found in the training and test masks other than ``ignore_index``, sorted and
renumbered 0..K-1 (so COCO panoptic ids up to 200 give K = the number of classes present, not 201).
``--class-map FILE`` merges raw values first (:func:`read_class_map`): a JSON ``{raw: merged}``, or a COCO file
whose categories' ``supercategory`` becomes the class — on coco128, 133 panoptic classes become 27
supercategories, a probe whose classes each occur in enough of the 100 training images to be learned.

Inputs (``--train`` / ``--test``):

* ``synthetic:scenes`` — the built-in scenes (train split for ``--train``, test split for ``--test``;
  ``synthetic:scenes:train`` / ``synthetic:scenes:test`` name one explicitly), generated with the run's
  ``data.synthetic`` settings if missing;
* a COCO JSON with segmentations (``*.json``): a semantic mask is drawn from the instance masks, background 0
  and each object ``category index + 1`` (categories sorted by id), later annotations over earlier ones where
  they overlap (drawing order). Crowd annotations are dropped by the source, so their pixels are background;
* ``IMAGES_DIR:MASKS_DIR`` — every image under ``IMAGES_DIR`` with a class-index PNG of the same relative path
  and stem under ``MASKS_DIR`` (single-channel ``L``/``P``/16-bit); images without a mask are skipped and
  counted (``skipped_no_mask``). E.g. coco128's semantic masks (0 = unlabeled: use ``--ignore-index 0``)::

      D=${SEMSSL_DATA_DIR:-$HOME/.cache/semssl}/coco128      # the data root; semssl data get coco128
      semssl eval dense --checkpoint RUN --ignore-index 0 \\
          --train $D/images/train2017:$D/semantic_segmentation/masks/train2017 \\
          --test $D/images/val2017:$D/semantic_segmentation/masks/val2017

  (a quoted ``'$SEMSSL_DATA_DIR/...'`` works too: semssl expands it to the data root itself).
* ``IMAGES_DIR:MASKS_DIR:LIST_FILE`` — the same pairs, only the images named in ``LIST_FILE`` (one id per line:
  the path relative to ``IMAGES_DIR``, with or without its extension), for sets whose split is a list:
  Stanford Background (``images:labels:splits/train.txt``, ``--ignore-index 15``) and MSRC-v2
  (``images:semantic:train.txt``, ``--ignore-index 255``).

``--baselines`` also probes, with the same protocol, the random initialisation of the same architecture and
seed (``random_init``: a run's method rebuilt from its config with the seed, as the pre-training's baseline;
for ``--stage dense`` the random backbone's ``layer4``), the same with BatchNorm statistics re-estimated on the
training images (``random_init_bn``) and the RGB values average-pooled to the evaluated map's resolution
(``pixels``: the same 1x1 head on the colour at each location after the same downsampling), and writes
``{"trained", "random_init", "random_init_bn", "pixels"}`` like a run's metrics.json
(docs/design.md §Random-init baselines: "beats random init" = beats the best of the three). ``--random-init
--arch A`` probes the three baselines alone.

Memory: the maps of both splits are held in memory as float32 (N x C x h x w: 1,000 images of ResNet-50 at
224 px = 400 MB), fine for the small probe datasets it is meant for.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from semssl.errors import ConfigError, DataError

log = logging.getLogger("semssl.eval")

MASK_EXTENSION = ".png"


# --------------------------------------------------------------------------------------------------------------
# Data: images with class-index masks
# --------------------------------------------------------------------------------------------------------------
class SegmentationSource:
    """Images with class-index masks: ``len()``, ``load(i) -> (PIL RGB image, int64 mask [H, W])``, ``skipped``
    (pairs left out, by reason) and ``names`` (each index's image file, when known)."""

    def __init__(self, location: str, count: int, load: Callable[[int], tuple[Image.Image, np.ndarray]],
                 skipped: dict[str, int] | None = None, names: list[str] | None = None) -> None:
        self.location, self._count, self._load = location, count, load
        self.skipped = skipped or {}
        self.names = names  # the image file of each index, for messages (None: not known, e.g. COCO)

    def __len__(self) -> int:
        return self._count

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        return self._load(index)


def coco_semantic_mask(masks: Tensor, labels: Tensor, height: int, width: int) -> np.ndarray:
    """Semantic mask of one image from its instance masks: 0 = background, ``label + 1`` for each object, in
    annotation order so later objects are drawn over earlier ones.

    Args:
        masks: ``uint8 [N, H, W]`` 0/1 instance masks.
        labels: ``int64 [N]`` category indices (0-based, categories sorted by id).
    """
    out = np.zeros((height, width), dtype=np.int64)
    for mask, label in zip(masks.numpy(), labels.tolist()):
        out[mask.astype(bool)] = int(label) + 1
    return out


def coco_segmentation(path: str, on_error: str = "skip") -> SegmentationSource:
    """A COCO instances JSON with segmentations as images + semantic masks (:func:`coco_semantic_mask`)."""
    from semssl.data.sources import CocoSource

    source = CocoSource(path, load_masks=True, on_error=on_error)
    if not source.load_masks:
        raise DataError(f"'{path}': the COCO file has no segmentations, so it has no masks for the dense probe")

    def load(index: int) -> tuple[Image.Image, np.ndarray]:
        sample = source[index]
        image = sample["image"]
        return image, coco_semantic_mask(sample["masks"], sample["box_labels"], image.height, image.width)

    return SegmentationSource(str(path), len(source), load)


def read_mask(path: Path) -> np.ndarray:
    """A single-channel class-index PNG as ``int64 [H, W]`` (``P`` masks give their palette indices)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise DataError(f"mask '{path}' has mode {img.mode}: expected a single-channel class-index PNG "
                                f"(L, P or 16-bit), not a colour-coded one")
            return np.asarray(img, dtype=np.int64)
    except OSError as err:
        raise DataError(f"cannot read mask '{path}': {err}") from err


def read_split_ids(list_file: str) -> list[str]:
    """The image ids of a split list: one per line, the path relative to the images folder with or without its
    extension (Stanford Background's ``splits/train.txt``, MSRC-v2's ``train.txt``); blank and ``#`` lines
    skipped."""
    from semssl.data.sources.base import IMG_EXTENSIONS

    path = Path(list_file)
    if not path.is_file():
        raise DataError(f"split list '{list_file}' does not exist (expected IMAGES_DIR:MASKS_DIR:LIST_FILE)")
    ids = []
    for line in path.read_text().splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.lower().endswith(IMG_EXTENSIONS):
            item = item.rsplit(".", 1)[0]
        ids.append(Path(item).as_posix())
    if not ids:
        raise DataError(f"split list '{list_file}' names no image")
    return ids


def folder_pair_segmentation(images_dir: str, masks_dir: str, on_error: str = "skip",
                             list_file: str | None = None) -> SegmentationSource:
    """Every image under ``images_dir`` whose mask ``masks_dir/<relative path>.png`` exists; with ``list_file``,
    only the images it names (:func:`read_split_ids`; ids without such a pair are counted in
    ``skipped_not_in_folder``)."""
    from semssl.data.sources import ImageFolderSource

    source = ImageFolderSource(images_dir, labels=False, on_error=on_error)
    masks_root = Path(masks_dir)
    if not masks_root.is_dir():
        raise DataError(f"masks folder '{masks_dir}' does not exist (expected IMAGES_DIR:MASKS_DIR)")
    kept, masks, missing = [], [], []
    for path in source.paths:
        mask = (masks_root / path.relative_to(source.root)).with_suffix(MASK_EXTENSION)
        if mask.is_file():
            kept.append(path)
            masks.append(mask)
        else:
            missing.append(path)
    if not kept:
        raise DataError(f"no image of '{images_dir}' has a mask in '{masks_dir}' (looked for "
                        f"<relative path>{MASK_EXTENSION})")
    if missing:
        log.warning("dense probe: %d image(s) of '%s' have no mask in '%s' and are left out (first: '%s', no '%s')",
                    len(missing), images_dir, masks_dir, missing[0],
                    (masks_root / missing[0].relative_to(source.root)).with_suffix(MASK_EXTENSION))
    skipped = {"skipped_no_mask": len(missing)}
    location = f"{images_dir}:{masks_dir}"
    if list_file is not None:
        wanted = read_split_ids(list_file)
        index = {p.relative_to(source.root).with_suffix("").as_posix(): i for i, p in enumerate(kept)}
        chosen = sorted({index[w] for w in wanted if w in index})
        absent = [w for w in dict.fromkeys(wanted) if w not in index]
        if absent:
            log.warning("%d id(s) of '%s' have no image with a mask in '%s' (e.g. '%s') and are left out",
                        len(absent), list_file, images_dir, absent[0])
        if not chosen:
            raise DataError(f"split list '{list_file}' names no image of '{images_dir}' with a mask in "
                            f"'{masks_dir}' (e.g. '{wanted[0]}')")
        skipped["skipped_not_in_folder"] = len(absent)
        kept, masks = [kept[i] for i in chosen], [masks[i] for i in chosen]
        location = f"{location}:{list_file}"
    source.paths, source.targets = kept, [-1] * len(kept)

    def load(index: int) -> tuple[Image.Image, np.ndarray]:
        sample = source[index]
        image, mask = sample["image"], read_mask(masks[sample["index"]])
        if mask.shape != (image.height, image.width):
            raise DataError(f"mask '{masks[sample['index']]}' is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"'{kept[sample['index']]}' is {image.width}x{image.height}")
        return image, mask

    return SegmentationSource(location, len(kept), load, skipped, [str(p) for p in kept])


def synthetic_scenes_json(split: str, cfg: Any = None) -> str:
    """The annotations.json of the built-in scenes' ``split`` (generated if missing, with ``cfg.data.synthetic``
    when a run config is given, else the defaults)."""
    from semssl.config import Config
    from semssl.data.synthetic import synth_config
    from semssl.data.synthetic.build import ensure_synthetic

    cfg = cfg if cfg is not None else Config()
    root = ensure_synthetic(Path(cfg.data.synthetic.root) if cfg.data.synthetic.root else None, synth_config(cfg))
    return str(root / "scenes" / split / "annotations.json")


def segmentation_source(spec: str, split: str, cfg: Any = None, on_error: str = "skip") -> SegmentationSource:
    """Parse a ``--train`` / ``--test`` value (module docstring): ``synthetic:scenes[:train|test]``, a COCO JSON,
    ``IMAGES_DIR:MASKS_DIR`` or ``IMAGES_DIR:MASKS_DIR:LIST_FILE``. ``split`` (``train``/``test``) is the split a
    bare ``synthetic:scenes`` means."""
    if spec.startswith("synthetic"):
        parts = spec.split(":")
        if parts[:2] != ["synthetic", "scenes"] or len(parts) > 3 or (len(parts) == 3 and parts[2] not in
                                                                       ("train", "test")):
            raise ConfigError(f"'{spec}': the built-in dense data is synthetic:scenes, synthetic:scenes:train or "
                              f"synthetic:scenes:test")
        return coco_segmentation(synthetic_scenes_json(parts[2] if len(parts) == 3 else split, cfg), on_error)
    if spec.lower().endswith(".json"):
        return coco_segmentation(spec, on_error)
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"'{spec}': expected synthetic:scenes, a COCO JSON with segmentations, IMAGES_DIR:MASKS_DIR "
                          f"or IMAGES_DIR:MASKS_DIR:LIST_FILE (a folder of images, a folder of class-index PNG masks "
                          f"and optionally a file of image ids, one per line)")
    return folder_pair_segmentation(parts[0], parts[1], on_error, parts[2] if len(parts) == 3 else None)


class SegmentationDataset(Dataset):
    """A :class:`SegmentationSource` resized to ``size x size``: ``{"image": [3, S, S] normalised, "mask":
    int64 [S, S] raw values}``."""

    def __init__(self, source: SegmentationSource, size: int) -> None:
        self.source, self.size = source, size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image, mask = self.source.load(index)
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        x = F.interpolate(x[None].float() / 255, size=(self.size, self.size), mode="bilinear",
                          align_corners=False, antialias=True)[0]
        m = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(self.size, self.size),
                          mode="nearest-exact")[0, 0].long()
        return {"image": (x - self.mean) / self.std, "mask": m}


# --------------------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DenseProbeConfig:
    """Settings of the dense probe (module docstring)."""

    stage: str = "layer4"
    size: int = 128
    epochs: int = 50
    lr: float = 0.01
    weight_decay: float = 0.0
    ignore_index: int = 255
    class_map: Optional[dict[int, int]] = None  # raw mask value -> merged class value (read_class_map)
    output_stride: int = 0  # 8 / 16: the backbone dilated for the probe (models.backbones.dilate_backbone); 0: as is
    pixels_per_image: int = 1024  # random pixels per image and step of the head's loss (0: all)
    batch_size: int = 0  # head training batch; 0: as many images as keep the sampled logits <= 16M values
    feature_batch_size: int = 64
    num_workers: int = 2
    seed: int = 0


def stage_kinds(stage: str) -> list[str]:
    """The map kinds of a ``--stage`` value: one (``layer4``) or several joined by ``+`` (``layer3+layer4``)."""
    kinds = [k.strip() for k in stage.split("+")]
    if not all(kinds) or len(set(kinds)) != len(kinds):
        raise ConfigError(f"--stage {stage!r}: expected a map kind or distinct kinds joined by '+' "
                          f"(e.g. layer3+layer4)")
    return kinds


def stage_map(model: Any, images: Tensor, stage: str, branch: str | None = None) -> Tensor:
    """``model.features(images, branch, kind)`` of the kind ``stage``; for ``a+b+...`` each map upsampled
    bilinearly (``align_corners=False``) to the largest of them and concatenated along channels (a hypercolumn:
    the coarse stage's semantics at the finer stage's resolution)."""
    maps = []
    for kind in stage_kinds(stage):
        fmap = model.features(images, branch=branch, kind=kind)
        if fmap.dim() != 4:
            raise ConfigError(f"--stage {kind}: the model's '{kind}' features are not a map "
                              f"(shape {tuple(fmap.shape)})")
        maps.append(fmap)
    return concat_maps(maps)


def concat_maps(maps: list[Tensor]) -> Tensor:
    """``[B, C_i, h_i, w_i]`` maps upsampled bilinearly (``align_corners=False``) to the largest and concatenated
    along channels; one map is returned as it is."""
    if len(maps) == 1:
        return maps[0]
    size = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
    return torch.cat([m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear",
                                                                   align_corners=False) for m in maps], dim=1)


def dilated_view(model: Any, output_stride: int, branch: str | None = None) -> Any:
    """The model the probe reads at ``output_stride``: ``model`` itself for 0 (or a model without a backbone,
    e.g. :class:`PixelMaps`), else a deep copy whose ``branch`` backbone is dilated in place
    (:func:`~semssl.models.backbones.dilate_backbone`; a method's own heads, e.g. DenseCL's ``dense`` map, then
    read the denser map too). The trained weights are unchanged: the dilated network computes the original's
    features at every shift of the input grid (its *a trous* equivalence), so it reads the same representation
    more densely."""
    if not output_stride or not hasattr(model, "backbone_for"):
        return model
    from semssl.models.backbones import dilate_backbone

    model = copy.deepcopy(model)
    resolved = model.resolve_branch(branch) if hasattr(model, "resolve_branch") else branch
    dilate_backbone(model.backbone_for(resolved), output_stride)
    return model


@torch.no_grad()
def extract_maps(model: Any, dataset: Dataset, kind: str, branch: str | None = None, batch_size: int = 64,
                 num_workers: int = 0, device: Any = "cpu") -> tuple[Tensor, Tensor]:
    """``(maps [N, C, h, w] float32 on the CPU, masks [N, S, S] int64)`` of the whole dataset, in order, through
    :func:`stage_map` of ``kind`` (the model is put in eval mode for the call and restored)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    feats, masks = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            fmap = stage_map(model, batch["image"].to(device), kind, branch)
            feats.append(fmap.float().cpu())
            masks.append(batch["mask"])
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return torch.cat(feats), torch.cat(masks)


def merge_classes(masks: Tensor, class_map: dict[int, int], ignore_index: int) -> Tensor:
    """Map raw mask values through ``class_map`` (e.g. COCO categories -> their supercategory,
    :func:`read_class_map`). ``ignore_index`` stays the ignore index, and so does a value the map does not name
    (logged with its pixel count), so a partial map probes only the classes it names."""
    if ignore_index in class_map.values():
        raise ConfigError(f"--class-map maps a value to the ignore index {ignore_index}; merged classes must differ "
                          f"from it")
    raw = torch.unique(masks).tolist()
    unnamed = [v for v in raw if v != ignore_index and v not in class_map]
    if unnamed:
        log.warning("dense probe: mask values %s are not in the class map; their %d pixels are ignored",
                    unnamed[:20], int(torch.isin(masks, torch.tensor(unnamed)).sum()))
    size = max(max(raw), max(class_map, default=0), max(ignore_index, 0)) + 1
    lut = torch.full((size,), ignore_index, dtype=torch.long)
    for old, new in class_map.items():
        if 0 <= old < size:
            lut[old] = new
    return lut[masks.clamp(min=0)].where(masks >= 0, masks)


def read_class_map(path: str) -> dict[int, int]:
    """A class map from a JSON file: either an object ``{"raw value": merged value, ...}``, or a COCO-style
    file with ``categories`` carrying ``supercategory`` (COCO instances or panoptic JSON), which merges each
    category id into its supercategory: ``1 + `` the supercategory's index in name order (0 is left free for
    "unlabeled", e.g. coco128's semantic masks with ``--ignore-index 0``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--class-map: file not found: '{p}'")
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"--class-map '{p}': not readable JSON ({exc})") from exc
    if isinstance(doc, dict) and isinstance(doc.get("categories"), list):
        cats = doc["categories"]
        if not all(isinstance(c, dict) and "id" in c and "supercategory" in c for c in cats):
            raise DataError(f"--class-map '{p}': every entry of 'categories' needs 'id' and 'supercategory'")
        supers = sorted({str(c["supercategory"]) for c in cats})
        return {int(c["id"]): 1 + supers.index(str(c["supercategory"])) for c in cats}
    if isinstance(doc, dict) and doc:
        try:
            return {int(k): int(v) for k, v in doc.items()}
        except (TypeError, ValueError) as exc:
            raise DataError(f"--class-map '{p}': keys and values must be integers ({exc})") from exc
    raise DataError(f"--class-map '{p}': expected a JSON object of integer pairs or a COCO file with 'categories'")


def class_index(train_masks: Tensor, test_masks: Tensor, ignore_index: int,
                class_map: Optional[dict[int, int]] = None) -> tuple[list[int], Tensor, Tensor]:
    """Renumber mask values: the values found in either split other than ``ignore_index``, sorted, become
    0..K-1; ``ignore_index`` (and nothing else) becomes -1. With ``class_map`` the raw values are merged first
    (:func:`merge_classes`). Returns ``(values, train, test)``."""
    if class_map:
        train_masks = merge_classes(train_masks, class_map, ignore_index)
        test_masks = merge_classes(test_masks, class_map, ignore_index)
    values = sorted(set(torch.unique(train_masks).tolist()) | set(torch.unique(test_masks).tolist()))
    values = [v for v in values if v != ignore_index]
    if not values:
        raise DataError("dense probe: every mask pixel is the ignore index; nothing to learn")
    if min(values) < 0:
        raise DataError(f"dense probe: negative mask values {min(values)} (class indices must be >= 0)")
    lut = torch.full((max(max(values), max(ignore_index, 0)) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(values)] = torch.arange(len(values))
    return values, lut[train_masks], lut[test_masks]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``[K, K]`` counts, rows = ground truth, columns = prediction, over pixels with ``target >= 0``."""
    valid = target >= 0
    flat = target[valid] * num_classes + pred[valid]
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: Tensor) -> dict[str, Any]:
    """mIoU (mean over classes present in the ground truth or the predictions) and pixel accuracy, in percent,
    and the per-class IoU (None for a class in neither)."""
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    return {"dense_miou": float(iou[present].mean() * 100) if present.any() else 0.0,
            "dense_pixel_acc": float(tp.sum() / total * 100) if total > 0 else 0.0,
            "per_class_iou": [None if math.isnan(v) else round(v * 100, 3) for v in iou.tolist()]}


def _standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    return (train - mean) / std, (test - mean) / std


def upsampled_logits_at(logits: Tensor, ys: Tensor, xs: Tensor, size: tuple[int, int]) -> Tensor:
    """The values at pixels ``(ys, xs)`` (``[B, P]`` each) of ``logits`` ``[B, K, h, w]`` upsampled bilinearly
    (``align_corners=False``) to ``size``, without upsampling the whole map: ``[B, K, P]``. Equal to
    ``F.interpolate(logits, size, mode="bilinear")[b, :, ys, xs]`` (``grid_sample`` at the output pixels' centres
    with border padding is the same interpolation)."""
    height, width = size
    gx = (xs.float() + 0.5) / width * 2 - 1
    gy = (ys.float() + 0.5) / height * 2 - 1
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(1)  # [B, 1, P, 2]
    return F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0]


def train_linear_head(feats: Tensor, masks: Tensor, num_classes: int, config: DenseProbeConfig) -> nn.Conv2d:
    """The 1x1-conv head on standardised ``feats`` ``[N, C, h, w]`` for ``masks`` ``[N, S, S]`` (class indices,
    -1 = ignored): Adam, cosine lr, cross-entropy of the logits upsampled bilinearly to the mask size.

    Decision: each step evaluates the upsampled loss at ``pixels_per_image`` random pixels of each image (exactly
    the upsampled logits there, :func:`upsampled_logits_at`) instead of all of them — an unbiased estimate of the
    full-resolution loss at a fraction of the cost (0 = every pixel)."""
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    head = nn.Conv2d(feats.shape[1], num_classes, 1)
    n, size = feats.shape[0], tuple(masks.shape[-2:])
    pixels = size[0] * size[1]
    per_image = config.pixels_per_image if 0 < config.pixels_per_image < pixels else pixels
    bs = config.batch_size or max(1, min(64, (1 << 24) // (num_classes * per_image)))
    steps_per_epoch = math.ceil(n / bs)
    total = max(1, config.epochs * steps_per_epoch)
    opt = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    flat_masks = masks.reshape(n, -1)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            if per_image == pixels:
                logits = F.interpolate(head(feats[idx]), size=size, mode="bilinear", align_corners=False)
                target = masks[idx]
            else:
                pick = torch.randint(pixels, (len(idx), per_image), generator=g)
                logits = upsampled_logits_at(head(feats[idx]), pick // size[1], pick % size[1], size)
                target = flat_masks[idx].gather(1, pick)
            if (target >= 0).any():
                loss = F.cross_entropy(logits, target, ignore_index=-1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return head


@torch.no_grad()
def predict(head: nn.Conv2d, feats: Tensor, size: tuple[int, int], batch_size: int = 16) -> Tensor:
    """``[N, S, S]`` argmax class of the upsampled logits."""
    out = []
    for i in range(0, feats.shape[0], batch_size):
        logits = F.interpolate(head(feats[i:i + batch_size]), size=size, mode="bilinear", align_corners=False)
        out.append(logits.argmax(dim=1))
    return torch.cat(out)


def probe_maps(train_feats: Tensor, train_masks: Tensor, test_feats: Tensor, test_masks: Tensor,
               config: DenseProbeConfig) -> dict[str, Any]:
    """The probe on pre-computed maps and raw masks: renumber classes, standardise, train, score the test split."""
    values, train_y, test_y = class_index(train_masks, test_masks, config.ignore_index, config.class_map)
    train_x, test_x = _standardise(train_feats, test_feats)
    head = train_linear_head(train_x, train_y, len(values), config)
    pred = predict(head, test_x, tuple(test_y.shape[-2:]))
    res = segmentation_scores(confusion_matrix(pred, test_y, len(values)))
    res.update(num_classes=len(values), class_values=values, feature_shape=list(train_feats.shape[1:]),
               train_images=int(train_feats.shape[0]), test_images=int(test_feats.shape[0]))
    return res


def dense_probe(model: Any, train: Dataset, test: Dataset, config: DenseProbeConfig, branch: str | None = None,
                device: Any = "cpu") -> dict[str, Any]:
    """Probe ``model`` (anything with ``features(images, branch, kind)`` returning maps) on two
    :class:`SegmentationDataset` splits; returns ``dense_miou``, ``dense_pixel_acc`` (percent) and details."""
    kw = {"kind": config.stage, "branch": branch, "batch_size": config.feature_batch_size,
          "num_workers": config.num_workers, "device": device}
    model = dilated_view(model, config.output_stride, branch)
    train_x, train_m = extract_maps(model, train, **kw)
    test_x, test_m = extract_maps(model, test, **kw)
    return probe_maps(train_x, train_m, test_x, test_m, config)


# --------------------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------------------
class PixelMaps(nn.Module):
    """The ``pixels`` baseline as a model: the (normalised) RGB values average-pooled to ``grid`` (the evaluated
    stage map's size), so the same 1x1 head sees the colour at each location after the same downsampling."""

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = tuple(grid)

    def features(self, images: Tensor, branch: str | None = None, kind: str = "layer4") -> Tensor:
        return F.adaptive_avg_pool2d(images, self.grid)


@torch.no_grad()
def reestimate_bn(backbone: nn.Module, dataset: Dataset, batch_size: int = 64, num_workers: int = 0,
                  device: Any = "cpu") -> nn.Module:
    """A copy of ``backbone`` whose BatchNorm running statistics are re-estimated (cumulative average, plain
    BatchNorm over each batch) on every image of ``dataset``; in eval mode."""
    backbone = copy.deepcopy(backbone)
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
            if hasattr(module, "num_splits"):
                module.num_splits = 1
    backbone.train()
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        backbone(batch["image"].to(device))
    return backbone.eval()


def random_backbone(cfg: Any, model: Any, seed: int) -> nn.Module:
    """The random initialisation of the evaluated architecture with ``seed``: the run's method rebuilt from its
    config (its default branch's backbone, as the pre-training's ``random_init``), or, for a plain backbone, a
    ResNet of the same depth, stem and width."""
    torch.manual_seed(seed)
    if cfg is not None and getattr(cfg, "method", None) is not None:
        from semssl.methods import build_method

        method = build_method(cfg)
        return method.backbone_for(method.resolve_branch())
    backbone = model.backbone_for(None)
    return _resnet(backbone.arch, backbone.small_input, getattr(backbone, "width", 64))


def _resnet(arch: str, small_input: bool, width: int) -> nn.Module:
    from semssl.models.backbones import ResNetBackbone

    return ResNetBackbone(arch, small_input=small_input, **({"width": width} if width != 64 else {}))


def baseline_probes(random_net: nn.Module, train: Dataset, test: Dataset, config: DenseProbeConfig,
                    grid: tuple[int, int] | None = None) -> dict[str, dict]:
    """``{"random_init", "random_init_bn", "pixels"}`` (docs/design.md §Random-init baselines): the probe on the random
    network as it is, on a copy with BatchNorm statistics re-estimated on the training images, and on the RGB
    values pooled to ``grid`` (default: the random network's map size)."""
    from semssl.models.backbones import BackboneModel

    out = {"random_init": dense_probe(BackboneModel(random_net.eval()), train, test, config)}
    recal = reestimate_bn(random_net, train, config.feature_batch_size, config.num_workers)
    out["random_init_bn"] = dense_probe(BackboneModel(recal), train, test, config)
    h, w = grid or out["random_init"]["feature_shape"][1:]
    pixel_config = DenseProbeConfig(**{**asdict(config), "stage": "rgb", "output_stride": 0})  # one RGB map
    out["pixels"] = dense_probe(PixelMaps((h, w)), train, test, pixel_config)
    return out


def dense_baselines(model: Any, cfg: Any, train: Dataset, test: Dataset, config: DenseProbeConfig,
                    branch: str | None = None, seed: int = 0) -> dict[str, dict]:
    """``{"trained", "random_init", "random_init_bn", "pixels"}``: the probe on ``model`` and on the baselines of
    its architecture and ``seed`` (the random network's stage of the same name; pixels at the model's map size).
    """
    from semssl.models.backbones import STAGES

    out = {"trained": dense_probe(model, train, test, config, branch)}
    grid = tuple(out["trained"]["feature_shape"][1:])
    kinds = stage_kinds(config.stage)
    if not set(kinds) <= set(STAGES):  # e.g. DenseCL's "dense" map: compare with the random backbone's layer4
        stage = "+".join(dict.fromkeys(k if k in STAGES else "layer4" for k in kinds))
        log.warning("--baselines: the random network has no '%s' map; its %s is probed", config.stage, stage)
        config = DenseProbeConfig(**{**asdict(config), "stage": stage})
    out.update(baseline_probes(random_backbone(cfg, model, seed), train, test, config, grid))
    return out


# --------------------------------------------------------------------------------------------------------------
# Command line: semssl eval dense (its options: semssl.eval.options.add_dense_arguments)
# --------------------------------------------------------------------------------------------------------------
def _load(args: argparse.Namespace) -> tuple[Any, dict, Any]:
    """The checkpoint's model (eval mode), its info and its run config (None for a plain state_dict)."""
    from semssl.checkpoints import load_model

    if not args.checkpoint:
        raise ConfigError("semssl eval dense: give --checkpoint (a run folder, a .ckpt, or a torchvision "
                          "state_dict) or --random-init")
    model, info, cfg = load_model(args.checkpoint, arch=args.arch)
    info["branch"] = model.resolve_branch(args.branch)
    if any(k == "pooled" or k not in model.feature_kinds for k in stage_kinds(args.stage)):
        raise ConfigError(f"--stage {args.stage}: this model's maps are "
                          f"{[k for k in model.feature_kinds if k != 'pooled']}")
    return model, info, cfg


def _print(title: str, results: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("model", "mIoU %", "pixel acc %", "classes", "map", "train / test images"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['dense_miou']:.2f}", f"{r['dense_pixel_acc']:.2f}", str(r["num_classes"]),
                      "x".join(str(v) for v in r["feature_shape"]), f"{r['train_images']} / {r['test_images']}")
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """``semssl eval dense``: the probe on a checkpoint (``trained``; with ``--baselines`` also the three
    random-init baselines of its architecture), or with ``--random-init`` on the baselines alone."""
    if args.random_init:
        model, info, cfg = None, {"source": "random init", "arch": args.arch or "resnet50",
                                  "small_input": args.small_input, "width": args.width, "seed": args.seed}, None
        if not set(stage_kinds(args.stage)) <= {"layer1", "layer2", "layer3", "layer4"}:
            raise ConfigError(f"--stage {args.stage}: a random backbone has layer1..layer4")
    else:
        model, info, cfg = _load(args)
    config = DenseProbeConfig(stage=args.stage, output_stride=args.output_stride, size=args.size, epochs=args.epochs,
                              lr=args.lr,
                              weight_decay=args.weight_decay, ignore_index=args.ignore_index,
                              class_map=read_class_map(args.class_map) if args.class_map else None,
                              pixels_per_image=args.pixels_per_image, batch_size=args.head_batch_size,
                              feature_batch_size=args.batch_size,
                              num_workers=args.workers, seed=args.seed)
    on_error = cfg.data.on_error if cfg is not None else "skip"
    train_src = segmentation_source(args.train, "train", cfg, on_error)
    test_src = segmentation_source(args.test, "test", cfg, on_error)
    train, test = SegmentationDataset(train_src, args.size), SegmentationDataset(test_src, args.size)
    if args.random_init:
        torch.manual_seed(args.seed)
        res = baseline_probes(_resnet(info["arch"], args.small_input, args.width), train, test, config)
    elif args.baselines:
        seed = cfg.trainer.seed if cfg is not None else args.seed  # a run's random init: its own seed
        res = dense_baselines(model, cfg, train, test, config, branch=args.branch, seed=seed)
    else:
        res = {"trained": dense_probe(model, train, test, config, branch=args.branch)}
    stride = f", output stride {args.output_stride}" if args.output_stride else ""
    _print(f"dense probe ({info['source']}, {args.stage}{stride}, {args.size} px)", res)
    if args.out:
        payload = {**res, "model": info, "train": args.train, "test": args.test, "protocol": asdict(config),
                   "skipped": {"train": train_src.skipped, "test": test_src.skipped}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2, default=float))
        print(f"wrote {args.out}")
    return 0
