"""A task's options, captured from its ``__init__`` signature: what its checkpoints store.

:class:`tasks.module.TaskModule` wraps the ``__init__`` of every subclass with
:func:`capturing_init`: the arguments of a call, bound to the signature (the one
:func:`tasks.builders.builder_signature` gives, builder options included) with every default
filled in, become the hyper-parameters (:meth:`~tasks.module.TaskModule.save_options`) once
``__init__`` has run. A new option is checkpointed by being a parameter: no list to keep in step.

Before ``__init__`` runs, :meth:`~tasks.module.TaskModule.normalize_options` turns old option
names into the new ones (warned once), so the body and the checkpoint only ever see the new ones.
What is not stored: modules (their weights are in the state dict) and the old names.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["bind_options", "capturing_init"]

_STATE = "_captured_options"


def bind_options(signature: inspect.Signature, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: value}`` of a call (``args`` after ``self``) with every default of ``signature`` filled in.

    Unlike ``Signature.bind`` it never raises: arguments the signature does not name are kept as
    given (the ``__init__`` refuses them itself, naming them and the accepted ones).
    """
    params = [p for p in list(signature.parameters.values())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    values = {p.name: a for p, a in zip(positional, args)}
    for p in params:
        if p.name in values:
            continue
        if p.name in kwargs:
            values[p.name] = kwargs[p.name]
        elif p.default is not p.empty:
            values[p.name] = p.default
    values.update({k: v for k, v in kwargs.items() if k not in values})
    return values


def capturing_init(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` recording its options (see the module doc); nested calls (``super().__init__``) add
    the options the outer ones did not name, the outermost call stores them."""

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        captured = self.__dict__.get(_STATE)
        outer = captured is None
        if outer:
            kwargs = self.normalize_options(dict(kwargs))
            captured = self.__dict__[_STATE] = {}
        for name, value in bind_options(inspect.signature(__init__), args, kwargs).items():
            captured.setdefault(name, value)
        try:
            init(self, *args, **kwargs)
        finally:
            if outer:
                del self.__dict__[_STATE]
        if outer and not self._log_hyperparams:  # unless __init__ saved its hyper-parameters itself
            # values __init__ resolved itself (tasks.classes.update_hparams: e.g. `pretrained` from
            # the weights) win over the arguments as given
            options = {k: v for k, v in {**captured, **dict(self.hparams)}.items() if not isinstance(v, nn.Module)}
            self.save_options(type(self).checkpointed_options(options))

    return __init__
