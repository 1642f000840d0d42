"""Progress for logs: :class:`LogProgress`, plain lines where there is no terminal.

Under ``nohup``, ``sbatch`` or any redirect, stdout is a file: a rich or tqdm bar redraws one
line that a log shows only at the end (or as a flood of carriage returns). :class:`TaskCLI
<tasks.cli.TaskCLI>` uses this bar when stdout is not a TTY (``progress.*`` in YAML or
``--progress.interval_s``); in a terminal Lightning's own bar stays. One line per interval::

    train epoch 0 step 120/500 (24%) loss 1.234 | 38.2 img/s | elapsed 0:01:02 | ETA 0:03:17

and one line at the end of each training epoch and of each validate/test/predict run. Written
by hand because Lightning's bars are interactive only; printed on global rank 0 and flushed.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar

__all__ = ["LogProgress"]


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def _batch_size(batch: Any) -> int:
    """Number of images in a task batch (``image``/``images``), else the first dimension of a tensor; 0: unknown."""
    from tasks.skips import readable_count

    n = readable_count(batch)
    if n >= 0:
        return n
    shape = getattr(batch, "shape", None)
    return int(shape[0]) if shape else 0


class LogProgress(ProgressBar):
    """A progress bar for log files: a plain line every ``interval_s`` seconds or ``every_n_steps`` steps.

    Args:
        interval_s: seconds between two lines (default 30).
        every_n_steps: also print every this many training batches (default ``None``: time only).
    """

    def __init__(self, interval_s: float = 30.0, every_n_steps: int | None = None) -> None:
        super().__init__()
        if interval_s < 0 or (every_n_steps is not None and every_n_steps < 1):
            raise ValueError(
                f"progress: interval_s must be >= 0 and every_n_steps >= 1, got {interval_s}, {every_n_steps}"
            )
        self.interval_s = interval_s
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start = self._last = 0.0
        self._images = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer: pl.Trainer, line: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(line, file=sys.stdout, flush=True)

    def _reset(self) -> None:
        self._start = self._last = time.monotonic()
        self._images = 0

    def _due(self, done: int) -> bool:
        if self.every_n_steps is not None:
            return done % self.every_n_steps == 0
        return time.monotonic() - self._last >= self.interval_s

    def _line(self, trainer: pl.Trainer, stage: str, done: int, total: float, loss: bool) -> str:
        elapsed = time.monotonic() - self._start
        self._last = time.monotonic()
        known = total not in (float("inf"),) and total > 0
        parts = [f"{stage}" + (f" epoch {trainer.current_epoch}" if stage == "train" else "")]
        parts[0] += f" step {done}/{int(total)} ({100 * done / total:.0f}%)" if known else f" step {done}"
        if loss:
            metrics = self.get_metrics(trainer, trainer.lightning_module)
            shown = {k: v for k, v in metrics.items() if k not in ("v_num",)}
            for k, v in shown.items():
                parts[0] += f" {k} {v:.4g}" if isinstance(v, float) else f" {k} {v}"
        if self._images and elapsed > 0:
            parts.append(f"{self._images / elapsed:.1f} img/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if known and done:
            parts.append(f"ETA {_duration(elapsed / done * (total - done))}")
        return " | ".join(parts)

    # -- training --
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += _batch_size(batch)
        done = batch_idx + 1
        if done < self.total_train_batches and self._due(done):
            self._print(trainer, self._line(trainer, "train", done, self.total_train_batches, loss=True))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        self._print(trainer, self._line(trainer, "train", done, self.total_train_batches, loss=True) + " | epoch done")

    # -- evaluation and prediction: a line at the interval and one at the end --
    def _eval_batch(self, trainer: pl.Trainer, stage: str, batch: Any, batch_idx: int, total: float) -> None:
        self._images += _batch_size(batch)
        if batch_idx + 1 < total and self._due(batch_idx + 1):
            self._print(trainer, self._line(trainer, stage, batch_idx + 1, total, loss=False))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_images, self._eval_start = self._images, self._start
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[override]
        if not trainer.sanity_checking:
            self._eval_batch(trainer, "validate", batch, batch_idx, trainer.num_val_batches[dataloader_idx])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            total = sum(trainer.num_val_batches)
            self._print(trainer, self._line(trainer, "validate", int(total), total, loss=False) + " | done")
        self._images, self._start = self._eval_images, self._eval_start  # training's rate goes on

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[override]
        self._eval_batch(trainer, "test", batch, batch_idx, trainer.num_test_batches[dataloader_idx])

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, self._line(trainer, "test", int(sum(trainer.num_test_batches)), 0, loss=False) + " | done")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[override]
        self._eval_batch(trainer, "predict", batch, batch_idx, trainer.num_predict_batches[dataloader_idx])

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = sum(trainer.num_predict_batches)
        self._print(trainer, self._line(trainer, "predict", int(total), 0, loss=False) + " | done")
