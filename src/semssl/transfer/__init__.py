"""Fine-tuning protocols on any checkpoint: ``finetune`` (classification), ``segment`` (FCN / DeepLab-v3),
``detect`` (Faster / Mask R-CNN, C4 and FPN) and ``export`` (torchvision, timm, detectron2, ONNX).

Each protocol is a function with typed arguments, usable from a notebook; ``semssl finetune | transfer | export``
only parse their options and call them (DESIGN "Commands are Python first"). The functions are imported lazily so
that ``import semssl.transfer`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from semssl.transfer.common import BackboneSource

__all__ = ["BackboneSource", "finetune", "segment", "detect", "export"]


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from semssl.transfer.finetune import finetune
        return finetune
    if name == "segment":
        from semssl.transfer.segment import segment
        return segment
    if name == "detect":
        from semssl.transfer.detect import detect
        return detect
    if name == "export":
        from semssl.transfer.export import export
        return export
    raise AttributeError(f"module 'semssl.transfer' has no attribute {name!r}")
