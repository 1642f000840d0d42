"""benchmarks/common.py: section writing, timing bookkeeping, FLOP counting (no speed asserted)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import benchmarks.common
from benchmarks.common import (
    Timing,
    count_gflops,
    markdown_table,
    matmul_peak,
    time_interleaved,
    update_section,
)
from vggbackbone import VGGBackbone


class _Clock:
    """A perf_counter that moves only when told (``advance``) or by ``tick`` per read."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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


def test_time_interleaved_calls_every_contender_warmup_plus_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(benchmarks.common.time, "perf_counter", clock)
    calls: list[str] = []
    cost = {"a": 0.25, "b": 0.5, "c": 1.0}  # seconds each call takes on the fake clock

    def make(name: str):
        def fn() -> None:
            first = name not in calls  # a first call is 3x slower (compilation)
            calls.append(name)
            clock.advance(cost[name] * (3 if first else 1))

        return fn

    t = time_interleaved({n: make(n) for n in cost}, torch.device("cpu"), repeats=3, warmup=2)
    assert sorted(calls) == sorted(["a", "b", "c"] * 5)
    assert calls[6:9] == ["a", "b", "c"] and calls[9:12] == ["b", "c", "a"]  # rotated rounds
    for name, seconds in cost.items():
        assert t[name].samples == [seconds] * 3 and t[name].median == seconds
    # the first call of each contender is timed on its own (3x here); warm-up calls are not recorded
    assert {n: v.first for n, v in t.items()} == {"a": 0.75, "b": 1.5, "c": 3.0}


def test_timing_median_and_spread() -> None:
    t = Timing(samples=[3.0, 1.0, 2.0, 10.0])
    assert t.median == 2.5 and t.spread == (10.0 - 1.0) / 2.5


def test_count_gflops_is_two_flops_per_multiply_add() -> None:
    lin = torch.nn.Linear(64, 32, bias=False)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        assert round(count_gflops(lambda: lin(torch.randn(10, 64))) * 1e9) == 2 * 10 * 64 * 32
        assert round(count_gflops(lambda: conv(torch.randn(1, 4, 5, 5))) * 1e9) == 2 * 8 * 4 * 9 * 25


def test_count_gflops_of_a_vgg_block_is_the_analytic_count() -> None:
    """conv1 of a 1/8-width VGG16 (two 3x3 convs, 8 channels) on 2 x 3 x 16 x 16, pools not counted."""
    bb = VGGBackbone("vgg16", ["pool1"], width_mult=0.125).eval()
    with torch.no_grad():
        flops = round(count_gflops(lambda: bb(torch.randn(2, 3, 16, 16))) * 1e9)
    per_pixel = 2 * (8 * 3 * 9 + 8 * 8 * 9)  # conv1_1 (3 -> 8) + conv1_2 (8 -> 8), 2 FLOPs per MAC
    assert flops == 2 * 16 * 16 * per_pixel


def test_matmul_peak_is_flops_of_the_timed_product_over_its_best_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # every clock read advances 1/8 s: the first 256 x 256 product already takes >= 50 ms, so n stays
    # 256, and each timed product measures exactly one tick
    monkeypatch.setattr(benchmarks.common.time, "perf_counter", _Clock(tick=0.125))
    sizes: list[int] = []
    real_mm = torch.mm
    monkeypatch.setattr(benchmarks.common.torch, "mm", lambda a, b: sizes.append(a.shape[0]) or real_mm(a, b))
    peak = matmul_peak(torch.float32, torch.device("cpu"), seconds=0.5)
    assert set(sizes) == {256}
    assert peak == 2 * 256**3 / 0.125 / 1e9
    # a product that takes 1/8 s per tick until n = 1024: the size grows while one product is < 50 ms
    ticks = itertools.count()
    monkeypatch.setattr(
        benchmarks.common.time, "perf_counter", lambda: next(ticks) * (1e-3 if sizes[-1] < 1024 else 0.125)
    )
    sizes.clear()
    assert matmul_peak(torch.float32, torch.device("cpu"), seconds=0.5) == pytest.approx(2 * 1024**3 / 0.125 / 1e9)
    assert sorted(set(sizes)) == [256, 512, 1024]
