"""A callback for CLI tests: the process sends itself a real signal at a chosen batch of a chosen loop.

Named in a test's YAML (``trainer.callbacks``: ``class_path: signal_probe.SignalAt``), with
``tests/`` on the subprocess's ``PYTHONPATH``: the signal then goes through the project's real
handlers at a known point, which an outside ``kill`` cannot hit reliably in a run of a second.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """``os.kill(own pid, signum)`` at the start of batch ``batch`` of ``loop`` on process ``rank``."""

    def __init__(
        self, loop: Literal["train", "validation", "test", "predict"], batch: int = 0, signum: int = 15, rank: int = 0
    ) -> None:
        self.loop, self.batch, self.signum, self.rank = loop, batch, signum, rank
        self.sent = False

    def _maybe(self, trainer: pl.Trainer, loop: str, batch_idx: int) -> None:
        if loop == self.loop and batch_idx == self.batch and trainer.global_rank == self.rank and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._maybe(trainer, "train", batch_idx)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *a: Any
    ) -> None:
        if not trainer.sanity_checking:
            self._maybe(trainer, "validation", batch_idx)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *a: Any) -> None:
        self._maybe(trainer, "test", batch_idx)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *a: Any) -> None:
        self._maybe(trainer, "predict", batch_idx)
