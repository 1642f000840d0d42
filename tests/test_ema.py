"""Model EMA (``model.ema``, :mod:`tasks.ema`): the average follows torch/timm's formula, resumes bit for bit,
is what evaluation, checkpoints, ``predict`` and ``export`` use; off by default."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from tasks import cli
from tasks.checkpoint import load_task, read_checkpoint
from tasks.classify import ClassificationTask
from tasks.ema import EMAConfig, ModelEMA, ema_decay, ema_multi_avg_fn
from tasks.optim import OptimConfig
from tasks.resume import ExactResume, ResumableSampler, SeededDataset

TINY = {"arch": "vgg11_bn", "width_mult": 0.0625, "fc_channels": 16, "dropout": 0.0}


class _Images(Dataset):
    """8 fixed random 32x32 images in [0, 1] with labels 0..3, in the classification batch form."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(8, 3, 32, 32, generator=g)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": i % 4, "path": f"{i}.png", "index": i}


def _loader() -> DataLoader:
    """Shuffled, resumable mid-epoch (the training data of every task: :mod:`tasks.resume`)."""
    images = _Images()
    return DataLoader(SeededDataset(images), batch_size=2, sampler=ResumableSampler(images, batch_size=2))


def _task(ema: EMAConfig | None) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(num_classes=4, ema=ema, optim=OptimConfig(name="sgd", lr=0.5, scheduler="none"), **TINY)


def _trainer(root: Path, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        deterministic=True,
        callbacks=[ExactResume()],
    )


def _ema_callback(trainer: pl.Trainer) -> ModelEMA:
    return next(c for c in trainer.callbacks if isinstance(c, ModelEMA))


def _averaged(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    model = _ema_callback(trainer)._average_model
    assert model is not None
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_decay_is_timms_warmup_and_integer_buffers_are_copied() -> None:
    cfg = EMAConfig(decay=0.9, warmup=True, warmup_gamma=1.0, warmup_power=0.5)
    assert ema_decay(cfg, 3) == pytest.approx(1 - 4**-0.5)  # 0.5 < 0.9
    assert ema_decay(cfg, 1000) == 0.9
    assert ema_decay(EMAConfig(decay=0.9, warmup=False), 1) == 0.9
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([10])]
    fn = ema_multi_avg_fn(EMAConfig(decay=0.75, warmup=False))
    fn([ema[0]], [torch.tensor([5.0, 6.0])], torch.tensor(1))
    fn([ema[1]], [torch.tensor([14])], torch.tensor(1))
    assert ema[0].tolist() == [2.0, 3.0] and ema[1].tolist() == [14]  # 0.75*1 + 0.25*5; the integer copied


def test_off_by_default_and_no_callback() -> None:
    task = _task(None)
    assert task.ema is None and task.hparams["ema"] is None
    assert not any(isinstance(c, ModelEMA) for c in task.configure_callbacks())


def test_ema_of_two_steps_by_hand_and_the_checkpoint_holds_the_average(tmp_path: Path) -> None:
    cfg = EMAConfig(decay=0.5, warmup=False)
    task = _task(cfg)
    start = {k: v.clone() for k, v in task.state_dict().items()}
    seen: list[dict[str, torch.Tensor]] = []

    class Record(pl.Callback):  # the trained weights after each optimiser step, before the EMA callback's update
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            seen.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer = _trainer(tmp_path, 2)
    trainer.callbacks.insert(0, Record())
    trainer.fit(task, train_dataloaders=_loader())
    # after fit, the task holds the average: copy of step 1, then 0.5 * it + 0.5 * step 2 (floats)
    key = "model.fc8.weight" if "model.fc8.weight" in start else next(k for k in start if k.endswith("weight"))
    expected = 0.5 * seen[0][key] + 0.5 * seen[1][key]
    assert torch.allclose(task.state_dict()[key], expected, atol=0, rtol=1e-6)
    assert not torch.equal(expected, seen[1][key])  # the average is not the trained weights
    bn = next(k for k in start if k.endswith("num_batches_tracked"))
    assert int(task.state_dict()[bn]) == 2  # copied, not averaged (timm)
    # a checkpoint written during fit stores the average as its weights, the trained ones beside
    trainer.save_checkpoint(tmp_path / "t.ckpt")
    ckpt = read_checkpoint(tmp_path / "t.ckpt")
    assert torch.equal(ckpt["state_dict"][key], task.state_dict()[key])
    assert torch.equal(ckpt["current_model_state"][key], task.state_dict()[key])  # after fit: both the average
    assert int(ckpt["averaging_state"]["n_averaged"]) == 2


def test_resume_continues_the_average_bit_for_bit(tmp_path: Path) -> None:
    cfg = EMAConfig(decay=0.9, warmup=True)
    whole = _trainer(tmp_path / "a", 4)
    whole.fit(_task(cfg), train_dataloaders=_loader())
    expected = _averaged(whole)

    # the same run, checkpointed after step 2 (as last.ckpt is, from inside fit), resumed from there
    first = _trainer(tmp_path / "b", 4)
    first.callbacks.append(ModelCheckpoint(tmp_path / "b", "{step}", every_n_train_steps=2, save_top_k=-1))
    first.fit(_task(cfg), train_dataloaders=_loader())
    assert all(torch.equal(_averaged(first)[k], v) for k, v in expected.items())
    ckpt = tmp_path / "b" / "step=2.ckpt"
    stored = read_checkpoint(ckpt)
    assert not torch.equal(stored["state_dict"]["model.fc8.weight"], stored["current_model_state"]["model.fc8.weight"])
    resumed = _trainer(tmp_path / "c", 4)
    resumed.fit(_task(cfg), train_dataloaders=_loader(), ckpt_path=ckpt, weights_only=True)
    got = _averaged(resumed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), [
        k for k in expected if not torch.equal(got[k], expected[k])
    ]


def test_validation_uses_the_average_and_export_predict_load_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = EMAConfig(decay=0.9, warmup=False)
    task = _task(cfg)
    metrics: list[torch.Tensor] = []

    class Probe(pl.Callback):  # what the model holds while validation runs, and after it
        def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any) -> None:
            metrics.append(pl_module.model.fc8.weight.detach().clone())

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=3,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=[Probe(), ModelCheckpoint(tmp_path, "e", every_n_train_steps=3)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, train_dataloaders=_loader(), val_dataloaders=_loader())
    averaged = _averaged(trainer)["module.model.fc8.weight"]
    assert torch.equal(metrics[0], averaged)  # validation ran with the averaged weights
    # the checkpoint written during fit holds the average as its weights, the trained ones beside
    ckpt = read_checkpoint(tmp_path / "e.ckpt")
    assert torch.equal(ckpt["state_dict"]["model.fc8.weight"], averaged)
    assert not torch.equal(ckpt["current_model_state"]["model.fc8.weight"], averaged)
    loaded = load_task(ClassificationTask, tmp_path / "e.ckpt")  # what predict/extract build from the checkpoint
    assert torch.equal(loaded.model.fc8.weight, averaged)
    assert loaded.ema == cfg  # the option travels with the checkpoint
    # export writes the averaged network: export_main hands the exporter the average's, not the trained weights
    handed: list[torch.nn.Module] = []
    monkeypatch.setattr(cli, "export_task_onnx", lambda model, out, *a, **k: handed.append(model) or Path(out))
    cli.export_main(ClassificationTask, "classify", ["--ckpt", str(tmp_path / "e.ckpt"), "--out", "m.onnx"])
    raw = _task(None)
    raw.load_state_dict(ckpt["current_model_state"])
    x = _Images().images[:2]
    with torch.no_grad():
        assert torch.equal(handed[0](x), loaded.eval()(x))
        assert not torch.allclose(handed[0](x), raw.eval()(x), atol=1e-5)


class _IdentityData(pl.LightningDataModule):
    """4 identities x 2 images of 64x32: the classifier's size comes from here, in the task's ``setup``."""

    num_classes = 4

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        images, pids = torch.rand(8, 3, 64, 32, generator=g), torch.arange(8) % 4
        items = [{"image": images[i], "pid": pids[i], "camid": 0} for i in range(8)]
        return DataLoader(items, batch_size=8)


def test_reid_averages_the_classifier_sized_by_setup(tmp_path: Path) -> None:
    """ReID sizes its classifier in ``setup``, after the callbacks' ``setup``: the average is made after it."""
    from tasks.reid import ReIDTask

    torch.manual_seed(0)
    task = ReIDTask(arch="vgg11", width_mult=0.0625, ema={"decay": 0.5, "warmup": False})
    assert task.model.num_classes == 0
    trainer = _trainer(tmp_path, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, datamodule=_IdentityData())
    averaged = _averaged(trainer)
    assert averaged["module.model.classifier.weight"].shape == (4, task.model.embedding_dim)
    assert int(averaged["n_averaged"]) == 2
