"""What ``python -m tasks.<task> predict`` writes: :class:`PredictionWriter`, the base of every task's writer.

Every task's ``predict`` output goes under ``writer.output_dir`` (``writer.*`` in the YAML, the
same keys in every task), by one protocol written once here, on :class:`tasks.outputs.OutputFolder`:

1. **clean** (when the predict epoch starts, every process): the earlier run's files, those its manifest lists and only
   those, are removed, ``_COMPLETE`` first (from then on the folder says "incomplete"); a file the
   run would write that no manifest lists, or an output among the inputs, stops it, named;
2. **write** (each batch, every process): :meth:`PredictionWriter.write_batch`, each file atomic and
   recorded in the process's journal before it takes its name;
3. **gather** (end of the run, every process): the images the task skipped
   (:meth:`tasks.module.TaskModule.predict_skipped`) and what every process produced
   (:meth:`PredictionWriter.gather`); a run that produced nothing fails, marking nothing complete;
4. **complete**: global rank 0 writes the gathered results (:meth:`PredictionWriter.write_results`),
   then the manifest, then ``<output_dir>/_COMPLETE`` (JSON summary) last.

A task's writer says what it writes (the four hooks); :attr:`tasks.module.TaskModule.writer_class`
names it, and the CLI offers its options as ``writer.*``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from pytorch_lightning.callbacks import BasePredictionWriter

from tasks.distributed import is_global_zero
from tasks.outputs import COMPLETE_MARKER, OutputFolder, predict_inputs, require_some
from tasks.skips import SkippedSample

__all__ = ["PredictionWriter", "predict_source", "to_output_dir"]


def to_output_dir(value: Any) -> dict[str, Any]:
    """The ``writer.*`` options an old ``model.predict_dir`` becomes: ``output_dir``."""
    return {"output_dir": str(value)}


def predict_source(datamodule: Any) -> Any:
    """What a ``predict`` run read, for messages: ``data.predict_images``, else ``data.root``."""
    return getattr(datamodule, "predict_images", None) or getattr(datamodule, "root", None) or "the predict data"


class PredictionWriter(BasePredictionWriter):
    """Writes what ``predict`` finds into ``output_dir`` (see the module doc for the protocol).

    Subclasses implement :meth:`reset`, :meth:`write_batch`, :meth:`gather` and, for results
    written once from every process's, :meth:`write_results`; :meth:`summary` is the
    ``_COMPLETE`` JSON and :meth:`message` the line printed at the end.

    Args:
        output_dir: the folder ``predict`` writes into.
    """

    #: who writes: named in the manifest and in errors (``"segment predict"``)
    by: ClassVar[str] = "predict"
    #: written last, once every other file is in place
    COMPLETE = COMPLETE_MARKER

    def __init__(self, output_dir: str = "outputs/predict") -> None:
        super().__init__("batch")
        self.output_dir = Path(output_dir)
        self.outputs = self.output_folder()

    # -- what a task's writer says --
    def output_folder(self) -> OutputFolder:
        """The record of this run's files (a new one for each run)."""
        return OutputFolder(self.output_dir, self.by)

    def expected_files(self) -> Iterable[str]:
        """Names this run will write, refused up front when a file no manifest lists is there."""
        return ()

    def reset(self) -> None:
        """Forget the previous run (called when a predict epoch starts)."""

    def write_batch(self, pl_module: Any, prediction: Any, batch: Any) -> None:
        """Write or keep what ``predict_step`` returned for ``batch`` (this process)."""
        raise NotImplementedError

    def gather(self) -> int:
        """Every process: gather what the processes kept; return how many images were predicted in all."""
        raise NotImplementedError

    def write_results(self, pl_module: Any) -> None:
        """Global rank 0, after :meth:`gather`: write the results made of every process's (the
        images skipped on every process are in :attr:`skipped`)."""

    def summary(self, count: int, skipped: list[SkippedSample]) -> dict[str, Any]:
        """The ``_COMPLETE`` file's JSON."""
        return {"images": count, "skipped": len(skipped)}

    def message(self, count: int, skipped: list[SkippedSample]) -> str:
        """The line printed when the run is complete."""
        return f"predict: {count} images -> {self.output_dir}"

    # -- the protocol --
    def on_predict_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Clean: after the task's own checks (``on_predict_start``: weights finite, classes), before any batch."""
        self.reset()
        self.outputs = self.output_folder()
        # the earlier run's files (its manifest's, the marker first) go: from here on the folder says "incomplete"
        self.outputs.begin(inputs=predict_inputs(trainer.datamodule), expected=list(self.expected_files()))

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self.write_batch(pl_module, prediction, batch)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.outputs.close()  # what was written stays recorded: the next run removes it

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        report = getattr(pl_module, "predict_skipped", None)
        skipped = report() if callable(report) else []  # a collective, reported once
        self.skipped: list[SkippedSample] = skipped
        count = self.gather()
        require_some(count, self.by, predict_source(trainer.datamodule), skipped, on_error=self.outputs.close)
        if is_global_zero():
            self.write_results(pl_module)
        # a collective: every process has written its files when it returns, so the marker comes last
        self.outputs.finish(self.summary(count, skipped))
        if is_global_zero():
            print(self.message(count, skipped))
