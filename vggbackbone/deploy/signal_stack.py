"""Keep the calling thread's alternate signal stack across OpenVINO calls that replace it.

OpenVINO's ``Core.compile_model`` (2026.4; NNCF's quantisation compiles models too) installs an
alternate signal stack (``sigaltstack``) on the calling thread and later unmaps that memory.
CPython installs its signal handlers with ``SA_ONSTACK``, so the next signal handled on that
thread (Ctrl+C, the task CLIs' SIGTERM clean stop) would run on unmapped memory and crash the
process (seen: SIGSEGV at ``kill``). :func:`keep_signal_stack` saves the thread's stack before
and puts it back after. Linux only (``sigaltstack`` through ctypes: no library exposes it);
elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

__all__ = ["SignalStack", "keep_signal_stack", "signal_stack"]


class SignalStack(ctypes.Structure):
    """glibc's ``stack_t``: ``ss_sp``, ``ss_flags`` (``SS_DISABLE`` = 2), ``ss_size``."""

    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


def _sigaltstack() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).sigaltstack
    except (OSError, AttributeError):
        return None


def signal_stack() -> tuple[int, int, int] | None:
    """The calling thread's alternate signal stack ``(address, flags, size)`` (``None``: unknown here)."""
    call = _sigaltstack()
    current = SignalStack()
    if call is None or call(None, ctypes.byref(current)) != 0:
        return None
    return current.sp or 0, current.flags, current.size


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Run the body, then give the calling thread back the alternate signal stack it had before."""
    call = _sigaltstack()
    saved = SignalStack()
    if call is None or call(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        saved.flags &= ~1  # SS_ONSTACK is a state, not something that can be set
        call(ctypes.byref(saved), None)
