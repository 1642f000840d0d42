"""GPU check: one command that measures training and inference on one CUDA GPU in a few minutes.

    python benchmarks/gpu_check.py --out results/gpu_check.json     # under 10 minutes on one H100

Prints and writes (JSON at ``--out``):

* **training** per task (``configs/<task>/demo.yaml``, ``bf16-mixed``, one epoch on CUDA): images/s
  of our Lightning loop (``python -m tasks.<task> fit``, timed by ``StepTimer`` between step
  ends, the first steps dropped) and of a plain PyTorch loop on the same model and the same
  batches right after (the task's own ``training_step`` under ``torch.autocast(bfloat16)``,
  ``backward``, ``AdamW.step``; :mod:`benchmarks.gpu_step_timer`), the peak GPU memory, and the
  demo's validation metrics after that one epoch;
* **inference** images/s of the VGG16 backbone and every task model at its real input size
  (``benchmarks/end_to_end.py``'s): fp32, bf16, fp16 (``optimize_for_inference``) and bf16
  compiled (``compile=True``), interleaved medians, with the peak memory of each.

Without CUDA it prints why, writes ``{"cuda": false, ...}`` and exits 0 at once (CI runs it so).
``--cpu-smoke`` runs the same code on the CPU with tiny models, 3 training steps and no fp16 /
compile rows: it checks the script, not the machine. Any row that fails is recorded with its
error and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Training steps dropped before the Lightning loop's and the plain loop's step times count.
SKIP_STEPS = 3
TASKS = ("detect", "segment", "reid", "classify")


def train_task(task: str, tmp: Path, smoke: bool) -> dict[str, Any]:
    """``python -m tasks.<task> fit`` on its demo config for one epoch (bf16-mixed on CUDA), with
    :class:`StepTimer`; its timings, peak memory and the validation metrics after the epoch."""
    root = tmp / task
    timings = root / "train_timing.json"
    args = [
        sys.executable,
        "-m",
        f"tasks.{task}",
        "fit",
        "--config",
        str(ROOT / "configs" / task / "demo.yaml"),
        "--trainer.max_epochs",
        "1",
        "--trainer.check_val_every_n_epoch",
        "1",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+=benchmarks.gpu_step_timer.StepTimer",
        "--trainer.callbacks.out",
        str(timings),
    ]
    if smoke:
        args += [
            "--trainer.accelerator",
            "cpu",
            "--trainer.limit_train_batches",
            str(SKIP_STEPS + 3),
            "--trainer.limit_val_batches",
            "1.0" if task == "reid" else "2",  # ReID ranks the query against the whole gallery
            "--trainer.callbacks.plain_steps",
            str(SKIP_STEPS + 2),
        ]
    else:
        args += ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tasks.{task} fit exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(timings.read_text())
    result["epoch_s"] = time.perf_counter() - t0
    metrics = sorted(root.rglob("val_metrics.json"))
    result["val_metrics"] = json.loads(metrics[-1].read_text()) if metrics else None
    return result


def inference_rows(device: torch.device, smoke: bool, repeats: int) -> list[dict[str, Any]]:
    """Images/s of the backbone and every task model in fp32 / bf16 / fp16 / bf16 compiled."""
    from benchmarks.common import time_interleaved
    from benchmarks.end_to_end import Spec, specs
    from vggbackbone import VGGBackbone, optimize_for_inference

    models = {
        "backbone": Spec(
            "VGG16 backbone (conv taps)",
            lambda: VGGBackbone("vgg16", ["conv3", "conv4", "conv5"], width_mult=0.0625 if smoke else 1.0),
            (2, 64, 64) if smoke else (32, 224, 224),
        )
    }
    models.update(specs(quick=smoke))
    variants = {"fp32": ("fp32", False), "bf16": ("bf16", False)}
    if not smoke:
        variants.update({"fp16": ("fp16", False), "bf16 compiled": ("bf16", True)})
    rows = []
    for key, spec in models.items():
        torch.manual_seed(0)
        model = spec.build().eval()
        n, h, w = spec.shape
        x: Any = (
            [torch.rand(3, h, w, device=device) for _ in range(n)]
            if spec.detector
            else torch.rand(n, 3, h, w, device=device)
        )
        for name, (precision, compile) in variants.items():
            row = {"model": key, "input": "x".join(map(str, spec.shape)), "variant": name}
            try:
                fast = optimize_for_inference(model, precision=precision, compile=compile, device=device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                timing = time_interleaved({name: lambda f=fast, x=x: f(x)}, device, repeats=repeats, warmup=2)[name]
                row.update(images_per_s=n / timing.median, first_call_s=timing.first)
                if device.type == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            except Exception as e:  # recorded, reported, and the exit status says so
                row["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--cpu-smoke", action="store_true", help="run every row on the CPU, tiny (checks the script)")
    p.add_argument("--tasks", default=",".join(TASKS), help="training rows for these tasks")
    p.add_argument("--repeats", type=int, default=10, help="timed inference calls per row (median)")
    args = p.parse_args(argv)
    out = Path(args.out)
    report: dict[str, Any] = {"cuda": torch.cuda.is_available(), "torch": torch.__version__}
    if not torch.cuda.is_available() and not args.cpu_smoke:
        report["skipped"] = "no CUDA device: every GPU row skipped (run this on a GPU machine)"
        print(f"gpu_check: {report['skipped']}")
        out.write_text(json.dumps(report, indent=1))
        return 0
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda")
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are fp32
    failed = 0
    report["training"] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for task in [t for t in args.tasks.split(",") if t]:
            try:
                report["training"][task] = train_task(task, Path(tmp), args.cpu_smoke)
            except Exception:
                report["training"][task] = {"error": traceback.format_exc(limit=3)}
                failed += 1
            print(f"training {task}: {json.dumps(report['training'][task])[:600]}", flush=True)
    report["inference"] = inference_rows(device, args.cpu_smoke, 2 if args.cpu_smoke else args.repeats)
    failed += sum("error" in r for r in report["inference"])
    report["failed_rows"] = failed
    out.write_text(json.dumps(report, indent=1))
    print(f"gpu_check: {out} ({failed} failed rows)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
