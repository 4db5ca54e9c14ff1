"""Fine-tuning protocols on any checkpoint: ``finetune`` (classification), ``segment`` (FCN / DeepLab-v3),
``detect`` (Faster / Mask R-CNN, C4 and FPN) and ``export`` (torchvision, timm, detectron2, ONNX).

Each protocol is a function with typed arguments, usable from a notebook (``semssl.transfer.detect(...)``);
``semssl finetune | transfer | export`` only parse their options and call them (DESIGN "Commands are Python
first"). Decision: the functions are bound here under their modules' names, so ``semssl.transfer.finetune`` is
the function; import a module's other names with ``from semssl.transfer.finetune import RECIPES``.
"""

from __future__ import annotations

from semssl.transfer.common import BackboneSource
from semssl.transfer.detect import detect
from semssl.transfer.export import export
from semssl.transfer.finetune import finetune
from semssl.transfer.segment import segment

__all__ = ["BackboneSource", "detect", "export", "finetune", "segment"]
