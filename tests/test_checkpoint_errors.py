"""Hostile and wrong checkpoints through every path that reads one (``--ckpt_path``, ``export --ckpt``,
``extract --ckpt``): never run, and an error naming the file, what it holds and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from tasks.checkpoint import CheckpointError, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class _WritesMarker:
    """Unpickling this object writes a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _save(module: pl.LightningModule, path: Path) -> Path:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    from tasks.detect import DetectionTask
    from tasks.reid import ReIDTask

    tmp = tmp_path_factory.mktemp("ckpts")
    reid = _save(ReIDTask(num_classes=4, arch="vgg11", width_mult=0.0625), tmp / "reid.ckpt")
    detect = _save(DetectionTask(classes=["a", "b"], arch="vgg11", width_mult=0.0625), tmp / "detect.ckpt")
    # a checkpoint of an earlier version, which did not record its task
    old = torch.load(detect, map_location="cpu", weights_only=True)
    old.pop("task_class")
    torch.save(old, tmp / "detect_old.ckpt")
    marker = tmp / "pwned.txt"
    torch.save({"state_dict": {}, "evil": _WritesMarker(marker)}, tmp / "evil.ckpt")
    (tmp / "empty.ckpt").write_bytes(b"")
    data = reid.read_bytes()
    (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    return {"reid": reid, "detect": detect, "detect_old": tmp / "detect_old.ckpt", "evil": tmp / "evil.ckpt",
            "empty": tmp / "empty.ckpt", "truncated": tmp / "truncated.ckpt", "marker": marker}  # fmt: skip


BAD = {
    "evil": r"refused: it holds Python objects other than tensors",
    "empty": r"empty file \(0 bytes\)",
    "truncated": r"truncated \(\d+ bytes: a zip archive, the container of PyTorch files, whose end is missing\)",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_read_checkpoint_names_the_file_and_never_runs_code(ckpts, kind: str) -> None:
    with pytest.raises(CheckpointError, match=rf"{ckpts[kind].name}: {BAD[kind]}") as err:
        read_checkpoint(ckpts[kind])
    assert "weights_only=False" not in str(err.value)  # never suggest the unsafe way
    assert not ckpts["marker"].exists()


@pytest.mark.parametrize("kind", sorted(BAD))
def test_export_and_extract_refuse_bad_files_by_name(ckpts, kind: str, tmp_path: Path) -> None:
    from tasks.reid import main

    with pytest.raises(CheckpointError, match=rf"{ckpts[kind].name}: {BAD[kind]}"):
        main(["export", "--ckpt", str(ckpts[kind]), "--out", str(tmp_path / "m.onnx")])
    Image.new("RGB", (16, 32)).save(tmp_path / "a.png")
    with pytest.raises(CheckpointError, match=rf"{ckpts[kind].name}: {BAD[kind]}"):
        main(["extract", "--ckpt", str(ckpts[kind]), "--images", str(tmp_path), "--out", str(tmp_path / "e.npz")])
    assert not ckpts["marker"].exists()


def test_a_checkpoint_of_another_task_is_named(ckpts, tmp_path: Path) -> None:
    from tasks.reid import main

    Image.new("RGB", (16, 32)).save(tmp_path / "a.png")
    extract = ["extract", "--images", str(tmp_path), "--out", str(tmp_path / "e.npz"), "--image_size", "[32, 16]"]
    with pytest.raises(
        CheckpointError,
        match=r"detect\.ckpt: a checkpoint of task tasks\.detect\.DetectionTask, family fasterrcnn, arch vgg11, "
        r"expected one of tasks\.reid\.ReIDTask",
    ):
        main([*extract, "--ckpt", str(ckpts["detect"])])
    with pytest.raises(
        CheckpointError, match=r"detect_old\.ckpt: its hyper-parameters \[.*'classes'.*\] are not options"
    ):
        main([*extract, "--ckpt", str(ckpts["detect_old"])])
    with pytest.raises(CheckpointError, match=r"reid\.ckpt: a checkpoint of task tasks\.reid\.ReIDTask"):
        from tasks.detect import main as detect_main

        detect_main(["export", "--ckpt", str(ckpts["reid"]), "--out", str(tmp_path / "m.onnx")])


def test_ckpt_path_of_another_arch_names_the_file_and_the_tensors(ckpts, tmp_path: Path) -> None:
    """A vgg11 checkpoint where the configuration says vgg16: which file, which arch, which tensors."""
    from cli_configs import tiny_segment_config

    from tasks.segment import SegmentationTask, main

    vgg11 = _save(
        SegmentationTask(num_classes=4, family="unet", arch="vgg11", width_mult=0.0625, decoder_channels=[8] * 5),
        tmp_path / "seg_vgg11.ckpt",
    )
    args = ["validate", "--config", str(tiny_segment_config(tmp_path)), "--model.arch", "vgg16"]
    with pytest.raises(
        RuntimeError, match=r"seg_vgg11\.ckpt: its weights do not fit SegmentationTask \(family unet, arch vgg16\): "
    ):
        main([*args, "--ckpt_path", str(vgg11)])
    for kind in BAD:
        with pytest.raises(CheckpointError, match=rf"{ckpts[kind].name}: {BAD[kind]}"):
            main([*args, "--ckpt_path", str(ckpts[kind])])
    with pytest.raises(CheckpointError, match=r"detect\.ckpt: a checkpoint of task tasks\.detect\.DetectionTask"):
        main([*args, "--ckpt_path", str(ckpts["detect"])])
    assert not ckpts["marker"].exists()


def test_read_checkpoint_allows_the_config_dataclasses_in_a_fresh_process(tmp_path: Path) -> None:
    """A checkpoint whose hyper-parameters hold ShapesConfig / MarketConfig / OptimConfig reads in
    a process that imported nothing but tasks.checkpoint (the dataclasses register themselves
    with torch's safe globals on import: read_checkpoint imports them)."""
    from tasks.data.market import MarketConfig
    from tasks.data.shapes import ShapesConfig
    from tasks.optim import OptimConfig

    path = tmp_path / "hp.ckpt"
    hp = {"shapes": ShapesConfig(num_train=3), "market": MarketConfig(), "optim": OptimConfig()}
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": hp}, path)
    code = (
        "import sys; from tasks.checkpoint import read_checkpoint; "
        "hp = read_checkpoint(sys.argv[1])['hyper_parameters']; "
        "print(type(hp['shapes']).__name__, hp['shapes'].num_train, "
        "type(hp['market']).__name__, type(hp['optim']).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["ShapesConfig", "3", "MarketConfig", "OptimConfig"]
