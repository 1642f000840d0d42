"""ReID data files: the Market-1501 layout and ``pid,camid`` CSV readers (:mod:`tasks.data.reid` uses them).

Market-1501 (Zheng et al. 2015) names crops ``PPPP_cCsS_FFFFFF_BB.jpg``: identity, camera,
sequence, frame, box. The benchmark's conventions, as torchreid and fast-reid apply them:

* identity ``-1`` ("junk": bad detections of people) is dropped from every split; the metric
  also ignores it (see :func:`vggbackbone.metrics.evaluate_rank`);
* identity ``0`` ("distractors": background false alarms) is kept in the gallery as a non-match
  and dropped from training;
* cameras are numbered from 1 in file names and from 0 here;
* identities below ``-1`` mean nothing in the protocol (torchreid asserts ``0 <= pid``): such
  files are skipped with the same counted warning as names that do not follow the pattern,
  and such CSV rows are refused with an error naming the line.

The name pattern ``PPPP_cC`` also reads DukeMTMC-reID (``0001_c2_f0046182.jpg``). Other data:
a CSV with a header ``path,pid,camid`` per split (paths relative to the CSV's folder).
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from tasks.images import IMAGE_EXTENSIONS

__all__ = ["MARKET_SPLITS", "ReIDSample", "parse_market_name", "read_market_split", "read_pid_csv"]

MARKET_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


@dataclass(frozen=True)
class ReIDSample:
    """One crop: its path, identity and camera (0-based)."""

    path: str
    pid: int
    camid: int


def parse_market_name(name: str) -> tuple[int, int] | None:
    """``"0002_c1s1_000451_03.jpg" -> (2, 0)`` (identity, 0-based camera); ``None`` if not that form."""
    m = _MARKET_NAME.match(name)
    if m is None or int(m.group(2)) < 1:
        return None
    return int(m.group(1)), int(m.group(2)) - 1


def read_market_split(folder: str | Path, *, keep_distractors: bool) -> list[ReIDSample]:
    """Crops of one Market-1501 folder, sorted by name, junk (``-1``) dropped.

    ``keep_distractors``: keep identity ``0`` (the gallery keeps it, training drops it). Files
    whose names do not follow the pattern, or name an identity below ``-1``, are skipped with one
    counted warning.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: Market-1501 folder not found (expected bounding_box_train, query, bounding_box_test)"
        )
    samples, odd, bad_pid = [], [], []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue  # Thumbs.db and friends ship with the real dataset
        parsed = parse_market_name(p.name)
        if parsed is None:
            odd.append(p.name)
            continue
        pid, camid = parsed
        if pid < -1:
            bad_pid.append(p.name)
            continue
        if pid == -1 or (pid == 0 and not keep_distractors):
            continue
        samples.append(ReIDSample(str(p), pid, camid))
    if odd:
        warnings.warn(
            f"{folder}: skipped {len(odd)} image(s) whose names are not PPPP_cC...: {', '.join(odd[:5])}"
            + (" ..." if len(odd) > 5 else ""),
            stacklevel=2,
        )
    if bad_pid:
        warnings.warn(
            f"{folder}: skipped {len(bad_pid)} image(s) whose identity is below -1 (-1 = junk, 0 = distractor, "
            f"people from 1): {', '.join(bad_pid[:5])}" + (" ..." if len(bad_pid) > 5 else ""),
            stacklevel=2,
        )
    if not samples:
        raise ValueError(f"{folder}: no Market-1501 images (PPPP_cCsS_FFFFFF_BB.jpg) found")
    return samples


def read_pid_csv(path: str | Path) -> list[ReIDSample]:
    """A split from a CSV with header ``path,pid,camid`` (paths relative to the CSV's folder).

    Identity ``-1`` rows are junk and dropped, as in Market-1501; an identity below ``-1`` is an
    error. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV file not found")
    samples = []
    with open(path, newline="", errors="surrogateescape") as f:  # paths as the file system has them
        reader = csv.DictReader(f)
        missing = {"path", "pid", "camid"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: the header must name path,pid,camid (missing: {', '.join(sorted(missing))})")
        for line, row in enumerate(reader, start=2):
            try:
                pid, camid = int(row["pid"]), int(row["camid"])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}:{line}: pid and camid must be integers, got {row['pid']!r}, {row['camid']!r}"
                ) from None
            if not row["path"]:
                raise ValueError(f"{path}:{line}: empty path")
            if camid < 0:
                raise ValueError(f"{path}:{line}: camid must be >= 0, got {camid}")
            if pid < -1:
                raise ValueError(f"{path}:{line}: pid must be >= -1 (-1 = junk, 0 = distractor), got {pid}")
            if pid == -1:
                continue
            p = Path(row["path"])
            samples.append(ReIDSample(str(p if p.is_absolute() else path.parent / p), pid, camid))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples
