"""ReID extraction: ``python -m tasks.reid extract`` machinery vs the bare model forward, and its memory.

    python benchmarks/reid_extract.py                   # prints the tables
    python benchmarks/reid_extract.py --write           # + updates docs/benchmarks.md
    python benchmarks/reid_extract.py --num-images 2000 --image-size 256 128 --width-mult 1

Throughput. Same model (``reid_vgg(arch, width_mult)``, random init, eval mode), same images
(synthetic Market-1501 crops, JPEG, decoded and resized to ``--image-size``):

* ``bare forward``: images decoded and resized beforehand, held in memory; only
  ``model(batch)`` under ``torch.inference_mode`` is timed (the ceiling). Once with the plain
  model in fp32 and once with each :func:`vggbackbone.optimize_for_inference` variant that
  extraction uses (fp32; and the reduced precision ``precision="auto"`` picks, where the
  device runs one fast);
* ``decode + forward``: a plain loop, read/decode/resize each image then forward, no
  Lightning, no writing (what a hand-written script costs);
* ``extract``: :func:`tasks.reid_extract.extract_embeddings`: Lightning predict, DataLoader with
  W worker processes, per-batch shard writes, the final merge into an atomically written
  ``.npz``.

Every row decodes the way extraction does, so all rows embed the same pixels: in full by
default; with ``--draft-decode`` (extraction's ``draft_decode=True``) a JPEG at least twice the
target size is decoded at 1/2, 1/4 or 1/8 scale (``read_image(path, draft=size)``).

Where the time goes: ``--breakdown`` (on by default) times, per image and on one core, the
steps of extraction apart: JPEG decode in full and in draft mode, the resize of each to the
target size, and the forward of the optimised fp32 model (per image, at the batch size).

``vs bare forward`` compares each row with the bare forward of the very model it runs (the
target: extraction >= 0.9x). Repeats run interleaved (contender order rotates each
round), medians. Extracted embeddings are checked against the bare forward first (fp32: 1e-4;
reduced precision: :data:`vggbackbone.deploy.RELATIVE_TOLERANCE`).

Memory. ``--memory-counts`` runs extraction (0 workers, so everything is in one process) in a
fresh subprocess per image count, on an image list that repeats the crops, with large
embeddings (``--memory-embedding-dim``, default 4096, so that holding them all would show), and
reports that process's peak resident memory: flat in the number of images, because embeddings
stream to shards and the merge copies them in chunks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    environment,
    environment_markdown,
    fmt,
    markdown_table,
    parse_args,
    time_interleaved,
    update_section,
)
from tasks.data.market import MarketConfig, generate_market  # noqa: E402
from tasks.images import list_images, read_image  # noqa: E402
from tasks.reid_extract import extract_embeddings, load_embeddings  # noqa: E402
from vggbackbone import optimize_for_inference  # noqa: E402
from vggbackbone.deploy import RELATIVE_TOLERANCE, default_precision  # noqa: E402
from vggbackbone.models import reid_vgg  # noqa: E402

SCRIPT = "benchmarks/reid_extract.py"
SECTION = "ReID extraction: throughput and memory"
TRAINER = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False}


def make_images(work: Path, num_images: int, folder: str | None) -> list[Path]:
    """``num_images`` synthetic Market-1501 crops (about 6 per identity), or a given folder's."""
    if folder is None:
        cfg = MarketConfig(num_train_ids=max(2, num_images // 5), num_test_ids=1, max_cameras=4, max_per_camera=3,
                           num_distractors=0, num_junk=0)  # fmt: skip
        folder = str(generate_market(work / "market", cfg, progress=False) / "bounding_box_train")
    return list_images(folder)[1][:num_images]


def write_list(path: Path, files: list[Path], count: int) -> Path:
    """An image list of ``count`` lines cycling through ``files``."""
    path.write_text("".join(f"{files[i % len(files)]}\n" for i in range(count)))
    return path


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def throughput(args: Any, work: Path, files: list[Path]) -> tuple[str, dict[str, float]]:
    """The throughput table (markdown) and the ``vs bare forward`` ratios of the extract rows."""
    size = tuple(args.image_size)
    listing = write_list(work / "images.txt", files, len(files))
    torch.manual_seed(0)
    model = reid_vgg(args.arch, width_mult=args.width_mult).eval()
    tf = v2.Compose([v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True)])
    bs = args.batch_size
    draft = size if args.draft_decode else None
    batches = [
        torch.stack([tf(read_image(f, draft=draft)) for f in files[a : a + bs]]) for a in range(0, len(files), bs)
    ]

    def bare(net: nn.Module) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            with torch.inference_mode():
                return torch.cat([net(b) for b in batches]).float().numpy()

        return run

    def decode_forward(net: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for a in range(0, len(files), bs):
                    net(torch.stack([tf(read_image(f, draft=draft)) for f in files[a : a + bs]]))

        return run

    def extract(workers: int, precision: str) -> Callable[[], Path]:
        def run() -> Path:
            out = work / f"emb_w{workers}_{precision}.npz"
            return extract_embeddings(model, listing, out, image_size=size, batch_size=bs, num_workers=workers,
                                      precision=precision, trainer=TRAINER, draft_decode=args.draft_decode)  # fmt: skip

        return run

    precisions = ["fp32"] + [p for p in [default_precision(args.device)] if p != "fp32"]
    reference = bare(model)()
    fns: dict[str, Callable[[], Any]] = {"bare forward, plain model fp32": bare(model)}
    same: dict[str, str] = {}  # row -> the bare-forward row of the same model
    for precision in precisions:
        fast = optimize_for_inference(model, precision=precision)  # what extraction runs
        base = f"bare forward, optimized {precision}"
        fns[base] = bare(fast)
        got = load_embeddings(extract(args.workers[0], precision)())
        assert got["paths"].tolist() == [str(f) for f in files]
        err = relative_error(got["embeddings"], reference)
        bound = 1e-4 if precision == "fp32" else RELATIVE_TOLERANCE[precision]
        assert err <= bound, f"extract {precision}: max rel. err {err:.2g} > {bound}"
        print(f"extract {precision}: max rel. err vs the plain fp32 model {err:.1e}")
        if precision == "fp32":
            fns["decode + forward (plain loop), optimized fp32"] = decode_forward(fast)
            same["decode + forward (plain loop), optimized fp32"] = base
        for w in args.workers:
            name = f"extract {precision}, {w} loader workers"
            fns[name], same[name] = extract(w, precision), base

    t = time_interleaved(fns, args.device, repeats=args.repeats, warmup=args.warmup)
    n, plain = len(files), t["bare forward, plain model fp32"].median
    rows, ratios = [], {}
    for name, timing in t.items():
        ratio = t[same[name]].median / timing.median if name in same else float("nan")
        if name.startswith("extract"):
            ratios[name] = ratio
        rows.append(
            [name, fmt(n / timing.median), fmt(plain / timing.median), fmt(ratio), f"{100 * timing.spread:.0f}%"]
        )
    headers = ["contender", "images/s", "vs plain fp32 forward", "vs bare forward (same model)", "spread"]
    return markdown_table(headers, rows), ratios


def breakdown(args: Any, files: list[Path]) -> str:
    """ms per image of each step of extraction, one thread, interleaved medians (markdown table)."""
    size = tuple(args.image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one loader worker (or the main process between batches) has
    try:
        tf = v2.Compose([v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True)])
        full = [read_image(f) for f in files]
        draft = [read_image(f, draft=size) for f in files]
        torch.manual_seed(0)
        fast = optimize_for_inference(reid_vgg(args.arch, width_mult=args.width_mult).eval(), precision="fp32")
        bs = args.batch_size
        batches = [torch.stack([tf(x) for x in draft[a : a + bs]]) for a in range(0, len(draft), bs)]
        fns: dict[str, Callable[[], Any]] = {
            "decode, full size": lambda: [read_image(f) for f in files],
            "decode, draft mode": lambda: [read_image(f, draft=size) for f in files],
            "resize + to float, from the full decode": lambda: [tf(x) for x in full],
            "resize + to float, from the draft decode": lambda: [tf(x) for x in draft],
            f"forward, optimized fp32, batch {bs}, 1 thread": lambda: [fast(b) for b in batches],
        }
        t = time_interleaved(fns, torch.device("cpu"), repeats=args.repeats, warmup=1)
    finally:
        torch.set_num_threads(threads)
    n = len(files)
    stored = f"{full[0].shape[1]}x{full[0].shape[2]}"
    drafted = f"{draft[0].shape[1]}x{draft[0].shape[2]}"
    rows = [[name, fmt(1e3 * timing.median / n), f"{100 * timing.spread:.0f}%"] for name, timing in t.items()]
    table = markdown_table(["step (one thread)", "ms per image", "spread"], rows)
    return f"Stored JPEGs {stored}, draft-decoded {drafted}, resized to {size[0]}x{size[1]}.\n\n{table}"


_CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
from tasks.reid_extract import extract_embeddings
from vggbackbone.models import reid_vgg
torch.manual_seed(0)
model = reid_vgg({arch!r}, width_mult={width_mult}, embedding_dim={dim}).eval()
extract_embeddings(model, {listing!r}, {out!r}, image_size={size}, batch_size={bs}, num_workers=0,
                   precision="fp32", trainer={trainer!r})
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory(args: Any, work: Path, files: list[Path]) -> str:
    """Peak RSS of one extraction process per image count (markdown table)."""
    rows = []
    for count in args.memory_counts:
        listing = write_list(work / f"mem{count}.txt", files, count)
        out = work / f"mem{count}.npz"
        code = _CHILD.format(root=str(ROOT), arch=args.arch, width_mult=args.width_mult, listing=str(listing),
                             out=str(out), size=tuple(args.image_size), bs=args.batch_size, trainer=TRAINER,
                            dim=args.memory_embedding_dim)  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"memory run with {count} images failed:\n{proc.stderr[-3000:]}")
        peak_mb = int(proc.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 1024
        dim = load_embeddings(out)["embeddings"].shape[1]
        rows.append([f"{count:,}", fmt(peak_mb), fmt(count * dim * 4 / 2**20), fmt(out.stat().st_size / 2**20),
                     fmt(count / seconds)])  # fmt: skip
        print(f"{count} images: peak RSS {peak_mb:.0f} MB", flush=True)
    headers = [
        "images",
        "peak RSS (MB)",
        "embeddings in memory would be (MB)",
        "output file (MB)",
        "images/s (whole process)",
    ]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    def extra(p: Any) -> None:
        p.add_argument("--num-images", type=int, default=600, help="synthetic crops timed (default 600)")
        p.add_argument("--image-size", type=int, nargs=2, default=(128, 64), help="height width fed to the model")
        p.add_argument("--arch", default="vgg16")
        p.add_argument("--width-mult", type=float, default=0.25)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers of the extract runs")
        p.add_argument("--images", default=None, help="use this folder's images instead of generating crops")
        p.add_argument("--draft-decode", action="store_true", help="extraction with draft_decode=True (all rows)")
        p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                       help="time decode / resize / forward apart (one thread)")  # fmt: skip
        p.add_argument("--memory-counts", type=int, nargs="*", default=[1000, 4000, 16000],
                       help="image counts of the peak-memory runs (none: skip them)")  # fmt: skip
        p.add_argument("--memory-embedding-dim", type=int, default=4096,
                       help="embedding size of the memory runs (large, so that holding them would show)")  # fmt: skip

    args = parse_args("ReID extraction vs the bare model forward, and its peak memory.", argv, extra)
    if args.device.type != "cpu":
        raise SystemExit("this benchmark drives extraction with accelerator=cpu; run it on the CPU")
    env = environment(args.device)
    work = Path(tempfile.mkdtemp(prefix="reid_extract_bench."))
    files = make_images(work, args.num_images, args.images)
    steps = breakdown(args, files) if args.breakdown else ""
    if steps:
        print(steps, flush=True)
    table, ratios = throughput(args, work, files)
    print(table, flush=True)
    mem = memory(args, work, files) if args.memory_counts else ""
    if mem:
        print(mem)
    command = f"python {SCRIPT} " + " ".join(sys.argv[1:] if argv is None else argv)
    body = "\n\n".join(p for p in [
        f"Command: `{command.strip()}`",
        environment_markdown(env),
        f"**Throughput**: {len(files)} crops {args.image_size[0]}x{args.image_size[1]}, {args.arch} width_mult "
        f"{args.width_mult}, batch {args.batch_size}, {args.repeats} interleaved repeats, median.",
        table,
        "`vs bare forward (same model)`: images/s over the bare forward of the model that row runs "
        "(extraction's optimize_for_inference model of the same precision); worst extract row: "
        f"{min(ratios.values()):.2f}x.",
        f"**Where the time goes** (per image, one thread, {args.repeats} interleaved repeats, median):"
        if steps
        else "",
        steps,
        f"**Peak memory** of one extraction process (0 loader workers, fp32, {args.memory_embedding_dim}-d "
        "embeddings) on an image list that repeats the crops:" if mem else "",
        mem,
    ] if p)  # fmt: skip
    if args.write:
        print(f"updated {update_section(SECTION, body, script=SCRIPT)}")
    else:
        print("\n(not written: add --write to update docs/benchmarks.md)")


if __name__ == "__main__":
    main()
