"""What a file is, from its first bytes: for errors that say why a weights file or checkpoint cannot be read.

``torch.load`` on a file that is not a PyTorch file fails with whatever its unpickler meets first
(``KeyError: 101`` for a text file, an ``UnpicklingError`` advising to load the file unsafely for
an HTML page): nothing that says what the file is. :func:`sniff_file` looks at the first bytes
(as ``file(1)`` does, for the few kinds that end up where weights are expected: an empty file, a
Git LFS or git-annex pointer, an HTML page saved by a failed download, other text, a truncated
zip archive, safetensors, NumPy, HDF5, compressed archives) and :func:`load_failure` explains a
``torch.load`` error in the same words, without torch's advice to load unsafely, which this
project never gives. Used by every reader of weights files (:mod:`vggbackbone.weights`) and of
checkpoints (``tasks.checkpoint.read_checkpoint``).

Written by hand: the ``magic``/``filetype`` packages know none of LFS pointers, torch's zip
layout or safetensors, and a file of a few dozen magic numbers needs no dependency.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FileKind", "error_text", "load_failure", "sniff_file"]

#: bytes read to decide
_HEAD = 4096
#: the magic number of PyTorch's legacy (pre-1.6, non-zip) format, pickled after the protocol header
_TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LFS = b"version https://git-lfs.github.com/spec/"
_ANNEX = re.compile(rb"^(\.\./)*(\.git/)?annex/objects/|^/annex/objects/")
_BINARY_MAGIC: tuple[tuple[bytes, str, str, str], ...] = (
    # (magic, kind, what, hint)
    (b"\x89HDF\r\n\x1a\n", "hdf5", "an HDF5 file (Keras/TensorFlow weights?), not a PyTorch file", ""),
    (b"\x93NUMPY", "npy", "a NumPy .npy array file, not a PyTorch file", ""),
    (b"\x1f\x8b", "gzip", "a gzip-compressed file", "decompress it first (gunzip)"),
    (b"BZh", "bzip2", "a bzip2-compressed file", "decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz", "an xz-compressed file", "decompress it first (unxz)"),
    (b"7z\xbc\xaf\x27\x1c", "7z", "a 7-Zip archive", "unpack it first"),
)
#: sentences of torch's errors that advise loading unsafely (``weights_only=False``, allowlisting globals)
_ADVICE = re.compile(
    r"weights.only|safe_globals|trusted source|trust this|file an issue|documentation of torch\.load|allowlist|"
    r"^WeightsUnpickler error:?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class FileKind:
    """What :func:`sniff_file` found.

    Attributes:
        kind: short name: ``empty``, ``lfs-pointer``, ``annex-pointer``, ``html``, ``json``, ``text``,
            ``truncated-zip``, ``torch``, ``torch-legacy``, ``pickle``, ``npz``, ``zip``,
            ``safetensors``, ``hdf5``, ``npy``, ``gzip``, ``bzip2``, ``xz``, ``7z``, ``tar``, ``binary``.
        what: a phrase for a message, without the path (``"a Git LFS pointer (131 bytes) ..."``).
        hint: what to do about it (``""``: nothing to add).
        torch_readable: whether ``torch.load`` may read it (a PyTorch file, a pickle or an unknown binary).
    """

    kind: str
    what: str
    hint: str = ""
    torch_readable: bool = False

    def describe(self) -> str:
        """``what``, then ``hint`` after a semicolon."""
        return f"{self.what}; {self.hint}" if self.hint else self.what


def _text(head: bytes) -> str | None:
    """``head`` decoded as UTF-8 text (a character cut at the end forgiven), or ``None`` for binary."""
    if b"\x00" in head:
        return None
    for cut in range(4):  # the read may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    printable = sum(c.isprintable() or c in "\t\n\r\f" for c in text)
    return text.lstrip("\ufeff") if printable >= 0.95 * max(len(text), 1) else None


def _first_line(text: str, limit: int = 60) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _sniff_text(text: str, size: int) -> FileKind:
    low = text.lstrip().lower()
    if low.startswith(("<!doctype html", "<html")) or "<html" in low[:1024]:
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        named = f", titled {_first_line(title.group(1))!r}" if title and title.group(1).strip() else ""
        return FileKind(
            "html",
            f"an HTML page ({size} bytes{named})",
            "a failed download (an error or sign-in page saved under this name): download the file itself again",
        )
    if low.startswith(("{", "[")):
        return FileKind("json", f"a JSON text file ({size} bytes) starting {_first_line(text)!r}")
    return FileKind("text", f"a text file ({size} bytes) starting {_first_line(text)!r}")


def _sniff_zip(path: Path, size: int) -> FileKind:
    if not zipfile.is_zipfile(path):  # no end-of-archive record: cut short
        return FileKind(
            "truncated-zip",
            f"truncated ({size} bytes: a zip archive, the container of PyTorch files, whose end is missing)",
            "an interrupted download or copy: fetch or copy it again",
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return FileKind("zip", f"a damaged zip archive ({size} bytes: {e})", "fetch or copy it again")
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return FileKind("torch", "a PyTorch file", torch_readable=True)
    if names and all(n.endswith(".npy") for n in names):
        return FileKind("npz", f"a NumPy .npz archive of {len(names)} arrays, not a PyTorch file")
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return FileKind("zip", f"a zip archive that is not a PyTorch file (it holds {shown or 'nothing'})", "unpack it?")


def sniff_file(path: str | os.PathLike[str]) -> FileKind:
    """What the file at ``path`` is, from its first bytes (raises ``OSError`` when it cannot be read)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return FileKind("empty", "empty file (0 bytes)", "an interrupted copy or download: copy or download it again")
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    if head.startswith(_LFS):
        real = re.search(rb"^size (\d+)", head, re.MULTILINE)
        to = f"to a {int(real.group(1)):,}-byte file" if real else "to a file"
        return FileKind(
            "lfs-pointer",
            f"a Git LFS pointer ({size} bytes) {to} that was not fetched",
            "`git lfs pull` in the repository it comes from fetches the real file",
        )
    if _ANNEX.match(head) and size < 1024:
        return FileKind(
            "annex-pointer", f"a git-annex pointer ({size} bytes) to a file not fetched", "`git annex get` fetches it"
        )
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path, size)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5 header
        if head[2:4] == b"\x8a\x0a" and head[4:14] == _TORCH_LEGACY_MAGIC:
            return FileKind("torch-legacy", "a PyTorch file (legacy format)", torch_readable=True)
        return FileKind("pickle", "a Python pickle", torch_readable=True)
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8:
            return FileKind("safetensors", "a safetensors file")
    for magic, kind, what, hint in _BINARY_MAGIC:
        if head.startswith(magic):
            return FileKind(kind, what, hint)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return FileKind("tar", "a tar archive", "unpack it first (tar -xf)")
    text = _text(head)
    if text is not None:
        return _sniff_text(text, size)
    return FileKind("binary", "a binary file of unknown kind", torch_readable=True)


def error_text(error: BaseException, limit: int = 300) -> str:
    """The message of ``error`` without torch's advice to load unsafely (``weights_only=False``,
    allowlisting globals) or to file an issue: what is left says what went wrong."""
    sentences = re.split(r"(?<=[.:!?])\s+|\n+", str(error))
    kept = [s.strip() for s in sentences if s.strip() and not _ADVICE.search(s)]
    text = " ".join(kept).removesuffix(":").strip() or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_failure(kind: FileKind, error: BaseException) -> tuple[str, str]:
    """Why ``torch.load(weights_only=True)`` failed on a file of ``kind``: ``(reason, phrase)``.

    ``reason`` is ``"code"`` (the pickle asks for a Python callable, ``phrase`` names it, or uses
    instructions the safe unpickler refuses),
    ``"truncated"`` (the file ends early) or ``"corrupt"``; ``phrase`` never repeats torch's
    advice to load unsafely.
    """
    detail = error_text(error)
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(error))  # the callable the pickle asks for
        if found:
            return "code", f"it asks for {found.group(1)}"
        if kind.torch_readable and kind.kind != "binary":  # a real pickle using more than tensors and plain data
            return "code", f"its pickle needs more than tensors and plain data: {detail}"
    text = str(error)
    if isinstance(error, EOFError) or re.search(r"unexpected EOF|central directory|Ran out of input", text):
        return "truncated", f"truncated: {kind.what} that ends early ({detail})"
    return "corrupt", f"{kind.what} that torch cannot read ({type(error).__name__}: {detail})"
