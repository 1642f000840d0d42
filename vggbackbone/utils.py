"""Small helpers shared by the library and the task code (no Lightning here)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write", "make_divisible", "scale_width"]


#: errno values that mean "no room to write": a full file system, or the user's quota used up
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: what torch's zip writer (``PyTorchStreamWriter``) says when a write fails or comes back short: no errno
_TORCH_SHORT_WRITE = re.compile(r"inline_container\.cc|PytorchStreamWriter|unexpected pos|iostream error")


def _no_space_errno(error: BaseException, tmp: Path) -> int | None:
    """``ENOSPC``/``EDQUOT`` when ``error`` (raised while writing ``tmp``) comes from a full disk, else ``None``.

    An ``OSError`` in the exception chain says so itself. torch's zip writer does not: its
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos`` (numpy's: an ``OSError``
    without errno) only says a write came back short; then a write to ``tmp`` (still there) asks
    the file system, whose errno decides.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    short_write = (isinstance(error, RuntimeError) and _TORCH_SHORT_WRITE.search(str(error))) or (
        type(error) is OSError and error.errno is None  # numpy's "N requested and M written"
    )
    if not short_write:
        return None
    try:  # up to 1 MiB more: a full file system refuses it (a short write first, then ENOSPC)
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return None
    try:
        chunk = bytes(64 * 1024)
        for _ in range(16):
            os.write(fd, chunk)
        os.fsync(fd)
    except OSError as e:
        return e.errno if e.errno in _NO_SPACE else None
    finally:
        os.close(fd)
    return None


def _no_space_error(code: int, path: Path) -> OSError:
    """The ``OSError`` a full disk raises from :func:`atomic_path`: names the file and the free space."""
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    quota = " (disk quota exceeded)" if code == errno.EDQUOT else ""
    return OSError(
        code,
        f"no space left on device{quota} writing {path} ({free} on the file system of {path.parent}); "
        f"nothing was written: the previous {path.name}, if any, is unchanged. Free some space and run again",
        str(path),
    )


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    For writers that want a file name (``np.save``, ``PIL.Image.save``, safetensors, ``torch.save``). The
    temporary file lives in the destination folder so the final ``os.replace`` is atomic:
    a crash mid-write leaves the old file (or no file), never a truncated one, and no temporary file.
    A full disk (or quota) is an ``OSError`` with ``errno.ENOSPC`` (``EDQUOT``) naming ``path`` and
    saying "no space left on device", whatever the writer raised (torch's zip writer raises a
    ``RuntimeError`` without errno or path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # make the bytes durable before the rename
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except Exception as e:
        code = _no_space_errno(e, tmp_path)
        if code is not None:
            raise _no_space_error(code, path) from e
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` atomically when the block exits."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``).

    The usual channel-width rounding of width-multiplied networks (MobileNet, timm): it never
    goes more than 10% below ``value``.
    """
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def scale_width(channels: int, width_mult: float, divisor: int = 8) -> int:
    """``channels`` times ``width_mult``, rounded to a multiple of ``divisor`` (:func:`make_divisible`).

    The one width rule of every model here (VGG blocks, fc6/fc7, FPNs, SSD's extra layers, box
    heads): ``width_mult == 1`` keeps ``channels`` exactly; FCOS's head asks for multiples of 32
    (its ``GroupNorm(32, C)``).
    """
    return channels if width_mult == 1.0 else make_divisible(channels * width_mult, divisor)
