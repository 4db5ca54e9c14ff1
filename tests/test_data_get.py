"""``semssl data get``: the datasets are built from small archives and folders the tests make, in the published
formats (a CIFAR-10 python archive, MSRC-v2's BMPs and MAT-files, Stanford Background's regions.txt, YOLO labels);
no network: a download goes to a closed local port and must fail in one line."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import tarfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from semssl.cli import main
from semssl.data import get
from semssl.data.matfile import load_mat
from semssl.errors import DataError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------------ CIFAR-10
def _cifar_archive(path: Path, per_batch: int = 1, test_per_class: int = 3) -> Path:
    """A CIFAR-10 python archive (cifar-10-batches-py/, pickled dicts with str keys, as the official one read
    with latin1): ``per_batch`` images per class in each of the 5 training batches; pixel (0, 0, 0) of an image
    is its batch number * 30 + its position, so the dataset's order can be checked."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        def add(name: str, obj: object) -> None:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        add("batches.meta", {"label_names": CLASSES, "num_cases_per_batch": 10 * per_batch})
        for b, (name, per_class) in enumerate([(f"data_batch_{i}", per_batch) for i in range(1, 6)]
                                              + [("test_batch", test_per_class)], 1):
            labels = [c for _ in range(per_class) for c in range(10)][::-1]  # classes interleaved, not sorted
            images = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
            images[:, 1] = 200
            for i in range(len(labels)):
                images[i, 0, 0, 0] = b * 30 + i
            add(name, {"data": images.reshape(len(labels), 3072), "labels": labels, "batch_label": name,
                       "filenames": [f"x{i}.png" for i in range(len(labels))]})
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def small_slice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A test archive under the published name, its md5 as the expected one, and a 3 + 2 per class slice."""
    archive = _cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    ds = get.DATASETS["cifar10-6k"]
    monkeypatch.setitem(get.DATASETS, "cifar10-6k", replace(ds, resources=(replace(ds.resources[0], md5=md5),)))
    monkeypatch.setattr(get, "CIFAR10_6K_PER_CLASS", {"train": 3, "test": 2})
    return archive


def test_cifar10_6k_from_an_archive_writes_the_slice(small_slice: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "root"
    assert main(["data", "get", "cifar10-6k", "--from", str(small_slice), "--root", str(root)]) == 0
    out = root / "cifar10-6k"
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(CLASSES)
    for part, n in (("train", 3), ("test", 2)):
        for cls in CLASSES:
            assert sorted(p.name for p in (out / part / cls).iterdir()) == [f"{i:04d}.jpg" for i in range(n)]
    with Image.open(out / "train" / "cat" / "0000.jpg") as im:
        assert im.size == (32, 32) and im.format == "JPEG"
    provenance = (out / "PROVENANCE.txt").read_text()
    assert "md5" in provenance and "verified" in provenance and "JPEG (quality ~75)" in provenance
    assert sorted(p.name for p in root.iterdir()) == ["cifar10-6k"]  # no work, partial or download folder left
    assert "already there" in json.dumps(get.get_dataset("cifar10-6k", root=root, sources=[small_slice]))


def test_cifar10_6k_keeps_the_dataset_order(small_slice: Path, tmp_path: Path) -> None:
    """The first images per class in batch order (data_batch_1 ... 5, test_batch), numbered from 0000 per class."""
    out = tmp_path / "root"
    get.get_dataset("cifar10-6k", root=out, sources=[small_slice], options={"format": "png"})
    labels = [c for c in range(10)][::-1]
    for cls in (0, 7):
        position = labels.index(cls)
        got = [np.array(Image.open(out / "cifar10-6k" / "train" / CLASSES[cls] / f"{k:04d}.png"))[0, 0, 0]
               for k in range(3)]
        assert got == [b * 30 + position for b in (1, 2, 3)]  # one per batch, batches in order
        test_first = np.array(Image.open(out / "cifar10-6k" / "test" / CLASSES[cls] / "0000.png"))[0, 0, 0]
        assert test_first == 6 * 30 + [c for _ in range(3) for c in range(10)][::-1].index(cls)


def test_full_cifar10_from_an_extracted_folder(tmp_path: Path) -> None:
    archive = _cifar_archive(tmp_path / "any-name.tar.gz", per_batch=1, test_per_class=1)
    with tarfile.open(archive) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    summary = get.get_dataset("cifar10", root=tmp_path / "root", sources=[tmp_path / "x"])
    assert summary["train"]["dog"] == 5 and summary["test"]["truck"] == 1
    assert "not verified" in summary["checks"][0]  # a folder: the checksum is of the published archive
    assert (tmp_path / "root" / "cifar10" / "train" / "dog" / "0004.png").is_file()


def test_a_corrupted_archive_fails_the_checksum_in_one_line(small_slice: Path, tmp_path: Path, capsys) -> None:
    data = bytearray(small_slice.read_bytes())
    data[len(data) // 2] ^= 0xFF
    small_slice.write_bytes(bytes(data))
    root = tmp_path / "root"
    assert main(["data", "get", "cifar10-6k", "--from", str(small_slice), "--root", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "md5" in err and "is not the" in err and "--from" in err
    assert list(root.iterdir()) == []  # nothing written


def test_too_few_images_for_the_slice_is_an_error(small_slice: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get, "CIFAR10_6K_PER_CLASS", {"train": 6, "test": 2})
    with pytest.raises(DataError, match="only 5 train images of class"):
        get.get_dataset("cifar10-6k", root=tmp_path / "root", sources=[small_slice])
    assert not (tmp_path / "root" / "cifar10-6k").exists()


def test_a_pickle_with_other_globals_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES, "x": Path("/")}, protocol=2))
    (folder / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        get.get_dataset("cifar10", root=tmp_path / "root", sources=[folder])


def test_offline_download_fails_in_one_line_naming_the_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            capsys) -> None:
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # the discard port: refused at once, online or not
    ds = get.DATASETS["cifar10-6k"]
    monkeypatch.setitem(get.DATASETS, "cifar10-6k", replace(ds, resources=(replace(ds.resources[0], url=url),)))
    root = tmp_path / "root"
    assert main(["data", "get", "cifar10-6k", "--root", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and url in err and "--from" in err
    assert list(root.iterdir()) == []  # no partial download, no empty downloads/ folder


def test_every_source_has_a_url_and_says_where_its_checksum_comes_from() -> None:
    for ds in get.DATASETS.values():
        for res in ds.resources:
            assert res.url.startswith(("https://", "http://")) and res.checksum_source
    assert get.DATASETS["cifar10-6k"].resources[0].md5 == "c58f30108f718f92721af3b95e74349a"


# ------------------------------------------------------------------------------------------------ MSRC-v2
def _element(mtype: int, payload: bytes) -> bytes:
    if len(payload) <= 4:  # the small data element format
        return struct.pack("<I", (len(payload) << 16) | mtype) + payload.ljust(4, b"\0")
    return struct.pack("<II", mtype, len(payload)) + payload + b"\0" * ((-len(payload)) % 8)


def write_mat(path: Path, variables: dict[str, np.ndarray], compress: bool = True) -> None:
    """A level-5 MAT-file as MATLAB writes it (MATLAB 7: each variable zlib-compressed), every variable of class
    double stored as uint8 (MATLAB's storage of small integers)."""
    out = b"MATLAB 5.0 MAT-file, made by a test".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    for name, array in variables.items():
        array = np.atleast_2d(np.asarray(array))
        body = (_element(6, struct.pack("<II", 6, 0)) + _element(5, struct.pack(f"<{array.ndim}i", *array.shape))
                + _element(1, name.encode()) + _element(2, array.astype(np.uint8).tobytes(order="F")))
        matrix = struct.pack("<II", 14, len(body)) + body
        out += struct.pack("<II", 15, len(zlib.compress(matrix))) + zlib.compress(matrix) if compress else matrix
    path.write_bytes(out)


@pytest.mark.parametrize("compress", [True, False])
def test_the_mat_reader_reads_matlab_arrays(tmp_path: Path, compress: bool) -> None:
    seg = np.arange(12).reshape(3, 4)
    write_mat(tmp_path / "a.mat", {"newseg": seg, "newlabels": np.array([3, 0, 9])}, compress=compress)
    mat = load_mat(tmp_path / "a.mat")
    assert mat["newseg"].dtype == np.float64 and mat["newseg"].shape == (3, 4) and (mat["newseg"] == seg).all()
    assert mat["newlabels"].reshape(-1).tolist() == [3, 0, 9]
    (tmp_path / "b.mat").write_bytes(b"not a mat file" * 20)
    with pytest.raises(DataError, match="not a level-5 MAT-file"):
        load_mat(tmp_path / "b.mat")


def _msrc_input(base: Path, n: int = 10) -> Path:
    """MSRC_v2 as published: Images/<name>.bmp and newsegmentations_mats/<name>_GT.mat (a segment map
    ``newseg`` and one label per segment, ``newlabels``: 4 = cow, 7 = sky, 0 = no label)."""
    root = base / "MultiGraph_MultiLabel_Learning-x" / "MSRC_v2"
    (root / "Images").mkdir(parents=True)
    (root / "newsegmentations_mats").mkdir()
    seg = np.ones((5, 6), dtype=np.uint8)  # segment 1: sky (top rows)
    seg[3:, :] = 2  # segment 2: unlabelled -> void
    seg[1:4, 1:3] = 3  # segment 3: a cow
    for i in range(n):
        name = f"{i + 1}_1_s"
        Image.fromarray(np.full((5, 6, 3), 40 * (i % 6), np.uint8)).save(root / "Images" / f"{name}.bmp")
        write_mat(root / "newsegmentations_mats" / f"{name}_GT.mat", {"newseg": seg, "newlabels": [7, 0, 4]})
    return base


def test_msrc_conversion_from_the_original_format(tmp_path: Path) -> None:
    summary = get.get_dataset("msrc-v2", root=tmp_path / "root", sources=[_msrc_input(tmp_path / "src")])
    out = tmp_path / "root" / "msrc-v2"
    names = sorted(f"{i + 1}_1_s" for i in range(10))
    assert (out / "train.txt").read_text().split() == names[:7] and (out / "test.txt").read_text().split() == names[7:]
    assert summary["train segments"] == 14 and summary["test segments"] == 6  # two labelled segments per image
    semantic = np.array(Image.open(out / "semantic" / f"{names[0]}.png"))
    assert semantic[0, 0] == 6 and semantic[2, 1] == 3 and semantic[4, 5] == get.MSRC_VOID  # sky, cow, void
    coco = json.loads((out / "instances_test.json").read_text())
    assert len(coco["categories"]) == 23
    cats = {c["id"]: c for c in coco["categories"]}
    assert cats[4]["name"] == "cow" and cats[4]["supercategory"] == "thing" and cats[7]["supercategory"] == "stuff"
    image = coco["images"][0]
    assert image == {"id": 8, "file_name": f"{names[7]}.jpg", "width": 6, "height": 5}  # ids over both splits
    cow = next(a for a in coco["annotations"] if a["image_id"] == 8 and a["category_id"] == 4)
    assert cow["bbox"] == [1.0, 1.0, 2.0, 3.0] and cow["area"] == 6.0 and cow["iscrowd"] == 0
    rle = {"size": cow["segmentation"]["size"], "counts": cow["segmentation"]["counts"].encode()}
    assert (mask_utils.decode(rle).astype(bool) == (semantic == 3)).all()
    with Image.open(out / "images" / f"{names[0]}.jpg") as im:
        assert im.format == "JPEG" and im.size == (6, 5)


def test_msrc_segment_map_of_another_size_is_an_error(tmp_path: Path) -> None:
    src = _msrc_input(tmp_path / "src", n=1)
    mat = next(src.rglob("*_GT.mat"))
    write_mat(mat, {"newseg": np.ones((4, 6)), "newlabels": [7]})
    with pytest.raises(DataError, match=r"segment map of size \(4, 6\), the image is \(5, 6\)"):
        get.get_dataset("msrc-v2", root=tmp_path / "root", sources=[src])
    assert not (tmp_path / "root" / "msrc-v2").exists()


# ------------------------------------------------------------------------------------------------ Stanford Background
def test_stanford_background_from_the_original_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "iccv09Data"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    for image_id in ("0000001", "0000002", "0000003"):
        Image.new("RGB", (4, 3)).save(src / "images" / f"{image_id}.jpg")
        (src / "labels" / f"{image_id}.regions.txt").write_text("0 1 -1 7\n2 2 3 3\n-1 5 6 4\n")
        (src / "labels" / f"{image_id}.surfaces.txt").write_text("0 0 0 0\n")
    (src / "horizons.txt").write_text("0000001 4 3 1.0\n")
    archive = tmp_path / "iccv09Data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="iccv09Data")
    monkeypatch.setattr(get, "_stanford_split", lambda part: ["0000001", "0000003"] if part == "train" else ["0000002"])
    summary = get.get_dataset("stanford-background", root=tmp_path / "root", sources=[archive])
    out = tmp_path / "root" / "stanford-background"
    assert summary["images"] == 3 and "not verified" in summary["checks"][0]  # no checksum is published
    label = Image.open(out / "labels" / "0000002.png")
    assert label.mode == "P" and label.getpalette()[:6] == [128, 128, 128, 129, 127, 38]
    assert np.array(label).tolist() == [[0, 1, 15, 7], [2, 2, 3, 3], [15, 5, 6, 4]]  # unknown -> 15
    assert (out / "splits" / "val.txt").read_text() == "0000002\n"
    assert not list((out / "labels").glob("*.txt"))


def test_the_packaged_stanford_split_is_the_docs_one() -> None:
    train, val = get._stanford_split("train"), get._stanford_split("val")
    assert (len(train), len(val)) == (572, 143) and not set(train) & set(val)


# ------------------------------------------------------------------------------------------------ coco128
def test_yolo_boxes_to_coco(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (640, 426)).save(tmp_path / "images" / "000000000139.jpg")
    Image.new("RGB", (10, 10)).save(tmp_path / "images" / "000000000285.jpg")  # no label file: no boxes
    (tmp_path / "labels" / "000000000139.txt").write_text("1 0.5 0.5 0.25 0.1\n")
    cats = [{"supercategory": "person", "id": 1, "name": "person"}, {"supercategory": "vehicle", "id": 2,
                                                                      "name": "bicycle"}]
    coco = get.yolo_to_coco_boxes(tmp_path / "images", tmp_path / "labels", cats, "test")
    assert [im["id"] for im in coco["images"]] == [139, 285]
    assert coco["annotations"] == [{"id": 1, "image_id": 139, "category_id": 2, "bbox": [240.0, 191.7, 160.0, 42.6],
                                    "area": 6816.0, "iscrowd": 0}]


def test_unknown_name_and_unmatched_from(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar100'.*did you mean"):
        get.get_dataset("cifar100", root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds none of what coco128 is built from"):
        get.get_dataset("coco128", root=tmp_path / "root", sources=[tmp_path / "empty"])
