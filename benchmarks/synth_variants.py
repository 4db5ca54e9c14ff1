"""Object-split variants of the built-in data, for sizing the main job (docs/results.md section 4b).

Writes ``ROOT/objects/{train,test}/<class>/<id>.png`` (5,000 / 1,000 images at 64 px, seed 0, the generator's
per-image seeding) for one variant, drawn by the generator's own object renderer with a style registered for
the variant (:class:`semssl.data.synthetic.render.StyleSpec`: one solid main object, no distractors, the
background and size the variant names; ``upright`` also narrows the rotation). Point a recipe
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
    backgrounds = ("gradient", "flat")
    unknown = parts - set(backgrounds) - set(AREAS) - {"upright"}
    if unknown or len(parts & set(backgrounds)) != 1 or len(parts & set(AREAS)) != 1:
        p.error(f"variant {args.variant!r}: one background of {list(backgrounds)}, one size of {sorted(AREAS)}, "
                f"optionally 'upright' (unknown: {sorted(unknown)})")
    target, accepted = AREAS[(parts & set(AREAS)).pop()]
    R.STYLE_SPECS[args.variant] = R.StyleSpec((parts & set(backgrounds)).pop(), textured=False, distractors=False,
                                              main_area_range=accepted, main_area_target=target)
    if "upright" in parts:
        sample_pose = R._sample_pose
        R._sample_pose = lambda rng, *a, **k: sample_pose(_UprightRng(rng), *a, **k)

    for part, n in (("train", args.n_train), ("test", args.n_test)):
        for i in range(n):
            cls = i % 10
            rng = np.random.default_rng(np.random.SeedSequence([0, zlib.crc32(f"objects/{part}".encode()), i]))
            image, _ = R.render_object_image(rng, 64, cls, style=args.variant)
            out = args.root / "objects" / part / CLASS_NAMES[cls]
            out.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / f"{i:05d}.png"), image[..., ::-1])
    print(f"wrote {args.n_train} + {args.n_test} images of {args.variant} under {args.root}/objects")


if __name__ == "__main__":
    main()
