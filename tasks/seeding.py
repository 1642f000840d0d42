"""The data order and the random numbers of a training run, as functions of ``(seed, epoch, rank, position)``.

What makes a run resumed mid-epoch replay exactly the run that would have happened
(:mod:`tasks.resume` puts it together):

* :class:`ResumableSampler`: the training order, a pure function of ``(seed, epoch)``, started at
  the epoch and batch the restored loop counters say (:func:`train_position`);
* :class:`SeededDataset`: every training sample loaded under its own seed
  (:func:`sample_seed`), so augmentations depend neither on the worker processes nor on the
  state they were killed in;
* :func:`capture_rng` / :func:`restore_rng`: a process's torch/numpy/python RNG states as plain data.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "ResumableSampler",
    "SeededDataset",
    "capture_rng",
    "derived_seed",
    "global_seed",
    "restore_rng",
    "sample_seed",
    "seeded",
    "train_position",
]


# ---------------------------------------------------------------------------- random states
def capture_rng() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and python RNG states, as tensors and plain data.

    Plain data so that a checkpoint holding them is still read with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device (DDP: one per process)
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the RNG states :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def derived_seed(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy's ``SeedSequence``), e.g. ``(seed, epoch)``."""
    mixed = np.random.SeedSequence([int(w) & 0xFFFFFFFFFFFFFFFF for w in words]).generate_state(2)
    return (int(mixed[0]) << 31) ^ int(mixed[1])


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The seed of the ``position``-th training sample of process ``rank`` in ``epoch``."""
    return derived_seed(seed, epoch, rank, position)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch, numpy and python RNGs seeded by ``seed``; their states are restored after.

    torchvision's random transforms draw from the global torch RNG (``torch.rand``...), so
    seeding it around one sample's loading fixes that sample's augmentation; restoring the
    states keeps the model's random numbers independent of how much data was loaded.
    """
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed would reseed CUDA's)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


# ---------------------------------------------------------------------------- training data
class SeededDataset(Dataset):
    """A training dataset whose sample ``(index, seed)`` is ``dataset[index]`` loaded under :func:`seeded` ``(seed)``.

    A plain integer key loads the sample as the wrapped dataset does. Other attributes are the
    wrapped dataset's.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with seeded(seed):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling in a worker process)
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableSampler(DistributedSampler):
    """The training sampler: ``(index, seed)`` pairs, in an order fixed by ``(seed, epoch)``, resumable mid-epoch.

    ``sampler`` gives the order: a ``DistributedSampler`` (e.g. the ReID ``PKSampler``) its
    process's share, any other sampler the whole order, which is then dealt out to the
    ``num_replicas`` processes (padded to equal shares, as ``DistributedSampler`` does); ``None``
    shuffles as Lightning's ``DistributedSampler`` does (seeded by ``seed + epoch``). The order is
    drawn under :func:`seeded` ``(derived_seed(seed, epoch))``, so a sampler that draws from the
    global RNG (``RandomSampler``) is a function of the epoch too, and leaves the model's random
    numbers alone. Each index comes with :func:`sample_seed` of its position, for
    :class:`SeededDataset`. The first iteration starts ``skip_batches`` batches of ``batch_size``
    into ``epoch`` (a run resumed mid-epoch, :func:`train_position`); later ones start at 0.

    It is a ``DistributedSampler`` so that Lightning keeps it under DDP (and calls ``set_epoch``).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: Any = None,
        *,
        seed: int = 0,
        batch_size: int = 1,
        epoch: int = 0,
        skip_batches: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        # DistributedSampler.__init__ wants an initialised process group: set its attributes here
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.dataset = dataset
        self.seed, self.epoch = int(seed), int(epoch)
        self.shuffle, self.drop_last = True, False
        if sampler is None:
            sampler = DistributedSampler(
                dataset, num_replicas=self.num_replicas, rank=self.rank, shuffle=True, seed=self.seed
            )
        self.sampler = sampler
        self.deal = not isinstance(sampler, DistributedSampler) and self.num_replicas > 1
        self.batch_size = batch_size
        self.resume_at(self.epoch, skip_batches)

    def resume_at(self, epoch: int, skip_batches: int) -> None:
        """Make the next iteration start ``skip_batches`` batches into ``epoch``."""
        self._skip = (int(epoch), int(skip_batches) * self.batch_size)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(self.epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return -(-n // self.num_replicas) if self.deal else n

    def order(self, epoch: int) -> list[int]:
        """This process's indices of ``epoch``, in order."""
        self.set_epoch(epoch)
        with seeded(derived_seed(self.seed, epoch)):
            order = [int(i) for i in self.sampler]
        if self.deal and order:
            total = len(self) * self.num_replicas
            order = (order * -(-total // len(order)))[:total][self.rank :: self.num_replicas]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        skip_epoch, skip = self._skip
        self._skip = (-1, 0)  # the resume position applies to the first iteration only
        order = self.order(epoch)
        for position in range(skip if skip_epoch == epoch else 0, len(order)):
            yield order[position], sample_seed(self.seed, epoch, self.rank, position)


def train_position(trainer: pl.Trainer | None) -> tuple[int, int]:
    """``(epoch, batches already trained in it)`` where a (resumed) fit's training data starts.

    From the loop counters Lightning restored from the checkpoint (as they stand when training
    starts): a checkpoint saved mid-epoch (a stop signal) goes on at the next batch of that epoch,
    one saved at an epoch end at the next epoch. ``(0, 0)`` without a trainer or a checkpoint.
    """
    if trainer is None:
        return 0, 0
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress.current
    mid_epoch = fit_loop.restarting and epochs.started > epochs.processed
    done = fit_loop.epoch_loop.batch_progress.current.ready if mid_epoch else 0
    return int(epochs.processed), int(done)


def global_seed() -> int:
    """The run's seed (``seed_everything``), as Lightning's own distributed samplers read it."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
