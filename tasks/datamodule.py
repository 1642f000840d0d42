"""The Lightning data module every task's data builds on: :class:`TaskDataModule`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from tasks.options import check_int
from tasks.seeding import ResumableSampler, SeededDataset, global_seed, train_position

__all__ = ["TaskDataModule"]


class TaskDataModule(pl.LightningDataModule):
    """Common loader settings and the four ``*_dataloader`` methods.

    Subclasses build each dataset in :meth:`build_dataset` (``train``, ``val``, ``test``,
    ``predict``; :meth:`setup` stores the ones a Lightning stage needs as ``self.<name>_set``, see
    :attr:`stage_sets`) or override ``setup`` itself, and name a collate function per stage in
    :attr:`collate_fns`; a training sampler (PK batches...) comes from :meth:`train_sampler`.
    Evaluation loaders shard the dataset without padding when distributed (Lightning's
    ``UnrepeatedDistributedSampler``), so summed metrics count every sample exactly once.
    """

    #: collate function of each stage (``train``, ``val``, ``test``, ``predict``); absent: PyTorch's default
    collate_fns: ClassVar[Mapping[str, Callable[[list[Any]], Any]]] = {}
    #: the datasets :meth:`setup` builds for each Lightning stage (``None``: all four, in this order)
    stage_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)
    }  # fmt: skip

    def __init__(self, batch_size: int = 8, eval_batch_size: int | None = None, num_workers: int = 2) -> None:
        super().__init__()
        # checked here, by name: DataLoader's own errors do not say which option (tasks.options)
        self.batch_size = check_int("data.batch_size", batch_size)
        self.eval_batch_size = check_int("data.eval_batch_size", eval_batch_size, optional=True) or self.batch_size
        self.num_workers = check_int("data.num_workers", num_workers, minimum=0)

    def build_dataset(self, name: str) -> Dataset | None:
        """The ``name`` dataset (``train``, ``val``, ``test`` or ``predict``) that :meth:`setup` stores.

        ``None`` (this default): not built here, for a subclass with its own loaders or ``setup``;
        a loader that needs it then fails naming it (:meth:`stage_dataset`).
        """
        return None

    def setup(self, stage: str | None = None) -> None:
        """``self.<name>_set = build_dataset(name)`` for every dataset ``stage`` needs (:attr:`stage_sets`)."""
        for name in ("train", "val", "test", "predict") if stage is None else self.stage_sets.get(stage, ()):
            dataset = self.build_dataset(name)
            if dataset is not None:
                setattr(self, f"{name}_set", dataset)

    def stage_dataset(self, stage: str) -> Dataset:
        """``self.<stage>_set``, with an error naming it when ``setup`` did not build it."""
        dataset = getattr(self, f"{stage}_set", None)
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no {stage} dataset (setup() did not build {stage}_set)")
        return dataset

    def train_sampler(self) -> Any:
        """Sampler of the training loader (``None``: shuffled, or Lightning's distributed sampler)."""
        return None

    def _loader(self, stage: str) -> DataLoader:
        train = stage == "train"
        return self.make_loader(
            self.stage_dataset(stage),
            train=train,
            collate_fn=self.collate_fns.get(stage),
            sampler=self.train_sampler() if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def make_loader(
        self,
        dataset: Dataset,
        *,
        train: bool,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        batch_size: int | None = None,
    ) -> DataLoader:
        """A loader of ``dataset``; training ones are exactly resumable (:mod:`tasks.seeding`).

        Training: ``sampler`` (``None``: shuffled) wrapped in a :class:`~tasks.seeding.ResumableSampler`
        starting where a resumed fit goes on, every sample loaded under its own seed
        (:class:`~tasks.seeding.SeededDataset`). Evaluation: unpadded shards when distributed.
        Every loader draws its worker seeds from its own generator, never from the global RNG.
        """
        if not train and sampler is None and batch_sampler is None and dist.is_available() and dist.is_initialized():
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        kwargs: dict[str, Any] = {
            "num_workers": self.num_workers,
            "collate_fn": collate_fn,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "generator": torch.Generator().manual_seed(global_seed()),
        }
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
        bs = batch_size or (self.batch_size if train else self.eval_batch_size)
        if train:
            epoch, done = train_position(self.trainer)
            sampler = ResumableSampler(
                dataset, sampler, seed=global_seed(), batch_size=bs, epoch=epoch, skip_batches=done
            )
            dataset = SeededDataset(dataset)
        return DataLoader(dataset, batch_size=bs, sampler=sampler, drop_last=train, **kwargs)
