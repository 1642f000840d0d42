"""``tasks/optim.py``: the learning-rate schedules and the optimiser's parameter groups."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from tasks.optim import OptimConfig, build_optimizer, lr_factor

REPO = Path(__file__).resolve().parents[1]


def test_warmup_then_step_schedule() -> None:
    cfg = OptimConfig(scheduler="step", milestones=[0.5, 0.75], gamma=0.1, warmup_steps=10, warmup_factor=0.01)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.01)
    assert f[5] == pytest.approx(0.01 * 0.5 + 0.5)  # linear from 0.01 to 1
    assert f[10] == f[49] == 1.0
    assert f[50] == pytest.approx(0.1) and f[74] == pytest.approx(0.1)
    assert f[75] == pytest.approx(0.01) and f[99] == pytest.approx(0.01)


def test_cosine_schedule_reaches_min_ratio() -> None:
    cfg = OptimConfig(scheduler="cosine", min_lr_ratio=0.05, warmup_steps=0)
    assert lr_factor(0, 200, cfg) == pytest.approx(1.0)
    assert lr_factor(100, 200, cfg) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(200, 200, cfg) == pytest.approx(0.05)
    values = [lr_factor(s, 200, cfg) for s in range(201)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_param_groups_no_decay_backbone_mult_and_frozen(tiny_net: nn.Module) -> None:
    net = tiny_net
    cfg = OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4, backbone_lr_mult=0.1)
    opt, sched = build_optimizer(net, cfg, total_steps=10)
    seen = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(net.named_parameters())
    # frozen block 1 is not optimised at all
    assert not any(id(p) in seen for n, p in names.items() if n.startswith("backbone.features.conv1"))
    w = names["backbone.features.conv2.conv2_1.weight"]
    bn = names["backbone.features.conv2.bn2_1.weight"]
    bias = names["head.bias"]
    head_w = names["head.weight"]
    assert seen[id(w)]["weight_decay"] == 1e-4 and seen[id(w)]["lr"] == pytest.approx(0.01)
    assert seen[id(bn)]["weight_decay"] == 0.0 and seen[id(bn)]["lr"] == pytest.approx(0.01)
    assert seen[id(bias)]["weight_decay"] == 0.0 and seen[id(bias)]["lr"] == pytest.approx(0.1)
    assert seen[id(head_w)]["weight_decay"] == 1e-4
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


def test_backbone_prefix_matches_whole_module_names() -> None:
    net = nn.ModuleDict({"backbone": nn.Linear(2, 2), "backbone_head": nn.Linear(2, 2)})
    opt, _ = build_optimizer(net, OptimConfig(lr=0.1, backbone_lr_mult=0.5, weight_decay=0.0), 1)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(0.05) for p in net["backbone"].parameters())
    assert all(lr_of[id(p)] == pytest.approx(0.1) for p in net["backbone_head"].parameters())


def test_everything_frozen_is_a_clear_error() -> None:
    net = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(net, OptimConfig(), 1)
