"""Shared test setup: deterministic, small, and kind to a 2-core machine."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist every worker gets one thread, so two workers fill two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
