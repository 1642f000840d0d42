"""Calibration for int8: recording the inputs a model (or a part of it) really receives.

* :class:`InputRecorder` stands in for a whole model inside someone else's code (a task's
  predict step, a sliding-window loop): it keeps the argument of its call and stops the caller
  by raising :class:`InputCaptured`, so calibration sees exactly what that code feeds the model.
* :func:`record_submodule_inputs` runs the whole model on calibration batches and keeps the
  arguments each named submodule receives: what :func:`~vggbackbone.deploy.int8.quantize_int8`
  observes its targets on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["InputCaptured", "InputRecorder", "RecordedCall", "record_submodule_inputs"]

#: One call of a module: its positional and keyword arguments.
RecordedCall = tuple[tuple[Any, ...], dict[str, Any]]


class InputCaptured(Exception):
    """Raised by :class:`InputRecorder` once it holds a model input: the caller stops there."""


class InputRecorder(nn.Module):
    """Stands in for a model: records the argument of each call in ``inputs`` and raises
    :class:`InputCaptured`.

    Calibration replays each recorded input as ``model(batch)``, so a call with anything but
    one positional argument is refused (``TypeError`` naming what it got).

    >>> recorder = InputRecorder()
    >>> try:
    ...     recorder(torch.zeros(1, 3, 8, 8))
    ... except InputCaptured:
    ...     pass
    >>> recorder.inputs[0].shape
    torch.Size([1, 3, 8, 8])
    """

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Any] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or kwargs:
            raise TypeError(
                "int8 calibration replays the model's inputs as model(batch), but the task called it with "
                f"{len(args)} positional and {sorted(kwargs)} keyword arguments"
            )
        self.inputs.append(args[0])
        raise InputCaptured


def record_submodule_inputs(
    model: nn.Module, modules: dict[str, nn.Module], calibration: Iterable[Any]
) -> dict[str, list[RecordedCall]]:
    """Run ``model(batch)`` for every calibration batch; return the calls each of ``modules``
    (``{qualified name: submodule}``, ``""`` = the model) received, in order.

    Raises ``ValueError`` when ``calibration`` gave no batch, or naming the submodules the
    batches never reached.
    """
    recorded: dict[str, list[RecordedCall]] = {name: [] for name in modules}

    def recorder_of(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            recorded[name].append((args, kwargs))

        return hook

    hooks = [m.register_forward_pre_hook(recorder_of(n), with_kwargs=True) for n, m in modules.items()]
    batches = 0
    try:
        with torch.no_grad():
            for batch in calibration:
                model(batch)
                batches += 1
    finally:
        for h in hooks:
            h.remove()
    if batches == 0:
        raise ValueError("int8 calibration gave no batches: pass an iterable of input batches")
    unused = [name or "<model>" for name, seen in recorded.items() if not seen]
    if unused:
        raise ValueError(f"int8: submodules {unused} were never called on the {batches} calibration batches")
    return recorded
