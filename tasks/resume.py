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
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "ExactResume",
    "ResumableSampler",
    "RunInterrupted",
    "SeededDataset",
    "StopSignalConnector",
    "capture_rng",
    "derived_seed",
    "exit_on_signal",
    "restore_rng",
    "sample_seed",
    "seeded",
    "train_position",
]

log = logging.getLogger(__name__)

#: the signals that stop a run cleanly (exit status 128 + the signal's number: 143, 130)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: what this process was told: the first stop signal, and the checkpoint saved because of it
_received: dict[str, Any] = {}


class RunInterrupted(SystemExit):
    """A run stopped by a signal: exits ``128 + signum`` (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)


def received_signal() -> int | None:
    """The stop signal this process received during the current run (``None``: none)."""
    return _received.get("signum")


# ---------------------------------------------------------------------------- random states
def capture_rng() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and python RNG states, as tensors and plain data.

    Plain data so that a checkpoint holding them is still read with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device (DDP: one per process)
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the RNG states :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def derived_seed(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy's ``SeedSequence``), e.g. ``(seed, epoch)``."""
    mixed = np.random.SeedSequence([int(w) & 0xFFFFFFFFFFFFFFFF for w in words]).generate_state(2)
    return (int(mixed[0]) << 31) ^ int(mixed[1])


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The seed of the ``position``-th training sample of process ``rank`` in ``epoch``."""
    return derived_seed(seed, epoch, rank, position)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch, numpy and python RNGs seeded by ``seed``; their states are restored after.

    torchvision's random transforms draw from the global torch RNG (``torch.rand``...), so
    seeding it around one sample's loading fixes that sample's augmentation; restoring the
    states keeps the model's random numbers independent of how much data was loaded.
    """
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed would reseed CUDA's)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


# ---------------------------------------------------------------------------- training data
class SeededDataset(Dataset):
    """A training dataset whose sample ``(index, seed)`` is ``dataset[index]`` loaded under :func:`seeded` ``(seed)``.

    A plain integer key loads the sample as the wrapped dataset does. Other attributes are the
    wrapped dataset's.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with seeded(seed):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling in a worker process)
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableSampler(DistributedSampler):
    """The training sampler: ``(index, seed)`` pairs, in an order fixed by ``(seed, epoch)``, resumable mid-epoch.

    ``sampler`` gives the order: a ``DistributedSampler`` (e.g. the ReID ``PKSampler``) its
    process's share, any other sampler the whole order, which is then dealt out to the
    ``num_replicas`` processes (padded to equal shares, as ``DistributedSampler`` does); ``None``
    shuffles as Lightning's ``DistributedSampler`` does (seeded by ``seed + epoch``). The order is
    drawn under :func:`seeded` ``(derived_seed(seed, epoch))``, so a sampler that draws from the
    global RNG (``RandomSampler``) is a function of the epoch too, and leaves the model's random
    numbers alone. Each index comes with :func:`sample_seed` of its position, for
    :class:`SeededDataset`. The first iteration starts ``skip_batches`` batches of ``batch_size``
    into ``epoch`` (a run resumed mid-epoch, :func:`train_position`); later ones start at 0.

    It is a ``DistributedSampler`` so that Lightning keeps it under DDP (and calls ``set_epoch``).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: Any = None,
        *,
        seed: int = 0,
        batch_size: int = 1,
        epoch: int = 0,
        skip_batches: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        # DistributedSampler.__init__ wants an initialised process group: set its attributes here
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.dataset = dataset
        self.seed, self.epoch = int(seed), int(epoch)
        self.shuffle, self.drop_last = True, False
        if sampler is None:
            sampler = DistributedSampler(
                dataset, num_replicas=self.num_replicas, rank=self.rank, shuffle=True, seed=self.seed
            )
        self.sampler = sampler
        self.deal = not isinstance(sampler, DistributedSampler) and self.num_replicas > 1
        self.batch_size = batch_size
        self.resume_at(self.epoch, skip_batches)

    def resume_at(self, epoch: int, skip_batches: int) -> None:
        """Make the next iteration start ``skip_batches`` batches into ``epoch``."""
        self._skip = (int(epoch), int(skip_batches) * self.batch_size)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(self.epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return -(-n // self.num_replicas) if self.deal else n

    def order(self, epoch: int) -> list[int]:
        """This process's indices of ``epoch``, in order."""
        self.set_epoch(epoch)
        with seeded(derived_seed(self.seed, epoch)):
            order = [int(i) for i in self.sampler]
        if self.deal and order:
            total = len(self) * self.num_replicas
            order = (order * -(-total // len(order)))[:total][self.rank :: self.num_replicas]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        skip_epoch, skip = self._skip
        self._skip = (-1, 0)  # the resume position applies to the first iteration only
        order = self.order(epoch)
        for position in range(skip if skip_epoch == epoch else 0, len(order)):
            yield order[position], sample_seed(self.seed, epoch, self.rank, position)


def train_position(trainer: pl.Trainer | None) -> tuple[int, int]:
    """``(epoch, batches already trained in it)`` where a (resumed) fit's training data starts.

    From the loop counters Lightning restored from the checkpoint (as they stand when training
    starts): a checkpoint saved mid-epoch (a stop signal) goes on at the next batch of that epoch,
    one saved at an epoch end at the next epoch. ``(0, 0)`` without a trainer or a checkpoint.
    """
    if trainer is None:
        return 0, 0
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress.current
    mid_epoch = fit_loop.restarting and epochs.started > epochs.processed
    done = fit_loop.epoch_loop.batch_progress.current.ready if mid_epoch else 0
    return int(epochs.processed), int(done)


def global_seed() -> int:
    """The run's seed (``seed_everything``), as Lightning's own distributed samplers read it."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


# ---------------------------------------------------------------------------- signals
class StopSignalConnector(_SignalConnector):
    """Lightning's signal connector, with SIGTERM and SIGINT turned into a request to stop.

    Lightning's own SIGTERM handler broadcasts from inside the handler (a collective at an
    arbitrary point of the program, which can deadlock a multi-process run) and stops training
    mid-validation with exit status 0. Here a handler only notes the signal (and forwards it to
    the processes Lightning launched); :class:`ExactResume` acts on it at the next batch boundary,
    where every process agrees. A second SIGINT stops at once (``KeyboardInterrupt``). SLURM
    requeueing (SIGUSR1) stays Lightning's.
    """

    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()  # Lightning's (SLURM's SIGUSR1); its SIGTERM handler is replaced
        if threading.current_thread() is not threading.main_thread() or sys.platform == "win32":
            return
        self._pid = os.getpid()
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._stop_handler)

    def _stop_handler(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process stops it
            return
        first = "signum" not in _received
        if first:
            _received["signum"] = signum
            launcher = self.trainer.strategy.launcher
            if launcher is not None:  # the processes it started get the same request
                launcher.kill(signum)
            if rank_zero_only.rank == 0:  # os.write: print() is not safe inside a signal handler
                fitting = self.trainer.state.fn == TrainerFn.FITTING
                then = "saving a checkpoint after the current training batch" if fitting else "stopping"
                again = "; Ctrl+C again to stop at once, without saving" if signum == signal.SIGINT and fitting else ""
                os.write(2, f"\n{signal.Signals(signum).name} received: {then}{again}\n".encode())
        elif signum == signal.SIGINT:
            _received["forced"] = True
            raise KeyboardInterrupt  # Ctrl+C twice: stop now, without a checkpoint
        if self.trainer.state.fn != TrainerFn.FITTING:
            self.received_sigterm = True  # Lightning's evaluation loop stops at the next batch too


# ---------------------------------------------------------------------------- the callback
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
        signum = _agree(trainer, received_signal())  # a collective: every process, every batch
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
        if _agree(trainer, received_signal()):
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
        _received.update(checkpoint=str(path), where=where, resume="last" if newest else str(path))

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


def _agree(trainer: pl.Trainer, signum: int | None) -> int:
    """The stop signal any process received (0: none), noted as this process's too; a collective when distributed."""
    agreed = int(signum or 0)
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        flag = torch.tensor([agreed], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
    if agreed:
        _received.setdefault("signum", agreed)  # another process's signal stops this one too
    return agreed


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


# ---------------------------------------------------------------------------- the exit status
def resume_command(module: str, argv: Sequence[str], checkpoint: str) -> str:
    """``python -m <module> <argv> --ckpt_path <checkpoint>``, any earlier ``--ckpt_path`` dropped."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--ckpt_path":
            skip = True
            continue
        if a.startswith("--ckpt_path="):
            continue
        args.append(a)
    return shlex.join(["python", "-m", module, *args, "--ckpt_path", checkpoint])


@contextmanager
def exit_on_signal(module: str, argv: Sequence[str]) -> Iterator[None]:
    """Around a CLI run: a run that received SIGTERM/SIGINT exits ``128 + signum``, saying what was saved.

    Whatever point the run had reached (Lightning ends a signalled fit with ``SystemExit(None)``,
    status 0); rank 0 prints where the checkpoint is and the command that resumes from it.
    """
    _received.clear()
    try:
        yield
    except BaseException as e:
        signum = received_signal()
        if signum is None:
            raise
        if not isinstance(e, (SystemExit, KeyboardInterrupt)):  # e.g. a collective whose peer has stopped
            _received["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _report(module, argv, signum)
        raise RunInterrupted(signum) from None
    signum = received_signal()
    if signum is not None:
        _report(module, argv, signum)
        raise RunInterrupted(signum)


def _report(module: str, argv: Sequence[str], signum: int) -> None:
    if rank_zero_only.rank != 0:
        return
    name = signal.Signals(signum).name
    sub = argv[0] if argv else "run"
    checkpoint = _received.get("checkpoint")
    if _received.get("forced"):
        text = f"{sub}: stopped at once by a second {name}; no checkpoint was saved for this point"
    elif checkpoint:
        text = (
            f"{sub}: stopped by {name} {_received.get('where', '')}; resumable checkpoint: {checkpoint}\n"
            f"resume with: {resume_command(module, argv, _received.get('resume', checkpoint))}"
        )
    elif sub == "fit":
        text = f"{sub}: stopped by {name} before training had started; nothing was saved"
    else:
        text = f"{sub}: stopped by {name}: incomplete, no metrics or completion marker were written"
    if "error" in _received:
        text += f"\n(while stopping: {_received['error']})"
    print(f"{text}\n(exit status {128 + signum})", file=sys.stderr, flush=True)
