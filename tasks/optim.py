"""Optimiser and learning-rate schedule of every task (``model.optim`` in the task YAML).

* :class:`OptimConfig`: SGD/Adam/AdamW, no weight decay on norms and biases, a backbone
  learning-rate multiplier, linear warm-up then step/multistep/cosine decay, stepped every
  iteration (milestones are fractions of the whole run, so one YAML works for any dataset size);
* :func:`lr_factor`: the closed-form multiplier of the base learning rate at a step;
* :func:`build_optimizer`: the optimiser over a module's trainable parameters and its ``LambdaLR``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["OptimConfig", "build_optimizer", "lr_factor", "lr_scheduler_config", "param_groups"]


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule, as written in the task YAML under ``model.optim``.

    Args:
        name: ``sgd`` (momentum), ``adam`` or ``adamw``.
        lr: peak learning rate (after warm-up).
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        betas: Adam/AdamW betas.
        weight_decay: L2 / decoupled weight decay.
        no_decay_norm_bias: no weight decay on biases and normalisation parameters.
        backbone_lr_mult: learning-rate factor for the parameters of the module named
            ``backbone_prefix`` (pretrained backbones often train slower).
        backbone_prefix: module name of the backbone (parameters named ``<prefix>.*``). The
            default ``backbone`` means "the task's backbone": a :class:`TaskModule` maps it to
            its ``backbone_path`` (``model.backbone``, or the VGG body of a detector's FPN).
        scheduler: ``none`` (constant), ``step``/``multistep`` (x ``gamma`` at each milestone),
            ``cosine`` (to ``min_lr_ratio * lr``), or ``plateau`` (x ``gamma`` when the epoch
            metric ``plateau_monitor`` has not improved for ``plateau_patience`` evaluations:
            ``torch.optim.lr_scheduler.ReduceLROnPlateau``, stepped after each validation; no warm-up).
        milestones: fractions of the total number of optimiser steps at which ``step``
            decays (the Faster R-CNN VOC07 recipe, 50k of 60k iterations, is ``[0.833]``).
        gamma: decay factor of ``step``.
        min_lr_ratio: final learning rate of ``cosine`` as a fraction of ``lr``.
        warmup_steps: linear warm-up iterations from ``warmup_factor * lr``.
        warmup_factor: starting factor of the warm-up.
        plateau_monitor: logged metric ``plateau`` watches (``val/acc1``, ``val/loss``...).
        plateau_mode: ``max`` (accuracy) or ``min`` (loss).
        plateau_patience: evaluations without improvement before the learning rate drops.
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = True
    backbone_lr_mult: float = 1.0
    backbone_prefix: str = "backbone"
    scheduler: Literal["none", "step", "multistep", "cosine", "plateau"] = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.75])
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    plateau_monitor: str = "val/loss"
    plateau_mode: Literal["min", "max"] = "min"
    plateau_patience: int = 2


# Hyper-parameters of a task or data module built in Python (not from YAML) hold these dataclasses
# themselves: allow them in torch.load(weights_only=True), which every checkpoint load here uses.


# Hyper-parameters of a task built in Python (not from YAML) hold this dataclass itself: allow it
# in torch.load(weights_only=True), which every checkpoint load here uses.
torch.serialization.add_safe_globals([OptimConfig])


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Parameter groups: (no weight decay?, backbone?) -> weight decay and learning rate of each."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    no_decay: set[str] = set()
    if cfg.no_decay_norm_bias:
        for mname, m in model.named_modules():
            for pname, _ in m.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if isinstance(m, norm_types) or pname == "bias":
                    no_decay.add(full)
    prefix = cfg.backbone_prefix.rstrip(".") + "."
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name in no_decay, name.startswith(prefix))
        groups.setdefault(key, []).append(p)
    out = []
    for (nd, bb), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "weight_decay": 0.0 if nd else cfg.weight_decay,
                "lr": cfg.lr * (cfg.backbone_lr_mult if bb else 1.0),
            }
        )
    return out


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    total = max(1, total_steps)
    if cfg.scheduler in ("step", "multistep"):
        decay = cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
    elif cfg.scheduler == "cosine":
        t = min(1.0, max(0, step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    else:  # none; plateau's decays are ReduceLROnPlateau's, not a function of the step
        decay = 1.0
    return warm * decay


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau]:
    """Optimiser over ``model``'s trainable parameters and a per-step ``LambdaLR``
    (``scheduler: plateau``: a ``ReduceLROnPlateau``, see :func:`lr_scheduler_config`)."""
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    if cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    elif cfg.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    if cfg.scheduler == "plateau":
        if cfg.warmup_steps:
            # LambdaLR would recompute the lr from the base lr every step and undo the plateau's drops
            raise ValueError("scheduler: plateau takes no warm-up (set warmup_steps: 0)")
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=cfg.plateau_mode, factor=cfg.gamma, patience=cfg.plateau_patience
        )
        return opt, plateau
    # LambdaLR rather than SequentialLR(LinearLR, ...): one closed-form factor is resumable
    # from any step and has no chained-scheduler edge cases.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
    return opt, sched


def lr_scheduler_config(sched: Any, cfg: OptimConfig) -> dict[str, Any]:
    """Lightning's scheduler dict: every step for ``LambdaLR``; after each validation, on
    ``cfg.plateau_monitor``, for ``plateau`` (Lightning raises naming the metric if it is not logged)."""
    if cfg.scheduler == "plateau":
        return {"scheduler": sched, "interval": "epoch", "frequency": 1, "monitor": cfg.plateau_monitor}
    return {"scheduler": sched, "interval": "step", "frequency": 1}


#: ``weights_backbone`` of a model rebuilt from a checkpoint: build it as the pretrained model it
