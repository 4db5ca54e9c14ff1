"""Lightning's checkpoint IO for semssl runs: atomic writes, weights-only reads (:mod:`semssl.checkpoints`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from semssl.checkpoints import atomic_torch_save, safe_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes, weights-only reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Optional[bool] = None) -> dict:
        return safe_load(path, map_location=map_location or "cpu")
