"""Shared test setup: deterministic, small, and kind to a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path
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


@pytest.fixture(scope="module")
def reid_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-step ReID checkpoint (fit in this process, once per test module that asks): ``{"cfg",
    "ckpt", "images" (the query images, copied), "tmp"}``."""
    from cli_configs import REID_CONFIG

    from tasks.reid import main

    tmp = tmp_path_factory.mktemp("reid")
    cfg = tmp / "reid.yaml"
    cfg.write_text(REID_CONFIG.format(root=tmp / "market", logs=tmp / "logs"))
    main(["fit", "--config", str(cfg), "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0"])
    ckpt = tmp / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    images = tmp / "images"
    images.mkdir()
    for p in sorted((tmp / "market" / "query").glob("*.jpg")):
        (images / p.name).write_bytes(p.read_bytes())
    return {"cfg": cfg, "ckpt": ckpt, "images": images, "tmp": tmp}
