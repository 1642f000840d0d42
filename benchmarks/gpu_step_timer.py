"""The timing callback of ``benchmarks/gpu_check.py``: Lightning's training steps, then a plain
PyTorch loop on the same module and batches (named in the fit command as
``--trainer.callbacks+=benchmarks.gpu_step_timer.StepTimer``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from benchmarks.gpu_check import SKIP_STEPS


class StepTimer(pl.Callback):
    """Times Lightning's training steps (between consecutive step ends) and, at the end of fit, a
    plain PyTorch loop on the same module and the same batches; writes both to ``out`` (JSON)."""

    def __init__(self, out: str, plain_steps: int = 30) -> None:
        self.out, self.plain_steps = out, plain_steps
        self.ends: list[float] = []
        self.images: list[int] = []
        self.batches: list[Any] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.images.append(_batch_size(batch))
        if len(self.batches) < self.plain_steps:
            self.batches.append(batch)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        steps = len(self.ends) - 1 - SKIP_STEPS
        seconds = self.ends[-1] - self.ends[SKIP_STEPS] if steps > 0 else float("nan")
        lightning = sum(self.images[SKIP_STEPS + 1 :]) / seconds if steps > 0 else float("nan")
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        plain = plain_loop(pl_module, self.batches, device)
        result = {
            "lightning_images_per_s": lightning,
            "plain_images_per_s": plain,
            "steps": len(self.ends),
            "peak_gib": peak,
        }
        Path(self.out).write_text(json.dumps(result))


def _batch_size(batch: Any) -> int:
    for attr in ("images",):
        if hasattr(batch, attr):
            return len(getattr(batch, attr))
    if isinstance(batch, dict) and "image" in batch:
        return len(batch["image"])
    return 1


def plain_loop(module: pl.LightningModule, batches: list[Any], device: torch.device) -> float:
    """Images/s of ``training_step`` + ``backward`` + ``AdamW.step`` under bf16 autocast on
    ``batches`` (Lightning's logging calls made no-ops: there is no loop to log to)."""
    if len(batches) <= SKIP_STEPS:
        return float("nan")
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    module.__dict__["log"] = lambda *a, **k: None
    module.__dict__["log_dict"] = lambda *a, **k: None
    t0, images = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            if i == SKIP_STEPS:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, images = time.perf_counter(), 0
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = module.training_step(batch, i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += _batch_size(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        module.__dict__.pop("log")
        module.__dict__.pop("log_dict")
    return images / (time.perf_counter() - t0)
