"""benchmarks/end_to_end.py --quick: every row of a detector and of a dense model runs and is
written (speeds are not asserted: CI machines are shared)."""

from __future__ import annotations

import importlib.util

import pytest

from benchmarks.end_to_end import main


@pytest.mark.slow
def test_end_to_end_quick_writes_every_row(tmp_path) -> None:
    out = main(["--quick", "--tasks", "ssd,classify", "--out", str(tmp_path / "e2e.md")])
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
