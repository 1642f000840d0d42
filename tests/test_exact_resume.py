"""Exact resume: a real CLI fit killed mid-run (SIGTERM mid-epoch, then ``kill -9``) and resumed with
``--ckpt_path last`` ends with the weights and metrics of the uninterrupted run, bit for bit.

Each task runs three times, 3 epochs each (every run in a subprocess, its own folder): uninterrupted;
then SIGTERM right after the first ``last.ckpt`` (epoch 0's end): the run stops after the next
training batch, mid-epoch, saving ``last.ckpt`` and exiting 143; resumed with ``--ckpt_path last``
and killed with SIGKILL as soon as it has rewritten ``last.ckpt`` (an epoch end); resumed again to
the end. Shuffling (Lightning's distributed sampler seeding, the ReID PK sampler), augmentation
(random crops, flips, erasing, the SSD-style photometric distortion) and the models' random
numbers all have to continue exactly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_configs import REPO, fasterrcnn_fpn_model, quick_trainer, shapes_data, write_config
from PIL import Image
from torch.utils.data import RandomSampler

from tasks.checkpoint import read_checkpoint
from tasks.resume import ResumableSampler, SeededDataset, capture_rng, restore_rng

EPOCHS = 3
TIMEOUT_S = 600


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(module: str, args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 (closed by _wait)
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout and proc.stdout.close()
    return log.read_text()


def _run(module: str, args: list[str], log: Path, expect: int = 0) -> str:
    proc = _start(module, args, log)
    text = _wait(proc, log)
    assert proc.returncode == expect, f"{args}: exit {proc.returncode}, expected {expect}\n{text[-6000:]}"
    return text


def _when_written(path_glob: tuple[Path, str], proc: subprocess.Popen, log: Path, after: int | None = None) -> Path:
    """Wait until a file matching ``root.glob(pattern)`` exists (with an inode other than ``after``)."""
    root, pattern = path_glob
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for p in root.glob(pattern):
            try:
                if after is None or p.stat().st_ino != after:
                    return p
            except FileNotFoundError:
                continue
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before writing {pattern}:\n{log.read_text()[-6000:]}")
        time.sleep(0.01)
    pytest.fail(f"no {pattern} under {root} after {TIMEOUT_S} s")


def _final(root: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """The run's last checkpoint (its progress, state dict) and its latest validation metrics (numbers only)."""
    (ckpt,) = root.glob("**/last.ckpt")
    state = read_checkpoint(ckpt)
    (metrics_file,) = root.glob("**/val_metrics.json")
    metrics = json.loads(metrics_file.read_text())
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float, list)) and k != "time"}
    return {"epoch": state["epoch"], "global_step": state["global_step"]}, state["state_dict"], numbers


def _assert_same_run(a: Path, b: Path) -> None:
    progress_a, weights_a, metrics_a = _final(a)
    progress_b, weights_b, metrics_b = _final(b)
    assert progress_a == progress_b
    assert weights_a.keys() == weights_b.keys()
    differ = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not differ, f"{len(differ)} of {len(weights_a)} tensors differ, e.g. {differ[:5]}"
    assert metrics_a == metrics_b


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (Lightning's DDP launcher starts rank 1 as a child of rank 0)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def _gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # exited, not yet reaped
            return True
        time.sleep(0.05)
    return False


def check_exact_resume(module: str, make_config, tmp: Path, *, extra: tuple[str, ...] = (), kill: bool = True) -> None:
    """Uninterrupted vs. SIGTERM mid-epoch + resume (+ SIGKILL at an epoch end + resume): the same final run.

    ``extra``: more CLI arguments for every run (e.g. 2 DDP processes: the SIGTERM then goes to rank 1 only).
    """
    straight = make_config(tmp / "straight")
    _run(module, ["fit", "--config", str(straight), *extra], tmp / "straight.log")
    steps = _final(tmp / "straight" / "runs")[0]["global_step"]
    batches_per_epoch = steps // EPOCHS
    assert batches_per_epoch >= 3 and steps == EPOCHS * batches_per_epoch

    cfg = make_config(tmp / "stopped")
    fit = ["fit", "--config", str(cfg), *extra]
    root = tmp / "stopped" / "runs"
    proc = _start(module, fit, tmp / "term.log")
    _when_written((root, "**/last.ckpt"), proc, tmp / "term.log")  # epoch 0 has ended
    target = _children(proc.pid) if "ddp" in extra else [proc.pid]
    assert len(target) == 1, target
    os.kill(target[0], signal.SIGTERM)
    text = _wait(proc, tmp / "term.log")
    assert proc.returncode == 143, text[-6000:]
    assert _gone(target[0]), "a process of the run is still running"
    (last,) = root.glob("**/last.ckpt")
    stopped = read_checkpoint(last)
    assert stopped["global_step"] % batches_per_epoch != 0, "the SIGTERM checkpoint is not mid-epoch"
    assert f"resumable checkpoint: {last}" in text
    assert "--ckpt_path last" in text and "(exit status 143)" in text

    if kill:
        log = tmp / "resume1.log"
        proc = _start(module, [*fit, "--ckpt_path", "last"], log)
        _when_written((root, "**/last.ckpt"), proc, log, after=last.stat().st_ino)  # rewritten at an epoch end
        assert proc.poll() is None, "the resumed run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        _wait(proc, log)
        killed = read_checkpoint(last)
        assert stopped["global_step"] < killed["global_step"] < EPOCHS * batches_per_epoch
        assert killed["global_step"] % batches_per_epoch == 0

    text = _run(module, [*fit, "--ckpt_path", "last"], tmp / "resume2.log")
    assert f"resuming from {last}" in text
    _assert_same_run(tmp / "straight" / "runs", root)


# ---------------------------------------------------------------------------- the pieces
def test_the_training_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch() -> None:
    data = list(range(10))
    a, b = ResumableSampler(data, seed=3, batch_size=2), ResumableSampler(data, seed=3, batch_size=2)
    torch.manual_seed(123)  # the global RNG plays no part
    first = list(a)
    torch.manual_seed(456)
    assert list(b) == first and sorted(i for i, _ in first) == data
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(i for i, _ in second) == data
    resumed = ResumableSampler(data, seed=3, batch_size=2, epoch=1, skip_batches=2)
    assert list(resumed) == second[4:]  # the epoch's remaining batches, with their own seeds
    assert list(resumed) == second  # the next iteration of that epoch starts at its beginning


def test_any_sampler_is_dealt_to_the_processes_without_touching_the_global_rng() -> None:
    data = list(range(7))
    state = torch.get_rng_state()
    shares = [ResumableSampler(data, RandomSampler(data), seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    orders = [[i for i, _ in s] for s in shares]
    assert torch.equal(torch.get_rng_state(), state)
    assert len(orders[0]) == len(orders[1]) == 4 and set(orders[0] + orders[1]) == set(data)  # one padded
    assert orders == [[i for i, _ in s] for s in shares]  # the same again: drawn from (seed, epoch)


def test_a_sample_seed_fixes_its_augmentation_and_leaves_the_global_rng_alone() -> None:
    flips = SeededDataset(_RandomPixels())
    torch.manual_seed(1)
    state = torch.get_rng_state()
    one = flips[(3, 12345)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert torch.equal(flips[(3, 12345)], one) and not torch.equal(flips[(3, 54321)], one)


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    np.random.seed(1)
    random.seed(2)
    torch.save({"rng": capture_rng()}, tmp_path / "rng.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


class _RandomPixels(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(4) + index


# ---------------------------------------------------------------------------- configs
def _detect_config(tmp: Path) -> Path:
    shapes = {"num_train": 6, "num_val": 2, "min_image_size": 64, "max_image_size": 80, "max_objects": 2,
              "min_object_size": 16, "max_object_size": 32, "seed": 1}  # fmt: skip
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp, max_epochs=EPOCHS, log_every_n_steps=1),
        "model": fasterrcnn_fpn_model(width_mult=0.0625, warmup_steps=1),
        "data": shapes_data(tmp / "shapes", shapes, hflip=0.5, photometric=0.5),
    }
    return write_config(cfg, tmp / "detect.yaml")


def _reid_config(tmp: Path, num_workers: int = 0) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp, max_epochs=EPOCHS, log_every_n_steps=1),
        "model": {
            "arch": "vgg11_bn", "width_mult": 0.0625, "grid_queries": 0, "max_rank": 5,
            "optim": {"name": "adam", "lr": 0.003, "warmup_steps": 0},
        },
        "data": {
            "root": str(tmp / "market"),
            "synthetic": {
                "num_train_ids": 8, "num_test_ids": 4, "num_cameras": 2, "min_cameras": 2, "max_cameras": 2,
                "max_per_camera": 2, "num_distractors": 2, "num_junk": 1, "height": 32, "width": 16, "seed": 4,
            },
            "image_size": [32, 16], "p": 2, "k": 2, "eval_batch_size": 8, "num_workers": num_workers,
            "random_erasing": 0.5, "pad": 2,
        },
    }  # fmt: skip
    return write_config(cfg, tmp / "reid.yaml")


def _classify_config(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for k in range(3):
            folder = tmp / "tree" / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.full((20, 24), 60 * k, dtype=np.uint8) + rng.integers(0, 50, (20, 24), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp, max_epochs=EPOCHS, log_every_n_steps=1),
        "model": {  # dropout: the model's own random numbers have to go on too
            "arch": [[1, 8], [1, 16]], "fc_channels": 32, "dropout": 0.5,
            "optim": {"name": "sgd", "lr": 0.01, "scheduler": "cosine", "warmup_steps": 2},
        },
        "data": {
            "root": str(tmp / "tree"), "in_channels": 1, "image_size": 16, "resize_size": 20,
            "train_crop": "resize_crop", "hflip": 0.5, "batch_size": 3, "eval_batch_size": 3, "num_workers": 0,
        },
        "test_after_fit": {"enabled": False},
    }  # fmt: skip
    return write_config(cfg, tmp / "classify.yaml")


def _segment_config(tmp: Path) -> Path:
    shapes = {"num_train": 8, "num_val": 2, "min_image_size": 40, "max_image_size": 48, "min_object_size": 10,
              "max_object_size": 20}  # fmt: skip
    cfg = {
        "seed_everything": 0,
        "trainer": quick_trainer(tmp, max_epochs=EPOCHS, log_every_n_steps=1),
        "model": {
            "head": "unet", "arch": "vgg11_bn", "width_mult": 0.0625, "decoder_channels": [8, 8, 8, 8, 8],
            "optim": {"name": "sgd", "lr": 0.01, "warmup_steps": 0},
        },
        "data": shapes_data(tmp / "shapes", shapes, layout="voc", crop_size=32, hflip=0.5, num_workers=1),
    }  # fmt: skip
    return write_config(cfg, tmp / "seg.yaml")


# ---------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_detection_resumes_exactly_after_sigterm_and_sigkill(tmp_path: Path) -> None:
    check_exact_resume("tasks.detect", _detect_config, tmp_path)


@pytest.mark.slow
def test_reid_resumes_exactly_with_loader_workers(tmp_path: Path) -> None:
    check_exact_resume("tasks.reid", lambda t: _reid_config(t, num_workers=2), tmp_path)


@pytest.mark.slow
def test_classification_with_dropout_resumes_exactly_after_sigterm(tmp_path: Path) -> None:
    check_exact_resume("tasks.classify", _classify_config, tmp_path, kill=False)


@pytest.mark.slow
def test_segmentation_resumes_exactly_after_sigterm(tmp_path: Path) -> None:
    check_exact_resume("tasks.segment", _segment_config, tmp_path, kill=False)


@pytest.mark.slow
def test_two_processes_sigterm_to_one_rank_stop_both_and_resume_exactly(tmp_path: Path) -> None:
    """DDP on CPU (gloo): SIGTERM to rank 1 alone stops both processes at the same batch, exit 143; resumed
    with 2 processes, the run ends as the uninterrupted 2-process run (per-rank PK plans and random states)."""
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    check_exact_resume("tasks.reid", _reid_config, tmp_path, extra=ddp, kill=False)


# ---------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize(
    ("sub", "loop", "signum"),
    [
        ("validate", "validation", signal.SIGTERM),
        ("test", "test", signal.SIGINT),
        ("predict", "predict", signal.SIGTERM),
    ],
)
def test_a_signal_stops_evaluation_nonzero_with_nothing_claiming_completion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sub: str, loop: str, signum: int
) -> None:
    """``validate``/``test``/``predict`` signalled at their last batch: no metrics file, no ``_COMPLETE``, exit 128+n.

    (In process: the run's signal handlers are the project's; ``signal_probe`` sends the signal.)
    """
    from tasks.segment import main

    cfg = _segment_config(tmp_path)
    predict_dir = tmp_path / "predict"
    probe = ["--trainer.callbacks+=signal_probe.SignalAt", "--trainer.callbacks.loop", loop]
    probe += ["--trainer.callbacks.signum", str(int(signum)), "--model.predict_dir", str(predict_dir)]
    with pytest.raises(SystemExit) as stop:
        main([sub, "--config", str(cfg), "--data.num_workers", "0", "--data.eval_batch_size", "8", *probe])
    assert stop.value.code == 128 + signum
    message = (
        f"{sub}: stopped by {signal.Signals(signum).name}: incomplete, no metrics or completion marker were written"
    )
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*_metrics.json"))
    assert not (predict_dir / "_COMPLETE").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back


@pytest.mark.parametrize(("accumulate", "signal_at", "steps"), [(1, 1, 2), (2, 0, 1)])
def test_ctrl_c_in_fit_saves_after_the_batch_and_exits_130(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], accumulate: int, signal_at: int, steps: int
) -> None:
    """SIGINT at a training batch: ``last.ckpt`` after it (with gradient accumulation: after the next optimiser
    step, the accumulated gradients are not in a checkpoint), mid-epoch, and exit 130 naming the file."""
    from tasks.segment import main

    cfg = _segment_config(tmp_path)
    probe = ["--trainer.callbacks+=signal_probe.SignalAt", "--trainer.callbacks.loop", "train"]
    probe += ["--trainer.callbacks.batch", str(signal_at), "--trainer.callbacks.signum", str(int(signal.SIGINT))]
    args = [
        "fit",
        "--config",
        str(cfg),
        "--data.num_workers",
        "0",
        "--trainer.accumulate_grad_batches",
        str(accumulate),
    ]
    with pytest.raises(SystemExit) as stop:
        main([*args, *probe])
    assert stop.value.code == 130
    (last,) = tmp_path.glob("runs/**/last.ckpt")
    ckpt = read_checkpoint(last)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, steps)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2  # of 4 batches
    err = capfd.readouterr().err  # the signal notice is written to fd 2
    assert "SIGINT received: saving a checkpoint after the current training batch" in err
    assert f"fit: stopped by SIGINT after batch 2 of epoch 0, step {steps}; resumable checkpoint: {last}" in err
    assert "--ckpt_path last" in err and "(exit status 130)" in err
