"""ReID extraction throughput: ``python -m tasks.reid extract`` machinery vs the bare model forward.

    PYTHONPATH=. python benchmarks/reid_extract.py                       # defaults below
    PYTHONPATH=. python benchmarks/reid_extract.py --num-images 2000 --image-size 256 128 --width-mult 1

Contenders, same model (``reid_vgg(arch, width_mult)``, random init, eval mode), same images
(synthetic Market-1501 crops, JPEG, decoded and resized to ``--image-size``):

* ``bare forward``: images decoded and resized beforehand, held in memory; only
  ``model(batch)`` under ``torch.inference_mode`` is timed (the ceiling);
* ``decode + forward``: a plain loop, read/decode/resize each image then forward, no Lightning,
  no writing (what a hand-written script costs);
* ``extract (W workers)``: :func:`tasks.reid_extract.extract_embeddings`: Lightning predict,
  DataLoader with W worker processes, per-batch shard writes, the final merge into an
  atomically written ``.npz``.

Repeats run interleaved (contender order rotates each round) and the median wall time is
reported, so a burst of load from other processes hits every contender alike. The extracted
embeddings are checked equal to the bare forward before anything is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.data.market import MarketConfig, generate_market  # noqa: E402
from tasks.images import read_image  # noqa: E402
from tasks.reid_extract import extract_embeddings, list_images, load_embeddings  # noqa: E402
from vggbackbone.models import reid_vgg  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=600, help="about this many synthetic crops")
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 64), help="height width fed to the model")
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers of the extract runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", default=None, help="use this folder instead of generating crops")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="reid_extract_bench."))
    if args.images:
        folder = Path(args.images)
    else:  # ~ 6 crops per identity with these settings (cut to --num-images below)
        ids = max(2, args.num_images // 5)
        cfg = MarketConfig(num_train_ids=ids, num_test_ids=1, max_cameras=4, max_per_camera=3, num_distractors=0, num_junk=0)
        folder = generate_market(work / "market", cfg, progress=False) / "bounding_box_train"
    names, files = list_images(folder)
    files = files[: args.num_images]
    names = names[: args.num_images]
    listing = work / "images.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    size = tuple(args.image_size)

    torch.manual_seed(0)
    model = reid_vgg(args.arch, width_mult=args.width_mult).eval()
    tf = v2.Compose([v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True)])
    batches = [torch.stack([tf(read_image(f)) for f in files[a : a + args.batch_size]]) for a in range(0, len(files), args.batch_size)]

    def bare() -> np.ndarray:
        with torch.inference_mode():
            return torch.cat([model(b) for b in batches]).numpy()

    def decode_forward() -> None:
        with torch.inference_mode():
            for a in range(0, len(files), args.batch_size):
                model(torch.stack([tf(read_image(f)) for f in files[a : a + args.batch_size]]))

    def extract(workers: int) -> Path:
        out = work / f"emb_w{workers}.npz"
        return extract_embeddings(
            model, listing, out, image_size=size, batch_size=args.batch_size, num_workers=workers,
            trainer={"accelerator": "cpu", "enable_progress_bar": False, "logger": False},
        )  # fmt: skip

    reference = bare()
    got = load_embeddings(extract(args.workers[0]))
    assert got["paths"].tolist() == [str(f) for f in files]
    np.testing.assert_allclose(got["embeddings"], reference, atol=1e-4)

    contenders = {"bare forward (pre-decoded)": bare, "decode + forward (plain loop)": decode_forward}
    for w in args.workers:
        contenders[f"extract, {w} loader workers"] = lambda w=w: extract(w)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    keys = list(contenders)
    for r in range(args.repeats):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t = time.perf_counter()
            contenders[k]()
            times[k].append(time.perf_counter() - t)

    n = len(files)
    base = n / statistics.median(times[keys[0]])
    load = os.getloadavg()
    print(f"\n{n} images {size[0]}x{size[1]}, {args.arch} width_mult={args.width_mult}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    print(f"| contender | images/s (median of {args.repeats}) | vs bare forward |")
    print("|---|---:|---:|")
    for k in keys:
        ips = n / statistics.median(times[k])
        print(f"| {k} | {ips:.1f} | {ips / base:.2f} |")


if __name__ == "__main__":
    main()
