"""Detection training step: Lightning overhead, and data-loader vs model throughput.

    python benchmarks/train_step.py            # the demo detector, a couple of minutes on 2 cores
    python benchmarks/train_step.py --write    # also updates docs/benchmarks.md

The model is ``configs/detect/demo.yaml``'s (Faster R-CNN + FPN on VGG11-BN at 1/4 width,
160-256 px images, AdamW, gradient clipping 10) on synthetic shapes generated into a temporary
folder. Contenders:

* **plain PyTorch loop**: ``DetectionTask.model(images, targets)``, sum of losses,
  ``backward``, ``clip_grad_norm_``, ``optimizer.step``, ``scheduler.step`` — optimiser and
  schedule from the task's own ``configure_optimizers`` code (:func:`tasks.core.build_optimizer`);
* **Lightning**: ``Trainer.fit`` of the same ``DetectionTask`` (its ``training_step``, logging
  included; no logger, checkpointing or progress bar), on the *same in-memory batches*, so the
  difference is Lightning's per-step overhead;
* **Lightning + DetectionData loader**: the real pipeline (JPEG decode, augmentation,
  ``--workers`` worker processes competing with the model for the cores);
* **DataLoader alone** (0 and ``--workers`` workers): how fast the data comes without a model.

Each run starts from the same initial weights and seed, so every contender does the same work;
step time = time between consecutive step ends, the first ``--skip`` steps of each run dropped,
median over ``--repeats`` runs per contender taken in alternating order.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    environment,
    environment_markdown,
    fmt,
    markdown_table,
    parse_args,
    update_section,
)

SCRIPT = "benchmarks/train_step.py"
SECTION = "Detection training step: Lightning overhead and data loading"
CLIP = 10.0


def build(root: Path, args: Any) -> tuple[Any, Any]:
    """The demo data module (generated into ``root``) and the demo DetectionTask."""
    from tasks.data.detection import DetectionDataModule
    from tasks.data.shapes import ShapesConfig, generate_shapes
    from tasks.detect import DetectionTask
    from tasks.optim import OptimConfig

    generate_shapes(root, ShapesConfig(num_train=args.images, num_val=4, layouts=("coco",)), progress=False)
    data = DetectionDataModule(root=str(root), batch_size=args.batch, num_workers=args.workers, photometric=0.0)
    data.setup("fit")
    torch.manual_seed(0)
    task = DetectionTask(
        classes=data.classes,
        category_ids=data.category_ids,
        arch="vgg11_bn",
        width_mult=0.25,
        fpn=True,
        min_size=160,
        max_size=256,
        anchor_sizes=[16, 32, 64, 128],
        detector=dict(
            rpn_pre_nms_top_n_train=300,
            rpn_post_nms_top_n_train=300,
            rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_test=300,
            box_batch_size_per_image=128,
        ),
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4, scheduler="cosine", warmup_steps=100),
    )
    return data, task


def step_times(ends: list[float], skip: int) -> list[float]:
    return [b - a for a, b in zip(ends[skip:], ends[skip + 1 :])]


def run_plain(task: Any, batches: list[Any], seed: int) -> list[float]:
    from tasks.optim import build_optimizer

    torch.manual_seed(seed)
    task.train()
    opt, sched = build_optimizer(task, task.optim, len(batches))
    params = [p for p in task.parameters() if p.requires_grad]
    ends = [time.perf_counter()]
    for batch in batches:
        targets = [{"boxes": t["boxes"].as_subclass(Tensor), "labels": t["labels"]} for t in batch.targets]
        loss = sum(task.model(batch.images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        sched.step()
        ends.append(time.perf_counter())
    return ends


def run_lightning(task: Any, loader: Any, steps: int, seed: int) -> list[float]:
    import pytorch_lightning as pl

    ends: list[float] = []

    class StepEnd(pl.Callback):
        def on_train_batch_start(self, *a: Any) -> None:
            if not ends:  # the loop's own start, after Trainer/optimizer setup
                ends.append(time.perf_counter())

        def on_train_batch_end(self, *a: Any) -> None:
            ends.append(time.perf_counter())

    torch.manual_seed(seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=CLIP,
        callbacks=[StepEnd()],
    )
    trainer.fit(task, train_dataloaders=loader)
    return ends


def loader_alone(data: Any, workers: int, batches: int) -> float:
    """Images per second of iterating the training DataLoader, no model."""
    data.num_workers = workers
    loader = data.train_dataloader()
    n, it = 0, iter(loader)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        n += len(next(it))
    return n / (time.perf_counter() - t0)


def measure(args: Any) -> tuple[dict[str, list[float]], float, float]:
    """Step times of every loop contender (``{"plain", "lightning", "pipeline"}`` -> seconds per
    step) and the images per second of the DataLoader alone with 0 and ``args.workers`` workers."""
    with tempfile.TemporaryDirectory() as tmp:
        data, task0 = build(Path(tmp) / "shapes", args)
        data.num_workers = 0
        it = iter(data.train_dataloader())
        batches = [next(it) for _ in range(args.steps)]  # the same in-memory batches for both loops
        memory_loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
        times: dict[str, list[float]] = {"plain": [], "lightning": [], "pipeline": []}
        for r in range(args.repeats):
            order = ["plain", "lightning"] if r % 2 == 0 else ["lightning", "plain"]
            for name in order:
                task = copy.deepcopy(task0)
                if name == "plain":
                    ends = run_plain(task, batches, r)
                else:
                    ends = run_lightning(task, memory_loader, args.steps, r)
                times[name] += step_times(ends, args.skip)
                print(f"round {r}: {name} {statistics.median(step_times(ends, args.skip)):.3f} s/step", flush=True)
        data.num_workers = args.workers
        ends = run_lightning(copy.deepcopy(task0), data.train_dataloader(), args.steps, 0)
        times["pipeline"] = step_times(ends, args.skip)
        load0 = loader_alone(data, 0, args.steps)
        loadw = loader_alone(data, args.workers, args.steps)
    return times, load0, loadw


def main(argv: list[str] | None = None) -> None:
    def extra(p: Any) -> None:
        p.add_argument("--batch", type=int, default=4, help="images per step (the demo's)")
        p.add_argument("--steps", type=int, default=12, help="steps per run")
        p.add_argument("--skip", type=int, default=2, help="first steps of each run not counted")
        p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the real pipeline")
        p.add_argument("--images", type=int, default=96, help="synthetic training images to generate")
        p.set_defaults(repeats=3)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    if args.device.type != "cpu":
        raise SystemExit("train_step.py measures the CPU pipeline; run it with --device cpu")
    env = environment(args.device)
    import warnings

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")
    times, load0, loadw = measure(args)

    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (max(v) - min(v)) / med[k] for k, v in times.items()}
    rows = [
        [
            "plain PyTorch loop (in-memory batches)",
            fmt(med["plain"]),
            fmt(args.batch / med["plain"]),
            "1x",
            "-",
            f"{100 * spread['plain']:.2g}%",
        ],
        [
            "Lightning Trainer.fit (same in-memory batches)",
            fmt(med["lightning"]),
            fmt(args.batch / med["lightning"]),
            fmt(med["lightning"] / med["plain"]) + "x",
            f"{100 * (med['lightning'] / med['plain'] - 1):+.1f}%",
            f"{100 * spread['lightning']:.2g}%",
        ],
        [
            f"Lightning + DetectionData loader ({args.workers} workers)",
            fmt(med["pipeline"]),
            fmt(args.batch / med["pipeline"]),
            fmt(med["pipeline"] / med["plain"]) + "x",
            f"{100 * (med['pipeline'] / med['plain'] - 1):+.1f}%",
            f"{100 * spread['pipeline']:.2g}%",
        ],
        ["DataLoader alone, 0 workers", "-", fmt(load0), "-", "-", "-"],
        [f"DataLoader alone, {args.workers} workers", "-", fmt(loadw), "-", "-", "-"],
    ]
    table = markdown_table(["contender", "s/step", "images/s", "vs plain loop", "overhead", "spread"], rows)
    note = (
        f"Batch {args.batch}, {args.steps} steps per run ({args.skip} dropped), {args.repeats} runs per loop "
        f"contender in alternating order, median step time. The loader rows time {args.steps} batches after the "
        "first. On a 2-core machine the DataLoader workers and the model share the cores, so the real pipeline "
        "is slower than either alone."
    )
    command = f"python {SCRIPT} --batch {args.batch} --steps {args.steps} --repeats {args.repeats} --write"
    body = f"Command: `{command}`\n\n{environment_markdown(env)}\n\n{table}\n\n{note}"
    print(body)
    if args.write:
        update_section(SECTION, body, script=SCRIPT)


if __name__ == "__main__":
    main()
