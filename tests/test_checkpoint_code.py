"""Nothing in a checkpoint is ever resolved to code: hyper-parameters that would make jsonargparse or
Lightning import a module (``class_path``/``init_args`` anywhere, ``_class_path``, a YAML string holding
one, a string where the parser reads a config file) are refused naming the file and the key, before
any parsing, through every path that reads a checkpoint: ``--ckpt_path`` of fit/validate/test/predict,
``export --ckpt``, ``reid extract --ckpt``, ``load_task``.

Each hostile checkpoint names a module written into the test's ``tmp_path`` whose import writes a
marker file; the marker must never appear. The checkpoints are edited copies of a real one (a tiny
segmentation ``fit``, or a ReID task saved by a trainer).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from cli_configs import REPO, tiny_segment_config
from PIL import Image

from tasks.checkpoint import CheckpointError, load_task, read_checkpoint

MODULE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("imported: code from a checkpoint ran")


class Evil:
    def __init__(self, *args, **kwargs):
        Path({marker!r}).write_text("instantiated")
"""


def _marker_module(folder: Path) -> tuple[str, Path]:
    """A module in ``folder`` (a fresh name, never imported before) whose import writes a marker file."""
    name = f"evil_{uuid.uuid4().hex[:8]}"
    marker = folder / f"{name}.imported"
    (folder / f"{name}.py").write_text(MODULE_CODE.format(marker=str(marker)))
    return name, marker


def _edited(src: Path, dst: Path, **hparams: Any) -> Path:
    """``src`` with its ``hyper_parameters`` updated by ``hparams`` (written with torch.save, as a stranger would)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"].update(hparams)
    torch.save(ckpt, dst)
    return dst


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(config, last.ckpt)`` of a real one-step segmentation fit."""
    from tasks.segment import main

    tmp = tmp_path_factory.mktemp("seg")
    cfg = tiny_segment_config(tmp)
    main(["fit", "--config", str(cfg), "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"])
    (last,) = (tmp / "runs").rglob("last.ckpt")
    return cfg, last


def _hostile(kind: str, module: str) -> dict[str, Any]:
    """Hyper-parameters that name ``module`` in each way the parser or Lightning would resolve."""
    return {
        "class_path": {"normalization": {"class_path": f"{module}.Evil"}},
        "init_args": {"decoder_use_norm": {"init_args": {"x": 1}, "class_path": f"{module}.Evil"}},
        "yaml_string": {"normalization": f"{{class_path: {module}.Evil}}"},
        "nested_list": {"head_kwargs": {"layers": [{"class_path": f"{module}.Evil"}]}},
        "lightning_instantiator": {
            "_instantiator": "pytorch_lightning.cli.instantiate_module",
            "normalization": {"class_path": f"{module}.Evil"},
        },
        "_class_path": {"_class_path": f"{module}.Evil"},
    }[kind]


KEY = {
    "class_path": r"hyper_parameters\.normalization\.class_path",
    "init_args": r"hyper_parameters\.decoder_use_norm\.(class_path|init_args)",
    "yaml_string": r"hyper_parameters\.normalization\.class_path: .* \(in the YAML string",
    "nested_list": r"hyper_parameters\.head_kwargs\.layers\[0\]\.class_path",
    "lightning_instantiator": r"hyper_parameters\.normalization\.class_path",
    "_class_path": r"hyper_parameters\._class_path",
}


def _env(extra: Path) -> dict[str, str]:
    path = os.pathsep.join([str(REPO), str(extra), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


@pytest.mark.parametrize("sub", ["validate", "fit"])
def test_ckpt_path_never_imports_what_a_checkpoint_names(seg_run, tmp_path: Path, sub: str) -> None:
    """The CLI in a subprocess, the marker module on its PYTHONPATH: refused naming file and key, never imported."""
    cfg, last = seg_run
    module, marker = _marker_module(tmp_path)
    evil = _edited(last, tmp_path / "evil.ckpt", **_hostile("class_path", module))
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.segment", sub, "--config", str(cfg), "--ckpt_path", str(evil)],
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    assert not marker.exists(), f"{sub} imported {module}: {marker.read_text()}"
    assert f"{evil}: refused: hyper_parameters.normalization.class_path: '{module}.Evil' names code" in proc.stderr
    assert "nothing a checkpoint names is imported or run" in proc.stderr


@pytest.mark.parametrize("kind", sorted(KEY))
@pytest.mark.parametrize("sub", ["test", "predict"])
def test_every_hostile_form_is_refused_by_key(seg_run, tmp_path: Path, monkeypatch, sub: str, kind: str) -> None:
    from tasks.segment import main

    cfg, last = seg_run
    module, marker = _marker_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    evil = _edited(last, tmp_path / "evil.ckpt", **_hostile(kind, module))
    with pytest.raises(CheckpointError, match=rf"evil\.ckpt: refused: {KEY[kind]}"):
        main([sub, "--config", str(cfg), "--ckpt_path", str(evil)])
    assert not marker.exists() and module not in sys.modules


def test_a_string_where_the_parser_reads_a_config_file_is_refused(seg_run, tmp_path: Path) -> None:
    """``optim`` is a group: jsonargparse reads a string there as a YAML file (which may hold a class_path)."""
    from tasks.segment import main

    cfg, last = seg_run
    sub_config = tmp_path / "optim.yaml"
    sub_config.write_text("lr: 123.0\n")
    evil = _edited(last, tmp_path / "evil.ckpt", optim=str(sub_config))
    with pytest.raises(CheckpointError, match=r"hyper_parameters\.optim: the string .*optim\.yaml' would be read as"):
        main(["validate", "--config", str(cfg), "--ckpt_path", str(evil)])


def test_the_legit_checkpoint_still_loads_everywhere(seg_run) -> None:
    from tasks.segment import SegmentationTask, main

    cfg, last = seg_run
    main(["validate", "--config", str(cfg), "--ckpt_path", str(last), "--trainer.limit_val_batches", "1"])
    module = load_task(SegmentationTask, last)
    assert module.hparams["family"] == "unet"


def test_a_checkpoints_dataclasses_reach_the_parser_as_mappings(seg_run, tmp_path: Path) -> None:
    """The checkpoint stores ``optim`` as an ``OptimConfig``; with no ``model.optim`` in the config it must still
    rebuild (given to the parser as an instance, it failed at instantiation or when the config was saved)."""
    import yaml

    from tasks.segment import main

    cfg, last = seg_run
    config = yaml.safe_load(cfg.read_text())
    del config["model"]["optim"]
    bare = tmp_path / "no_optim.yaml"
    bare.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    main(["validate", "--config", str(bare), "--ckpt_path", str(last), "--trainer.limit_val_batches", "1",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(runs)])  # fmt: skip
    assert (runs / "val_metrics.json").is_file()


def _reid_ckpt(path: Path) -> Path:
    from tasks.reid import ReIDTask

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(ReIDTask(num_classes=4, arch="vgg11", width_mult=0.0625))
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("kind", ["lightning_instantiator", "class_path", "_class_path"])
def test_export_extract_and_load_task_never_import_what_a_checkpoint_names(tmp_path: Path, monkeypatch, kind) -> None:
    """``load_from_checkpoint`` runs a checkpoint's ``_instantiator`` (Lightning's parses the hyper-parameters
    with jsonargparse): load_task never lets it, and refuses the checkpoint before Lightning reads it."""
    from tasks.reid import ReIDTask, main

    module, marker = _marker_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    evil = _edited(_reid_ckpt(tmp_path / "reid.ckpt"), tmp_path / "evil.ckpt", **_hostile(kind, module))
    match = rf"evil\.ckpt: refused: {KEY[kind]}"
    with pytest.raises(CheckpointError, match=match):
        load_task(ReIDTask, evil)
    with pytest.raises(CheckpointError, match=match):
        main(["export", "--ckpt", str(evil), "--out", str(tmp_path / "m.onnx")])
    Image.new("RGB", (16, 32)).save(tmp_path / "a.png")
    with pytest.raises(CheckpointError, match=match):
        main(["extract", "--ckpt", str(evil), "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "e.npz")])
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(evil)
    assert not marker.exists() and module not in sys.modules


def test_load_task_builds_without_a_checkpoints_instantiator(tmp_path: Path) -> None:
    """Lightning's own ``_instantiator`` (written by a LightningCLI module) is inert: the task is built by
    its ``__init__`` from the plain hyper-parameters, as without it."""
    from tasks.reid import ReIDTask

    ckpt = _edited(_reid_ckpt(tmp_path / "reid.ckpt"), tmp_path / "inst.ckpt",
                   _instantiator="pytorch_lightning.cli.instantiate_module")  # fmt: skip
    module = load_task(ReIDTask, ckpt)
    assert isinstance(module, ReIDTask) and module.model.num_classes == 4
    other = _edited(ckpt, tmp_path / "other.ckpt", _instantiator="os.system")
    with pytest.raises(CheckpointError, match=r"hyper_parameters\._instantiator: 'os\.system' names code"):
        load_task(ReIDTask, other)
