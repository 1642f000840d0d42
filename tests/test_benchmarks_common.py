"""benchmarks/common.py: section writing, timing bookkeeping, FLOP counting (no speed asserted)."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import count_gflops, markdown_table, matmul_peak, time_interleaved, update_section


def test_update_section_replaces_only_its_block(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    update_section("A", "first A", path=doc)
    update_section("B (x, 8x224)", "first B", path=doc)  # regex metacharacters in the name
    doc.write_text(doc.read_text() + "\nhand-written prose\n")
    update_section("A", "second A", path=doc, script="benchmarks/a.py")
    text = doc.read_text()
    assert "first A" not in text and "second A" in text and "written by benchmarks/a.py" in text
    assert "first B" in text and "hand-written prose" in text
    assert text.count("## A") == 1 and text.index("second A") < text.index("first B")
    assert text.startswith("# Benchmarks")


def test_markdown_table() -> None:
    assert markdown_table(["a", "b"], [[1, "x"]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | x |"]


def test_time_interleaved_calls_every_contender_warmup_plus_repeats() -> None:
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    t = time_interleaved(fns, torch.device("cpu"), repeats=3, warmup=2)
    assert sorted(calls) == sorted(["a", "b", "c"] * 5)
    assert calls[6:9] == ["a", "b", "c"] and calls[9:12] == ["b", "c", "a"]  # rotated rounds
    assert all(len(v.samples) == 3 and v.first >= 0 and v.median >= 0 for v in t.values())


def test_count_gflops_is_two_flops_per_multiply_add() -> None:
    lin = torch.nn.Linear(64, 32, bias=False)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        assert round(count_gflops(lambda: lin(torch.randn(10, 64))) * 1e9) == 2 * 10 * 64 * 32
        assert round(count_gflops(lambda: conv(torch.randn(1, 4, 5, 5))) * 1e9) == 2 * 8 * 4 * 9 * 25


def test_matmul_peak_is_a_positive_rate() -> None:
    assert matmul_peak(torch.float32, torch.device("cpu"), seconds=0.01) > 0
