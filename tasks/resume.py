"""Exact resume and clean stops: a run stopped at any point and resumed is the run that would have happened.

What a resumed run needs beyond Lightning's checkpoint (weights, optimiser, schedule, loop counters):

* **the data order**: the training sampler (:class:`ResumableSampler`) is a pure function of
  ``(seed, epoch)`` (Lightning's ``DistributedSampler`` seeding, also in one process; the ReID
  ``PKSampler`` is too), started at the epoch and batch the restored loop counters say
  (:func:`train_position`), so a run resumed mid-epoch replays exactly the remaining batches;
* **the augmentations**: every training sample is loaded under its own seed, a function of
  ``(seed, epoch, rank, position in the epoch)`` (:class:`SeededDataset`), so random crops,
  flips and erasing depend neither on the worker processes nor on the state they were killed in;
* **the model's random numbers** (dropout, detector sampling): the torch/numpy/python RNG states
  of every process (:class:`ExactResume` keeps them in the checkpoint, one entry per rank).

``SIGTERM`` (a scheduler's time limit or preemption) and ``SIGINT`` (Ctrl+C) make ``fit`` finish
the current batch, save ``last.ckpt`` (atomically, through the trainer's checkpoint writer:
:class:`tasks.checkpoint.AtomicCheckpointIO`) and exit 143 / 130 with a message naming the file
and the command that resumes from it; ``validate``/``test``/``predict`` stop after the current
batch, writing no metric or completion marker, and exit non-zero too (:func:`exit_on_signal`).
In a multi-process run every process stops at the same batch whichever of them got the signal.

The pieces live in :mod:`tasks.seeding` (data order, sample seeds, RNG states) and
:mod:`tasks.signals` (stop signals, the exit status); this module holds :class:`ExactResume`,
the callback that puts them together, and serves their names as before.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

# the pieces, each in its module, importable from here as before
from tasks.seeding import (
    ResumableSampler,
    SeededDataset,
    capture_rng,
    derived_seed,
    global_seed,
    restore_rng,
    sample_seed,
    seeded,
    train_position,
)
from tasks.signals import (
    STOP_SIGNALS,
    RunInterrupted,
    StopSignalConnector,
    agree_signal,
    exit_on_signal,
    note_checkpoint,
    received_signal,
    resume_command,
)

__all__ = [
    "STOP_SIGNALS",
    "ExactResume",
    "ResumableSampler",
    "RunInterrupted",
    "SeededDataset",
    "StopSignalConnector",
    "capture_rng",
    "derived_seed",
    "exit_on_signal",
    "global_seed",
    "received_signal",
    "restore_rng",
    "resume_command",
    "sample_seed",
    "seeded",
    "train_position",
]

log = logging.getLogger(__name__)


class ExactResume(pl.Callback):
    """Per-rank RNG states in the checkpoint, and stops on SIGTERM/SIGINT at a resumable point.

    * ``state_dict``: every process's RNG states (:func:`capture_rng`), gathered (checkpoints are
      saved by every process, written by rank 0); restored by each process at the start of
      training, so dropout and the detectors' sampling go on as they would have;
    * a stop signal during ``fit`` (any process: they agree at every batch end): after the current
      training batch, ``last.ckpt`` (``last_checkpoint``'s file) is saved and the run exits
      ``128 + signum``. When the batch was the epoch's last, or validation follows it, the
      validation and the epoch end run first (a checkpoint mid-validation could not resume it)
      and the epoch-end ``last.ckpt`` is the checkpoint;
    * during ``validate``/``test``/``predict``: stop after the current batch, no metric written.
    """

    def __init__(self, last_checkpoint: ModelCheckpoint | None = None) -> None:
        self.last_checkpoint = last_checkpoint
        self._loaded: dict[str, Any] | None = None
        self._stopping = False

    # -- RNG states --
    def state_dict(self) -> dict[str, Any]:
        states = _all_gather(capture_rng())
        return {"rng": states, "world_size": len(states), "seed": global_seed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fit_loop.is_resuming:
            _restart_data(trainer)
        loaded, self._loaded = self._loaded, None
        if not loaded or not loaded.get("rng"):
            return
        states = loaded["rng"]
        if len(states) != trainer.world_size:
            rank_zero_only(warnings.warn)(
                f"resuming a {len(states)}-process run with {trainer.world_size} process(es): the data order and "
                "the random numbers differ from the run that would have happened (an exact resume needs the same "
                "number of processes)",
                stacklevel=2,
            )
        restore_rng(states[trainer.global_rank % len(states)])

    # -- stop signals --
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = agree_signal(trainer, received_signal())  # a collective: every process, every batch
        if not signum or self._stopping:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        last = epoch_loop.batch_progress.is_last_batch or epoch_loop.batch_progress.current.ready >= float(
            trainer.num_training_batches
        )
        # every process decides alike (a time-based validation interval is read on each one)
        if _agree_any(trainer, last or epoch_loop._is_training_done or _validation_follows(trainer)):
            self._stopping = True  # after the validation and the epoch end (on_train_epoch_end)
            return
        if epoch_loop._should_accumulate():  # gradients of this batch wait for the next ones: not in a checkpoint
            return
        path = self._checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        self._saved(trainer, path, _where(trainer, batch_idx + 1))
        raise RunInterrupted(signum)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if agree_signal(trainer, received_signal()):
            self._stopping = True
            trainer._signal_connector.received_sigterm = True  # Lightning stops once the epoch has ended

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not (self._stopping and isinstance(exception, SIGTERMException)) or isinstance(exception, RunInterrupted):
            return
        # stopped by Lightning after the epoch end: the epoch-end last.ckpt, unless it was not written then
        cb = self.last_checkpoint
        path = self._checkpoint_path(trainer)
        if cb is None or getattr(cb, "_last_global_step_saved", None) != trainer.global_step or not path.is_file():
            trainer.save_checkpoint(path, weights_only=False)
        done = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch
        self._saved(trainer, path, _where(trainer, None) + (", training complete" if done else ""))

    def _saved(self, trainer: pl.Trainer, path: Path, where: str) -> None:
        """Note the checkpoint for the exit message, and what ``--ckpt_path`` finds it by (``last``: the newest)."""
        root = Path(trainer.default_root_dir)
        found = sorted(root.glob(f"**/{path.name}"), key=lambda p: p.stat().st_mtime_ns) if root.is_dir() else []
        newest = bool(found) and found[-1].resolve() == path.resolve()
        note_checkpoint(str(path), where, "last" if newest else str(path))

    def _checkpoint_path(self, trainer: pl.Trainer) -> Path:
        cb = self.last_checkpoint
        if cb is not None and cb.dirpath:
            return Path(cb.format_checkpoint_name({"epoch": trainer.current_epoch, "step": trainer.global_step}))
        return Path(trainer.default_root_dir) / "last.ckpt"

    def _stop_in_evaluation(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn != TrainerFn.FITTING and received_signal():
            raise RunInterrupted(received_signal())  # type: ignore[arg-type]

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop_in_evaluation(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop_in_evaluation(trainer)

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop_in_evaluation(trainer)


def _restart_data(trainer: pl.Trainer) -> None:
    """Start the training data where the restored loop goes on (:func:`train_position`).

    Lightning builds the training loader and its iterator before it restores the loop counters
    (``configure_optimizers`` asks for ``estimated_stepping_batches``), and on a resumed run it
    keeps that iterator for the first epoch: here, once the counters are back, the samplers are
    moved to the resumed position and the iterator is made again.
    """
    loader = trainer.fit_loop._combined_loader
    fetcher = trainer.fit_loop._data_fetcher
    if loader is None or fetcher is None:
        return
    samplers = {
        id(s): s
        for dl in loader.flattened
        for s in (getattr(dl, "sampler", None), getattr(getattr(dl, "batch_sampler", None), "sampler", None))
        if isinstance(s, ResumableSampler)
    }
    if not samplers:
        return
    epoch, done = train_position(trainer)
    for sampler in samplers.values():
        sampler.resume_at(epoch, done)
    iter(fetcher)
    # Lightning then warns that a loader without state_dict() cannot resume mid-epoch: this one does
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def _all_gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agree_any(trainer: pl.Trainer, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a collective when distributed)."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        t = torch.tensor([int(flag)], device=trainer.strategy.root_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return bool(flag)


def _validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates after the current training batch."""
    try:
        return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # another Lightning: be safe, let the validation run first
        return True


def _where(trainer: pl.Trainer, batch: int | None) -> str:
    at = (
        f"after batch {batch} of epoch {trainer.current_epoch}"
        if batch
        else f"at the end of epoch {trainer.current_epoch - 1}"
    )
    return f"{at}, step {trainer.global_step}"
