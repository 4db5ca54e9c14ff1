"""Tests for semssl.data.sources: folders, file lists, COCO scenes, robust decoding, skips and errors."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from semssl.data.sources import (
    CocoSource,
    DataError,
    FileListSource,
    ImageDecodeError,
    ImageFolderSource,
    build_source,
    load_image,
)

# The shared data sit next to the repository (../shared from its root); the test that needs them skips without.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COCO128 = SHARED / "data" / "coco128"
COCO128_JSON = COCO128 / "coco_json_train2017" / "instances_train2017.json"


def _save(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 6)) -> Path:
    """Write a tiny solid-colour image (format from the suffix) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _channel0(img: Image.Image) -> list[int]:
    """First channel of a one-row image, left to right."""
    return np.asarray(img)[0, :, 0].tolist()


def _pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------


def test_image_folder_labelled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path / "dog" / "z.png", (0, 0, 255))
    _save(tmp_path / "dog" / "sub" / "a.jpg", (0, 255, 0))
    _save(tmp_path / "cat" / "b.PNG", (255, 0, 0))
    _save(tmp_path / "cat" / "a.bmp", (255, 0, 0))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="semssl.data"):
        src = build_source(tmp_path)
    assert isinstance(src, ImageFolderSource)
    assert src.classes == ["cat", "dog"]
    assert src.num_classes == 2
    assert [p.relative_to(tmp_path).as_posix() for p in src.paths] == [
        "cat/a.bmp", "cat/b.PNG", "dog/sub/a.jpg", "dog/z.png",
    ]
    assert src.targets == [0, 0, 1, 1]
    assert "empty" in caplog.text
    sample = src[3]
    assert sample["image"].mode == "RGB" and sample["image"].size == (8, 6)
    assert sample["label"] == 1 and sample["index"] == 3
    assert _pixel(sample["image"], (0, 0)) == (0, 0, 255)
    assert src.summary().startswith("4 images, 2 classes, 0 skipped")
    assert pickle.loads(pickle.dumps(src)).paths == src.paths  # DataLoader workers get a copy


def test_image_folder_unlabelled_flat_and_forced(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for name in ("b.png", "a.png", "c.jpeg"):
        _save(flat / name)
    src = ImageFolderSource(flat)
    assert [p.name for p in src.paths] == ["a.png", "b.png", "c.jpeg"]
    assert src.targets == [-1, -1, -1] and src.classes == [] and src[0]["label"] == -1
    assert "unlabelled" in src.summary()

    tree = tmp_path / "tree"
    _save(tree / "x" / "1.png")
    _save(tree / "y" / "deep" / "2.png")
    forced = ImageFolderSource(tree, labels=False)
    assert [p.relative_to(tree).as_posix() for p in forced.paths] == ["x/1.png", "y/deep/2.png"]
    assert forced.targets == [-1, -1] and forced[1]["label"] == -1


def test_image_folder_ambiguous_layout(tmp_path: Path) -> None:
    _save(tmp_path / "loose.png")
    _save(tmp_path / "cls" / "a.png")
    with pytest.raises(DataError, match="labels=True"):
        ImageFolderSource(tmp_path)
    assert ImageFolderSource(tmp_path, labels=True).classes == ["cls"]
    assert len(ImageFolderSource(tmp_path, labels=False)) == 2
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderSource(tmp_path / "cls", labels=True)


def test_image_folder_warns_when_classes_look_like_splits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save(tmp_path / "train" / "cat" / "a.png")
    _save(tmp_path / "val" / "cat" / "b.png")
    with caplog.at_level(logging.WARNING, logger="semssl.data"):
        src = ImageFolderSource(tmp_path)
    assert src.classes == ["train", "val"]
    assert "look like dataset splits" in caplog.text and str(tmp_path / "val") in caplog.text


def test_empty_folder_and_wrong_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        build_source(empty)
    assert str(empty) in str(info.value) and ".jpg" in str(info.value)

    (tmp_path / "images").mkdir()
    wrong = tmp_path / "imagse"
    with pytest.raises(DataError) as info:
        build_source(wrong)
    assert str(wrong) in str(info.value)
    assert "did you mean" in str(info.value) and str(tmp_path / "images") in str(info.value)

    with pytest.raises(DataError, match="not found"):
        ImageFolderSource(tmp_path / "nope" / "deeper")


# ------------------------------------------------------------------------------------------------
# File lists
# ------------------------------------------------------------------------------------------------


def test_file_list_relative_paths_comments_labels(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    _save(lists / "imgs" / "a.png", (255, 0, 0))
    _save(lists / "imgs" / "b.png", (0, 255, 0))
    absolute = _save(tmp_path / "elsewhere" / "c.png", (0, 0, 255))
    list_file = lists / "train.txt"
    list_file.write_text(f"# a comment\n\nimgs/a.png 2\n  imgs/b.png\t0  \n{absolute} 1\n")
    src = build_source(list_file)
    assert isinstance(src, FileListSource)
    assert src.paths == [lists / "imgs" / "a.png", lists / "imgs" / "b.png", absolute]
    assert src.targets == [2, 0, 1] and src.num_classes == 3
    assert src[0]["label"] == 2 and _pixel(src[0]["image"], (1, 1)) == (255, 0, 0)
    assert src[2]["label"] == 1 and _pixel(src[2]["image"], (1, 1)) == (0, 0, 255)

    unlabelled = tmp_path / "unlabelled.lst"
    unlabelled.write_text("a.png\nb.png\n")
    src = FileListSource(unlabelled, root=lists / "imgs")
    assert src.targets == [-1, -1] and src[1]["label"] == -1 and src.classes == []

    csv_file = lists / "train.csv"
    csv_file.write_text("path,label\nimgs/a.png,4\n")
    assert build_source(csv_file).targets == [4]


def test_file_list_errors_name_the_line(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("# header\na.png 0\n\na.png\n")
    with pytest.raises(DataError) as info:
        FileListSource(mixed)
    assert "line 4" in str(info.value) and str(mixed) in str(info.value)

    bad_label = tmp_path / "bad.txt"
    bad_label.write_text("a.png cat\n")
    with pytest.raises(DataError, match="line 1.*'cat'"):
        FileListSource(bad_label)

    wrong_root = tmp_path / "wrong.txt"
    wrong_root.write_text("missing/a.png\nmissing/b.png\n")
    with pytest.raises(DataError, match="check root="):
        FileListSource(wrong_root)

    comments_only = tmp_path / "comments.txt"
    comments_only.write_text("# nothing\n\n")
    with pytest.raises(DataError, match="names no images"):
        FileListSource(comments_only)


# ------------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------------


def _uncompressed_rle(mask: np.ndarray) -> dict[str, object]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = int(value), 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _tiny_coco(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Two images (20x16 with annotations, 10x10 without) in root/images, the JSON in root."""
    height, width = 16, 20
    _save(root / "images" / "scene.png", (50, 60, 70), size=(width, height))
    _save(root / "images" / "blank.png", size=(10, 10))
    rle_mask = np.zeros((height, width), dtype=np.uint8)
    rle_mask[9:14, 12:19] = 1
    str_mask = np.zeros((height, width), dtype=np.uint8)
    str_mask[0:3, 0:4] = 1
    compressed = mask_utils.encode(np.asfortranarray(str_mask))
    compressed["counts"] = compressed["counts"].decode("ascii")
    data = {
        "images": [
            {"id": 7, "file_name": "scene.png", "width": width, "height": height},
            {"id": 3, "file_name": "blank.png", "width": 10, "height": 10},
        ],
        "categories": [{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [2, 2, 6, 4], "iscrowd": 0,
             "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [12, 9, 7, 5], "iscrowd": 0,
             "segmentation": _uncompressed_rle(rle_mask)},
            {"id": 3, "image_id": 7, "category_id": 2, "bbox": [0, 0, 20, 16], "iscrowd": 1,
             "segmentation": _uncompressed_rle(np.ones((height, width), dtype=np.uint8))},
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [5, 5, 1, 8], "iscrowd": 0,
             "segmentation": [[5, 5, 6, 5, 6, 13, 5, 13]]},
            {"id": 5, "image_id": 7, "category_id": 5, "bbox": [0, 0, 4, 3], "iscrowd": 0,
             "segmentation": compressed},
            {"id": 6, "image_id": 7, "category_id": 2, "bbox": [10, 0, 5, 5], "iscrowd": 0,
             "segmentation": [[10, 0, 15, 5]]},  # two points: no area
        ],
    }
    path = root / "instances_tiny.json"
    path.write_text(json.dumps(data))
    return path, rle_mask, str_mask


def test_coco_boxes_masks_categories(tmp_path: Path) -> None:
    path, rle_mask, str_mask = _tiny_coco(tmp_path)
    src = build_source(path)
    assert isinstance(src, CocoSource)
    assert src.images_dir == tmp_path / "images"
    assert src.categories == ["cat", "dog"] and src.num_classes == 2
    assert src.image_ids == [3, 7]  # ordered by id

    blank = src[0]
    assert blank["image_id"] == 3 and blank["label"] == -1 and blank["index"] == 0
    assert blank["boxes"].shape == (0, 4) and blank["boxes"].dtype == torch.float32
    assert blank["box_labels"].shape == (0,) and blank["box_labels"].dtype == torch.int64
    assert blank["masks"].shape == (0, 10, 10) and blank["masks"].dtype == torch.uint8

    scene = src[1]
    assert scene["image"].mode == "RGB" and scene["image"].size == (20, 16)
    # crowd (id 3) and the 1-px-wide box (id 4) are dropped; xywh -> xyxy; dog id 5 -> 1, cat id 2 -> 0
    expected_boxes = torch.tensor(
        [[2, 2, 8, 6], [12, 9, 19, 14], [0, 0, 4, 3], [10, 0, 15, 5]], dtype=torch.float32
    )
    assert torch.equal(scene["boxes"], expected_boxes)
    assert scene["box_labels"].tolist() == [1, 0, 1, 0]
    masks = scene["masks"]
    assert masks.shape == (4, 16, 20) and masks.dtype == torch.uint8
    polygon = np.zeros((16, 20), dtype=np.uint8)
    polygon[2:6, 2:8] = 1  # pycocotools rasterises the 6x4 rectangle to rows 2-5, columns 2-7
    assert np.array_equal(masks[0].numpy(), polygon)
    assert np.array_equal(masks[1].numpy(), rle_mask)
    assert np.array_equal(masks[2].numpy(), str_mask)
    assert int(masks[3].sum()) == 0

    no_masks = CocoSource(path, load_masks=False)
    assert "masks" not in no_masks[1] and no_masks[1]["boxes"].shape == (4, 4)


def test_coco_images_dir_layouts(tmp_path: Path) -> None:
    # COCO's own layout: annotations/instances_train2017.json beside train2017/
    _save(tmp_path / "train2017" / "a.png")
    ann = tmp_path / "annotations" / "instances_train2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": []}))
    src = CocoSource(ann)
    assert src.images_dir == tmp_path / "train2017"
    assert src[0]["boxes"].shape == (0, 4) and "masks" not in src[0]
    with pytest.raises(DataError, match="images_dir"):
        CocoSource(ann, images_dir=tmp_path / "annotations")


def test_coco_size_mismatch_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path / "a.png", size=(8, 6))
    _save(tmp_path / "b.png", size=(8, 6))
    ann = tmp_path / "ann.json"
    images = [{"id": 1, "file_name": "a.png", "width": 6, "height": 8},
              {"id": 2, "file_name": "b.png", "width": 8, "height": 6}]
    ann.write_text(json.dumps({"images": images, "categories": []}))
    src = CocoSource(ann)
    with caplog.at_level(logging.WARNING, logger="semssl.data"):
        assert src[0]["image_id"] == 2
    assert "a.png" in caplog.text and "differs" in caplog.text


def test_coco_malformed_names_file_and_key(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"images": [')
    with pytest.raises(DataError, match="malformed JSON") as info:
        build_source(bad_json)
    assert str(bad_json) in str(info.value)

    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(DataError, match="'images'") as info:
        CocoSource(no_images)
    assert str(no_images) in str(info.value)

    no_bbox = tmp_path / "no_bbox.json"
    no_bbox.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 9, "image_id": 1, "category_id": 1}],
    }))
    with pytest.raises(DataError, match=r"annotations\[0\] \(id 9\) has no key 'bbox'") as info:
        CocoSource(no_bbox)
    assert str(no_bbox) in str(info.value)

    unknown_cat = tmp_path / "unknown_cat.json"
    unknown_cat.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 9, "image_id": 1, "category_id": 4, "bbox": [0, 0, 3, 3]}],
    }))
    with pytest.raises(DataError, match="unknown category_id 4"):
        CocoSource(unknown_cat)

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 3, 3],
             "segmentation": [[0, 0, 3, 0, 3, 3]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]},
        ],
    }))
    with pytest.raises(DataError, match=r"annotations\[1\] \(id 2\) has no key 'segmentation'"):
        CocoSource(partial)
    assert CocoSource(partial, load_masks=False)[0]["boxes"].shape == (2, 4)


@pytest.mark.skipif(not COCO128_JSON.is_file(), reason="coco128 not present in ../shared/data")
def test_coco128_loads_with_masks() -> None:
    src = build_source(COCO128_JSON)
    assert isinstance(src, CocoSource)
    assert src.images_dir == COCO128 / "images" / "train2017"
    assert len(src) == 128 and src.num_classes == 80
    assert src.check(max_workers=2) == []
    total = 0
    for i in range(0, len(src), 8):  # every 8th image keeps the test fast
        sample = src[i]
        width, height = sample["image"].size
        n = sample["boxes"].shape[0]
        assert sample["index"] == i and sample["masks"].shape == (n, height, width)
        assert sample["box_labels"].shape == (n,)
        if n:
            assert int(sample["box_labels"].max()) < 80
            assert bool((sample["masks"].flatten(1).sum(1) > 0).all())
            assert bool((sample["boxes"][:, 2:] > sample["boxes"][:, :2]).all())
        total += n
    assert total > 0 and src.skipped == {}


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------


def test_load_image_grey_palette_alpha(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    Image.new("L", (4, 3), 77).save(grey)
    img = load_image(grey)
    assert img.mode == "RGB" and _pixel(img, (0, 0)) == (77, 77, 77)

    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 3), (200, 100, 50, 128)).save(rgba)
    r, g, b = _pixel(load_image(rgba), (1, 1))
    # composited on black: each channel is scaled by alpha 128/255, within rounding
    assert abs(r - 100) <= 1 and abs(g - 50) <= 1 and abs(b - 25) <= 1, (r, g, b)

    la = tmp_path / "la.png"
    Image.new("LA", (4, 3), (200, 0)).save(la)
    assert _pixel(load_image(la), (0, 0)) == (0, 0, 0)

    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([255, 255, 255, 10, 200, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    pal = tmp_path / "palette.png"
    palette.save(pal, transparency=0)
    img = load_image(pal)
    assert _pixel(img, (0, 0)) == (0, 0, 0)  # the transparent white entry becomes black
    assert _pixel(img, (2, 2)) == (10, 200, 30)


def test_load_image_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    img = load_image(path)
    assert img.mode == "RGB"
    r, g, b = _pixel(img, (4, 4))
    assert r > 240 and g < 15 and b < 15


def test_load_image_deep_greyscale(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    png16 = tmp_path / "deep.png"
    Image.fromarray(values).save(png16)
    assert Image.open(png16).mode.startswith("I")
    img = load_image(png16)
    assert _channel0(img) == [0, 1, 128, 255]

    int32 = tmp_path / "int32.tif"
    Image.fromarray(values.astype(np.int32)).save(int32)
    assert Image.open(int32).mode == "I"
    assert _channel0(load_image(int32)) == [0, 1, 128, 255]

    floats = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(floats)
    assert Image.open(floats).mode == "F"
    assert _channel0(load_image(floats)) == [0, 128, 255]

    wide = tmp_path / "wide.tif"
    Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32)).save(wide)
    assert _channel0(load_image(wide)) == [0, 128, 255]  # min-max stretched, not clipped


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    raw = Image.new("RGB", (16, 8), (255, 0, 0))
    raw.paste((0, 0, 255), (8, 0, 16, 8))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    raw.save(path, exif=exif, quality=95)
    img = load_image(path)
    assert img.size == (8, 16)
    top, bottom = _pixel(img, (4, 3)), _pixel(img, (4, 12))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageDecodeError, match="not a recognised image format") as info:
        load_image(junk)
    assert info.value.path == str(junk) and str(junk) in str(info.value)
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------------
# Skipping bad files
# ------------------------------------------------------------------------------------------------


def _folder_with_bad_files(root: Path) -> tuple[Path, Path]:
    """a.png good, b.png corrupt, c.jpg truncated, d.png good."""
    _save(root / "a.png", (1, 2, 3))
    corrupt = root / "b.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    full = root / "full.jpg"
    Image.fromarray(noise).save(full)
    truncated = root / "c.jpg"
    data = full.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    full.unlink()
    _save(root / "d.png", (4, 5, 6))
    return corrupt, truncated


def test_bad_files_are_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    corrupt, truncated = _folder_with_bad_files(tmp_path)
    src = ImageFolderSource(tmp_path)
    with caplog.at_level(logging.WARNING, logger="semssl.data"):
        sample = src[1]
    assert sample["index"] == 3 and _pixel(sample["image"], (0, 0)) == (4, 5, 6)
    assert set(src.skipped) == {str(corrupt), str(truncated)}
    assert "truncated" in src.skipped[str(truncated)].lower()
    assert str(corrupt) in caplog.text and str(truncated) in caplog.text
    assert src[2]["index"] == 3 and src[0]["index"] == 0
    assert src.summary().startswith("4 images, unlabelled, 2 skipped: ")
    assert str(corrupt) in src.summary()
    assert src.check(max_workers=2) == [str(corrupt), str(truncated)]


def test_bad_files_raise_when_asked(tmp_path: Path) -> None:
    corrupt, truncated = _folder_with_bad_files(tmp_path)
    src = ImageFolderSource(tmp_path, on_error="raise")
    with pytest.raises(ImageDecodeError) as info:
        src[1]
    assert info.value.path == str(corrupt)
    with pytest.raises(ImageDecodeError, match="(?i)truncated") as info:
        src[2]
    assert str(truncated) in str(info.value)
    assert src[3]["index"] == 3
    assert src.check(max_workers=1) == [str(corrupt), str(truncated)] and src.skipped == {}
    assert "not a recognised image format" in src.bad_files[str(corrupt)]
    with pytest.raises(IndexError):
        src[4]


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_the_training_log_says_skipped_only_when_bad_files_are_skipped(
        on_error: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from semssl.config import load_config
    from semssl.engine.data import build_train_dataset

    _folder_with_bad_files(tmp_path)
    cfg = load_config(None, [f"data.on_error={on_error}"])
    if on_error == "raise":  # fails before training, naming the files, and never says "skipped"
        with caplog.at_level(logging.WARNING, logger="semssl.data"), \
                pytest.raises(DataError, match=r"2 unreadable file\(s\) in .*data.on_error=raise") as err:
            build_train_dataset(cfg, str(tmp_path))
        assert "will be skipped" not in caplog.text and "will be skipped" not in str(err.value)
        return
    with caplog.at_level(logging.WARNING, logger="semssl.data"):
        build_train_dataset(cfg, str(tmp_path))
    summary = [r.getMessage() for r in caplog.records if "unreadable file(s)" in r.getMessage()]
    assert len(summary) == 1 and summary[0].startswith(f"2 unreadable file(s) in {tmp_path}")
    assert "will be skipped" in summary[0]


def test_every_file_bad_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.jpg").write_bytes(b"")
    src = ImageFolderSource(tmp_path)
    with pytest.raises(DataError, match="every one of the 2 images"):
        src[0]
    assert len(src.skipped) == 2


def test_build_source_kinds_and_options(tmp_path: Path) -> None:
    _save(tmp_path / "imgs" / "a.png")
    path, _, _ = _tiny_coco(tmp_path / "coco")
    with pytest.raises(DataError, match="labels.*coco.*images_dir"):
        build_source(path, labels=True)
    odd = tmp_path / "data.parquet"
    odd.write_text("x")
    with pytest.raises(DataError, match="cannot tell"):
        build_source(odd)
    with pytest.raises(DataError, match="unknown source kind"):
        build_source(tmp_path / "imgs", kind="zip")
    assert len(build_source(tmp_path / "imgs", kind="folder", labels=False)) == 1
    with pytest.raises(DataError, match="on_error"):
        ImageFolderSource(tmp_path / "imgs", on_error="ignore")  # type: ignore[arg-type]


def test_a_folder_holding_annotations_json_is_read_as_its_coco_split(tmp_path: Path) -> None:
    # The built-in scenes' split layout: images/, semantic/ (class-index masks), annotations.json. As a plain
    # folder the masks would be listed as images of a class "semantic"; read through the JSON, only the images are.
    json_path, _, _ = _tiny_coco(tmp_path / "split")
    json_path.rename(tmp_path / "split" / "annotations.json")
    _save(tmp_path / "split" / "semantic" / "scene.png")
    source = build_source(tmp_path / "split")
    assert isinstance(source, CocoSource) and len(source) == 2
    assert [p.parent.name for p in source.paths] == ["images", "images"]
    folder = build_source(tmp_path / "split", kind="folder", labels=False)  # an explicit folder stays a folder
    assert len(folder) == 3
