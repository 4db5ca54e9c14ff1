"""D3SSL's region augmentations (semssl.data.regions): PRC, PRM, the de-positioning composite and their batch
transforms — pure functions with explicit generators, checked on hand-made images and boxes."""

import math

import pytest
import torch

from semssl.data.regions import (
    Depositioning,
    ProposalCutout,
    ProposalMask,
    batch_transform_names,
    box_jitter,
    boxes_to_mask,
    build_batch_transform,
    composite,
    depositioning_offset,
    prc_mask,
    prm_mask,
    proposal_cutout,
    proposal_mask,
)
from semssl.data.views import view_to_source
from semssl.errors import SampleError, ViewError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box_pixels(box, size):
    return boxes_to_mask(torch.tensor([box], dtype=torch.float32), size)


# ------------------------------------------------------------------------------------------------ PRC
def test_prc_cuts_keep_the_box_aspect_and_go_from_large_to_small():
    boxes = torch.tensor([[2.0, 2.0, 12.0, 8.0], [10.0, 10.0, 58.0, 42.0], [30.0, 5.0, 50.0, 45.0]])
    for seed in range(20):
        cut, trace = prc_mask(boxes, (64, 64), generator=gen(seed))
        assert trace["order"] == [1, 2, 0]  # areas 1536, 800, 60
        for i, (left, top, right, bottom) in trace["rects"].items():
            w, h = trace["box_pixels"][i]
            s = math.sqrt(((right - left) * (bottom - top)) / (w * h))
            # sides are floor(sqrt(r) * (w, h)): the aspect of the box within one pixel
            assert abs((right - left) - s * w) <= 1.0 + 1e-6 and abs((bottom - top) - s * h) <= 1.0 + 1e-6
            assert abs((right - left) / (bottom - top) - w / h) <= max(1 / (bottom - top), w / h / (right - left)) * 1.5
            x1, y1, x2, y2 = boxes[i].tolist()  # the cut-out lies inside its box
            assert x1 - 0.5 <= left and right <= x2 + 0.5 and y1 - 0.5 <= top and bottom <= y2 + 0.5
        assert cut.dtype == torch.bool and cut.shape == (64, 64)


def test_prc_never_cuts_more_than_its_bound():
    torch.manual_seed(0)
    for seed in range(50):
        g = gen(seed)
        xy = torch.rand(6, 2, generator=g) * 40
        wh = 3 + torch.rand(6, 2, generator=g) * 30
        boxes = torch.cat([xy, (xy + wh).clamp(max=64)], dim=1)
        cut, trace = prc_mask(boxes, (64, 64), area=(0.2, 0.5), generator=g)
        for i, fraction in trace["fraction_after"].items():
            assert fraction <= float(trace["ratios"][i]) + 1e-12 <= 0.5 + 1e-12
        last = trace["order"][-1]  # the smallest box: nothing is cut after it
        inside = box_pixels(boxes[last].tolist(), (64, 64))
        frac = (cut & inside).sum() / inside.sum()
        assert float(frac) <= float(trace["ratios"][last]) + 1e-12
    # a single box is cut by (almost exactly) its ratio: floor of the sides loses at most a row and a column
    cut, trace = prc_mask(torch.tensor([[0.0, 0.0, 40.0, 20.0]]), (20, 40), area=(0.5, 0.5), generator=gen(1))
    assert 0.5 * 800 - 40 - 20 <= int(cut.sum()) <= 0.5 * 800


def test_prc_restores_an_over_cut_smaller_box():
    # the big box's cut-out (sqrt(0.5) * 20 = 14 px square) always covers > 50 % of the centred small box
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 15.0, 15.0]])
    for seed in range(10):
        cut, trace = prc_mask(boxes, (20, 20), area=(0.5, 0.5), generator=gen(seed))
        assert trace["order"] == [0, 1] and trace["restored"] == [1]
        small = box_pixels([5.0, 5.0, 15.0, 15.0], (20, 20))
        assert int((cut & small).sum()) == 49  # restored, then cut again by its own 7 x 7 cut-out (ratio 0.5)
        big_rect = torch.zeros(20, 20, dtype=torch.bool)
        left, top, right, bottom = trace["rects"][0]
        big_rect[top:bottom, left:right] = True
        assert torch.equal(cut & ~small, big_rect & ~small)  # the big box's cut-out outside the small box stays


def test_prc_leaves_invalid_boxes_and_the_outside_alone():
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [30.0, 30.0, 60.0, 60.0]])
    cut, trace = prc_mask(boxes, (64, 64), valid=torch.tensor([True, False]), generator=gen(0))
    assert trace["order"] == [0]
    assert not (cut & ~box_pixels([4.0, 4.0, 20.0, 20.0], (64, 64))).any()
    # the same stream whatever the validity: the valid box's cut-out is the same
    cut_all, _ = prc_mask(boxes, (64, 64), generator=gen(0))
    torch.testing.assert_close(cut[:30, :30], cut_all[:30, :30])


def test_proposal_cutout_paints_only_cut_pixels_with_the_fill():
    image = torch.rand(3, 32, 32)
    boxes = torch.tensor([[4.0, 4.0, 28.0, 20.0]])
    out, cut = proposal_cutout(image, boxes, generator=gen(3))
    assert torch.equal(out[:, ~cut], image[:, ~cut]) and cut.any()
    assert (out[:, cut] == 0).all()
    uint8 = (image * 255).to(torch.uint8)
    out8, cut8 = proposal_cutout(uint8, boxes, generator=gen(3))
    assert torch.equal(cut8, cut) and out8[:, cut8][:, 0].tolist() == [124, 116, 104]  # ImageNet mean, 0..255


# ------------------------------------------------------------------------------------------------ PRM
def test_prm_rectangles_are_within_the_stated_ranges_and_touch_their_box():
    boxes = torch.tensor([[20.0, 24.0, 40.0, 40.0], [60.0, 10.0, 90.0, 70.0]])
    for seed in range(30):
        visible, trace = prm_mask(boxes, (100, 100), generator=gen(seed))
        assert visible[boxes_to_mask(boxes, (100, 100))].all()  # every box stays visible
        for i, rects in trace["rects"].items():
            x1, y1, x2, y2 = boxes[i].tolist()
            assert 1 <= len(rects) == len(trace["sides"][i]) <= 4
            assert len(set(trace["sides"][i])) == len(rects)
            for side, (a, b, c, d) in zip(trace["sides"][i], rects):
                scale = (c - a) * (d - b) / ((x2 - x1) * (y2 - y1))
                aspect = (c - a) / (d - b)
                assert 0.2 - 1e-9 <= scale <= 0.6 + 1e-9 and 3 / 4 - 1e-9 <= aspect <= 4 / 3 + 1e-9
                touch = {"left": c == pytest.approx(x1), "right": a == pytest.approx(x2),
                         "top": d == pytest.approx(y1), "bottom": b == pytest.approx(y2)}[side]
                centre_in = (y1 <= (b + d) / 2 <= y2) if side in ("left", "right") else (x1 <= (a + c) / 2 <= x2)
                assert touch and centre_in
        # nothing else is visible
        extra = torch.zeros(100, 100, dtype=torch.bool)
        for rects in trace["rects"].values():
            for r in rects:
                extra |= box_pixels(list(r), (100, 100))
        assert torch.equal(visible, boxes_to_mask(boxes, (100, 100)) | extra)


def test_proposal_mask_hides_everything_else_and_keeps_box_colours():
    image = torch.zeros(3, 64, 64)
    image[0] = 1.0  # red everywhere
    image[:, 10:30, 10:30] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # a green box
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    out, visible = proposal_mask(image, boxes, generator=gen(0))
    assert (out[:, 10:30, 10:30] == torch.tensor([0.0, 1.0, 0.0])[:, None, None]).all()  # still green
    assert (out[:, ~visible] == 0).all() and (~visible).any()
    assert torch.equal(out[:, visible], image[:, visible])
    # no valid box: nothing to give context to, unchanged
    same, _ = proposal_mask(image, boxes, valid=torch.tensor([False]), generator=gen(0))
    assert torch.equal(same, image)


# ------------------------------------------------------------------------------------------------ composite
def test_depositioning_offset_keeps_every_box_inside():
    boxes = torch.tensor([[5.5, 10.0, 20.0, 30.0], [30.0, 2.0, 50.25, 12.0]])
    seen = set()
    for seed in range(200):
        tx, ty = depositioning_offset(boxes, (64, 64), generator=gen(seed))
        moved = boxes + torch.tensor([tx, ty, tx, ty])
        assert moved.min() >= 0 and moved[:, 2].max() <= 64 and moved[:, 3].max() <= 64
        seen.add((tx, ty))
    assert len(seen) > 50 and min(t[0] for t in seen) == -5 and max(t[0] for t in seen) == 13
    assert depositioning_offset(boxes, (64, 64), valid=torch.tensor([False, False]), generator=gen(0)) == (0, 0)


def test_composite_puts_the_foreground_at_the_shifted_place():
    fg = torch.rand(3, 48, 64)
    fg[:, 8:20, 10:30] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # a red box
    bg = torch.rand(3, 48, 64)
    boxes = torch.tensor([[10.0, 8.0, 30.0, 20.0], [40.0, 30.0, 50.0, 40.0]])
    offset = (7, 5)
    for cut in (False, True):
        x3, shifted, pasted = composite(fg, boxes, bg, offset, cut=cut, generator=gen(1))
        torch.testing.assert_close(shifted, boxes + torch.tensor([7.0, 5.0, 7.0, 5.0]))  # one common offset
        union = boxes_to_mask(shifted, (48, 64))
        assert torch.equal(pasted, union) if not cut else bool((pasted <= union).all() and (pasted < union).any())
        ys, xs = pasted.nonzero(as_tuple=True)
        torch.testing.assert_close(x3[:, ys, xs], fg[:, ys - 5, xs - 7])  # inside: the source's pixels
        assert torch.equal(x3[:, ~pasted], bg[:, ~pasted])  # outside: the other image
        red = pasted[13:25, 17:37]
        assert (x3[:, 13:25, 17:37][:, red] == torch.tensor([1.0, 0.0, 0.0])[:, None]).all()  # still red
    with pytest.raises(ViewError):
        composite(fg, boxes, bg[:, :10], offset)


# ------------------------------------------------------------------------------------------------ batch transforms
def region_batch(n_images: int = 3, size: int = 32, seed: int = 0) -> dict:
    g = gen(seed)
    xy = torch.rand(n_images, 3, 2, generator=g) * size / 2
    boxes = torch.cat([xy, xy + 4 + torch.rand(n_images, 3, 2, generator=g) * size / 3], dim=2).clamp(max=size)
    valid = torch.ones(n_images, 3, dtype=torch.bool)
    valid[0, 2] = False
    ids = torch.arange(3).repeat(n_images, 1)
    views = {"x1": torch.randn(n_images, 3, size, size, generator=g),
             "x2": torch.randn(n_images, 3, size, size, generator=g),
             "x2s": torch.randn(n_images, 3, size // 2, size // 2, generator=g)}
    crops = torch.tensor([[0.0, 0.0, 64.0, 64.0, 0.0], [8.0, 4.0, 40.0, 36.0, 1.0], [0.0, 0.0, 64.0, 48.0, 0.0]])
    geometry = {name: crops[:n_images].clone() for name in views}
    return {"views": views, "geometry": geometry, "index": torch.arange(n_images),
            "proposals": {"x1": boxes, "x2": boxes.clone(), "x2s": boxes / 2},
            "proposal_ids": {k: ids.clone() for k in views}, "proposal_valid": {k: valid.clone() for k in views}}


def test_region_batch_transforms_are_registered_and_validated():
    assert {"prc", "prm", "depositioning"} <= set(batch_transform_names())
    assert isinstance(build_batch_transform("prc", views=["x1"]), ProposalCutout)
    assert isinstance(build_batch_transform("prm", views=["x1"], scale=[0.2, 0.6]), ProposalMask)
    assert isinstance(build_batch_transform("depositioning", source="x2", out="x3"), Depositioning)
    with pytest.raises(ViewError):
        build_batch_transform("prc", area=[0.6, 0.2])
    with pytest.raises(ViewError):
        build_batch_transform("prm", p=2.0)
    with pytest.raises(ViewError):
        build_batch_transform("depositioning", source="x2", out="x2")
    with pytest.raises(ViewError):
        build_batch_transform("prc", size=3)


def test_prc_prm_batch_transforms_change_only_their_views_reproducibly():
    batch = region_batch()
    pure = {ProposalCutout: lambda x, b, v, g: proposal_cutout(x, b, v, area=(0.2, 0.5), generator=g)[0],
            ProposalMask: lambda x, b, v, g: proposal_mask(x, b, v, scale=(0.2, 0.6), aspect=(3 / 4, 4 / 3),
                                                           generator=g)[0]}
    for transform in (ProposalCutout(views=("x1", "x2s")), ProposalMask(views=("x1", "x2s"))):
        out = transform(batch, gen(5))
        again = transform(batch, gen(5))
        assert torch.equal(out["views"]["x1"], again["views"]["x1"])
        assert torch.equal(out["views"]["x2"], batch["views"]["x2"])  # not listed: untouched
        assert not torch.equal(out["views"]["x1"], batch["views"]["x1"])
        assert not torch.equal(out["views"]["x2s"], batch["views"]["x2s"])
        assert out["proposals"] is batch["proposals"]  # boxes unchanged
        # row 1 of x1 equals the pure function with the same draws: the p-draw of the view's rows, then row 0's
        g = gen(5)
        assert bool((torch.rand(3, generator=g) < 1.0).all())
        fn = pure[type(transform)]
        fn(batch["views"]["x1"][0], batch["proposals"]["x1"][0], batch["proposal_valid"]["x1"][0], g)
        row1 = fn(batch["views"]["x1"][1], batch["proposals"]["x1"][1], batch["proposal_valid"]["x1"][1], g)
        assert torch.equal(out["views"]["x1"][1], row1) and not torch.equal(row1, batch["views"]["x1"][1])
    off = ProposalCutout(views=("x1",), p=0.0)(batch, gen(0))
    assert torch.equal(off["views"]["x1"], batch["views"]["x1"])
    with pytest.raises(SampleError):
        ProposalMask(views=("nope",))(batch, gen(0))


def test_depositioning_batch_transform_makes_x3_with_shifted_boxes_and_ids():
    batch = region_batch(n_images=3)
    out = Depositioning(source="x2", out="x3")(batch, gen(2))
    assert "x3" not in batch["views"] and out["views"]["x3"].shape == batch["views"]["x2"].shape
    assert torch.equal(out["proposal_ids"]["x3"], batch["proposal_ids"]["x2"])
    assert torch.equal(out["proposal_valid"]["x3"], batch["proposal_valid"]["x2"])
    delta = out["proposals"]["x3"] - batch["proposals"]["x2"]
    for r in range(3):
        d = delta[r][batch["proposal_valid"]["x2"][r]]
        assert torch.allclose(d, d[0].expand_as(d), atol=1e-4) and torch.allclose(d[0, :2], d[0, 2:], atol=1e-4)
        assert torch.allclose(d[0], d[0].round(), atol=1e-4)  # one integer offset per image
        d = d.round()
        b3 = out["proposals"]["x3"][r][batch["proposal_valid"]["x2"][r]]
        assert b3.min() >= 0 and b3[:, 2:].max() <= 32
        # geometry: the shifted boxes map back to the same source pixels as the original ones (flip in row 1)
        torch.testing.assert_close(view_to_source(b3, out["geometry"]["x3"][r], 32),
                                   view_to_source(batch["proposals"]["x2"][r][batch["proposal_valid"]["x2"][r]],
                                                  batch["geometry"]["x2"][r], 32))
        # pixels: inside the pasted shifted boxes from this image's x2, the rest from another image's x2
        tx, ty = int(d[0, 0]), int(d[0, 1])
        x3, x2 = out["views"]["x3"][r], batch["views"]["x2"][r]
        shifted = boxes_to_mask(out["proposals"]["x3"][r], (32, 32), batch["proposal_valid"]["x2"][r])
        from_source = (x3 == torch.roll(x2, (ty, tx), (-2, -1))).all(0)
        others = [batch["views"]["x2"][o] for o in range(3) if o != r]
        from_other = torch.stack([(x3 == o).all(0) for o in others]).any(0)
        assert (from_source | from_other).all()
        # measured 0.67-0.79 over the rows
        assert from_source[shifted].float().mean() > 0.3 and not from_source[~shifted].any()
        assert not from_other[~shifted].logical_not().any()
    with pytest.raises(SampleError):
        Depositioning()({k: v for k, v in batch.items() if k != "proposals"}, gen(0))


def test_rbj_never_grows_a_box():
    boxes = torch.tensor([[4.0, 4.0, 30.0, 20.0], [10.0, 12.0, 60.0, 60.0]])
    for seed in range(50):
        j = box_jitter(boxes, 64, p=1.0, max_ratio=0.1, grow=False, generator=gen(seed))
        assert ((j[:, 2:] - j[:, :2]) <= (boxes[:, 2:] - boxes[:, :2]) + 1e-5).all()


def test_a_coloured_proposal_keeps_its_colour_through_views_and_region_augmentations():
    from semssl.data.regions import RegionSampling
    from semssl.data.views import Collate, MultiViewTransform, ViewSpec

    def scene(colour, box, index):
        image = torch.zeros(3, 60, 80, dtype=torch.uint8)
        image[2] = 200  # blue background
        x1, y1, x2, y2 = box
        image[:, y1:y2, x1:x2] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
        return {"image": image, "index": index, "seed": 100 + index, "proposals": [list(map(float, box))]}

    specs = [ViewSpec("x1", size=48, whole_image=True, recipe="none", flip_p=0.0),
             ViewSpec("x2", size=48, scale=(0.7, 1.0), recipe="none", flip_p=0.5),
             ViewSpec("x2s", size=24, geometry_from="x2", recipe="none")]
    transform = MultiViewTransform(specs, normalize=False, region_sampling=RegionSampling(views=("x1", "x2"), k=4))
    red, box = (255, 0, 0), (20, 14, 52, 40)
    samples = []
    for i, (colour, b) in enumerate([(red, box), ((0, 255, 0), (5, 5, 30, 30))]):
        torch.manual_seed(i)
        samples.append(transform(scene(colour, b, i)))
    collate = Collate([Depositioning(source="x2", out="x3"), ProposalCutout(views=("x1", "x2s")),
                       ProposalMask(views=("x1", "x2s"))], seed=0)
    batch = collate(samples)
    fill = torch.tensor([124, 116, 104], dtype=torch.uint8)
    red_t = torch.tensor(red, dtype=torch.uint8)

    def interior(b, shrink=2):
        x1, y1, x2, y2 = b.tolist()
        return slice(int(y1) + shrink, int(y2) - shrink), slice(int(x1) + shrink, int(x2) - shrink)

    for view in ("x1", "x2", "x2s", "x3"):
        boxes, valid = batch["proposals"][view][0], batch["proposal_valid"][view][0]
        assert valid.all() and torch.equal(batch["proposal_ids"][view][0], torch.zeros(4, dtype=torch.int64))
        ys, xs = interior(boxes[0])  # 2 px inside: no blending with the background by the resampling
        pixels = batch["views"][view][0][:, ys, xs].reshape(3, -1).T
        assert pixels.shape[0] >= 16
        is_red = (pixels == red_t).all(1)
        if view == "x2":
            assert is_red.all()  # the teacher's view: untouched
        elif view == "x3":  # pasted (red) or, where PRC cut the pasted mask, the other image's x2
            other = batch["views"]["x2"][1][:, ys, xs].reshape(3, -1).T
            # measured 0.57
            assert (is_red | (pixels == other).all(1)).all() and is_red.float().mean() >= 0.4
        else:  # PRC: red or cut (mean colour), at most half cut
            # measured 0.55 (x1) and 0.55 (x2s)
            assert (is_red | (pixels == fill).all(1)).all() and is_red.float().mean() >= 0.4


def test_viz_regions_draws_every_augmentation_on_real_images(tmp_path) -> None:
    """Issue 12 item 6: `semssl viz regions` — proposals, PRC, PRM, RBJ and the composite, one row per image."""
    import numpy as np
    from PIL import Image

    from semssl.cli import main
    from semssl.viz.regions import augment_row, load_with_proposals

    rng = np.random.default_rng(0)
    for i in range(2):
        img = np.full((96, 128, 3), 40 + 60 * i, np.uint8)
        img[20:70, 30:90] = rng.integers(0, 255, 3)  # one object-like block for selective search
        Image.fromarray(img).save(tmp_path / f"im{i}.png")
    image, boxes = load_with_proposals(tmp_path / "im0.png", 64, 4)
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and 1 <= boxes.shape[0] <= 4
    assert float(boxes.min()) >= 0 and float(boxes.max()) <= 64
    row = augment_row(image, boxes, torch.zeros_like(image), torch.Generator().manual_seed(0))
    assert list(row) == ["proposals", "PRC", "PRM", "RBJ", "composite"]
    assert all(img.shape == image.shape for img, _ in row.values())
    jittered = row["RBJ"][1]
    assert bool(((jittered[:, 2:] - jittered[:, :2]) <= (boxes[:, 2:] - boxes[:, :2]) + 1e-4).all())  # never grows
    out = tmp_path / "regions.png"
    assert main(["viz", "regions", "--images", str(tmp_path), "--n", "2", "--size", "64", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["viz", "regions", "--images", str(tmp_path / "im0.png"), "--out", str(out)]) == 1  # one image
