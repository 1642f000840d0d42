"""ReID training: the losses go down on the real pipeline; the center loss follows its rule."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from tasks.core import OptimConfig
from tasks.data.market import MarketConfig
from tasks.data.reid import ReIDDataModule
from tasks.reid import CenterLoss, ReIDTask

TINY = MarketConfig(
    num_train_ids=6, num_test_ids=5, num_cameras=3, min_cameras=2, max_cameras=3, max_per_camera=3,
    num_distractors=3, num_junk=2, height=32, width=16, seed=3,
)  # fmt: skip


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_loss_goes_down_and_num_classes_come_from_the_data(tmp_path):
    pl.seed_everything(0)  # other tests in the same worker must not decide the initialisation
    dm = ReIDDataModule(root=str(tmp_path / "market"), synthetic=TINY, image_size=(32, 16), p=3, k=2,
                        num_workers=0, random_erasing=0.0)  # fmt: skip
    task = ReIDTask(arch="vgg11_bn", width_mult=0.125, center_weight=5e-4,
                    optim=OptimConfig(name="adam", lr=3e-3, weight_decay=0.0, scheduler="none"))  # fmt: skip
    assert task.model.num_classes == 0
    rec = _Losses()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=120, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[rec], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, datamodule=dm)  # prepare_data generates the synthetic set
    assert (tmp_path / "market" / "bounding_box_train").is_dir()
    assert task.model.num_classes == 6 and task.hparams.num_classes == 6
    assert task.center is not None and task.center.centers.abs().sum() > 0
    first, last = sum(rec.losses[:8]) / 8, sum(rec.losses[-8:]) / 8
    assert len(rec.losses) == 120 and last < 0.7 * first, (first, last)


def test_center_loss_update_rule():
    c = CenterLoss(num_classes=2, dim=3, alpha=0.5)
    f = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [4.0, 4.0, 4.0]])
    y = torch.tensor([0, 0, 1])
    loss = c(f, y)
    assert loss.item() == pytest.approx(0.5 * (14 + 14 + 48) / 3)
    # c_j -= alpha * sum(c_j - f_i) / (1 + n_j), from c = 0
    torch.testing.assert_close(c.centers[0], 0.5 * (f[0] + f[1]) / 3)
    torch.testing.assert_close(c.centers[1], 0.5 * f[2] / 2)
    c.eval()
    before = c.centers.clone()
    c(f, y)
    assert torch.equal(c.centers, before)  # no update in eval


def test_backbone_lr_mult_reaches_the_backbone():
    task = ReIDTask(arch="vgg11_bn", width_mult=0.125, num_classes=4,
                    optim=OptimConfig(name="adam", lr=0.1, backbone_lr_mult=0.1, warmup_steps=0))  # fmt: skip
    opt = task.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    backbone = {id(p) for p in task.model.backbone.parameters()}
    assert backbone and all(lr_of[i] == pytest.approx(0.01) for i in backbone)
    assert all(lr == pytest.approx(0.1) for i, lr in lr_of.items() if i not in backbone)
    assert any(i not in backbone for i in lr_of)  # the head has its own parameters


def test_empty_training_batch_gives_a_zero_loss_on_every_parameter():
    task = ReIDTask(arch="vgg11_bn", width_mult=0.125, num_classes=4)
    batch = {
        "image": torch.empty(0),
        "pid": torch.empty(0, dtype=torch.long),
        "skipped": [("x.jpg", "image file is empty")],
    }
    task.on_train_batch_start(batch, 0)  # TaskModule counts every batch's readable and skipped images
    loss = task.training_step(batch, 0)
    assert loss.item() == 0.0
    loss.backward()  # every process joins DDP's gradient all-reduce, with zeros
    assert all(p.grad is not None and not p.grad.any() for p in task.parameters() if p.requires_grad)
    assert [s.path for s in task.train_skips.items] == ["x.jpg"]  # still counted for the epoch's warning
    assert task.train_skips.readable == 0 and task.eval_skips.items == []  # training and evaluation apart
