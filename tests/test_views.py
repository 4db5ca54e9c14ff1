"""Tests of semssl.data.views: exact geometry, box/proposal/mask transport, shared crops (geometry_from),
crop-major collate, errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from semssl.data.augment import normalize
from semssl.data.views import (
    CropParams,
    MultiViewTransform,
    SampleError,
    ViewError,
    ViewSpec,
    box_area,
    collate_views,
    map_boxes,
    render_crop,
    source_to_view,
    view_to_source,
)


def _rect_image(h: int, w: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Black uint8 image with the box [x1, x2) x [y1, y2) filled white."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 255
    return img


def _white_extent(view: torch.Tensor) -> torch.Tensor:
    """Pixel box [x1, y1, x2, y2) of the pixels brighter than half (continuous coordinates)."""
    on = view[0] > 127
    rows = on.any(dim=1).nonzero().flatten()
    cols = on.any(dim=0).nonzero().flatten()
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)


def _raw(spec: ViewSpec) -> MultiViewTransform:
    return MultiViewTransform([spec], normalize=False)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_box_drawn_in_source_lands_on_same_view_pixels(flip: bool, interpolation: str) -> None:
    box = (20, 20, 36, 36)  # left of the crop's centre column (41)
    img = _rect_image(64, 80, box)
    t = _raw(ViewSpec("v", 32, recipe="none", interpolation=interpolation))
    crop = CropParams(top=10, left=16, height=40, width=50, flip=flip)
    out = t({"image": img, "label": 0, "index": 0}, params={"v": [crop]})
    geometry = out["geometry"]["v"][0]
    assert geometry.tolist() == [16.0, 10.0, 66.0, 50.0, float(flip)]
    expected = source_to_view(torch.tensor([box], dtype=torch.float32), geometry, 32)[0]
    torch.testing.assert_close(_white_extent(out["views"]["v"][0]), expected, atol=1.0, rtol=0)
    assert (expected[0] > 16) == flip  # left half of the crop unflipped, right half flipped


def test_random_crops_geometry_matches_pixels() -> None:
    box = (20, 14, 44, 40)
    img = _rect_image(56, 64, box)
    t = _raw(ViewSpec("v", 24, n_crops=6, scale=(0.3, 1.0), recipe="none"))
    src_box = torch.tensor([box], dtype=torch.float32)
    checked = 0
    for seed in range(6):
        torch.manual_seed(seed)
        out = t({"image": img, "label": 0, "index": seed})
        for view, geometry in zip(out["views"]["v"], out["geometry"]["v"]):
            expected = source_to_view(src_box, geometry, 24, clip=True)[0]
            if (expected[2] - expected[0]) < 2 or (expected[3] - expected[1]) < 2:
                continue  # rectangle (almost) outside this crop
            torch.testing.assert_close(_white_extent(view), expected, atol=1.0, rtol=0)
            checked += 1
    assert checked >= 20


def test_map_boxes_round_trip_is_identity() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(8, 2, generator=g) * 50
    wh = 5 + torch.rand(8, 2, generator=g) * 60
    flips = (torch.rand(8, 1, generator=g) > 0.5).float()
    geometry = torch.cat([xy, xy + wh, flips], dim=1)  # [8, 5]
    raw = torch.rand(8, 5, 4, generator=g) * 32
    xs = torch.sort(raw[..., [0, 2]], dim=-1).values
    ys = torch.sort(raw[..., [1, 3]], dim=-1).values
    boxes = torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)  # [8 views, 5 boxes, 4]
    src = view_to_source(boxes, geometry, 32)
    torch.testing.assert_close(source_to_view(src, geometry, 32), boxes, atol=1e-4, rtol=0)
    # view -> other view -> back, with different resolutions
    other = geometry.roll(1, dims=0)
    there = map_boxes(boxes, geometry, other, 20, src_size=32)
    torch.testing.assert_close(map_boxes(there, other, geometry, 32, src_size=20), boxes, atol=1e-4, rtol=0)
    # the whole view maps to its crop box, flipped or not
    whole = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    torch.testing.assert_close(view_to_source(whole, geometry, 32)[:, 0], geometry[:, :4], atol=1e-4, rtol=0)
    with pytest.raises(TypeError, match="src_size"):
        map_boxes(boxes, geometry, other, 20)  # type: ignore[call-arg]
    with pytest.raises(ViewError, match=r"geometry must be \[\.\.\., 5\]"):
        view_to_source(boxes, geometry[:, :4], 32)


def test_local_crop_inside_global_crop_via_map_boxes() -> None:
    """SCFS's RoI crop use: where a local crop lies in global crop 0, in global-view pixels."""
    global_geom = torch.tensor([10.0, 0.0, 90.0, 80.0, 1.0])  # 80 x 80 crop, flipped, seen at 40 px
    local_geom = torch.tensor([20.0, 10.0, 40.0, 30.0, 0.0])  # 20 x 20 crop, seen at 16 px
    where = map_boxes(torch.tensor([[0.0, 0.0, 16.0, 16.0]]), local_geom, global_geom, 40, src_size=16)
    # source x [20, 40) -> global unflipped [5, 15) -> flipped [25, 35); y [10, 30) -> [5, 15)
    torch.testing.assert_close(where, torch.tensor([[25.0, 5.0, 35.0, 15.0]]))


def _boxes_sample(index: int = 0, n_boxes: int = 4) -> dict:
    boxes = torch.tensor(
        [[4.0, 6.0, 30.0, 20.0], [40.0, 30.0, 70.0, 58.0], [0.0, 0.0, 79.0, 59.0], [60.0, 2.0, 62.5, 4.0]]
    )[:n_boxes]
    masks = torch.zeros(n_boxes, 60, 80, dtype=torch.uint8)
    for i, b in enumerate(boxes.round().int().tolist()):
        masks[i, b[1] : b[3], b[0] : b[2]] = 1
    g = torch.Generator().manual_seed(index)
    image = Image.fromarray(torch.randint(0, 256, (60, 80, 3), dtype=torch.uint8, generator=g).numpy())
    return {
        "image": image,
        "label": index % 3,
        "index": index,
        "boxes": boxes,
        "box_labels": torch.arange(n_boxes) + 10,
        "masks": masks,
    }


def test_tv_tensor_boxes_equal_boxes_from_recorded_geometry() -> None:
    t = MultiViewTransform(
        [ViewSpec("q", 32, n_crops=2, scale=(0.1, 0.6)), ViewSpec("x1", 24, whole_image=True)]
    )
    src_boxes = _boxes_sample()["boxes"]
    n_invalid = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = t(_boxes_sample())
        assert out["box_ids"]["q"].tolist() == [[0, 1, 2, 3]] * 2 and out["box_ids"]["x1"].tolist() == [[0, 1, 2, 3]]
        for name, size in (("q", 32), ("x1", 24)):
            for c in range(len(out["views"][name])):
                expected = source_to_view(src_boxes, out["geometry"][name][c], size, clip=True)
                torch.testing.assert_close(out["boxes"][name][c], expected, atol=1e-4, rtol=0)
                valid = out["box_valid"][name][c]
                assert torch.equal(valid, box_area(expected) >= 1.0)
                n_invalid += int((~valid).sum())
    assert n_invalid > 0  # small crops cut some boxes away: the flag is exercised


def test_masks_follow_the_image() -> None:
    """A mask equal to the white pixels of the source stays equal to them in every crop (up to edges)."""
    yy, xx = torch.meshgrid(torch.arange(60), torch.arange(80), indexing="ij")
    disc = ((xx - 50) ** 2 + (yy - 25) ** 2 < 15**2) | ((xx > 8) & (xx < 30) & (yy > 30) & (yy < 52))
    img = disc.to(torch.uint8).mul(255).expand(3, -1, -1).contiguous()
    t = _raw(ViewSpec("v", 40, n_crops=4, scale=(0.3, 1.0), recipe="none"))
    sample = {"image": img, "label": 0, "index": 0, "boxes": torch.tensor([[0.0, 0.0, 80.0, 60.0]]),
              "masks": disc[None].to(torch.uint8)}
    seen = set()
    for seed in range(5):
        torch.manual_seed(seed)
        out = t(sample)
        for view, mask, geometry in zip(out["views"]["v"], out["masks"]["v"], out["geometry"]["v"]):
            seen.add(bool(geometry[4]))
            white = view[0] > 127
            m = mask[0].bool()
            union = (white | m).sum()
            if union < 20:
                continue
            iou = float((white & m).sum()) / float(union)
            # measured 0.984-1.0 over the crops
            assert iou > 0.85, (seed, iou)
    assert seen == {False, True}  # both flip states were exercised


def test_collate_is_crop_major() -> None:
    t = _raw(ViewSpec("g", 16, n_crops=3, recipe="none"))
    samples = []
    for b in range(4):
        img = torch.full((3, 40, 40), 10 * (b + 1), dtype=torch.uint8)
        samples.append(t({"image": img, "label": b, "index": 100 + b}))
    batch = collate_views(samples)
    assert batch["views"]["g"].shape == (12, 3, 16, 16)
    for c in range(3):
        for b in range(4):
            assert int(batch["views"]["g"][c * 4 + b].float().mean().round()) == 10 * (b + 1)
            assert torch.equal(batch["geometry"]["g"][c * 4 + b], samples[b]["geometry"]["g"][c])
    assert batch["label"].tolist() == [0, 1, 2, 3] and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == [100, 101, 102, 103]
    assert batch["source_size"].tolist() == [[40, 40]] * 4


def test_dino_multicrop_groups_by_resolution_and_recipe_per_crop() -> None:
    specs = [
        ViewSpec("global", 32, n_crops=2, scale=(0.4, 1.0), recipe=["dino_global1", "dino_global2"],
                 interpolation="bicubic"),
        ViewSpec("local", 16, n_crops=4, scale=(0.05, 0.4), recipe="dino_local", interpolation="bicubic"),
    ]
    t = MultiViewTransform(specs)
    assert t.recipe_names == {"global": ["dino_global1", "dino_global2"], "local": ["dino_local"] * 4}
    torch.manual_seed(0)
    batch = collate_views([t(_boxes_sample(i, n_boxes=0)) for i in range(3)])
    assert batch["views"]["global"].shape == (6, 3, 32, 32)
    assert batch["views"]["local"].shape == (12, 3, 16, 16)
    assert batch["views"]["global"].dtype == torch.float32
    assert batch["geometry"]["global"].shape == (6, 5) and batch["geometry"]["local"].shape == (12, 5)
    areas = lambda g: (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) / (60 * 80)  # noqa: E731
    assert float(areas(batch["geometry"]["local"]).max()) <= 0.45  # RandomResizedCrop rounds sides
    assert float(areas(batch["geometry"]["global"]).min()) >= 0.35
    assert batch["boxes"]["global"].shape == (6, 0, 4) and batch["box_ids"]["global"].shape == (6, 0)


def test_recipe_applies_per_crop() -> None:
    img = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    spec = ViewSpec("v", 24, n_crops=2, whole_image=True, flip_p=0.0, recipe=["none", "dino_global2"])
    t = _raw(spec)
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = t({"image": img, "label": 0, "index": 0})
        assert torch.equal(out["views"]["v"][0], img)  # crop 0: recipe "none", whole image at its own size
        changed += int(not torch.equal(out["views"]["v"][1], img))
    # measured 20 of 20
    assert changed >= 10  # crop 1: jitter p 0.8 / grayscale / blur / solarize


def test_whole_image_view_geometry_is_full_image() -> None:
    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    t = _raw(ViewSpec("x1", 32, whole_image=True, recipe="none", flip_p=0.0))
    out = t({"image": img, "label": 0, "index": 0})
    assert out["geometry"]["x1"].tolist() == [[0.0, 0.0, 48.0, 40.0, 0.0]]
    assert torch.equal(out["views"]["x1"][0], F.resize(img, [32, 32], antialias=True))  # aspect not kept
    normalized = MultiViewTransform([ViewSpec("x1", 32, whole_image=True, recipe="none", flip_p=0.0)])
    out_n = normalized({"image": img, "label": 0, "index": 0})["views"]["x1"][0]
    torch.testing.assert_close(out_n, normalize(F.resize(img, [32, 32], antialias=True)), atol=1e-5, rtol=0)
    flipped = _raw(ViewSpec("x1", 32, whole_image=True, recipe="none", flip_p=1.0))
    out = flipped({"image": img, "label": 0, "index": 0})
    assert out["geometry"]["x1"][0, 4] == 1.0
    assert torch.equal(out["views"]["x1"][0], F.resize(img, [32, 32], antialias=True).flip(-1))


def test_flip_frequency() -> None:
    torch.manual_seed(0)
    t = _raw(ViewSpec("v", 8, n_crops=50, recipe="none"))
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    flips = torch.cat([t({"image": img, "label": 0, "index": 0})["geometry"]["v"][:, 4] for _ in range(8)])
    # seed 0: 0.505 of 400 flips; the binomial sd is 0.025, so +-0.1 is 4 sd
    assert 0.4 < float(flips.mean()) < 0.6
    never = _raw(ViewSpec("v", 8, n_crops=50, recipe="none", flip_p=0.0))
    assert float(never({"image": img, "label": 0, "index": 0})["geometry"]["v"][:, 4].sum()) == 0


def test_boxes_padding_and_valid_flags() -> None:
    t = MultiViewTransform([ViewSpec("q", 20, n_crops=2), ViewSpec("k", 16)])
    left_half = {"q": [CropParams(0, 0, 60, 40)] * 2, "k": [CropParams(0, 0, 60, 80)]}
    s0 = t(_boxes_sample(0, n_boxes=4), params=left_half)
    s1 = t(_boxes_sample(1, n_boxes=1), params=left_half)
    s2 = t({"image": _boxes_sample(2)["image"], "label": 1, "index": 2}, params=left_half)
    batch = collate_views([s0, s1, s2])
    ids = [[0, 1, 2, 3], [0, -1, -1, -1], [-1, -1, -1, -1]]
    assert batch["box_ids"]["q"].tolist() == ids * 2 and batch["box_ids"]["k"].tolist() == ids  # crop-major
    assert batch["box_ids"]["q"].dtype == torch.int64
    # labels are per image (indexed by box id), not per view
    assert batch["box_labels"].tolist() == [[10, 11, 12, 13], [10, -1, -1, -1], [-1, -1, -1, -1]]
    assert batch["boxes"]["q"].shape == (6, 4, 4) and batch["boxes"]["k"].shape == (3, 4, 4)
    assert batch["masks"]["q"].shape == (6, 4, 20, 20) and batch["masks"]["q"].dtype == torch.uint8
    valid_q = batch["box_valid"]["q"]  # rows: crop * 3 + image
    # box 1 (x from 40) and box 3 (x from 60) lie right of the left-half crop: invalid; padding is invalid
    assert valid_q[0].tolist() == valid_q[3].tolist() == [True, False, True, False]  # image 0, crops 0 and 1
    assert valid_q[1].tolist() == valid_q[4].tolist() == [True, False, False, False]  # image 1
    assert not valid_q[[2, 5]].any() and not batch["box_valid"]["k"][2].any()  # image 2 has no boxes
    # the whole-width crop keeps box 3 (2.5 x 2 px source -> 0.5 x 0.53 view px at 16/80): area < 1 -> invalid
    assert batch["box_valid"]["k"][0].tolist() == [True, True, True, False]
    padding = batch["boxes"]["q"][[1, 4], 1:], batch["boxes"]["q"][[2, 5]]
    assert all(float(p.abs().sum()) == 0 for p in padding)
    assert float(batch["masks"]["q"][[1, 4], 1:].sum()) == 0 and float(batch["masks"]["q"][[2, 5]].sum()) == 0
    assert float(batch["masks"]["q"][1, 0].sum()) > 0  # image 1's real mask is kept
    # masks of sample 0 but not of sample 1: a clear error
    s1_masks = {k: v for k, v in s1.items() if k != "masks"}
    with pytest.raises(SampleError, match="masks must be all or none"):
        collate_views([s0, s1_masks])


class _Mapped(Dataset):
    def __init__(self, samples: list[dict], transform: MultiViewTransform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.transform(self.samples[i])


def test_dataloader_and_pickling() -> None:
    t = MultiViewTransform([ViewSpec("q", 16), ViewSpec("k", 16, recipe="weak")])
    t = pickle.loads(pickle.dumps(t))  # worker processes receive a pickled copy
    data = [_boxes_sample(i, n_boxes=1 + i % 3) for i in range(6)]
    batches = list(DataLoader(_Mapped(data, t), batch_size=3, collate_fn=collate_views))
    assert len(batches) == 2
    assert batches[0]["views"]["q"].shape == (3, 3, 16, 16) and batches[0]["views"]["k"].shape == (3, 3, 16, 16)
    assert batches[1]["box_ids"]["k"].tolist() == [[0, -1, -1], [0, 1, -1], [0, 1, 2]]
    assert batches[1]["index"].tolist() == [3, 4, 5]


def test_clear_errors() -> None:
    with pytest.raises(ViewError, match="n_crops must be an int >= 1"):
        ViewSpec("q", 32, n_crops=0)
    with pytest.raises(ViewError, match="size must be an int >= 8"):
        ViewSpec("q", 4)
    with pytest.raises(ViewError, match="unknown augmentation recipe 'mocov3'.*valid recipes: mocov2"):
        ViewSpec("q", 32, recipe="mocov3")
    with pytest.raises(ViewError, match="2 entries but n_crops is 3"):
        ViewSpec("g", 32, n_crops=3, recipe=["dino_global1", "dino_global2"])
    with pytest.raises(ViewError, match="scale"):
        ViewSpec("q", 32, scale=(0.5, 0.2))
    with pytest.raises(ViewError, match="repeated: q"):
        MultiViewTransform([ViewSpec("q", 32), ViewSpec("q", 16)])
    t = MultiViewTransform([ViewSpec("q", 16)])
    with pytest.raises(SampleError, match="no 'image' key"):
        t({"label": 0, "index": 3})
    with pytest.raises(SampleError, match=r"sample index 5: 'boxes' must be \[N, 4\]"):
        t({"image": Image.new("RGB", (20, 20)), "label": 0, "index": 5, "boxes": torch.zeros(2, 5)})
    with pytest.raises(SampleError, match="box 0 .* x2 < x1"):
        t({"image": Image.new("RGB", (20, 20)), "label": 0, "index": 5, "boxes": [[10.0, 0.0, 5.0, 4.0]]})
    with pytest.raises(SampleError, match="'masks' given without 'boxes'"):
        t({"image": Image.new("RGB", (20, 20)), "label": 0, "index": 5, "masks": torch.zeros(1, 20, 20)})
    with pytest.raises(SampleError, match=r"'image' tensor must be uint8 \[3, H, W\]"):
        t({"image": torch.zeros(3, 20, 20), "label": 0, "index": 5})
    with pytest.raises(ViewError, match="params for view 'q'"):
        t({"image": Image.new("RGB", (20, 20)), "label": 0, "index": 5}, params={})
    with pytest.raises(SampleError, match="non-empty list"):
        collate_views([])


# ------------------------------------------------------------------------------------ geometry_from (x2 -> x2s)
def _smooth_image(h: int = 60, w: int = 80) -> torch.Tensor:
    """A smooth uint8 image (gradients and a soft blob): resampling it twice or once gives nearly the same."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    blob = torch.exp(-((xx - 50) ** 2 + (yy - 25) ** 2) / 200.0)
    img = torch.stack([xx / w, yy / h, blob]) * 255
    return img.round().to(torch.uint8)


def test_geometry_from_reuses_crops_and_flips() -> None:
    img = _smooth_image()
    x2 = ViewSpec("x2", 32, scale=(0.3, 1.0), recipe="none")
    x2s = ViewSpec("x2s", 16, recipe="none", geometry_from="x2", whole_image=True, flip_p=0.0)  # both unused
    t = MultiViewTransform([x2s, x2], normalize=False)  # the copy may come first
    alone = MultiViewTransform([x2], normalize=False)
    boxes = torch.tensor([[10.0, 8.0, 50.0, 40.0], [30.0, 20.0, 70.0, 55.0]])
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = t({"image": img, "label": 0, "index": seed, "boxes": boxes})
        torch.manual_seed(seed)
        ref = alone({"image": img, "label": 0, "index": seed, "boxes": boxes})
        geometry = out["geometry"]["x2s"]
        assert torch.equal(geometry, out["geometry"]["x2"])  # same rectangle and flip, recorded
        assert torch.equal(out["geometry"]["x2"], ref["geometry"]["x2"])  # the copy draws nothing
        assert torch.equal(out["views"]["x2"][0], ref["views"]["x2"][0])
        flips.add(bool(geometry[0, 4]))
        g = geometry[0].tolist()
        crop = CropParams(int(g[1]), int(g[0]), int(g[3] - g[1]), int(g[2] - g[0]), bool(g[4]))
        expected, _, _ = render_crop(img, crop, 16, InterpolationMode.BILINEAR)
        assert torch.equal(out["views"]["x2s"][0], expected)  # rendered from the source at its own size
        down = F.resize(out["views"]["x2"][0], [16, 16], antialias=True)  # ~ a downsampled copy of x2
        # measured 0.16-0.31
        assert (down.float() - out["views"]["x2s"][0].float()).abs().mean() < 2.0
        torch.testing.assert_close(out["boxes"]["x2s"][0], out["boxes"]["x2"][0] / 2, atol=1e-4, rtol=0)
    assert flips == {False, True}


def test_geometry_from_multi_crop_and_explicit_params() -> None:
    t = MultiViewTransform(
        [ViewSpec("g", 32, n_crops=2, recipe="none"), ViewSpec("gs", 16, n_crops=2, recipe="none", geometry_from="g")],
        normalize=False,
    )
    img = _smooth_image()
    torch.manual_seed(0)
    out = t({"image": img, "label": 0, "index": 0})
    assert torch.equal(out["geometry"]["g"], out["geometry"]["gs"])
    assert out["geometry"]["g"][0].tolist() != out["geometry"]["g"][1].tolist()  # crop i <-> crop i
    crops = [CropParams(0, 0, 30, 40), CropParams(10, 20, 40, 50, True)]
    out = t({"image": img, "label": 0, "index": 0}, params={"g": crops})  # the copy's params follow
    assert out["geometry"]["gs"].tolist() == [c.geometry_list() for c in crops]
    with pytest.raises(ViewError, match="params for view 'gs' differ from those of 'g'"):
        t({"image": img, "label": 0, "index": 0}, params={"g": crops, "gs": crops[::-1]})


def test_geometry_from_errors() -> None:
    with pytest.raises(ViewError, match="geometry_from 'x9' is not a view"):
        MultiViewTransform([ViewSpec("x2", 32), ViewSpec("x2s", 16, geometry_from="x9")])
    with pytest.raises(ViewError, match="geometry_from 'x2' has n_crops 2 but this view has 1"):
        MultiViewTransform([ViewSpec("x2", 32, n_crops=2), ViewSpec("x2s", 16, geometry_from="x2")])
    with pytest.raises(ViewError, match="cycle: a -> b -> a"):
        MultiViewTransform([ViewSpec("a", 32, geometry_from="b"), ViewSpec("b", 16, geometry_from="a")])
    with pytest.raises(ViewError, match="view spec 'a': geometry_from names the view itself"):
        ViewSpec("a", 32, geometry_from="a")
    chain = MultiViewTransform(  # chains are fine: all three share one draw
        [ViewSpec("a", 32, recipe="none"), ViewSpec("b", 16, geometry_from="a"), ViewSpec("c", 8, geometry_from="b")]
    )
    out = chain({"image": _smooth_image(), "label": 0, "index": 0})
    assert torch.equal(out["geometry"]["a"], out["geometry"]["c"])


def test_view_spec_defaults_and_new_field_errors() -> None:
    spec = ViewSpec("q")
    assert spec.size == 224 and spec.geometry_from is None
    assert spec.box_cutout_p == 0.0 and spec.box_jitter_p == 0.0 and spec.box_jitter_grow is True
    with pytest.raises(ViewError, match="view spec 'q': box_cutout_p must be in \\[0, 1\\], got 1.5"):
        ViewSpec("q", box_cutout_p=1.5)
    with pytest.raises(ViewError, match="box_cutout_area must satisfy 0 < min <= max <= 1.0"):
        ViewSpec("q", box_cutout_area=(0.3, 0.1))
    with pytest.raises(ViewError, match="box_jitter_range must be in \\[0, 1\\)"):
        ViewSpec("q", box_jitter_range=1.0)
    with pytest.raises(ViewError, match="box_jitter_grow must be true or false"):
        ViewSpec("q", box_jitter_grow="no")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ proposals
def _proposals_sample(index: int = 0, n: int = 3) -> dict:
    sample = _boxes_sample(index, n_boxes=2)
    sample["proposals"] = torch.tensor(
        [[2.0, 2.0, 40.0, 30.0], [35.0, 10.0, 78.0, 58.0], [10.0, 40.0, 20.0, 52.0], [60.0, 0.0, 61.0, 1.0]]
    )[:n]
    return sample


def test_proposals_are_transformed_like_boxes() -> None:
    t = MultiViewTransform(
        [ViewSpec("x1", 24, whole_image=True), ViewSpec("x2", 32, n_crops=2, scale=(0.1, 0.5)),
         ViewSpec("x2s", 16, n_crops=2, geometry_from="x2")]
    )
    src = _proposals_sample()["proposals"]
    n_invalid = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = t(_proposals_sample(seed))
        assert out["box_ids"]["x1"].tolist() == [[0, 1]]  # ground truth untouched, kept apart
        for name, size in (("x1", 24), ("x2", 32), ("x2s", 16)):
            assert out["proposal_ids"][name].tolist() == [[0, 1, 2]] * len(out["views"][name])
            for c, geometry in enumerate(out["geometry"][name]):
                expected = source_to_view(src, geometry, size, clip=True)
                torch.testing.assert_close(out["proposals"][name][c], expected, atol=1e-4, rtol=0)
                valid = out["proposal_valid"][name][c]
                assert torch.equal(valid, box_area(expected) >= 1.0)
                n_invalid += int((~valid).sum())
    assert n_invalid > 0
    assert "box_labels" in out and "masks" in out  # proposals have neither: nothing proposal-shaped is added
    assert not any(k.startswith("proposal_") and k not in ("proposal_ids", "proposal_valid") for k in out)


def test_collate_proposals_crop_major_with_padding() -> None:
    t = MultiViewTransform([ViewSpec("q", 20, n_crops=2), ViewSpec("k", 16)])
    left_half = {"q": [CropParams(0, 0, 60, 40)] * 2, "k": [CropParams(0, 0, 60, 80)]}
    s0 = t(_proposals_sample(0, n=3), params=left_half)
    s1 = t({k: v for k, v in _proposals_sample(1, n=1).items() if k not in ("boxes", "box_labels", "masks")},
           params=left_half)
    s2 = t({"image": _boxes_sample(2)["image"], "label": 1, "index": 2}, params=left_half)
    batch = collate_views([s0, s1, s2])
    ids = [[0, 1, 2], [0, -1, -1], [-1, -1, -1]]
    assert batch["proposal_ids"]["q"].tolist() == ids * 2 and batch["proposal_ids"]["k"].tolist() == ids
    assert batch["proposal_ids"]["q"].dtype == torch.int64 and batch["proposal_valid"]["q"].dtype == torch.bool
    assert batch["proposals"]["q"].shape == (6, 3, 4) and batch["proposals"]["k"].shape == (3, 3, 4)
    # proposal 1 starts at x 35 and reaches into the left half; proposal 2 is inside it
    assert batch["proposal_valid"]["q"].tolist() == [[True, True, True], [True, False, False], [False] * 3] * 2
    torch.testing.assert_close(batch["proposals"]["q"][3], s0["proposals"]["q"][1])  # crop 1, image 0
    assert float(batch["proposals"]["q"][[1, 4], 1:].abs().sum()) == 0  # padding is 0
    # boxes: sample 1 and 2 have none -> all padding; the proposal set did not leak into them
    assert batch["box_ids"]["q"].tolist() == [[0, 1], [-1, -1], [-1, -1]] * 2
    with pytest.raises(SampleError, match="'proposal_ids' must be a dict view"):
        collate_views([{**s0, "proposal_ids": torch.arange(3)}])


def test_sample_seed_passes_through() -> None:
    t = MultiViewTransform([ViewSpec("q", 16)])
    out = t({"image": _smooth_image(), "label": 0, "index": 4, "seed": 123})
    assert out["seed"] == 123
    assert "seed" not in t({"image": _smooth_image(), "label": 0, "index": 4})
    with pytest.raises(SampleError, match="sample index 4: 'seed' must be an int"):
        t({"image": _smooth_image(), "label": 0, "index": 4, "seed": 1.5})


def test_proposal_errors() -> None:
    t = MultiViewTransform([ViewSpec("q", 16)])
    image = Image.new("RGB", (20, 20))
    with pytest.raises(SampleError, match=r"sample index 5: 'proposals' must be \[N, 4\]"):
        t({"image": image, "label": 0, "index": 5, "proposals": torch.zeros(2, 3)})
    with pytest.raises(SampleError, match=r"sample index 5: proposal 1 \[.*\] has x2 < x1"):
        t({"image": image, "label": 0, "index": 5, "proposals": [[0.0, 0.0, 4.0, 4.0], [9.0, 0.0, 5.0, 4.0]]})
    with pytest.raises(SampleError, match="'proposals' contains non-finite values"):
        t({"image": image, "label": 0, "index": 5, "proposals": [[0.0, 0.0, float("nan"), 4.0]]})
