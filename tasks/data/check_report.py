"""What ``python -m tasks.data check`` found, per split, and how it is shown: a rich table in a
terminal, plain ``key: value`` lines in a log, JSON for machines."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import IO, Any

__all__ = ["ERRORS", "SplitReport", "render", "to_json"]

#: The counts that make the check fail (exit status 1); every other count is reported only.
ERRORS = (
    "unreadable files",
    "labels outside the classes",
    "bad label lines",
    "boxes dropped (zero/negative size or outside the image)",
    "image/annotation size mismatches",
    "mask/image size mismatches",
    "unreadable masks",
    "duplicate ids",
    "splits without any box",
)

#: How many files each problem names.
EXAMPLES = 5


@dataclass
class SplitReport:
    """One split: its size, what it holds per class, and every problem counted (the first few named).

    ``per_class``: instances (detection) or pixels (segmentation) per class name; ``info``:
    anything else worth a line (ReID identities and cameras...); ``error``: the reader refused
    the split (nothing else could be counted).
    """

    task: str
    split: str
    source: str = ""
    images: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def add(self, problem: str, example: str | None = None) -> None:
        """Count one ``problem``, naming ``example`` among the first :data:`EXAMPLES`."""
        self.counts[problem] += 1
        if example is not None and len(self.examples.setdefault(problem, [])) < EXAMPLES:
            self.examples[problem].append(example)

    def touch(self, *problems: str) -> None:
        """Show ``problems`` even when none was found (a zero is an answer)."""
        for p in problems:
            self.counts[p] += 0

    @property
    def failed(self) -> bool:
        return self.error is not None or any(self.counts.get(k, 0) for k in ERRORS)


def to_json(reports: list[SplitReport]) -> str:
    """The reports as JSON: ``{"ok": bool, "splits": [...]}`` (counts as plain dicts)."""
    splits = [asdict(r) | {"counts": dict(r.counts), "failed": r.failed} for r in reports]
    return json.dumps({"ok": not any(r.failed for r in reports), "splits": splits}, indent=2, default=str)


def _lines(r: SplitReport) -> list[tuple[str, str]]:
    rows = [("source", r.source), ("images", str(r.images))]
    if r.error:
        return [*rows, ("ERROR", r.error), *(("note", note) for note in r.notes)]
    rows += [(f"  {name}", str(n)) for name, n in r.per_class.items()]
    rows += [(k, str(v)) for k, v in r.info.items()]
    for problem, n in r.counts.items():
        flag = "ERROR " if n and problem in ERRORS else ""
        named = r.examples.get(problem, [])
        rows.append((f"{flag}{problem}", f"{n}" + (f" (e.g. {'; '.join(named)})" if named else "")))
    rows += [("note", note) for note in r.notes]
    return rows


def _title(r: SplitReport) -> str:
    unit = {"detect": "instances", "segment": "pixels", "classify": "images"}.get(r.task, "")
    return f"{r.task} {r.split}: {'FAILED' if r.failed else 'ok'}" + (f" ({unit} per class indented)" if unit else "")


def render(reports: list[SplitReport], out: IO[str] | None = None, rich: bool | None = None) -> None:
    """Print the reports: a rich table per split when ``out`` is a terminal (or ``rich=True``), else plain lines."""
    out = out or sys.stdout
    use_rich = out.isatty() if rich is None else rich
    if use_rich:
        from rich.console import Console
        from rich.table import Table

        console = Console(file=out)
        for r in reports:
            table = Table(title=_title(r), show_header=False)
            for key, value in _lines(r):
                style = "bold red" if key.startswith("ERROR") else None
                table.add_row(key, value, style=style)
            console.print(table)
    else:
        for r in reports:
            print(_title(r), file=out)
            for key, value in _lines(r):
                print(f"  {key}: {value}", file=out)
    failed = [f"{r.task} {r.split}" for r in reports if r.failed]
    print(f"check: {'FAILED: ' + ', '.join(failed) if failed else 'every split ok'}", file=out)
