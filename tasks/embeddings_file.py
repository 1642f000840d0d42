"""The embeddings file of ``extract``: per-rank record shards, merged in input order into one ``.npz``.

* :func:`record_dtype`, :class:`Shard`, :func:`read_skips`: one fixed-size record per image, so
  a crash mid-write loses at most a partial last record;
* :func:`merge_shards`: the shards merged chunk by chunk (memory stays flat) into the ``.npz``,
  written atomically (the shards stay: :mod:`tasks.reid_extract` removes them, as recorded);
* :func:`write_npz`: the file itself (also what ``python -m tasks.reid predict`` writes);
* :func:`load_embeddings`: read it back.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.images import SkippedSample, warn_skipped
from tasks.outputs import require_some
from vggbackbone.utils import atomic_path

if TYPE_CHECKING:
    from tasks.outputs import OutputFolder

__all__ = ["Shard", "check_finite", "load_embeddings", "merge_shards", "read_skips", "record_dtype", "write_npz"]

_MERGE_ROWS = 65536  # paths per merge chunk
_MERGE_BYTES = 32 << 20  # embeddings per merge chunk: memory stays flat for any embedding size


def record_dtype(dim: int) -> np.dtype:
    # one fixed-size record per image, so a crash mid-write loses at most a partial last record
    return np.dtype([("index", "<i8"), ("embedding", "<f4", (dim,))])


class Shard:
    """One rank's record file, read in bounded pieces.

    Plain reads, not a memory map: a map keeps every page it touched resident (and counted in the
    process's memory) until it is closed, and reading the index column of a map touches every
    page, since records interleave indices and embeddings.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dtype = record_dtype(int(path.stem.rsplit("-d", 1)[1]))
        self.dim = int(self.dtype["embedding"].shape[0])
        self.count = path.stat().st_size // self.dtype.itemsize  # a partial last record is ignored

    def indices(self) -> np.ndarray:
        """Image index of every record, in file order (read ``_MERGE_BYTES`` at a time)."""
        step = max(1, _MERGE_BYTES // self.dtype.itemsize)
        parts = [self.read(a, min(self.count, a + step))["index"].copy() for a in range(0, self.count, step)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def read(self, first: int, last: int) -> np.ndarray:
        """Records ``first:last``."""
        return np.fromfile(self.path, self.dtype, count=last - first, offset=first * self.dtype.itemsize)

    def embeddings(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of the records at positions ``rows``, in that order.

        Reads the span from the first to the last of them: a shard is written in increasing
        image order, so the rows of one chunk of the output are contiguous in it.
        """
        if len(rows) == 0:
            return np.zeros((0, self.dim), np.float32)
        first = int(rows.min())
        return self.read(first, int(rows.max()) + 1)["embedding"][rows - first]


def check_finite(emb: np.ndarray, names: Sequence[str], what: str) -> None:
    """Refuse a batch of embeddings ``(N, D)`` holding NaN/inf, naming the first image (``names[i]`` of row ``i``):
    never written, as a NaN embedding would poison every distance computed from it."""
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise FloatingPointError(
            f"{what}: non-finite embedding of {names[int(np.flatnonzero(bad)[0])]} ({int(bad.sum())} in this "
            "batch); the model's weights or this image produce NaN/inf, nothing of this batch was written"
        )


def read_skips(path: Path) -> dict[int, str]:
    out = {}
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        idx, _, reason = line.partition("\t")
        if idx.isdigit() and reason:
            out[int(idx)] = reason
    return out


def _write_npy_member(zf: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Any) -> None:
    """Stream an ``.npy`` member into a zip (np.savez would need the whole array in memory)."""
    with zf.open(name, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        )
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def write_npz(
    path: Path,
    shape: tuple[int, int],
    embeddings: Iterable[np.ndarray],
    width: int,
    paths: Iterable[np.ndarray],
    skipped: Sequence[SkippedSample],
) -> None:
    """Write the embeddings file (the format in :mod:`tasks.reid_extract`'s doc) at ``path``, streamed.

    ``shape``: ``(N, D)``; ``embeddings``: chunks of rows in order; ``paths``: chunks of the
    ``N`` paths as ``<U{width}`` arrays; ``skipped``: the images not embedded. Used by
    ``extract`` (:func:`merge_shards`) and by ``python -m tasks.reid predict``
    (:class:`tasks.reid_writer.ReIDWriter`), so both write the same file.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_npy_member(zf, "embeddings.npy", np.dtype("<f4"), shape, embeddings)
        _write_npy_member(zf, "paths.npy", np.dtype(f"<U{width}"), (shape[0],), paths)
        sw = max((len(s.path) for s in skipped), default=1)
        skipped_paths = np.array([s.path for s in skipped], dtype=f"<U{sw}")
        _write_npy_member(zf, "skipped_paths.npy", np.dtype(f"<U{sw}"), (len(skipped),), [skipped_paths])
        reasons = np.array([s.reason for s in skipped], dtype=str) if len(skipped) else np.zeros(0, "<U1")
        _write_npy_member(zf, "skipped_reasons.npy", reasons.dtype, (len(skipped),), [reasons])


def merge_shards(
    parts: Path,
    out: Path,
    names: Sequence[str],
    *,
    files: Sequence[Path] | None = None,
    outputs: OutputFolder | None = None,
) -> Path:
    """Merge the shards in ``parts`` into ``out`` (``.npz``) in input order; the shards stay.

    ``files``: the shard (``.rec``) and skip (``.skip``) files to merge (default: those in
    ``parts``); ``outputs``: the :class:`~tasks.outputs.OutputFolder` that records ``out``. No
    embedding at all (every image unreadable) is an error naming the first unreadable ones.
    """
    files = sorted(parts.glob("a*-r*-d*.rec")) + sorted(parts.glob("a*-r*.skip")) if files is None else files
    shards = [sh for sh in (Shard(p) for p in sorted(f for f in files if f.suffix == ".rec")) if sh.count]
    skips: dict[int, str] = {}
    for p in sorted(f for f in files if f.suffix == ".skip"):
        skips.update(read_skips(p))
    dims = {sh.dim for sh in shards}
    if len(dims) > 1:
        raise RuntimeError(f"{parts}: shards disagree on the embedding size {sorted(dims)}")
    dim = dims.pop() if dims else 0
    indices = [sh.indices() for sh in shards]
    has = np.zeros(len(names), bool)
    for idx in indices:
        has[idx] = True
    missing = np.flatnonzero(~has)
    missing = missing[~np.isin(missing, list(skips))]
    if len(missing):
        raise RuntimeError(
            f"{parts}: {len(missing)} image(s) were neither embedded nor skipped, e.g. {names[missing[0]]}"
        )
    kept = np.flatnonzero(has)
    orders = [np.argsort(idx, kind="stable") for idx in indices]  # record positions by image index
    sorted_idx = [idx[o] for idx, o in zip(indices, orders)]

    def embedding_chunks():
        step = max(1, _MERGE_BYTES // (4 * max(dim, 1)))
        for a in range(0, len(kept), step):
            lo_i, hi_i = kept[a], kept[min(len(kept), a + step) - 1] + 1
            idx_parts, emb_parts = [], []
            for sh, o, s in zip(shards, orders, sorted_idx):
                lo, hi = np.searchsorted(s, [lo_i, hi_i])
                idx_parts.append(s[lo:hi])
                emb_parts.append(sh.embeddings(o[lo:hi]))
            idx = np.concatenate(idx_parts)
            emb = np.concatenate(emb_parts) if emb_parts else np.zeros((0, dim), np.float32)
            _, first = np.unique(idx, return_index=True)  # a record written twice counts once
            yield emb[first]

    def path_chunks(sel: np.ndarray, width: int):
        for a in range(0, len(sel), _MERGE_ROWS):
            yield np.array([names[i] for i in sel[a : a + _MERGE_ROWS]], dtype=f"<U{width}")

    skipped = np.array(sorted(i for i in skips if not has[i]), dtype=np.int64)
    require_some(len(kept), "extract", f"{len(names)} image(s)", [SkippedSample(names[i], skips[i]) for i in skipped])
    width = max((len(names[i]) for i in kept), default=1)
    opened = outputs.write(out.name) if outputs is not None else atomic_path(out)
    with opened as tmp:
        write_npz(
            tmp, (len(kept), dim), embedding_chunks(), width, path_chunks(kept, width),
            [SkippedSample(names[i], skips[i]) for i in skipped],
        )  # fmt: skip
    if len(skipped):
        warn_skipped([SkippedSample(names[i], skips[i]) for i in skipped], f"extract {out}")
    print(f"extract: {len(kept)} embeddings of dimension {dim} -> {out} ({len(skipped)} unreadable image(s) skipped)")
    return out


def load_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """``{"embeddings": (N, D) float32, "paths": (N,), "skipped_paths": (M,), "skipped_reasons": (M,)}``."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
