"""The shared training glue: schedules, parameter groups, atomic writes, the CLI's checkpoints."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from tasks.core import AtomicCheckpointIO, OptimConfig, build_optimizer, gather_unique, lr_factor
from vggbackbone import VGGBackbone
from vggbackbone.utils import atomic_path, atomic_write

REPO = Path(__file__).resolve().parents[1]


def test_warmup_then_step_schedule() -> None:
    cfg = OptimConfig(scheduler="step", milestones=[0.5, 0.75], gamma=0.1, warmup_steps=10, warmup_factor=0.01)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.01)
    assert f[5] == pytest.approx(0.01 * 0.5 + 0.5)  # linear from 0.01 to 1
    assert f[10] == f[49] == 1.0
    assert f[50] == pytest.approx(0.1) and f[74] == pytest.approx(0.1)
    assert f[75] == pytest.approx(0.01) and f[99] == pytest.approx(0.01)


def test_cosine_schedule_reaches_min_ratio() -> None:
    cfg = OptimConfig(scheduler="cosine", min_lr_ratio=0.05, warmup_steps=0)
    assert lr_factor(0, 200, cfg) == pytest.approx(1.0)
    assert lr_factor(100, 200, cfg) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(200, 200, cfg) == pytest.approx(0.05)
    values = [lr_factor(s, 200, cfg) for s in range(201)]
    assert all(a >= b for a, b in zip(values, values[1:]))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = VGGBackbone([(1, 8), (1, 8)], ["conv2"], batch_norm=True, frozen_stages=1)
        self.head = nn.Conv2d(8, 2, 1)


def test_param_groups_no_decay_backbone_mult_and_frozen() -> None:
    net = _Net()
    cfg = OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4, backbone_lr_mult=0.1)
    opt, sched = build_optimizer(net, cfg, total_steps=10)
    seen = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(net.named_parameters())
    # frozen block 1 is not optimised at all
    assert not any(id(p) in seen for n, p in names.items() if n.startswith("backbone.features.conv1"))
    w = names["backbone.features.conv2.conv2_1.weight"]
    bn = names["backbone.features.conv2.bn2_1.weight"]
    bias = names["head.bias"]
    head_w = names["head.weight"]
    assert seen[id(w)]["weight_decay"] == 1e-4 and seen[id(w)]["lr"] == pytest.approx(0.01)
    assert seen[id(bn)]["weight_decay"] == 0.0 and seen[id(bn)]["lr"] == pytest.approx(0.01)
    assert seen[id(bias)]["weight_decay"] == 0.0 and seen[id(bias)]["lr"] == pytest.approx(0.1)
    assert seen[id(head_w)]["weight_decay"] == 1e-4
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


def test_everything_frozen_is_a_clear_error() -> None:
    net = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(net, OptimConfig(), 1)


def test_gather_unique_single_process_keeps_first() -> None:
    assert gather_unique({1: "a", 2: "b"}) == {1: "a", 2: "b"}


def test_atomic_write_keeps_old_file_on_crash(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_checkpoint_io_never_leaves_a_partial_checkpoint(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}

    def exploding_save(obj, f, *a, **k):  # a crash half-way through torch.save
        Path(f).write_bytes(b"\x80partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


_TOY = textwrap.dedent(
    """
    import torch
    from torch.utils.data import TensorDataset
    from tasks.core import OptimConfig, TaskDataModule, TaskModule, cli_main

    class Toy(TaskModule):
        def __init__(self, optim: OptimConfig = OptimConfig(scheduler="none")):
            super().__init__()
            self.save_hyperparameters()
            self.optim = optim
            self.net = torch.nn.Linear(4, 2)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            # a metric that gets *worse* every epoch, so "best" stays at epoch 0
            self.log("val/score", -float(self.current_epoch), sync_dist=True)

    class ToyData(TaskDataModule):
        def __init__(self, batch_size: int = 4):
            super().__init__(batch_size=batch_size, num_workers=0)
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(16, 4, generator=g)
            self.y = (self.x[:, 0] > 0).long()

        def train_dataloader(self):
            return self.make_loader(TensorDataset(self.x, self.y), train=True)

        def val_dataloader(self):
            return self.make_loader(TensorDataset(self.x, self.y), train=False)

    if __name__ == "__main__":
        cli_main(Toy, ToyData, task="toy", monitor=("val/score", "max"))
    """
)


def test_cli_keeps_best_and_true_last_checkpoint(tmp_path: Path) -> None:
    script = tmp_path / "toy.py"
    script.write_text(_TOY)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    root = tmp_path / "run"
    cmd = [sys.executable, str(script), "fit", "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = root / "version_0" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best-000.ckpt", "last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(ckpts / "best-000.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and best["epoch"] == 0  # last is the latest epoch, not the best one
    assert (root / "csv" / "version_0" / "metrics.csv").is_file()  # loggers followed default_root_dir
    assert not (tmp_path / "runs").exists()
    assert math.isfinite(float(last["state_dict"]["net.weight"].sum()))
