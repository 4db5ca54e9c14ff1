"""Tests of semssl.data.regions: SoCo's proposal sampling inside MultiViewTransform, box cutout, box jitter, and
the batch-transform stage (Collate)."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass

import pytest
import torch
from torch.utils.data import DataLoader

from semssl.data.augment import IMAGENET_MEAN
from semssl.data.regions import (
    RegionSampling,
    ShuffleBackgrounds,
    box_cutout,
    box_jitter,
    boxes_to_mask,
    build_batch_transform,
    register_batch_transform,
    select_regions,
)
from semssl.data.views import (
    Collate,
    CropParams,
    MultiViewTransform,
    SampleError,
    ViewError,
    ViewSpec,
    batch_seed,
    box_area,
    collate_views,
    source_to_view,
)

H, W = 60, 80


def _image(index: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(index)
    return torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)


def _grid_proposals() -> torch.Tensor:
    """12 boxes of 16 x 16 px on a 4 x 3 grid covering the 80 x 60 image."""
    return torch.tensor(
        [[2.0 + 20 * i, 2.0 + 20 * j, 18.0 + 20 * i, 18.0 + 20 * j] for j in range(3) for i in range(4)]
    )


# --------------------------------------------------------------------------------------------- select_regions
def test_select_regions_without_replacement_then_padding() -> None:
    g = torch.Generator().manual_seed(0)
    candidates = torch.tensor([True, False, True, True, False, True, True, True])
    for _ in range(20):
        chosen = select_regions(candidates, 4, generator=g)
        assert len(set(chosen.tolist())) == 4 and candidates[chosen].all()
        assert chosen.tolist() == sorted(chosen.tolist())
    padded = select_regions(torch.tensor([False, True, False, True]), 5, generator=g)
    assert padded.shape == (5,) and padded[:2].tolist() == [1, 3] and set(padded.tolist()) == {1, 3}
    assert select_regions(torch.tensor([False, True, False, True]), 5, pad=False, generator=g).tolist() == [1, 3]
    assert select_regions(torch.zeros(3, dtype=torch.bool), 4).numel() == 0


# ------------------------------------------------------------------------------------------ proposal sampling
def _soco(k: int = 4, **sampling) -> MultiViewTransform:
    specs = [
        ViewSpec("x1", 32, whole_image=True, recipe="none"),
        ViewSpec("x2", 32, scale=(0.05, 0.2), recipe="none"),
        ViewSpec("x3", 16, scale=(0.05, 0.2), recipe="none"),
    ]
    return MultiViewTransform(specs, normalize=False, region_sampling=RegionSampling(("x1", "x2"), k=k, **sampling))


def test_sampling_keeps_only_proposals_visible_in_both_views() -> None:
    t = _soco(k=4)
    src = _grid_proposals()
    n_hidden_in_x2 = n_hidden_in_x3 = n_padded = 0
    for seed in range(25):
        torch.manual_seed(seed)
        out = t({"image": _image(seed), "label": 0, "index": seed, "proposals": src})
        ids = out["proposal_ids"]["x1"][0]
        assert ids.shape == (4,)
        for name, size in (("x1", 32), ("x2", 32), ("x3", 16)):
            assert torch.equal(out["proposal_ids"][name][0], ids)  # the same selection in every view
            geometry = out["geometry"][name][0]
            expected = source_to_view(src[ids], geometry, size, clip=True)
            torch.testing.assert_close(out["proposals"][name][0], expected, atol=1e-4, rtol=0)
            assert torch.equal(out["proposal_valid"][name][0], box_area(expected) >= 1.0)
        assert out["proposal_valid"]["x1"].all() and out["proposal_valid"]["x2"].all()
        # which proposals this draw makes visible in x2 (x1 is the whole image)
        area = box_area(source_to_view(src, out["geometry"]["x2"][0], 32, clip=True))
        surely = set((area >= 1.001).nonzero().flatten().tolist())  # up to float rounding at the threshold
        maybe = set((area >= 0.999).nonzero().flatten().tolist())
        assert set(ids.tolist()) <= maybe
        if len(surely) >= 4:
            assert len(set(ids.tolist())) == 4  # k distinct proposals, no padding needed
        else:
            assert set(ids.tolist()) >= surely  # all of them kept, padded by duplicates
            n_padded += 1
        n_hidden_in_x2 += 12 - len(maybe)
        n_hidden_in_x3 += int((~out["proposal_valid"]["x3"]).sum())
    # measured 204
    assert n_hidden_in_x2 > 100  # small x2 crops hide most proposals: the filter is exercised
    assert n_hidden_in_x3 > 0  # other views get the selection with their own validity
    assert n_padded > 0


def test_sampling_is_reproducible_per_sample() -> None:
    t = _soco()
    sample = {"image": _image(), "label": 0, "index": 0, "proposals": _grid_proposals()}
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(t(sample))
    for key in ("proposals", "proposal_ids", "geometry", "views"):
        for name in ("x1", "x2", "x3"):
            a, b = outs[0][key][name], outs[1][key][name]
            assert all(torch.equal(x, y) for x, y in zip(a, b))


class _Script:
    """Stands in for ``sample_params``: returns the given draws in order and counts the calls."""

    def __init__(self, draws: list[dict[str, list[CropParams]]]):
        self.draws, self.calls = draws, 0

    def __call__(self, height: int, width: int) -> dict[str, list[CropParams]]:
        self.calls += 1
        return self.draws[self.calls - 1]


WHOLE = CropParams(0, 0, H, W)
EMPTY_CORNER = CropParams(top=0, left=30, height=20, width=20)  # x 30-50, y 0-20: no proposal
TOP_LEFT = CropParams(top=0, left=0, height=20, width=20)  # proposal 0 only
BOTTOM_RIGHT = CropParams(top=30, left=50, height=30, width=30)  # proposals 1 and 2
PROPOSALS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [60.0, 40.0, 80.0, 60.0], [62.0, 42.0, 78.0, 58.0]])


def _two_views(**sampling) -> MultiViewTransform:
    specs = [ViewSpec("x1", 32, whole_image=True, recipe="none"), ViewSpec("x2", 32, recipe="none")]
    return MultiViewTransform(specs, normalize=False, region_sampling=RegionSampling(("x1", "x2"), **sampling))


def _scripted(t: MultiViewTransform, crops: list[CropParams]) -> _Script:
    script = _Script([{"x1": [WHOLE], "x2": [c]} for c in crops])
    t.sample_params = script  # type: ignore[method-assign]
    return script


def _run(t: MultiViewTransform, proposals: torch.Tensor = PROPOSALS, **kwargs) -> dict:
    return t({"image": _image(), "label": 0, "index": 0, "proposals": proposals}, **kwargs)


def test_sampling_redraws_while_too_few_are_visible() -> None:
    t = _two_views(k=4)  # least_common starts at k // 2 = 2
    script = _scripted(t, [EMPTY_CORNER, TOP_LEFT, BOTTOM_RIGHT])
    out = _run(t)
    assert script.calls == 2  # 0 < 2 -> redraw with least_common 1; 1 visible >= 1 -> kept
    assert out["geometry"]["x2"][0].tolist() == TOP_LEFT.geometry_list()
    assert out["proposal_ids"]["x2"][0].tolist() == [0, 0, 0, 0]  # padded by duplicating the only one

    t = _two_views(k=4, least_common=2)
    script = _scripted(t, [TOP_LEFT, BOTTOM_RIGHT])
    out = _run(t)
    assert script.calls == 2 and out["geometry"]["x2"][0].tolist() == BOTTOM_RIGHT.geometry_list()
    ids = out["proposal_ids"]["x2"][0].tolist()
    assert ids[:2] == [1, 2] and set(ids) == {1, 2}


def test_least_common_is_halved_after_each_failed_draw() -> None:
    t = _two_views(k=4, least_common=4)
    script = _scripted(t, [TOP_LEFT] * 5)
    _run(t)
    assert script.calls == 3  # 1 < 4, 1 < 2, 1 >= 1 (without halving all 5 draws would be used)


def test_fallbacks_to_the_whole_image() -> None:
    t = _two_views(k=4, max_tries=2)
    script = _scripted(t, [EMPTY_CORNER] * 5)
    out = _run(t)
    assert script.calls == 2  # max_tries draws in all, the last one is kept
    assert out["geometry"]["x2"][0].tolist() == EMPTY_CORNER.geometry_list()
    assert out["proposal_ids"]["x1"][0].tolist() == [3] * 4  # a new id after the 3 given proposals
    for name in ("x1", "x2"):
        assert out["proposals"][name][0].tolist() == [[0.0, 0.0, 32.0, 32.0]] * 4  # the whole view
        assert out["proposal_valid"][name].all()
    # no proposal at all: the whole image is proposal 0 (SoCo)
    t = _two_views(k=3)
    _scripted(t, [EMPTY_CORNER])
    out = _run(t, proposals=torch.zeros(0, 4))
    assert out["proposal_ids"]["x2"][0].tolist() == [0, 0, 0]
    assert out["proposals"]["x2"][0].tolist() == [[0.0, 0.0, 32.0, 32.0]] * 3
    # explicit params are never re-drawn
    t = _two_views(k=2)
    out = _run(t, params={"x1": [WHOLE], "x2": [EMPTY_CORNER]})
    assert out["proposal_ids"]["x2"][0].tolist() == [3, 3]


def test_padding_duplicates_ids_and_boxes() -> None:
    t = _two_views(k=5)
    _scripted(t, [BOTTOM_RIGHT])
    out = _run(t)
    ids = out["proposal_ids"]["x2"][0]
    assert ids.shape == (5,) and ids[:2].tolist() == [1, 2] and set(ids.tolist()) == {1, 2}
    for name in ("x1", "x2"):
        boxes = out["proposals"][name][0]
        for j in range(2, 5):  # a duplicate has the box of its original in every view
            original = 0 if ids[j] == 1 else 1
            assert torch.equal(boxes[j], boxes[original])
    # without padding: only the visible ones; the collate pads with -1
    t = _two_views(k=5, pad=False)
    _scripted(t, [BOTTOM_RIGHT])
    short = _run(t)
    assert short["proposal_ids"]["x2"][0].tolist() == [1, 2]
    batch = collate_views([out, short])
    assert batch["proposal_ids"]["x2"].tolist() == [ids.tolist(), [1, 2, -1, -1, -1]]
    assert batch["proposal_valid"]["x2"].tolist() == [[True] * 5, [True, True, False, False, False]]


def test_sampling_needs_proposals_and_valid_settings() -> None:
    t = _two_views()
    out = t({"image": _image(), "label": 0, "index": 0})
    assert "proposals" not in out and "proposal_ids" not in out  # nothing to sample: outputs as before
    with pytest.raises(ViewError, match="region sampling: views names 'x9', which is not a view"):
        MultiViewTransform([ViewSpec("x1", 32)], region_sampling=RegionSampling(("x1", "x9")))
    with pytest.raises(ViewError, match="must name two different views"):
        RegionSampling(("x1", "x1"))
    with pytest.raises(ViewError, match="k must be an int >= 1, got 0"):
        RegionSampling(k=0)
    with pytest.raises(ViewError, match=r"least_common must be None or an int in \[1, k=4\], got 5"):
        RegionSampling(least_common=5)
    with pytest.raises(ViewError, match="min_visible must be a number >= 1.0"):
        RegionSampling(min_visible=0.5)
    with pytest.raises(ViewError, match="region_sampling must be a RegionSampling"):
        MultiViewTransform([ViewSpec("x1", 32)], region_sampling={"k": 4})  # type: ignore[arg-type]
    assert RegionSampling(k=1).first_least_common == 1 and RegionSampling(k=4).first_least_common == 2


# ------------------------------------------------------------------------------------------------- box cutout
def _square(zero: torch.Tensor) -> tuple[int, int, int]:
    """(left, top, side) of the zeroed pixels, checking that they form one full square."""
    rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
    top, left = int(rows.min()), int(cols.min())
    h, w = int(rows.max()) + 1 - top, int(cols.max()) + 1 - left
    assert h == w and int(zero.sum()) == h * w, (h, w, int(zero.sum()))
    return left, top, h


def test_box_cutout_zeroes_a_square_of_the_right_area_centred_in_the_box() -> None:
    image = torch.ones(3, 64, 64)
    box = torch.tensor([[16.0, 20.0, 48.0, 44.0]])  # 32 x 24 = 768 px^2
    centres = []
    for seed in range(60):
        out = box_cutout(image, box, p=1.0, area=(0.1, 0.3), generator=torch.Generator().manual_seed(seed))
        assert ((out == 0) | (out == 1)).all() and torch.equal((out == 0).all(0), (out == 0).any(0))
        left, top, side = _square((out == 0).all(0))
        assert round(math.sqrt(0.1 * 768)) <= side <= round(math.sqrt(0.3 * 768))  # 9 .. 15 px
        cx, cy = left + side / 2, top + side / 2
        assert 16 - 0.5 <= cx <= 48 + 0.5 and 20 - 0.5 <= cy <= 44 + 0.5  # centred at a point of the box
        centres.append((cx, cy))
    xs = [c[0] for c in centres]
    # measured 16.5 and 46.5 (box centres 16-48)
    assert min(xs) < 22 and max(xs) > 42  # uniform over the box, not at its centre
    # probability, validity, determinism, and the image itself is left alone
    assert torch.equal(box_cutout(image, box, p=0.0), image)
    assert torch.equal(box_cutout(image, box, torch.tensor([False]), p=1.0), image)
    hits = sum(bool((box_cutout(image, box, p=0.5, generator=torch.Generator().manual_seed(s)) == 0).any())
               for s in range(200))
    # measured 101 of 200; the binomial sd is 7, so +-30 is 4.2 sd
    assert 70 < hits < 130
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(box_cutout(image, box, p=1.0, generator=g1), box_cutout(image, box, p=1.0, generator=g2))
    assert image.eq(1).all()


def test_box_cutout_only_touches_valid_boxes_and_clips_to_the_image() -> None:
    image = torch.full((3, 40, 40), 200, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 12.0, 12.0], [25.0, 25.0, 40.0, 40.0]])
    fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
    for seed in range(20):
        out = box_cutout(image, boxes, torch.tensor([False, True]), p=1.0, fill=fill,
                         generator=torch.Generator().manual_seed(seed))
        cut = (out != 200).any(0)
        assert cut.any() and not cut[:20, :20].any()  # only around the valid box (side <= 8 px)
        assert out[:, cut].T.tolist() == [list(fill)] * int(cut.sum())  # the mean colour in a uint8 view


# ------------------------------------------------------------------------------------------------- box jitter
def _random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = 12 + torch.rand(n, 2, generator=g) * 20
    wh = 4 + torch.rand(n, 2, generator=g) * 16
    return torch.cat([xy, xy + wh], dim=1)  # inside [12, 52]: jitter by 10 % never reaches the 64 px border


def test_box_jitter_never_grows_with_grow_false() -> None:
    boxes = _random_boxes(300, 0)
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    shrunk = box_jitter(boxes, 64, p=1.0, max_ratio=0.1, grow=False, generator=torch.Generator().manual_seed(1))
    new_wh = shrunk[:, 2:] - shrunk[:, :2]
    assert (new_wh <= wh + 1e-4).all() and (new_wh >= 0.9 * wh - 1e-4).all()
    assert (new_wh < wh - 0.05).any()
    shift = ((shrunk[:, :2] + shrunk[:, 2:]) / 2 - centre).abs()
    assert (shift <= 0.1 * wh + 1e-4).all() and (shift > 0.05 * wh).any()
    grown = box_jitter(boxes, 64, p=1.0, max_ratio=0.1, grow=True, generator=torch.Generator().manual_seed(1))
    grown_wh = grown[:, 2:] - grown[:, :2]
    assert (grown_wh > wh + 0.05).any() and (grown_wh <= 1.1 * wh + 1e-4).all()


def test_box_jitter_clips_respects_p_and_validity() -> None:
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0], [40.0, 40.0, 64.0, 64.0], [5.0, 5.0, 9.0, 9.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = box_jitter(boxes, 64, torch.tensor([True, True, False]), p=1.0, max_ratio=0.3, generator=g)
        assert out.min() >= 0 and out.max() <= 64
        assert torch.equal(out[2], boxes[2])
    assert torch.equal(box_jitter(boxes, 64, p=0.0), boxes)
    with pytest.raises(ViewError, match=r"max_ratio must be in \[0, 1\), got 1.0"):
        box_jitter(boxes, 64, max_ratio=1.0)


# -------------------------------------------------------------------------------- box transforms in the views
def _scene(with_boxes: bool = True) -> dict:
    sample = {"image": _image(), "label": 0, "index": 0, "proposals": torch.tensor([[36.0, 15.0, 64.0, 45.0]])}
    if with_boxes:
        sample["boxes"] = torch.tensor([[0.0, 48.0, 12.0, 60.0]])  # far from the proposal
    return sample


def test_view_cutout_uses_the_proposals_and_zeroes_normalised_pixels() -> None:
    plain = MultiViewTransform([ViewSpec("x2", 32, whole_image=True, recipe="none", flip_p=0.0)])
    cut = MultiViewTransform([ViewSpec("x2", 32, whole_image=True, recipe="none", flip_p=0.0, box_cutout_p=1.0)])
    for seed in range(10):
        torch.manual_seed(seed)
        a = plain(_scene())["views"]["x2"][0]
        torch.manual_seed(seed)
        out = cut(_scene())
        b = out["views"]["x2"][0]
        changed = (a != b).any(0)
        assert (b[:, changed] == 0).all()  # zero in the normalised tensor
        left, top, side = _square(changed)
        x1, y1, x2, y2 = out["proposals"]["x2"][0, 0].tolist()  # [14.4, 8, 25.6, 24]: the square stays inside the view
        assert x1 - 0.5 <= left + side / 2 <= x2 + 0.5 and y1 - 0.5 <= top + side / 2 <= y2 + 0.5
        assert not changed[:, :8].any()  # the ground-truth box (x < 4.8) is not a target: the proposals are
        assert torch.equal(out["proposals"]["x2"], plain(_scene())["proposals"]["x2"])  # boxes unchanged


def test_view_jitter_changes_only_its_view() -> None:
    specs = [
        ViewSpec("x1", 32, whole_image=True, recipe="none", box_jitter_p=1.0, box_jitter_grow=False),
        ViewSpec("x2", 32, whole_image=True, recipe="none"),
    ]
    t = MultiViewTransform(specs, normalize=False)
    moved = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out = t(_scene(with_boxes=False))
        exact = {n: source_to_view(_scene()["proposals"], out["geometry"][n][0], 32, clip=True) for n in ("x1", "x2")}
        torch.testing.assert_close(out["proposals"]["x2"][0], exact["x2"], atol=1e-4, rtol=0)
        jittered = out["proposals"]["x1"][0]
        wh, wh0 = jittered[:, 2:] - jittered[:, :2], exact["x1"][:, 2:] - exact["x1"][:, :2]
        assert (wh <= wh0 + 1e-4).all()
        moved += int(not torch.allclose(jittered, exact["x1"]))
        assert out["proposal_ids"]["x1"].tolist() == out["proposal_ids"]["x2"].tolist() == [[0]]
        assert out["proposal_valid"]["x1"].all()
    assert moved == 10


# ------------------------------------------------------------------------------------------- batch transforms
@register_batch_transform("test_regions_noise")
@dataclass
class _Noise:
    """Adds generator noise to every view: a stand-in for any random batch transform."""

    scale: float = 1.0

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        out = dict(batch)
        out["views"] = {
            n: v + self.scale * torch.randn(v.shape, generator=generator) for n, v in batch["views"].items()
        }
        return out


def _samples(seeds: list[int | None]) -> list[dict]:
    t = MultiViewTransform([ViewSpec("q", 16, n_crops=2, recipe="none")])
    out = []
    for i, seed in enumerate(seeds):
        torch.manual_seed(i)
        sample = {"image": _image(i), "label": 0, "index": i, "proposals": _grid_proposals()[i : i + 2]}
        if seed is not None:
            sample["seed"] = seed
        out.append(t(sample))
    return out


def test_batch_transforms_are_reproducible_from_the_samples() -> None:
    samples = _samples([11, 12, 13])
    collate = Collate(["test_regions_noise"])
    first, second = collate(samples), collate(samples)
    assert torch.equal(first["views"]["q"], second["views"]["q"])  # e.g. a resumed run, another worker
    plain = collate_views(samples)
    assert not torch.equal(first["views"]["q"], plain["views"]["q"])  # the transform ran
    assert torch.equal(plain["views"]["q"], collate_views(samples)["views"]["q"])  # the input was not changed
    reseeded = collate(_samples([11, 12, 99]))  # another epoch -> other per-sample seeds -> other randomness
    assert not torch.equal(first["views"]["q"], reseeded["views"]["q"])
    assert batch_seed(samples) != batch_seed(samples[::-1]) and batch_seed(samples) != batch_seed(samples, seed=1)
    no_seeds = _samples([None, None, None])  # falls back to the indices, still reproducible
    assert batch_seed(no_seeds) == batch_seed(_samples([None, None, None]))
    loader = DataLoader(samples, batch_size=3, collate_fn=pickle.loads(pickle.dumps(collate)))
    assert torch.equal(next(iter(loader))["views"]["q"], first["views"]["q"])


def test_batch_transform_registry_errors() -> None:
    with pytest.raises(ViewError, match="unknown batch transform 'nope'; valid: .*shuffle_backgrounds"):
        build_batch_transform("nope")
    with pytest.raises(ViewError, match="batch transform 'shuffle_backgrounds': .*unexpected keyword"):
        build_batch_transform("shuffle_backgrounds", q=1)
    with pytest.raises(ViewError, match="'test_regions_noise' is already registered"):
        register_batch_transform("test_regions_noise")(ShuffleBackgrounds)
    with pytest.raises(ViewError, match="must be callable or a registered name"):
        Collate([3])  # type: ignore[list-item]
    assert build_batch_transform("test_regions_noise", scale=2.0).scale == 2.0
    with pytest.raises(SampleError, match="returned NoneType, not a batch dict"):
        Collate([lambda batch, generator: None])(_samples([1, 2]))


def test_shuffle_backgrounds_keeps_regions_and_takes_the_rest_from_another_image() -> None:
    samples = _samples([1, 2, 3])
    batch = collate_views(samples)
    out = build_batch_transform("shuffle_backgrounds")(batch, torch.Generator().manual_seed(0))
    x, y = batch["views"]["q"], out["views"]["q"]
    fg = boxes_to_mask(batch["proposals"]["q"], 16, batch["proposal_valid"]["q"])
    assert fg.any() and (~fg).any()
    assert torch.equal(y[fg[:, None].expand_as(y)], x[fg[:, None].expand_as(x)])  # regions untouched
    n = 3
    shifts = [s for s in (1, 2) if all(torch.equal(y[r][:, ~fg[r]], x[r - r % n + (r % n + s) % n][:, ~fg[r]])
                                       for r in range(6))]
    assert len(shifts) == 1  # one other image (never itself) gives the background of every crop
    assert not torch.equal(x, y) and torch.equal(batch["views"]["q"], collate_views(samples)["views"]["q"])
    never = ShuffleBackgrounds(p=0.0)(batch, torch.Generator().manual_seed(0))
    assert torch.equal(never["views"]["q"], x)
    alone = collate_views(samples[:1])
    assert torch.equal(ShuffleBackgrounds()(alone, torch.Generator())["views"]["q"], alone["views"]["q"])
    with pytest.raises(SampleError, match="shuffle_backgrounds: the batch has no 'boxes'"):
        ShuffleBackgrounds(regions="boxes")(batch, torch.Generator())
