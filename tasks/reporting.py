"""Evaluation metrics: computed once on rank 0, shared with every rank, logged, printed, written.

* :class:`EvalReport`: what a task's evaluation computed;
* :func:`publish_metrics`: the collective every task's evaluation ends with;
* :func:`print_metrics`: a readable table on rank 0;
* :func:`write_json`: indented JSON written atomically on rank 0.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from tasks.checkpoint import check_finite
from tasks.distributed import all_gather_objects, is_global_zero
from tasks.outputs import COMPLETE_MARKER  # its old home: re-exported
from vggbackbone.utils import atomic_path

__all__ = ["COMPLETE_MARKER", "DEFAULT_METRICS_FILE", "EvalReport", "print_metrics", "publish_metrics", "write_json"]

#: default of ``TaskModule.metrics_file``: evaluation metrics file, relative to the log folder
DEFAULT_METRICS_FILE = "{stage}_metrics.json"


def print_metrics(
    title: str, metrics: Mapping[str, float], table: Sequence[tuple[str, Sequence[Any]]] | None = None
) -> None:
    """Print a readable metrics table on global rank 0 (rich when available)."""
    if not is_global_zero():
        return
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a task dependency
        print(title, {k: round(float(v), 4) for k, v in metrics.items()})
        return
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        t.add_row(k, f"{float(v):.4f}")
    Console(stderr=False).print(t)
    if table:
        extra = Table(show_header=True, header_style="bold")
        for col, _ in table:
            extra.add_column(col)
        for row in zip(*(vals for _, vals in table)):
            extra.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
        Console(stderr=False).print(extra)


@dataclass
class EvalReport:
    """What a task's evaluation computed (on global rank 0), for :func:`publish_metrics`.

    Args:
        metrics: scalar metrics by plain name (``AP``, ``mIoU``, ``mAP``...): logged as
            ``<stage>/<name>`` by every process and written to the metrics JSON.
        extra: JSON-only content (curves, confusion matrix, counts, settings).
        title: title of the printed table.
        table: extra printed columns (per-class numbers...), see :func:`print_metrics`.
        shown: the metrics printed in the table (default: all).
        no_metric: why there is no metric (``metrics`` empty): the message of the error
            :func:`publish_metrics` raises on every process (naming the split and what was missing).
    """

    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    title: str = ""
    table: Sequence[tuple[str, Sequence[Any]]] | None = None
    shown: Sequence[str] | None = None
    no_metric: str = ""


def _json_safe(obj: Any) -> Any:
    """NaN/inf floats -> ``None`` (JSON ``null``), recursively: the file stays valid JSON."""
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def publish_metrics(
    module: pl.LightningModule,
    stage: str,
    compute: Callable[[Path], EvalReport | None],
    *,
    prog_bar: Iterable[str] = (),
    verbose: bool = True,
) -> dict[str, float]:
    """Compute evaluation metrics once on rank 0, share them with every rank, log, print and write.

    Every process must call it (it is a collective). ``compute(log_dir)`` runs on global rank 0
    only (it may write its own files into ``log_dir``) and returns an :class:`EvalReport`, or
    ``None`` for nothing to report. Every process then logs the same ``<stage>/<name>`` values,
    so checkpoint monitors agree; a NaN metric (e.g. the IoU of a class absent from the set) is
    not logged at all rather than logged as a number. Rank 0 prints the table (``verbose``)
    and writes ``<log_dir>/<stage>_metrics.json`` (``module.metrics_file``) atomically:
    ``stage``, ``epoch``, ``global_step``, the metrics and ``extra``, NaN written as ``null``.
    Nothing happens during Lightning's sanity check. A model with non-finite weights gets no
    metrics: a ``FloatingPointError`` names its NaN/inf tensors (on every process). An evaluation
    that produced no metric (``compute`` returned ``None``, or only NaN besides ``loss``) is a
    ``RuntimeError`` on every process, with the report's :attr:`EvalReport.no_metric` reason:
    never a run that ends well with nothing measured. Returns the metrics.
    """
    trainer = module.trainer
    if trainer.sanity_checking:
        return {}
    check_finite(module.state_dict(), f"{stage} evaluation of {type(module).__name__}: its weights")
    # trainer.log_dir is a collective (a broadcast) under DDP: every rank must read it
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    report = compute(log_dir) if is_global_zero() else None
    shared = all_gather_objects((report.metrics, report.no_metric) if report is not None else None)[0]
    metrics, no_metric = shared if shared is not None else ({}, "")
    metrics = dict(metrics or {})
    measured = [k for k, v in metrics.items() if k != "loss" and math.isfinite(float(v))]
    if not measured:
        why = no_metric or (
            f"every metric is NaN ({', '.join(metrics)})" if metrics else "the evaluation computed nothing"
        )
        raise RuntimeError(
            f"{stage} evaluation of {type(module).__name__} produced no metric: {why}; "
            "no metrics file written, stopping"
        )
    shown_on_bar = set(prog_bar)
    for name, value in metrics.items():
        if not math.isnan(float(value)):
            module.log(f"{stage}/{name}", float(value), sync_dist=True, prog_bar=name in shown_on_bar)
    if report is None or not metrics:
        return metrics
    if verbose:
        printed = {k: metrics[k] for k in (report.shown if report.shown is not None else metrics)}
        print_metrics(report.title or stage, printed, report.table)
    filename = getattr(module, "metrics_file", DEFAULT_METRICS_FILE)
    if filename:
        out = {
            "stage": stage,
            "epoch": module.current_epoch,
            "global_step": module.global_step,
            **metrics,
            **report.extra,
        }
        write_json(log_dir / filename.format(stage=stage), _json_safe(out))
    return metrics


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (on global rank 0 only); return the path."""
    path = Path(path)
    if is_global_zero():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, default=float))
    return path
