"""Shared test setup: deterministic, small, and kind to a 2-core machine."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn

# Under pytest-xdist every worker gets one thread, so two workers fill two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TinyNet(nn.Module):
    """Two VGG blocks of 8 channels (BatchNorm, block 1 frozen) as ``backbone``, a 1x1 conv ``head``."""

    def __init__(self) -> None:
        super().__init__()
        from vggbackbone import VGGBackbone

        self.backbone = VGGBackbone([(1, 8), (1, 8)], ["conv2"], batch_norm=True, frozen_stages=1)
        self.head = nn.Conv2d(8, 2, 1)


@pytest.fixture
def tiny_net() -> TinyNet:
    return TinyNet()


@pytest.fixture
def tiny_task() -> Any:
    """A ``TaskModule`` around :class:`TinyNet` (lr 0.1, backbone x0.1) that records what it
    logs in ``log_calls`` (``{name: value}``) instead of sending it to the loggers."""
    from tasks.module import TaskModule
    from tasks.optim import OptimConfig

    class _Task(TaskModule):
        def __init__(self) -> None:
            super().__init__()
            self.optim = OptimConfig(lr=0.1, backbone_lr_mult=0.1)
            self.model = TinyNet()
            self.log_calls: dict[str, float] = {}

        def log(self, name: str, value: Any, **kwargs: Any) -> None:
            self.log_calls[name] = value

    return _Task()
