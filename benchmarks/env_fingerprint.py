"""Fingerprint of what a training run depends on besides the code: package versions and, for each piece of the
main job's step, a SHA-256 digest of its output on fixed inputs.

Two environments that print the same digests compute the same thing bit for bit up to that piece; the first digest
that differs names where their training runs part. Written after the main job printed kNN 25.4 on two machines and
19.8 on a third with the same code and data (docs/results.md section 1).

    python benchmarks/env_fingerprint.py                 # prints versions and digests
    python benchmarks/env_fingerprint.py --out fp.json   # also writes them as JSON (compare with diff)

Pieces: ``augment/<recipe>`` — 16 fixed random 32 px images through each photometric recipe
(:class:`semssl.data.augment.PhotometricTransform`, parameters drawn after ``torch.manual_seed(0)``);
``backbone/forward`` and ``backbone/grad`` — the main job's backbone (built after ``torch.manual_seed(0)``) on a
fixed batch: its pooled features and the gradient of their sum; ``rng/torch`` and ``rng/numpy`` — the first
draws of the seeded generators.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from importlib import metadata
from typing import Any

import numpy as np
import torch

from semssl.config import load_config
from semssl.data.augment import PhotometricTransform, recipe_names
from semssl.models.backbones import build_backbone

PACKAGES = ("torch", "torchvision", "numpy", "opencv-contrib-python-headless", "pillow", "lightning", "pycocotools")


def digest(x: Any) -> str:
    """First 16 hex digits of the SHA-256 of an array's or tensor's bytes (with its dtype and shape)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def fingerprint(n_images: int = 16, size: int = 32, batch: int = 16) -> dict[str, str]:
    images = np.random.default_rng(0).random((n_images, 3, size, size), dtype=np.float32)
    out: dict[str, str] = {}
    for name in recipe_names():
        t = PhotometricTransform(name, size)
        torch.manual_seed(0)
        out[f"augment/{name}"] = digest(np.stack([t.apply_array(im.copy(), t.make_params([])) for im in images]))
    cfg = load_config(None, [])
    torch.manual_seed(0)
    model = build_backbone(cfg.model)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((batch, 3, size, size), dtype=np.float32))
    pooled = model(x)["pooled"]
    pooled.sum().backward()
    out["backbone/forward"] = digest(pooled)
    out["backbone/grad"] = digest(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.manual_seed(0)
    out["rng/torch"] = digest(torch.rand(8))
    out["rng/numpy"] = digest(np.random.default_rng(0).random(8))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the versions and digests as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the digests must not depend on how a reduction is split over threads
    res = {"versions": versions(), "digests": fingerprint()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    for section, values in res.items():
        for k, v in values.items():
            print(f"{section:8s} {k:40s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
