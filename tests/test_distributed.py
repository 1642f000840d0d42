"""``tasks/distributed.py``: gathering evaluation results across processes, one and two (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tasks.distributed import gather_unique

REPO = Path(__file__).resolve().parents[1]


def test_gather_unique_single_process_keeps_first() -> None:
    assert gather_unique({1: "a", 2: "b"}) == {1: "a", 2: "b"}


_GATHER_WORKER = """
import json, sys
import torch.distributed as dist
from tasks.distributed import all_gather_objects, gather_unique, is_global_zero

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
# key 0 on both ranks (a padded sampler's repeat), with a different value on each
merged = gather_unique({0: f"rank{rank}", 10 + rank: f"own{rank}"})
gathered = all_gather_objects(rank * 100)
result = {"merged": {str(k): v for k, v in merged.items()}, "order": list(merged), "gathered": gathered,
          "zero": is_global_zero()}
with open(f"{out}.{rank}", "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def test_gather_unique_two_processes_keeps_the_first_rank() -> None:
    """Two real gloo processes: a key both ranks hold keeps rank 0's value, on every rank."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(_GATHER_WORKER)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = [
            subprocess.Popen([sys.executable, str(script), str(r), f"{tmp}/store", f"{tmp}/out"], env=env)
            for r in range(2)
        ]
        try:
            codes = [p.wait(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert codes == [0, 0]
        results = [json.loads(Path(f"{tmp}/out.{r}").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["merged"] == {"0": "rank0", "10": "own0", "11": "own1"}, f"rank {r}"
        assert res["order"] == [0, 10, 11] and res["gathered"] == [0, 100]
        assert res["zero"] == (r == 0)
