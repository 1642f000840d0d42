"""ReID evaluation at benchmark scale: chunked Market-1501 ranking and k-reciprocal re-ranking.

    PYTHONPATH=. python benchmarks/reid_rank.py                         # Market-1501 sizes
    PYTHONPATH=. python benchmarks/reid_rank.py --query 20000 --gallery 20000 --no-rerank

Random embeddings with identity structure (each identity a random centre, its images the centre
plus noise, several cameras) at Market-1501's sizes by default (3,368 queries, 15,913 + 2,793
gallery images, 2,048-d like ResNet-50 or 512-d like VGG conv5). Reports wall time and peak
resident memory of

* ``rank_embeddings`` (chunked distances + ranking; the full ``Q x G`` matrix is never built:
  a dense float32 distance matrix alone would be ``4 Q G`` bytes, plus ``8 Q G`` for its argsort);
* the k-NN graph of re-ranking: faiss ``IndexFlatL2`` vs chunked torch ``topk`` (same result);
* ``rank_embeddings(rerank=True)`` (sparse k-reciprocal re-ranking, k1=20, k2=6).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vggbackbone.metrics import rank_embeddings
from vggbackbone.metrics.rerank import knn


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


STEPS = ("rank", "knn_faiss", "knn_torch", "rerank")


def _data(args: argparse.Namespace):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.ids, args.dim, generator=g)
    q_pids = torch.randint(0, args.ids, (args.query,), generator=g)
    g_pids = torch.randint(0, args.ids, (args.gallery,), generator=g)
    q = centres[q_pids] + args.noise * torch.randn(args.query, args.dim, generator=g)
    gal = centres[g_pids] + args.noise * torch.randn(args.gallery, args.dim, generator=g)
    q_cams, g_cams = torch.randint(0, 6, (args.query,), generator=g), torch.randint(0, 6, (args.gallery,), generator=g)
    return q, gal, q_pids, g_pids, q_cams, g_cams


def run_step(args: argparse.Namespace) -> dict:
    q, gal, q_pids, g_pids, q_cams, g_cams = _data(args)
    before = _peak_mib()
    t = time.perf_counter()
    if args.step == "rank":
        res = rank_embeddings(q, gal, q_pids, g_pids, q_cams, g_cams, metric="cosine")
        note = f"mAP {res.mAP:.4f}, rank-1 {res.rank(1):.4f}"
    elif args.step == "rerank":
        res = rank_embeddings(q, gal, q_pids, g_pids, q_cams, g_cams, metric="cosine", rerank=True)
        note = f"mAP {res.mAP:.4f}, rank-1 {res.rank(1):.4f}"
    else:
        feats = torch.nn.functional.normalize(torch.cat([q, gal]), dim=1)
        idx = knn(feats, 21, use_faiss=args.step == "knn_faiss")
        note = f"{tuple(idx.shape)}, checksum {int(idx[:, 1:].sum())}"
    return {"step": args.step, "seconds": time.perf_counter() - t, "extra_mib": _peak_mib() - before, "note": note}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--query", type=int, default=3368)
    p.add_argument("--gallery", type=int, default=18706)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ids", type=int, default=750)
    p.add_argument("--noise", type=float, default=2.4, help="per-image noise around its identity's centre")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-rerank", action="store_true", help="skip the k-NN and re-ranking steps")
    p.add_argument("--step", choices=STEPS, default=None, help="run one step in this process (internal)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step:
        print(json.dumps(run_step(args)))
        return
    # each step in its own process, so its peak memory is its own
    rows = []
    for step in STEPS[:1] if args.no_rerank else STEPS:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--step", step]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    dense = (4 + 8) * args.query * args.gallery / 2**20
    load = os.getloadavg()
    threads = torch.get_num_threads()
    print(f"\n{args.query} queries x {args.gallery} gallery, {args.dim}-d, torch threads {threads}, "
          f"load average {load[0]:.1f}; a dense float32 distance matrix + its argsort "
          f"would take {dense:.0f} MiB")  # fmt: skip
    print("| step | seconds | peak memory above the inputs (MiB) | result |")
    print("|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']:.1f} | {r['extra_mib']:.0f} | {r['note']} |")


if __name__ == "__main__":
    main()
