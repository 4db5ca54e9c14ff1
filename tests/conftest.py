"""Shared fixtures: a tiny built-in dataset and a tiny MoCo-v2 config that runs in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from semssl.config import Config, load_config
from semssl.data.synthetic import SynthConfig
from semssl.data.synthetic.build import ensure_synthetic

# The small real datasets lie beside the repository on the developers' machine (../shared/data from its root):
# the tests read the recipes' $SEMSSL_DATA_DIR there, unless the variable is set already. Tests that need a dataset
# skip when it is absent; every test that writes data writes it into a tmp folder (the built-in data included:
# data.synthetic.root), never under the data root.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("SEMSSL_DATA_DIR", str(SHARED_DATA))

TINY_SYNTH = SynthConfig(seed=0, object_size=32, scene_size=64, n_train_objects=96, n_test_objects=40,
                         n_train_scenes=8, n_test_scenes=4, num_classes=4, workers=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests share 2 cores with each other and with data workers: keep torch to one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return ensure_synthetic(root, TINY_SYNTH)


def tiny_overrides(synth_root: Path, out_dir: Path) -> list[str]:
    s = TINY_SYNTH
    return [
        f"data.synthetic.root={synth_root}", f"data.synthetic.object_size={s.object_size}",
        f"data.synthetic.scene_size={s.scene_size}", f"data.synthetic.n_train_objects={s.n_train_objects}",
        f"data.synthetic.n_test_objects={s.n_test_objects}", f"data.synthetic.n_train_scenes={s.n_train_scenes}",
        f"data.synthetic.n_test_scenes={s.n_test_scenes}", f"data.synthetic.num_classes={s.num_classes}",
        f"data.synthetic.workers={s.workers}",
        "data.batch_size=16", "data.num_workers=0", "data.views.0.size=32", "data.views.1.size=32",
        "data.eval_size=32", "model.arch=resnet18", "model.bn_splits=2", "method.queue_size=64",
        "trainer.max_steps=0", "trainer.max_epochs=2", "trainer.progress_bar=false",
        f"trainer.out_dir={out_dir}", "trainer.log_every_n_steps=1", "eval.linear.epochs=5",
        "eval.knn_k=[5,20]", "eval.batch_size=64",
    ]


@pytest.fixture
def tiny_cfg(tiny_synth, tmp_path) -> Config:
    return load_config(None, tiny_overrides(tiny_synth, tmp_path / "runs"))


@pytest.fixture
def branches_read(monkeypatch) -> list[str]:
    """The branch of every ``Method.features`` call made while the test runs (the call itself is unchanged)."""
    from semssl.methods import Method

    seen: list[str] = []
    real = Method.features

    def recording(self, images, branch=None, kind="pooled"):
        seen.append(self.resolve_branch(branch))
        return real(self, images, branch, kind)

    monkeypatch.setattr(Method, "features", recording)
    return seen
