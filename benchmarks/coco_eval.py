"""COCO bbox evaluation time: faster-coco-eval vs pycocotools on a COCO val2017-sized synthetic set.

    python benchmarks/coco_eval.py                      # 5,000 images x 100 detections, 3 runs each
    python benchmarks/coco_eval.py --repeats 3 --write  # and update docs/benchmarks.md

The set is synthetic and seeded (``--seed``): 5,000 images, 80 categories, ~7 objects per image
(COCO val2017 has 36,781 objects in 5,000 images) across the small/medium/large area ranges
with 1% crowd boxes, and exactly ``--dets`` detections per image (a detector's
``box_detections_per_img=100``): jittered copies of the objects plus false positives. Each run
is one :func:`vggbackbone.metrics.coco_evaluate` call (result loading, ``evaluate``,
``accumulate``, ``summarize``) with the backend named; the backends alternate, and the
median per backend is reported. The 12 numbers of both backends are compared as well.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, environment_markdown, fmt, markdown_table, parse_args, update_section
from vggbackbone.metrics import COCO_STATS, coco_evaluate

SCRIPT = "benchmarks/coco_eval.py"
SECTION = "COCO evaluation: faster-coco-eval vs pycocotools"


def synthetic_coco(
    n_images: int, dets_per_image: int, n_classes: int = 80, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A COCO ground-truth dict and a results list (see the module docstring)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(n_classes)]
    images, anns, dets = [], [], []
    for i in range(n_images):
        w, h = int(rng.integers(320, 640)), int(rng.integers(320, 640))
        images.append({"id": i + 1, "width": w, "height": h})
        n = int(rng.poisson(7.3))
        side = np.choose(
            rng.integers(0, 3, n), [rng.uniform(6, 31, n), rng.uniform(33, 95, n), rng.uniform(97, 300, n)]
        )
        bw, bh = side * rng.uniform(0.6, 1.4, n), side * rng.uniform(0.6, 1.4, n)
        x, y = rng.uniform(0, 1, n) * np.maximum(w - bw, 1), rng.uniform(0, 1, n) * np.maximum(h - bh, 1)
        cat = rng.integers(1, n_classes + 1, n)
        for k in range(n):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(cat[k]),
                    "bbox": [float(x[k]), float(y[k]), float(bw[k]), float(bh[k])],
                    "area": float(bw[k] * bh[k]),
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
        hits = min(n, dets_per_image)
        j = rng.normal(0, 0.1, (hits, 4)) * side[:hits, None]
        boxes = np.stack([x[:hits] + j[:, 0], y[:hits] + j[:, 1], bw[:hits] + j[:, 2], bh[:hits] + j[:, 3]], 1)
        labels = np.where(rng.random(hits) < 0.9, cat[:hits], rng.integers(1, n_classes + 1, hits))
        scores = rng.uniform(0.3, 1.0, hits)
        m = dets_per_image - hits  # false positives
        fs = rng.uniform(6, 200, m)
        fboxes = np.stack([rng.uniform(0, w - 6, m), rng.uniform(0, h - 6, m), fs, fs * rng.uniform(0.5, 2, m)], 1)
        boxes = np.concatenate([boxes, fboxes])
        labels = np.concatenate([labels, rng.integers(1, n_classes + 1, m)])
        scores = np.concatenate([scores, rng.uniform(0.0, 0.7, m)])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
        for b, lab, s in zip(boxes.round(2).tolist(), labels.tolist(), scores.round(5).tolist()):
            dets.append({"image_id": i + 1, "category_id": int(lab), "bbox": b, "score": s})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def main(argv: list[str] | None = None) -> None:
    def extra(p: Any) -> None:
        p.add_argument("--images", type=int, default=5000)
        p.add_argument("--dets", type=int, default=100, help="detections per image")
        p.add_argument("--seed", type=int, default=0)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    env = environment(args.device)
    gt, dets = synthetic_coco(args.images, args.dets, seed=args.seed)
    print(f"{len(gt['images'])} images, {len(gt['annotations'])} objects, {len(dets)} detections", flush=True)
    backends = ("pycocotools", "faster_coco_eval")
    times: dict[str, list[float]] = {b: [] for b in backends}
    stats: dict[str, dict[str, float]] = {}
    for r in range(args.repeats):
        for b in backends if r % 2 == 0 else backends[::-1]:
            t0 = time.perf_counter()
            stats[b] = coco_evaluate(gt, dets, backend=b)
            times[b].append(time.perf_counter() - t0)
            print(f"  run {r + 1}: {b} {times[b][-1]:.2f} s", flush=True)
    diff = max(abs(stats["pycocotools"][k] - stats["faster_coco_eval"][k]) for k in COCO_STATS)
    med = {b: float(np.median(t)) for b, t in times.items()}
    rows = [
        [
            b,
            fmt(med[b]),
            fmt(min(times[b])),
            fmt(med["pycocotools"] / med[b]) + "x",
            ", ".join(fmt(t) for t in times[b]),
        ]
        for b in backends
    ]
    table = markdown_table(["backend", "median s", "best s", "speedup", "runs s"], rows)
    command = f"python {SCRIPT} --images {args.images} --dets {args.dets} --repeats {args.repeats} --write"
    body = (
        f"Command: `{command}`\n\n{environment_markdown(env)}\n\n"
        f"{len(gt['images']):,} images, {len(gt['annotations']):,} objects, {len(dets):,} detections "
        f"(synthetic, seed {args.seed}); one `coco_evaluate(..., backend=...)` call per run, backends "
        f"alternating.\n\n{table}\n\n"
        f"Largest difference between the two backends' 12 numbers: {diff:.1e} "
        f"(AP {stats['pycocotools']['AP']:.4f}, AP50 {stats['pycocotools']['AP50']:.4f})."
    )
    print(body)
    if args.write:
        update_section(SECTION, body, script=SCRIPT)


if __name__ == "__main__":
    main()
