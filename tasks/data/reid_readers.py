"""ReID data files: the Market-1501 layout, ``pid,camid`` CSV, MSMT17 list and CUHK03 protocol readers
(:mod:`tasks.data.reid` uses them).

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

import numpy as np

from tasks.images import IMAGE_EXTENSIONS

__all__ = [
    "MARKET_SPLITS",
    "ReIDSample",
    "msmt17_folders",
    "parse_market_name",
    "read_cuhk03_split",
    "read_market_split",
    "read_msmt17_list",
    "read_msmt17_split",
    "read_pid_csv",
]

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


# ---------------------------------------------------------------------------- MSMT17
#: MSMT17's image folders per version (torchreid's ``VERSION_DICT``): train/val lists name train images,
#: query/gallery lists test images.
MSMT17_FOLDERS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
MSMT17_LISTS = {name: f"list_{name}.txt" for name in ("train", "val", "query", "gallery")}


def msmt17_folders(root: str | Path) -> tuple[Path, Path, Path]:
    """``(list folder, train image folder, test image folder)`` of an MSMT17 V1 or V2 tree.

    ``root`` is the ``MSMT17_V1``/``MSMT17_V2`` folder (holding the list files) or a folder holding
    one of them; the image folders are ``train``/``test`` (V1) or ``mask_train_v2``/``mask_test_v2`` (V2).
    """
    root = Path(root)
    for base in (root, *(root / v for v in MSMT17_FOLDERS)):
        for train, test in MSMT17_FOLDERS.values():
            if (base / MSMT17_LISTS["train"]).is_file() and (base / train).is_dir() and (base / test).is_dir():
                return base, base / train, base / test
    raise FileNotFoundError(
        f"{root}: not an MSMT17 tree (expected list_train.txt and train/ + test/ (V1) or mask_train_v2/ + "
        "mask_test_v2/ (V2), here or in MSMT17_V1/ or MSMT17_V2/)"
    )


def read_msmt17_list(listing: str | Path, image_dir: str | Path) -> list[ReIDSample]:
    """An MSMT17 list (``path pid`` lines, paths relative to ``image_dir``), as torchreid reads it.

    The camera is the third ``_`` field of the file name, 1-based (``0000_000_01_0303morning_0015_0.jpg``
    is camera 1, here 0). Identities are kept as listed (MSMT17 numbers people from 0; there are no
    junk or distractor ids). Errors name ``file:line``: a line that is not ``path pid``, a pid
    that is not an integer >= 0, a name without a camera field.
    """
    listing, image_dir = Path(listing), Path(image_dir)
    if not listing.is_file():
        raise FileNotFoundError(f"{listing}: MSMT17 list file not found")
    samples = []
    for n, line in enumerate(listing.read_text(errors="surrogateescape").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"{listing}:{n}"
        if len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(f"{where}: a line is 'path pid' (pid an integer >= 0), got {line.strip()!r}")
        parts = Path(fields[0]).name.split("_")
        if len(parts) < 3 or not parts[2].isdigit() or int(parts[2]) < 1:
            raise ValueError(f"{where}: no camera in the name {Path(fields[0]).name!r} (expected PPPP_NNN_CC_...)")
        samples.append(ReIDSample(str(image_dir / fields[0]), int(fields[1]), int(parts[2]) - 1))
    if not samples:
        raise ValueError(f"{listing}: no samples")
    return samples


def read_msmt17_split(root: str | Path, split: str, *, with_val: bool = False) -> list[ReIDSample]:
    """``train`` (``list_train.txt``, plus ``list_val.txt`` with ``with_val``: torchreid's ``combineall``),
    ``query`` or ``gallery`` of an MSMT17 tree (:func:`msmt17_folders`)."""
    base, train_dir, test_dir = msmt17_folders(root)
    if split == "train":
        names = ["train", "val"] if with_val else ["train"]
        return [s for name in names for s in read_msmt17_list(base / MSMT17_LISTS[name], train_dir)]
    return read_msmt17_list(base / MSMT17_LISTS[split], test_dir)


# ---------------------------------------------------------------------------- CUHK03
CUHK03_PROTOCOL = "cuhk03_new_protocol_config_{boxes}.mat"
_CUHK03_KEYS = ("train_idx", "query_idx", "gallery_idx", "labels", "filelist", "camId")


def read_cuhk03_split(root: str | Path, split: str, boxes: str = "labeled") -> list[ReIDSample]:
    """``train``/``query``/``gallery`` of CUHK03's 767/700 protocol (Zhong et al. 2017), as torchreid reads it.

    ``root`` holds ``cuhk03_new_protocol_config_{labeled,detected}.mat`` and the crops in
    ``images_{labeled,detected}/`` (``boxes``: which). The ``.mat`` (``scipy.io.loadmat``) gives
    1-based ``train_idx``/``query_idx``/``gallery_idx`` into ``filelist`` (file names),
    ``labels`` (identities) and ``camId`` (cameras, 1-based; 0-based here). Errors name the file:
    a missing key, an index outside ``filelist``, arrays of different lengths.
    """
    from scipy.io import loadmat

    if boxes not in ("labeled", "detected"):
        raise ValueError(f"data.cuhk03_boxes must be 'labeled' or 'detected', got {boxes!r}")
    root = Path(root)
    mat_file = root / CUHK03_PROTOCOL.format(boxes=boxes)
    if not mat_file.is_file():
        raise FileNotFoundError(f"{mat_file}: CUHK03 new-protocol file not found")
    try:
        mat = loadmat(mat_file)
    except (ValueError, OSError, NotImplementedError) as e:
        raise ValueError(f"{mat_file}: cannot read it with scipy.io.loadmat ({e})") from e
    missing = [k for k in _CUHK03_KEYS if k not in mat]
    if missing:
        raise ValueError(f"{mat_file}: missing {', '.join(missing)} (the protocol file has {', '.join(_CUHK03_KEYS)})")
    files = [str(np.asarray(f).reshape(-1)[0]) for f in mat["filelist"].reshape(-1)]
    pids, cams = mat["labels"].reshape(-1).astype(np.int64), mat["camId"].reshape(-1).astype(np.int64)
    if not len(files) == len(pids) == len(cams):
        raise ValueError(f"{mat_file}: filelist, labels and camId have {len(files)}, {len(pids)}, {len(cams)} entries")
    idx = mat[f"{split}_idx"].reshape(-1).astype(np.int64) - 1  # 1-based (MATLAB)
    bad = idx[(idx < 0) | (idx >= len(files))]
    if bad.size:
        raise ValueError(
            f"{mat_file}: {split}_idx has {bad.size} index(es) outside 1..{len(files)}: {(bad + 1)[:5].tolist()}"
        )
    if (cams[idx] < 1).any():
        raise ValueError(f"{mat_file}: camId must be 1-based (>= 1), got {sorted(set(cams[idx].tolist()))[:5]}")
    folder = root / f"images_{boxes}"
    return [ReIDSample(str(folder / files[i]), int(pids[i]), int(cams[i]) - 1) for i in idx]
