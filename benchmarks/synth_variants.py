"""Object-split variants of the built-in data, for sizing the main job (docs/results.md section 4b).

Writes ``ROOT/objects/{train,test}/<class>/<id>.png`` (5,000 / 1,000 images at 64 px, seed 0, the generator's
per-image seeding) for one variant, drawn with the generator's own pieces (:mod:`semssl.data.synthetic.render`)
but with one main object only and the background, texture, size and rotation the variant names. Point a recipe
at the folder with ``data.train=ROOT/objects/train data.eval_train=ROOT/objects/train
data.eval_test=ROOT/objects/test``.

    python benchmarks/synth_variants.py VARIANT ROOT

Variants (each a ``+``-joined list; the ones measured are in docs/results.md section 4b):
    ``gradient`` | ``flat``   background: version 2's colour gradient and blotches without the clutter, or one
                              colour (+ sensor noise, as every style);
    ``large`` | ``medium`` | ``small``   main-object area (fraction of the image): 15-60 % (version 2),
                              6-35 % (version 3's ``plain``), 4-25 %;
    ``upright``               rotation within +-20 degrees instead of any.
Every variant draws solid (shaded) objects and no distractors. ``flat+medium`` writes the same pixels as the
generator's ``plain`` style (version 3), byte for byte; only the file names differ (5 digits here, 6 there).
"""

from __future__ import annotations

import argparse
import math
import zlib
from pathlib import Path

import cv2
import numpy as np

from semssl.data.synthetic import render as R
from semssl.data.synthetic.classes import CLASS_NAMES

AREAS = {"large": ((0.20, 0.50), (0.15, 0.60)), "medium": ((0.10, 0.25), (0.06, 0.35)),
         "small": ((0.06, 0.16), (0.04, 0.25))}


def gradient_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Version 2's colour gradient with smooth blotches (the first part of ``render._background``)."""
    ends = R._random_colours(rng, 2, sat=(0.05, 0.6), val=(0.2, 0.95))
    psi = rng.uniform(0.0, 2 * math.pi)
    cells = np.linspace(0.0, 1.0, 4)
    g = math.cos(psi) * cells[None, :] + math.sin(psi) * cells[:, None]
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    grid = ends[0] + (ends[1] - ends[0]) * g[..., None] + rng.normal(0.0, rng.uniform(6.0, 20.0), (4, 4, 3))
    up = R._upsample_matrix(size)
    rows = np.tensordot(up, grid.astype(np.float32), axes=(1, 0))
    return np.clip(np.matmul(up, rows), 0, 255).astype(np.float32)


class _UprightRng:
    """Proxy of a Generator whose first ``uniform`` call (``_sample_pose``'s angle) is within +-20 degrees."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.first = rng, True

    def uniform(self, *args, **kwargs):
        if self.first:
            self.first = False
            return self.rng.uniform(-math.radians(20), math.radians(20))
        return self.rng.uniform(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.rng, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", help="e.g. flat+medium, gradient+large, flat+medium+upright")
    p.add_argument("root", type=Path)
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=1000)
    args = p.parse_args()
    parts = set(args.variant.split("+"))
    backgrounds = {"gradient": gradient_background, "flat": R._flat_background}
    unknown = parts - set(backgrounds) - set(AREAS) - {"upright"}
    if unknown or len(parts & set(backgrounds)) != 1 or len(parts & set(AREAS)) != 1:
        p.error(f"variant {args.variant!r}: one background of {sorted(backgrounds)}, one size of {sorted(AREAS)}, "
                f"optionally 'upright' (unknown: {sorted(unknown)})")
    background = backgrounds[(parts & set(backgrounds)).pop()]
    target, accepted = AREAS[(parts & set(AREAS)).pop()]
    R.TEXTURES = ("solid",)  # one texture (drawing an index among one consumes no random numbers)
    if "upright" in parts:
        sample_pose = R._sample_pose
        R._sample_pose = lambda rng, *a, **k: sample_pose(_UprightRng(rng), *a, **k)

    for part, n in (("train", args.n_train), ("test", args.n_test)):
        for i in range(n):
            cls = i % 10
            rng = np.random.default_rng(np.random.SeedSequence([0, zlib.crc32(f"objects/{part}".encode()), i]))
            canvas = background(rng, 64)
            for _ in range(100):
                main = R._make_instance(rng, cls, rng.uniform(*target) * 64 * 64, 64)
                if accepted[0] <= main.mask.mean() <= accepted[1]:
                    break
            R._paint(canvas, main, rng)
            out = args.root / "objects" / part / CLASS_NAMES[cls]
            out.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / f"{i:05d}.png"), R._finish(canvas, rng)[..., ::-1])
    print(f"wrote {args.n_train} + {args.n_test} images of {args.variant} under {args.root}/objects")


if __name__ == "__main__":
    main()
