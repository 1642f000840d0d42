"""int8 accuracy on the demos: each task's metric from the int8 model next to the fp32 model's.

    python benchmarks/int8_accuracy.py --tasks reid                     # trains the demo first
    python benchmarks/int8_accuracy.py --tasks reid --ckpt-reid runs/reid/version_0/checkpoints/last.ckpt
    python benchmarks/int8_accuracy.py --tasks reid segment detect --write   # + docs/benchmarks.md

For each task: the demo config ``configs/<task>/demo.yaml`` (trained with ``python -m
tasks.<task> fit`` unless ``--ckpt-<task>`` is given), then ``validate`` twice on the same
checkpoint, in this process: once with the fp32 model, once with the model whose VGG backbone
is quantised to int8 (BatchNorm folded, then :func:`vggbackbone.deploy.quantize_int8`: torchao
PT2E with the x86 inductor quantizer, what ``optimize_for_inference(precision="int8")`` runs).
The metric (ReID rank-1 and mAP, segmentation mIoU, detection AP50, classification top-1) of both, and their
difference (the target: within 0.01); for ReID also the cosine similarity of each
validation embedding to its fp32 counterpart.

Calibration: ``--calibration-images`` (default 64, the most ``inference.calibration_images``
takes) *training* images, evenly spread over the training split, in the form the model's
forward takes in evaluation (ReID: batches of 16 at the eval transform's size; segmentation:
each image normalised and rescaled as ``predict_logits`` feeds the net; detection: lists of 4
``[0, 1]`` images; classification: batches of 16 at the evaluation size).

On a CPU without VNNI/AMX the quantised graph runs uncompiled (``--compile`` off by default):
oneDNN's reference quantise/dequantise kernels give the int8 numbers (equal to the compiled
kernels' up to rounding, ``tests/test_int8.py``), only slower. ``--compile`` lowers it to the
oneDNN int8 convolutions (minutes of compiling on a small CPU).
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, environment_markdown, markdown_table, parse_args, update_section  # noqa: E402
from vggbackbone.deploy import InputCaptured, InputRecorder, fold_batchnorm, quantize_int8  # noqa: E402

SCRIPT = "benchmarks/int8_accuracy.py"
SECTION = "int8 accuracy on the demos"
METRICS = {
    "reid": ("val/rank1", "val/mAP"),
    "segment": ("val/mIoU",),
    "detect": ("val/AP50", "val/AP"),
    "classify": ("val/acc1",),
}
#: what one validate run of each task leaves: metric name -> value, per run key
RESULTS: dict[str, dict[str, float]] = {}


def _spread(n_total: int, n: int) -> list[int]:
    return np.unique(np.linspace(0, n_total - 1, min(n, n_total)).round().astype(int)).tolist()


def calibration_batches(task: str, dm: Any, module: Any, num_images: int) -> list[Any]:
    """``num_images`` training images, in the form the task's model takes in evaluation."""
    if task == "reid":
        from tasks.data.reid import ReIDDataset

        ds = ReIDDataset(dm.read_split("train"), dm.eval_transform)
        images = [ds[i]["image"] for i in _spread(len(ds), num_images)]
        return [torch.stack(images[a : a + 16]) for a in range(0, len(images), 16)]
    if task == "segment":
        ds = dm.dataset(dm.train_split)  # no training transforms: whole images, as evaluated
        recorder = InputRecorder()
        for i in _spread(len(ds), num_images):
            with contextlib.suppress(InputCaptured):  # the net's input in predict_logits (normalised, rescaled)
                module.predict_logits(torch.as_tensor(ds[i]["image"]), recorder)
        return recorder.inputs
    if task == "detect":
        from tasks.data.detection import DetectionDataset

        ds = DetectionDataset(dm.split("train"), train=False)
        images = [ds[i][0] for i in _spread(len(ds), num_images)]
        return [list(images[a : a + 4]) for a in range(0, len(images), 4)]
    if task == "classify":
        ds = dm.dataset(dm.train_split)  # evaluation transforms: images as the model sees them in validation
        images = [ds[i]["image"] for i in _spread(len(ds), num_images)]
        return [torch.stack(images[a : a + 16]) for a in range(0, len(images), 16)]
    raise ValueError(f"unknown task {task!r}")


class Int8Validation(pl.Callback):
    """For ``validate``: swaps ``pl_module.model`` for its int8 version (``precision="int8"``) or
    leaves it (``"fp32"``), and stores the run's metrics in :data:`RESULTS` under ``key``."""

    def __init__(self, task: str, key: str, precision: str, calibration_images: int, compile: bool) -> None:
        self.task, self.key, self.precision = task, key, precision
        self.calibration_images, self.compile = calibration_images, compile
        self.fp32: torch.nn.Module | None = None
        self.info: dict[str, float] = {}

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.precision != "int8":
            return
        start = time.perf_counter()
        self.fp32 = pl_module.model
        batches = calibration_batches(self.task, trainer.datamodule, pl_module, self.calibration_images)
        model = copy.deepcopy(self.fp32).eval()
        fold_batchnorm(model)
        quantize_int8(model, batches, compile=self.compile)
        self.info["calibration images"] = sum(len(b) for b in batches)
        self.info["quantise s"] = time.perf_counter() - start
        if self.task == "reid":
            self.info.update(_embedding_cosine(trainer.datamodule.val_dataloader(), self.fp32, model))
        pl_module.model = model

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fp32 is not None:  # back to the fp32 model before Lightning restores the training mode
            pl_module.model = self.fp32
        RESULTS[self.key] = {k: float(v) for k, v in trainer.callback_metrics.items()} | self.info


def _embedding_cosine(loader: Iterable[Any], fp32: torch.nn.Module, int8: torch.nn.Module) -> dict[str, float]:
    cos = []
    with torch.no_grad():
        for batch in loader:
            if batch["image"].numel():
                a, b = fp32.eval()(batch["image"]), int8(batch["image"])
                cos.append(torch.nn.functional.cosine_similarity(a, b, dim=1))
    c = torch.cat(cos)
    return {"embedding cosine min": float(c.min()), "embedding cosine mean": float(c.mean())}


def train_demo(task: str, work: Path, extra: list[str]) -> Path:
    """``python -m tasks.<task> fit --config configs/<task>/demo.yaml`` into ``work``; its last.ckpt."""
    logs = work / task
    cmd = [sys.executable, "-m", f"tasks.{task}", "fit", "--config", f"configs/{task}/demo.yaml",
           "--trainer.logger.class_path", "pytorch_lightning.loggers.CSVLogger",
           "--trainer.logger.init_args.save_dir", str(logs), "--trainer.enable_progress_bar", "false",
           *extra]  # fmt: skip
    print("training:", " ".join(cmd[1:]), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    # the logger's folder, or where the task's checkpoint callback writes (runs/<task>/version_N)
    found = [
        p for p in [*logs.glob("**/last.ckpt"), *(ROOT / "runs").glob("**/last.ckpt")] if p.stat().st_mtime >= start
    ]
    if not found:
        raise FileNotFoundError(f"no last.ckpt written by {' '.join(cmd[1:])}")
    return max(found, key=lambda p: p.stat().st_mtime)


def validate(task: str, ckpt: Path, key: str, precision: str, args: Any) -> dict[str, float]:
    import importlib
    import json

    main = importlib.import_module(f"tasks.{task}").main
    init = {"task": task, "key": key, "precision": precision}
    init |= {"calibration_images": args.calibration_images, "compile": args.compile}
    callback = {"class_path": f"{__name__}.Int8Validation", "init_args": init}
    main(["validate", "--config", str(ROOT / "configs" / task / "demo.yaml"), "--ckpt_path", str(ckpt),
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          f"--trainer.callbacks=[{json.dumps(callback)}]"])  # fmt: skip
    return RESULTS[key]


def main(argv: list[str] | None = None) -> None:
    def extra(p: Any) -> None:
        p.add_argument("--tasks", nargs="+", default=["reid"], choices=sorted(METRICS))
        for t in METRICS:
            p.add_argument(f"--ckpt-{t}", default=None, help=f"a {t} demo checkpoint (default: train the demo)")
        p.add_argument("--calibration-images", type=int, default=64)
        p.add_argument("--compile", action="store_true", help="compile the int8 graph (oneDNN int8 kernels)")
        p.add_argument("--fit-args", default="", help="extra fit options, e.g. '--trainer.max_epochs 10'")
        p.add_argument("--work", default="runs/int8_accuracy", help="where demos are trained")

    args = parse_args("int8 vs fp32 task metrics on the demos.", argv, extra)
    env = environment(torch.device("cpu"))
    rows = []
    for task in args.tasks:
        ckpt = getattr(args, f"ckpt_{task}") or train_demo(task, ROOT / args.work, args.fit_args.split())
        fp32 = validate(task, Path(ckpt), f"{task}-fp32", "fp32", args)
        int8 = validate(task, Path(ckpt), f"{task}-int8", "int8", args)
        for m in METRICS[task]:
            if m in fp32:
                delta = int8[m] - fp32[m]
                ok = "yes" if abs(delta) <= 0.01 else "**no**"
                rows.append([task, m, f"{fp32[m]:.4f}", f"{int8[m]:.4f}", f"{delta:+.4f}", ok])
        notes = ", ".join(f"{k} {v:.4g}" for k, v in int8.items() if not k.startswith(("val/", "epoch", "step")))
        rows.append([task, "int8 run", "", "", "", notes])
        print(rows[-1], flush=True)
    table = markdown_table(["task", "metric", "fp32", "int8", "int8 - fp32", "within 0.01"], rows)
    print(table)
    command = f"python {SCRIPT} " + " ".join(sys.argv[1:] if argv is None else argv)
    body = "\n\n".join([
        f"Command: `{command.strip()}`",
        environment_markdown(env),
        f"Calibration: {args.calibration_images} training images; int8 graph "
        + ("compiled (oneDNN int8 kernels)." if args.compile else "uncompiled (reference int8 kernels)."),
        table,
    ])  # fmt: skip
    if args.write:
        print(f"updated {update_section(SECTION, body, script=SCRIPT)}")


if __name__ == "__main__":
    main()
