"""What ``python -m tasks.classify predict`` writes: :class:`ClassificationWriter` (``writer.*`` in YAML)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from tasks.distributed import all_gather_objects
from tasks.outputs import OutputFolder
from tasks.pathnames import display_path, path_hex
from tasks.skips import SkippedSample
from tasks.writer import PredictionWriter
from vggbackbone.utils import atomic_path

__all__ = ["ClassificationWriter", "predictions_file", "write_predictions"]

#: one predicted row: ``(index in the input list, path, labels best first, their scores)``
Row = tuple[int, str, list[int], list[float]]


def predictions_file(value: Any) -> dict[str, Any]:
    """The ``writer.*`` options an old ``model.predict_file`` becomes: its folder and its name."""
    path = Path(value)
    return {"output_dir": str(path.parent), "filename": path.name}


def write_predictions(
    path: str | Path, rows: list[Row], class_names: list[str], top_k: int, outputs: OutputFolder | None = None
) -> Path:
    """Write ``path,label1,score1,...,path_hex`` (one row per ``(index, path, labels, scores)``) atomically;
    with ``outputs`` (the :class:`~tasks.outputs.OutputFolder` of ``path``'s folder) recorded in its manifest.

    UTF-8; a path that is not valid UTF-8 is written ``\\xNN`` for its bad bytes, its exact bytes in
    hex in ``path_hex`` (empty for the others): :mod:`tasks.pathnames`.
    """
    path = Path(path)
    header = ["path"] + [f"{c}{j}" for j in range(1, top_k + 1) for c in ("label", "score")] + ["path_hex"]
    opened = outputs.write(path.name) if outputs is not None else atomic_path(path)
    with opened as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for _, image, labels, scores in rows:
            scored = (v for lab, s in zip(labels, scores) for v in (class_names[lab], f"{s:.6f}"))
            writer.writerow([display_path(image), *scored, path_hex(image)])
    return path


class ClassificationWriter(PredictionWriter):
    """Writes ``<output_dir>/<filename>``: a CSV ``path,label1,score1,...,labelK,scoreK,path_hex``
    (softmax scores, best first, ``model.top_k`` of them, rows in input order), then
    ``<output_dir>/_COMPLETE`` last, by the protocol of :class:`tasks.writer.PredictionWriter`.

    The CSV itself must stay apart from the input images (it may sit beside their folder). The
    old option ``model.predict_file: F`` still works (warned once): ``output_dir`` is F's folder
    and ``filename`` its name.
    """

    by = "classify predict"

    def __init__(self, output_dir: str = "outputs/classify", filename: str = "predictions.csv") -> None:
        self.filename = filename
        super().__init__(output_dir)
        self.rows: list[Row] = []
        self.top_k = 0

    @property
    def path(self) -> Path:
        """The CSV."""
        return self.output_dir / self.filename

    def output_folder(self) -> OutputFolder:
        outputs = OutputFolder(self.output_dir, self.by)
        outputs.output, outputs.what = self.path, "output file"  # the CSV, not its folder, stays apart from inputs
        return outputs

    def expected_files(self) -> list[str]:
        return [self.filename]

    def reset(self) -> None:
        self.rows = []

    def write_batch(self, pl_module: Any, prediction: Any, batch: Any) -> None:
        self.rows += prediction or []

    def gather(self) -> int:
        self.rows = sorted(r for part in all_gather_objects(self.rows) for r in part)
        return len(self.rows)

    def write_results(self, pl_module: Any) -> None:
        self.top_k = pl_module.top_k
        write_predictions(self.path, self.rows, pl_module.class_names, self.top_k, outputs=self.outputs)

    def message(self, count: int, skipped: list[SkippedSample]) -> str:
        return f"predict: top-{self.top_k} labels and scores of {count} images written to {self.path}"
