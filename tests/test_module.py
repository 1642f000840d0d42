"""``tasks/module.py``: ``TaskModule``'s shared steps."""

from __future__ import annotations

from pathlib import Path

from tasks.module import TaskModule

REPO = Path(__file__).resolve().parents[1]


def test_zero_loss_reaches_every_trainable_parameter_with_zero_gradient(tiny_task: TaskModule) -> None:
    task = tiny_task
    loss = task.zero_loss()
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for name, p in task.named_parameters():
        if p.requires_grad:  # all-reduced by DDP like any other step's gradients
            assert p.grad is not None and not p.grad.any(), name
        else:  # frozen block 1
            assert p.grad is None, name
