"""ReID data: Market-1501 layout and ``pid,camid`` CSV readers, PK sampling, the data module.

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
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms import v2

from tasks.data.market import MarketConfig, ensure_market
from tasks.deprecation import renamed
from tasks.images import IMAGE_EXTENSIONS, BadImageError, SkippedSample, drop_skipped, read_image
from tasks.module import TaskDataModule
from tasks.options import check_int, check_number, check_probability, check_size, require_file, require_folder

__all__ = [
    "PKSampler",
    "ReIDDataModule",
    "ReIDDataset",
    "ReIDSample",
    "collate_reid",
    "parse_market_name",
    "read_market_split",
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


class ReIDDataset(Dataset):
    """Crops as ``{"image": float (3,H,W) in [0,1], "pid", "camid", "index"}``.

    ``labels``: the per-sample target returned as ``pid`` (training relabels identities to
    ``0..C-1``; evaluation keeps the original ids). An unreadable image comes back as a
    :class:`~tasks.images.SkippedSample`, which :func:`collate_reid` drops and counts.
    """

    def __init__(self, samples: Sequence[ReIDSample], transform: Any, labels: Sequence[int] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.labels = list(labels) if labels is not None else [s.pid for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        s = self.samples[index]
        try:
            image = read_image(s.path)
        except BadImageError as e:
            return SkippedSample(s.path, e.reason)
        return {"image": self.transform(image), "pid": self.labels[index], "camid": s.camid, "index": index}


def collate_reid(items: list[Any]) -> dict[str, Any]:
    """Stack readable samples: ``image (B,3,H,W)``, ``pid``, ``camid``, ``index``, ``is_query`` (B,).

    ``skipped`` lists ``(path, reason)`` of the batch's unreadable images (plain tuples:
    Lightning's batch transfer cannot rebuild frozen dataclasses such as ``SkippedSample``).
    """
    kept, skipped = drop_skipped(items)
    return {
        "image": torch.stack([k["image"] for k in kept]) if kept else torch.empty(0),
        "pid": torch.tensor([k["pid"] for k in kept], dtype=torch.long),
        "camid": torch.tensor([k["camid"] for k in kept], dtype=torch.long),
        "index": torch.tensor([k["index"] for k in kept], dtype=torch.long),
        "is_query": torch.tensor([k.get("is_query", False) for k in kept], dtype=torch.bool),
        "skipped": [(s.path, s.reason) for s in skipped],
    }


class PKSampler(DistributedSampler):
    """P identities x K images per batch, each process its own batches, the same plan on every rank.

    Written by hand because pytorch-metric-learning's ``MPerClassSampler`` is not distributed:
    Lightning wraps a non-distributed sampler in ``DistributedSamplerWrapper``, which shuffles
    its output and deals it out index by index, breaking the P x K structure. This subclasses
    ``DistributedSampler`` so Lightning leaves it alone, and calls ``set_epoch`` on it.

    Per epoch, each identity's images are shuffled and cut into groups of K, padded by
    re-sampling its own images (``padding``): ``"multiple"`` (the default) pads every identity
    to a multiple of K, so every image is seen each epoch; ``"below_k"`` pads only identities with
    fewer than K images (up to K) and drops the others' last incomplete group, as the strong
    baseline's ``RandomIdentitySampler`` (reid-strong-baseline ``data/samplers/triplet_sampler.py``,
    also open-reid's and torchreid's): on Market-1501 at K=4 its epochs are ~15-20 % shorter.
    Batches take P random identities that still have a group. Batches are dealt round-robin to the ``num_replicas``
    processes (the plan is seeded by ``seed + epoch``, so every rank builds the same one), each
    rank gets the same number. Yields indices; the loader cuts them into batches of ``P * K``.
    """

    def __init__(
        self,
        labels: Sequence[int],
        p: int,
        k: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        padding: Literal["multiple", "below_k"] = "multiple",
    ) -> None:
        if padding not in ("multiple", "below_k"):
            raise ValueError(f"PK sampler padding must be 'multiple' or 'below_k', got {padding!r}")
        self.padding = padding
        # DistributedSampler.__init__ needs a dataset and an initialised process group; set its
        # attributes ourselves so this also works in a single process.
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        p, k = check_int("data.p", p), check_int("data.k", k)
        self.labels = np.asarray(labels)
        self.p, self.k = p, k
        self.num_replicas, self.rank = num_replicas, rank
        self.seed, self.epoch = seed, 0
        self.shuffle, self.drop_last = True, True
        self.by_pid: dict[int, np.ndarray] = {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}
        if len(self.by_pid) < p:
            raise ValueError(
                f"PK sampling needs at least P={p} identities in the training set, found {len(self.by_pid)}: "
                f"lower data.p to at most {len(self.by_pid)}"
            )
        # batches per rank and epoch: from epoch 0's plan (later plans can differ by a batch or two)
        self.num_batches = max(1, len(self._plan(0)) // num_replicas)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + epoch)
        pools: dict[int, list[np.ndarray]] = {}
        for pid, idx in self.by_pid.items():
            idx = rng.permutation(idx)
            if self.padding == "below_k":  # the strong baseline: pad to K only, drop the remainder
                if len(idx) < self.k:
                    idx = np.concatenate([idx, rng.choice(idx, self.k - len(idx), replace=True)])
                idx = idx[: len(idx) - len(idx) % self.k]
            elif len(idx) % self.k:
                idx = np.concatenate([idx, rng.choice(idx, self.k - len(idx) % self.k, replace=True)])
            pools[pid] = list(idx.reshape(-1, self.k))
        batches = []
        alive = [pid for pid in pools if pools[pid]]
        while len(alive) >= self.p:
            chosen = rng.choice(len(alive), self.p, replace=False)
            batches.append(np.concatenate([pools[alive[c]].pop() for c in chosen]))
            alive = [pid for pid in alive if pools[pid]]
        return batches

    def __iter__(self) -> Iterator[int]:
        batches = self._plan(self.epoch)
        mine = batches[self.rank :: self.num_replicas][: self.num_batches]
        while len(mine) < self.num_batches:  # a later epoch's plan may be a batch shorter
            mine.append(batches[len(mine) % len(batches)])
        for b in mine:
            yield from (int(i) for i in b)

    def __len__(self) -> int:
        return self.num_batches * self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class _Concat(Dataset):
    """Query then gallery, with ``is_query`` implied by the index (``index < num_query``)."""

    def __init__(self, query: ReIDDataset, gallery: ReIDDataset) -> None:
        self.query, self.gallery = query, gallery

    def __len__(self) -> int:
        return len(self.query) + len(self.gallery)

    def __getitem__(self, index: int) -> Any:
        nq = len(self.query)
        item = self.query[index] if index < nq else self.gallery[index - nq]
        if isinstance(item, dict):
            item["index"], item["is_query"] = index, index < nq
        return item


class ReIDDataModule(TaskDataModule):
    """Training crops with PK batches; query + gallery for evaluation.

    Args:
        root: Market-1501 folder (``bounding_box_train``, ``query``, ``bounding_box_test``).
        layout: ``market`` (the folder layout) or ``csv`` (``train_csv``/``query_csv``/``gallery_csv``).
        train_csv, query_csv, gallery_csv: CSV splits (header ``path,pid,camid``) for ``layout: csv``.
        synthetic: when set, ``prepare_data`` generates synthetic pedestrians with this config in
            ``root`` unless the same dataset is already there (the demo's self-contained data).
        image_size: ``[height, width]`` the crops are resized to (the strong baseline: 256x128).
        p: identities per training batch.
        k: images per identity in a training batch (batch size ``p * k`` per process).
        eval_batch_size: batch size of evaluation and extraction.
        num_workers: loader processes.
        hflip: probability of a horizontal flip.
        pad: pixels of padding before a random crop back to ``image_size`` (0: off).
        random_erasing: probability of random erasing (Zhong et al. 2020).
        erasing_value: the RGB value in ``[0, 1]`` erased areas get (the mean pixel, ImageNet's
            by default, so they become 0 after normalisation).
        erasing_scale: ``[min, max]`` fraction of the crop an erased rectangle covers
            (torchvision's ``RandomErasing`` default ``[0.02, 0.33]``; the strong baseline's
            ``sl, sh`` are ``[0.02, 0.4]``).
        pk_padding: how the PK sampler fills identities (:class:`PKSampler`): ``multiple`` (every
            identity padded to a multiple of K) or ``below_k`` (only identities with fewer than K
            images, the strong baseline's epoch).
        color_jitter: brightness/contrast/saturation jitter strength (0: off).
        format, flip: old names of ``layout`` and ``hflip`` (accepted, warned once).
    """

    collate_fns: ClassVar[Mapping[str, Any]] = dict.fromkeys(("train", "val", "test", "predict"), collate_reid)

    def __init__(
        self,
        root: str = "data/market1501",
        layout: Literal["market", "csv"] = "market",
        train_csv: str | None = None,
        query_csv: str | None = None,
        gallery_csv: str | None = None,
        synthetic: MarketConfig | None = None,
        image_size: tuple[int, int] = (256, 128),
        p: int = 16,
        k: int = 4,
        eval_batch_size: int = 128,
        num_workers: int = 4,
        hflip: float = 0.5,
        pad: int = 10,
        random_erasing: float = 0.5,
        erasing_value: tuple[float, float, float] = (0.485, 0.456, 0.406),
        erasing_scale: tuple[float, float] = (0.02, 0.33),
        pk_padding: Literal["multiple", "below_k"] = "multiple",
        color_jitter: float = 0.0,
        format: Literal["market", "csv"] | None = None,
        flip: float | None = None,
    ) -> None:
        p, k = check_int("data.p", p), check_int("data.k", k)  # before p * k is the batch size
        super().__init__(batch_size=p * k, eval_batch_size=eval_batch_size, num_workers=num_workers)
        layout = renamed("data", "format", "layout", format, layout, "market")
        hflip = renamed("data", "flip", "hflip", flip, hflip, 0.5)
        check_size("data.image_size", image_size, 2)
        check_probability("data.hflip", hflip)
        check_int("data.pad", pad, minimum=0)
        check_probability("data.random_erasing", random_erasing)
        check_number("data.color_jitter", color_jitter)
        if len(erasing_value) != 3 or not all(0.0 <= float(v) <= 1.0 for v in erasing_value):
            raise ValueError(f"data.erasing_value must be 3 numbers (RGB) in [0, 1], got {erasing_value!r}")
        self.save_hyperparameters(ignore=["format", "flip"])
        self.hparams.update(layout=layout, hflip=hflip)
        self.root = Path(root)
        self.layout = layout
        self.csvs = {"train": train_csv, "query": query_csv, "gallery": gallery_csv}
        self.synthetic = synthetic
        self.image_size = tuple(image_size)
        self.p, self.k = p, k
        if pk_padding not in ("multiple", "below_k"):
            raise ValueError(f"data.pk_padding must be 'multiple' or 'below_k', got {pk_padding!r}")
        self.pk_padding = pk_padding
        self.train_transform = v2.Compose(
            [
                v2.Resize(self.image_size, antialias=True),
                v2.RandomHorizontalFlip(hflip),
                *([v2.Pad(pad), v2.RandomCrop(self.image_size)] if pad > 0 else []),
                *([v2.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []),
                v2.ToDtype(torch.float32, scale=True),
                *(
                    [v2.RandomErasing(random_erasing, scale=tuple(erasing_scale), value=list(erasing_value))]
                    if random_erasing > 0
                    else []
                ),
            ]
        )
        self.eval_transform = v2.Compose(
            [v2.Resize(self.image_size, antialias=True), v2.ToDtype(torch.float32, scale=True)]
        )
        self.train_set: ReIDDataset | None = None
        self.query_set: ReIDDataset | None = None
        self.gallery_set: ReIDDataset | None = None
        self._num_classes: int | None = None

    # ------------------------------------------------------------------ reading
    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_market(self.root, self.synthetic)

    def read_split(self, split: str) -> list[ReIDSample]:
        """Samples of ``train``, ``query`` or ``gallery`` (distractors kept in the gallery only)."""
        if self.layout == "csv":
            if not self.csvs[split]:
                raise ValueError(f"layout: csv needs {split}_csv")
            samples = read_pid_csv(require_file(f"data.{split}_csv", self.csvs[split]))
            return [s for s in samples if s.pid != 0] if split == "train" else samples
        folder = require_folder(
            "data.root", self.root / MARKET_SPLITS[split], within=("data.root", self.root)
        )  # Market-1501: bounding_box_train, query, bounding_box_test
        return read_market_split(folder, keep_distractors=split == "gallery")

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            train = self.read_split("train")
            pids = sorted({s.pid for s in train})
            relabel = {pid: i for i, pid in enumerate(pids)}
            self.train_set = ReIDDataset(train, self.train_transform, [relabel[s.pid] for s in train])
            self._num_classes = len(pids)
            #: the identities (person ids) training labels 0..N-1 stand for: the classifier's classes (tasks.classes)
            self.train_identities = [str(pid) for pid in pids]
            where = self.csvs["train"] if self.layout == "csv" else self.root / MARKET_SPLITS["train"]
            self.identity_source = f"the training identities of {where}"
        if stage in (None, "fit", "validate", "test", "predict") and self.query_set is None:
            self.query_set = ReIDDataset(self.read_split("query"), self.eval_transform)
            self.gallery_set = ReIDDataset(self.read_split("gallery"), self.eval_transform)
            # evaluation and predict: query then gallery (``is_query`` from the index)
            self.val_set = self.test_set = self.predict_set = _Concat(self.query_set, self.gallery_set)

    @property
    def num_classes(self) -> int:
        """Training identities (known after ``setup("fit")``)."""
        if self._num_classes is None:
            self.setup("fit")
        assert self._num_classes is not None
        return self._num_classes

    @property
    def num_query(self) -> int:
        return len(self.query_set) if self.query_set is not None else 0

    def eval_samples(self) -> list[ReIDSample]:
        """Query then gallery samples, in the order of the evaluation dataset's indices."""
        assert self.query_set is not None and self.gallery_set is not None
        return self.query_set.samples + self.gallery_set.samples

    @property
    def format(self) -> str:
        """The old name of :attr:`layout`."""
        return self.layout

    # ------------------------------------------------------------------ loaders
    def train_sampler(self) -> PKSampler:
        """PK batches, with the same seed on every rank (Lightning's own distributed samplers read it the same way)."""
        assert self.train_set is not None
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return PKSampler(self.train_set.labels, self.p, self.k, seed=seed, padding=self.pk_padding)
