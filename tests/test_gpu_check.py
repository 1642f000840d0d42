"""benchmarks/gpu_check.py on a machine without CUDA: every GPU row skipped with a message, exit 0,
quickly (CI runs it so; on a GPU machine it measures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check, not the skip")
def test_gpu_check_skips_without_cuda(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device: every GPU row skipped" in proc.stdout
    report = json.loads(out.read_text())
    assert report["cuda"] is False and "training" not in report and "skipped" in report
