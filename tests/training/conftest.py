"""Training tests run tiny models: one intra-op thread is fastest on a shared machine."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
