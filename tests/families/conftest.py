"""Tiny random checkpoints of every supported family (and Swin), saved offline with save_pretrained.

Built once per session into a temp dir: hidden 48, 3 heads, 2 layers, 32x32 images, 8x8 patches.
Every parameter gets noise on top of transformers' init, so that zero-initialised tokens, position
tables and relative biases take part in the parity checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# the helpers live beside this file (on sys.path as for every test module here): importing them from
# ``conftest`` would find whichever conftest was imported first
from family_models import FAMILIES, save_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """kind -> directory of a saved tiny checkpoint (FAMILIES and ``swin``)."""
    root = tmp_path_factory.mktemp("families")
    return {k: save_model(k, root / k) for k in FAMILIES + ("swin",)}


