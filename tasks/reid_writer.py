"""What ``python -m tasks.reid predict`` writes: :class:`ReIDWriter` (``writer.*`` in YAML)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.distributed import all_gather_objects
from tasks.embeddings_file import check_finite, write_npz
from tasks.skips import SkippedSample
from tasks.writer import PredictionWriter

__all__ = ["ReIDWriter"]


class ReIDWriter(PredictionWriter):
    """Writes ``<output_dir>/<filename>``: the embeddings of the images ``predict`` reads (the query
    then the gallery images of the data), in the format of ``python -m tasks.reid extract``
    (:func:`tasks.embeddings_file.write_npz`: ``embeddings`` ``(N, D)`` float32 in data order,
    ``paths``, ``skipped_paths``, ``skipped_reasons``; read it with
    :func:`tasks.embeddings_file.load_embeddings`), then ``<output_dir>/_COMPLETE`` last, by the
    protocol of :class:`tasks.writer.PredictionWriter`. For a folder or list of images of any
    size, streamed and resumable, use ``extract``.
    """

    by = "reid predict"

    def __init__(self, output_dir: str = "outputs/reid", filename: str = "embeddings.npz") -> None:
        super().__init__(output_dir)
        self.filename = filename
        self.reset()

    def expected_files(self) -> list[str]:
        return [self.filename]

    def reset(self) -> None:
        self.rows: dict[int, np.ndarray] = {}
        self._samples: list[Any] | None = None

    def _paths(self, pl_module: Any, indices: list[int]) -> list[str]:
        """The image paths of data indices (``eval_samples()`` of the data module: query, then gallery)."""
        if self._samples is None:
            datamodule = pl_module.trainer.datamodule
            self._samples = datamodule.eval_samples() if hasattr(datamodule, "eval_samples") else []
        return [str(self._samples[i].path) if self._samples else str(i) for i in indices]

    def write_batch(self, pl_module: Any, prediction: Any, batch: Any) -> None:
        emb = prediction["embedding"]
        if emb is None or not len(emb):
            return
        emb = emb.detach().float().cpu().numpy()
        index = prediction["index"].tolist()
        check_finite(emb, self._paths(pl_module, index), "reid predict")
        for i, e in zip(index, emb):
            self.rows[int(i)] = e

    def gather(self) -> int:
        merged: dict[int, np.ndarray] = {}
        for part in all_gather_objects(self.rows):
            for i, e in part.items():
                merged.setdefault(i, e)
        self.rows = dict(sorted(merged.items()))
        return len(self.rows)

    def write_results(self, pl_module: Any) -> None:
        paths = self._paths(pl_module, list(self.rows))
        width = max((len(p) for p in paths), default=1)
        emb = np.stack(list(self.rows.values())).astype("<f4")
        with self.outputs.write(self.filename) as tmp:
            write_npz(tmp, emb.shape, [emb], width, [np.array(paths, dtype=f"<U{width}")], self.skipped)

    def message(self, count: int, skipped: list[SkippedSample]) -> str:
        dim = len(next(iter(self.rows.values()))) if self.rows else 0
        return (
            f"predict: {count} embeddings of dimension {dim} -> {self.output_dir / self.filename} "
            f"({len(skipped)} unreadable image(s) skipped)"
        )
