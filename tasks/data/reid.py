"""ReID data: the dataset, its collate function and the data module; the Market-1501 and CSV readers
are :mod:`tasks.data.reid_readers`, the PK sampler :mod:`tasks.data.pk_sampler` (their names are served here too).

Layouts (``data.layout``): ``market`` (Market-1501 names, also DukeMTMC-reID), ``csv``, ``msmt17``
and ``cuhk03``; the benchmark's identity and camera conventions are written once, in
:mod:`tasks.data.reid_readers`.

Query identities that have no image in the gallery can never be matched: they are counted and
named in a warning when the splits are read (:func:`unmatched_query_ids`), and the evaluation
reports them again in its metrics (the ranking skips queries without a match, as the benchmark
code does).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from tasks.data.market import MarketConfig, ensure_market
from tasks.data.pk_sampler import PKSampler
from tasks.data.reid_readers import (
    MARKET_SPLITS,
    ReIDSample,
    parse_market_name,
    read_cuhk03_split,
    read_market_split,
    read_msmt17_split,
    read_pid_csv,
)
from tasks.deprecation import renamed
from tasks.images import BadImageError, SkippedSample, drop_skipped, read_image
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
    "unmatched_query_ids",
]


def unmatched_query_ids(query: Sequence[ReIDSample], gallery: Sequence[ReIDSample]) -> dict[int, int]:
    """``{identity: query images}`` of the query identities with no image in the gallery (never matchable)."""
    in_gallery = {s.pid for s in gallery}
    return dict(sorted(Counter(s.pid for s in query if s.pid not in in_gallery).items()))


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
        root: Market-1501 (or DukeMTMC-reID) folder (``bounding_box_train``, ``query``,
            ``bounding_box_test``); MSMT17: the ``MSMT17_V1``/``MSMT17_V2`` folder (or its parent);
            CUHK03: the folder of the protocol ``.mat`` files and ``images_labeled``/``images_detected``.
        layout: ``market`` (the folder layout), ``csv`` (``train_csv``/``query_csv``/``gallery_csv``),
            ``msmt17`` (its list files) or ``cuhk03`` (the 767/700 protocol).
        msmt17_with_val: MSMT17: train on ``list_train.txt`` + ``list_val.txt`` (torchreid's
            ``combineall``; off by default, as published results train on ``list_train.txt``).
        cuhk03_boxes: CUHK03: ``labeled`` (hand-drawn) or ``detected`` (DPM) crops and protocol file.
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
        layout: Literal["market", "csv", "msmt17", "cuhk03"] = "market",
        train_csv: str | None = None,
        query_csv: str | None = None,
        gallery_csv: str | None = None,
        msmt17_with_val: bool = False,
        cuhk03_boxes: Literal["labeled", "detected"] = "labeled",
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
        if layout not in ("market", "csv", "msmt17", "cuhk03"):
            raise ValueError(f"data.layout must be 'market', 'csv', 'msmt17' or 'cuhk03', got {layout!r}")
        if cuhk03_boxes not in ("labeled", "detected"):
            raise ValueError(f"data.cuhk03_boxes must be 'labeled' or 'detected', got {cuhk03_boxes!r}")
        self.msmt17_with_val, self.cuhk03_boxes = msmt17_with_val, cuhk03_boxes
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
        #: ``{identity: query images}`` of query identities absent from the gallery (:func:`unmatched_query_ids`)
        self.unmatched_queries: dict[int, int] = {}

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
        if self.layout == "msmt17":  # people numbered from 0: no distractor id
            return read_msmt17_split(require_folder("data.root", self.root), split, with_val=self.msmt17_with_val)
        if self.layout == "cuhk03":
            return read_cuhk03_split(require_folder("data.root", self.root), split, self.cuhk03_boxes)
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
            train_of = {"csv": self.csvs["train"], "market": self.root / MARKET_SPLITS["train"]}
            where = train_of.get(self.layout, self.root)
            self.identity_source = f"the training identities of {where}"
        if stage in (None, "fit", "validate", "test", "predict") and self.query_set is None:
            self.query_set = ReIDDataset(self.read_split("query"), self.eval_transform)
            self.gallery_set = ReIDDataset(self.read_split("gallery"), self.eval_transform)
            self.unmatched_queries = unmatched_query_ids(self.query_set.samples, self.gallery_set.samples)
            if self.unmatched_queries:
                ids, images = list(self.unmatched_queries), sum(self.unmatched_queries.values())
                warnings.warn(
                    f"{self.root} ({self.layout}): {len(ids)} query identit(y/ies) ({images} "
                    f"query images) have no image in the gallery and can never be matched; the ranking skips them: "
                    f"{ids[:10]}{' ...' if len(ids) > 10 else ''}",
                    stacklevel=2,
                )
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
