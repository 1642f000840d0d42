"""Clean stops: ``SIGTERM`` and ``SIGINT`` become a request to stop at the next batch, and the run's exit status.

* :class:`StopSignalConnector`: the trainer's signal handlers only note the signal (and pass it to
  the processes Lightning launched); :class:`tasks.resume.ExactResume` acts on it at a batch
  boundary where every process agrees (:func:`agree_signal`);
* :func:`exit_on_signal`: around a CLI run, a run that received a stop signal exits
  ``128 + signum`` (:class:`RunInterrupted`: 143, 130), rank 0 saying what was saved and the
  command that resumes from it (:func:`resume_command`).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector
from pytorch_lightning.trainer.states import TrainerFn

__all__ = [
    "STOP_SIGNALS",
    "RunInterrupted",
    "StopSignalConnector",
    "agree_signal",
    "exit_on_signal",
    "note_checkpoint",
    "received_signal",
    "resume_command",
]

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


def note_checkpoint(checkpoint: str, where: str, resume: str) -> None:
    """The checkpoint a stop saved, for the exit message: its path, where the run stopped, what resumes it."""
    _received.update(checkpoint=checkpoint, where=where, resume=resume)


def agree_signal(trainer: pl.Trainer, signum: int | None) -> int:
    """The stop signal any process received (0: none), noted as this process's too; a collective when distributed."""
    agreed = int(signum or 0)
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        flag = torch.tensor([agreed], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
    if agreed:
        _received.setdefault("signum", agreed)  # another process's signal stops this one too
    return agreed


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
