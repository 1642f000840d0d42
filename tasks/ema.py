"""Model EMA of every task (``model.ema`` in the task YAML): :class:`EMAConfig`, :class:`ModelEMA`.

Built on Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging` (torch's
:class:`~torch.optim.swa_utils.AveragedModel` of the whole task, updated after every optimiser
step, so ``trainer.accumulate_grad_batches`` counts updates, not batches) with an averaging
function that is torch's :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` plus two things
from timm's ``ModelEmaV3``:

* the optional warm-up of the decay, ``min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)``
  at the ``t``-th update (``t`` is the averaged model's ``n_averaged``, stored in the checkpoint,
  so a resumed run goes on with the same decays);
* buffers: floating-point ones (BatchNorm's running mean and variance) are averaged like the
  weights, integer ones (``num_batches_tracked``) copied from the trained model, as timm's
  default (``exclude_buffers=False``) does; torch's function would average integers into floats.

Where the averaged weights are used:

* validation during ``fit`` (they are swapped in for it and back after the checkpoint callbacks'
  turn is prepared), and the model after ``fit`` (``trainer.test`` after ``fit``);
* every checkpoint: its ``state_dict`` holds the averaged weights, so ``validate``/``test``/
  ``predict --ckpt_path``, ``export --ckpt`` and ``extract`` use them with no option to set; the
  trained weights and the averaging state are kept beside (``current_model_state``,
  ``averaging_state``), from which ``fit --ckpt_path`` resumes both exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

__all__ = ["EMAConfig", "ModelEMA", "ema_config", "ema_decay", "ema_multi_avg_fn"]


@dataclass
class EMAConfig:
    """``model.ema``: an exponential moving average of the weights (``null``: none).

    Args:
        decay: the EMA decay (timm's ImageNet recipes: ``0.9998``; short runs want less, e.g.
            ``0.999``: the average spans about ``1 / (1 - decay)`` optimiser steps).
        warmup: timm's warm-up of the decay (small decays at the first updates, so the average
            does not hold on to the initial weights for ``1 / (1 - decay)`` steps).
        warmup_gamma: timm's ``warmup_gamma``.
        warmup_power: timm's ``warmup_power`` (``2/3`` for runs of about 100k steps, ``3/4`` shorter).
    """

    decay: float = 0.9998
    warmup: bool = True
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"model.ema.decay must be in [0, 1], got {self.decay}")
        if self.warmup_gamma <= 0 or self.warmup_power <= 0:
            raise ValueError(
                f"model.ema.warmup_gamma and warmup_power must be > 0, got {self.warmup_gamma}, {self.warmup_power}"
            )


# Hyper-parameters of a task built in Python hold this dataclass itself: allow it in
# torch.load(weights_only=True), which every checkpoint load here uses.
torch.serialization.add_safe_globals([EMAConfig])


def ema_config(value: EMAConfig | Mapping[str, Any] | None) -> EMAConfig | None:
    """``model.ema`` as given (a checkpoint's hyper-parameters may hold a mapping) as an :class:`EMAConfig`."""
    if value is None or isinstance(value, EMAConfig):
        return value
    if isinstance(value, Mapping):
        return EMAConfig(**value)
    raise TypeError(f"model.ema must be a mapping of EMAConfig's fields or null, got {type(value).__name__}")


def ema_decay(config: EMAConfig, t: int) -> float:
    """The decay of the update that follows ``t`` earlier ones (``t >= 1``; the first update copies)."""
    if not config.warmup:
        return config.decay
    return min(config.decay, 1.0 - (1.0 + t / config.warmup_gamma) ** -config.warmup_power)


def ema_multi_avg_fn(config: EMAConfig) -> Any:
    """An ``AveragedModel`` ``multi_avg_fn``: lerp of floating-point tensors by ``1 - decay``
    (``torch._foreach_lerp_``, as :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`), integer
    tensors copied (timm)."""

    @torch.no_grad()
    def update(ema: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            torch._foreach_lerp_(ema, current, 1.0 - ema_decay(config, int(n_averaged)))
        else:
            torch._foreach_copy_(ema, current)

    return update


class ModelEMA(WeightAveraging):
    """The EMA of a task's weights (see the module doc): :class:`TaskModule` adds it when ``model.ema`` is set.

    Lightning's callback, with these changes:

    * the averaged copy is made at ``on_fit_start``, once the task's ``setup`` and a resumed
      checkpoint have given the model its final structure (ReID sizes its classifier from the
      data there; Lightning's callback copies the model before that), and every swap checks that
      both hold the same tensors (an error naming the first that differs, never a silent mismatch);
    * the swap back after validation waits until ``on_validation_end``, so the task's own
      ``on_validation_epoch_end`` (which may still run the model) sees the averaged weights; the
      checkpoint callbacks, which Lightning runs last, see the trained ones again and store both;
    * outside ``fit`` a checkpoint with averaged weights is used as it is (no warning), and one
      without is named in a warning (its weights are not an average).
    """

    def __init__(self, config: EMAConfig) -> None:
        super().__init__(use_buffers=True, multi_avg_fn=ema_multi_avg_fn(config))
        self.config = config
        self._pending: dict[str, Tensor] | None = None  # a resumed checkpoint's average, until on_fit_start

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing yet: :meth:`on_fit_start` copies the model once it has its final structure."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._average_model = AveragedModel(
            pl_module, device=pl_module.device, use_buffers=True, multi_avg_fn=ema_multi_avg_fn(self.config)
        )
        if self._pending is not None:
            self._average_model.load_state_dict(self._pending)
            self._pending = None

    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        self._check_structure(pl_module)
        super()._swap_models(pl_module)

    def _copy_average_to_current(self, pl_module: pl.LightningModule) -> None:
        self._check_structure(pl_module)
        super()._copy_average_to_current(pl_module)

    def _check_structure(self, pl_module: pl.LightningModule) -> None:
        """Lightning pairs the tensors of the model and of its average by position: they must be the same."""
        assert self._average_model is not None
        average = self._average_model.module
        mine = [(n, t.shape) for n, t in [*pl_module.named_parameters(), *pl_module.named_buffers()]]
        theirs = [(n, t.shape) for n, t in [*average.named_parameters(), *average.named_buffers()]]
        if mine != theirs:
            diff = next((f"{a} / {b}" for a, b in zip(mine, theirs) if a != b), f"{len(mine)} / {len(theirs)} tensors")
            raise RuntimeError(f"model.ema: the model changed since its average was made (model / average: {diff})")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing here: :meth:`on_validation_end` swaps the trained weights back."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._swap_models(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "config": asdict(self.config)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = state_dict["latest_update_step"]

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is not None:  # outside fit the weights are already what the checkpoint held
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        averaged = "current_model_state" in checkpoint and "averaging_state" in checkpoint
        if trainer.state.fn == TrainerFn.FITTING:  # resume the trained weights, and the average at on_fit_start
            if averaged:
                pl_module.load_state_dict(checkpoint["current_model_state"])
                state = {"module." + k: v for k, v in checkpoint["state_dict"].items()} | checkpoint["averaging_state"]
                if self._average_model is not None:  # a strategy that restores after on_fit_start
                    self._average_model.load_state_dict(state)
                else:
                    self._pending = state
            else:
                warnings.warn(
                    f"{trainer.ckpt_path}: the checkpoint has no EMA state (trained without model.ema): the average "
                    "starts from its weights",
                    stacklevel=2,
                )
        elif not averaged:
            warnings.warn(
                f"model.ema is set but {trainer.ckpt_path} was trained without it: its weights are evaluated as "
                "they are (not an average)",
                stacklevel=2,
            )
