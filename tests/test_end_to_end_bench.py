"""benchmarks/end_to_end.py --quick: every row of a detector and of a dense model runs and is
written (speeds are not asserted: CI machines are shared).

The quick run goes in its own process, as users run the script, so that OpenVINO's threads and
state stay out of the pytest worker (where a signal stack OpenVINO left behind once crashed the
in-process signal tests: vggbackbone/deploy/signal_stack.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.end_to_end import main


@pytest.mark.slow
def test_end_to_end_quick_writes_every_row(tmp_path) -> None:
    out = tmp_path / "e2e.md"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "end_to_end.py"
    args = [sys.executable, str(script), "--quick", "--tasks", "ssd,classify", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    rows = ["torchvision-style fp32 eager", "ours fp32", "ours bf16", "ONNX Runtime fp32"]
    if importlib.util.find_spec("openvino") is not None:
        rows += ["OpenVINO fp32", "OpenVINO default (its own hint)", "OpenVINO int8"]
    for task in ("SSD300 VGG16", "VGG16 classifier"):
        for row in rows:
            assert f"| {task} | " in text and f"| {row} |" in text, (task, row)
    assert "| 1.00x |" in text and "cpu capability" in text and out.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit, match="unknown"):
        main(["--quick", "--tasks", "nope", "--out", str(tmp_path / "x.md")])
