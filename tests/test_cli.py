"""``tasks/cli.py``: a toy task through the real CLI: best and true last checkpoints, explicit
arguments over the checkpoint's, the ``export`` subcommand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from tasks.checkpoint import WEIGHTS_IN_CHECKPOINT

REPO = Path(__file__).resolve().parents[1]


_TOY = textwrap.dedent(
    """
    import json, os
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from tasks.core import OptimConfig, TaskDataModule, TaskModule, cli_main

    class Toy(TaskModule):
        def __init__(self, width: int = 4, note: str = "trained", weights_backbone: str | None = None,
                     optim: OptimConfig = OptimConfig(scheduler="none")):
            super().__init__()
            self.save_hyperparameters()
            self.optim = optim
            self.model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def validation_step(self, batch, _):
            # a metric that gets *worse* every epoch, so "best" stays at epoch 0
            self.log("val/score", -float(self.current_epoch), sync_dist=True)
            with open(os.environ["TOY_NOTE"], "w") as f:
                json.dump({"note": self.hparams.note, "width": self.hparams.width,
                           "weights": self.hparams.weights_backbone}, f)

    class ToyData(TaskDataModule):
        def __init__(self, batch_size: int = 4):
            super().__init__(batch_size=batch_size, num_workers=0)
            g = torch.Generator().manual_seed(0)
            self.x = torch.rand(16, 3, 8, 8, generator=g)
            self.y = (self.x[:, 0].mean((1, 2)) > 0.5).long()

        def train_dataloader(self):
            return self.make_loader(TensorDataset(self.x, self.y), train=True)

        def val_dataloader(self):
            return self.make_loader(TensorDataset(self.x, self.y), train=False)

    if __name__ == "__main__":
        cli_main(Toy, ToyData, task="toy", monitor=("val/score", "max"))
    """
)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """A 3-epoch fit of a toy task through the real CLI: (script, run folder, env)."""
    tmp = tmp_path_factory.mktemp("toy")
    script = tmp / "toy.py"
    script.write_text(_TOY)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOY_NOTE=str(tmp / "note.json"))  # fmt: skip
    root = tmp / "run"
    _toy(script, env, "fit", "--model.width", "6", "--model.note", "trained", "--trainer.max_epochs", "3",
         "--model.weights_backbone", "imagenet.pth", "--trainer.default_root_dir", str(root))  # fmt: skip
    return script, root, env


def _toy(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    common = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"] if args[0] != "export" else []
    proc = subprocess.run([sys.executable, str(script), *args, *common], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_keeps_best_and_true_last_checkpoint(toy_run) -> None:
    script, root, _ = toy_run
    ckpts = root / "version_0" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best-000.ckpt", "last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(ckpts / "best-000.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and best["epoch"] == 0  # last is the latest epoch, not the best one
    assert (root / "csv" / "version_0" / "metrics.csv").is_file()  # loggers followed default_root_dir
    assert not (script.parent / "runs").exists()
    assert math.isfinite(float(last["state_dict"]["model.0.weight"].sum()))
    # the pretrained weights are not needed to rebuild from a checkpoint: its state dict replaces them
    assert last["hyper_parameters"]["note"] == "trained"
    assert last["hyper_parameters"]["weights_backbone"] == WEIGHTS_IN_CHECKPOINT


def test_explicit_model_arguments_win_over_the_checkpoint(toy_run) -> None:
    """Lightning 2.6 lets checkpoint hparams override the command line; ours does not."""
    script, root, env = toy_run
    ckpt = str(root / "version_0" / "checkpoints" / "last.ckpt")
    note = Path(env["TOY_NOTE"])
    _toy(script, env, "validate", "--ckpt_path", ckpt, "--trainer.default_root_dir", str(root / "v"))
    # from the checkpoint; its state dict replaces the pretrained weights, which are not fetched again
    assert json.loads(note.read_text()) == {"note": "trained", "width": 6, "weights": WEIGHTS_IN_CHECKPOINT}
    _toy(script, env, "validate", "--ckpt_path", ckpt, "--model.note", "given", "--trainer.default_root_dir",
         str(root / "v"), "--model.weights_backbone", "imagenet.pth")  # fmt: skip
    assert json.loads(note.read_text()) == {"note": "given", "width": 6, "weights": WEIGHTS_IN_CHECKPOINT}
    # a checkpoint that kept naming its weights (they bring their own input normalisation) keeps them
    kept = torch.load(ckpt, map_location="cpu", weights_only=False)
    kept["hyper_parameters"]["weights_backbone"] = "caffe.pth"
    torch.save(kept, root / "kept.ckpt")
    _toy(script, env, "validate", "--ckpt_path", str(root / "kept.ckpt"), "--trainer.default_root_dir", str(root / "v"),
         "--model.weights_backbone", "caffe.pth")  # fmt: skip
    assert json.loads(note.read_text())["weights"] == "caffe.pth"


def test_export_subcommand_writes_onnx_equal_to_the_model(toy_run) -> None:
    import onnxruntime as ort

    script, root, env = toy_run
    ckpt = root / "version_0" / "checkpoints" / "last.ckpt"
    out = root / "toy.onnx"
    proc = _toy(script, env, "export", "--ckpt", str(ckpt), "--out", str(out), "--height", "16", "--width", "20")
    assert "export:" in proc.stdout
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 2))  # fmt: skip
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items()})
    x = torch.rand(3, 3, 24, 28)  # another batch and size than the example: dynamic axes
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), model.eval()(x).detach(), rtol=1e-4, atol=1e-5)
