"""The registry of task-model builders: one table the library and the task CLIs read.

>>> from vggbackbone.models import create_model, list_models
>>> list_models("segment")
['fcn32s', 'fcn16s', 'fcn8s', 'unet']
>>> model = create_model("unet", arch="vgg11", num_classes=3, width_mult=0.125)

Every builder of :mod:`vggbackbone.models` is registered (in ``vggbackbone/models/__init__.py``)
under a name and a task (``detect``, ``segment``, ``reid``, ``classify``); ``python -m
tasks.<task>`` picks the entry with ``model.family`` and offers the builder's arguments as
``model.<option>``. A new model is a builder ``(arch, num_classes, weights_backbone, **options)``
and one :func:`register_model` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import nn

__all__ = [
    "BUILD_CONFIG_ATTR",
    "TASKS",
    "ModelEntry",
    "TaskModels",
    "create_model",
    "list_models",
    "model_entry",
    "record_build",
    "register_model",
]

#: The tasks of the project's CLIs, in their usual order.
TASKS: tuple[str, ...] = ("detect", "segment", "reid", "classify")

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

#: Where :func:`create_model` leaves ``{"name", "options"}`` on the model it built.
BUILD_CONFIG_ATTR = "vggbackbone_build"


def _at_backbone(options: Mapping[str, Any]) -> str:
    return "backbone"


@dataclass(frozen=True)
class ModelEntry:
    """A registered builder.

    Attributes:
        name: the registry name (``model.family`` in the task CLIs).
        task: ``detect``, ``segment``, ``reid``, ``classify`` (or a task of your own).
        builder: ``builder(**kwargs)`` returns the model.
        backbone_path: given the builder's options, where the pretrained
            :class:`~vggbackbone.VGGBackbone` sits in the model (``"backbone"``,
            ``"backbone.body"`` ...): what a backbone learning-rate multiplier aims at.
    """

    name: str
    task: str
    builder: Callable[..., nn.Module]
    backbone_path: Callable[[Mapping[str, Any]], str] = _at_backbone


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    builder: Builder | None = None,
    *,
    task: str,
    backbone_path: str | Callable[[Mapping[str, Any]], str] = "backbone",
) -> Any:
    """Register ``builder`` as ``name`` for ``task``; used as ``register_model(name, fn, task=...)``
    or as a decorator ``@register_model(name, task=...)``. Returns the builder.

    ``backbone_path``: where the VGG sits in the built model, a dotted path or a function of the
    builder's options. A name registered twice for different builders is an error.
    """
    if not name or not task:
        raise ValueError(f"register_model needs a name and a task, got {name!r}, {task!r}")
    path = backbone_path if callable(backbone_path) else (lambda options, p=backbone_path: p)

    def add(fn: Builder) -> Builder:
        old = _REGISTRY.get(name)
        if old is not None and (old.builder is not fn or old.task != task):
            raise ValueError(f"model {name!r} is already registered ({old.task}: {old.builder!r})")
        _REGISTRY[name] = ModelEntry(name, task, fn, path)
        return fn

    return add if builder is None else add(builder)


def list_models(task: str | None = None) -> list[str]:
    """Registered names, in registration order; ``task``: only that task's (an unknown task is an
    error naming the known ones)."""
    if task is None:
        return list(_REGISTRY)
    names = [name for name, entry in _REGISTRY.items() if entry.task == task]
    if not names:
        known = list(dict.fromkeys(entry.task for entry in _REGISTRY.values()))
        raise ValueError(f"no model registered for task {task!r}; tasks: {', '.join(known)}")
    return names


def model_entry(name: str, task: str | None = None) -> ModelEntry:
    """The entry of ``name`` (of ``task``, when given); an unknown name is an error naming the choices."""
    choices = list_models(task)
    if name not in choices:
        which = f" for task {task!r}" if task else ""
        raise ValueError(f"unknown model {name!r}{which}; registered: {', '.join(choices)}")
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``builder(**kwargs)`` of the model registered as ``name``; an unknown name is an error
    naming the registered ones. The model remembers ``name`` and ``kwargs`` (its
    ``vggbackbone_build`` attribute), which :func:`~vggbackbone.models.save_pretrained` writes."""
    return record_build(model_entry(name).builder(**kwargs), name, kwargs)


def record_build(model: nn.Module, name: str, options: Mapping[str, Any]) -> nn.Module:
    """Remember on ``model`` that it is ``create_model(name, **options)``; returns ``model``."""
    object.__setattr__(model, BUILD_CONFIG_ATTR, {"name": name, "options": dict(options)})
    return model


T = TypeVar("T")


class TaskModels(Mapping[str, T], Generic[T]):
    """A task's registered models as a read-only mapping ``name -> view(entry)``, always current
    (a model registered later appears): ``TaskModels("segment")`` maps names to builders.

    The task CLIs' former tables (``tasks.detect.DETECTORS``, ``tasks.segment.SEGMENTATION_HEADS``)
    are such views.
    """

    def __init__(self, task: str, view: Callable[[ModelEntry], T] = lambda entry: entry.builder) -> None:
        self.task = task
        self._view = view

    def __getitem__(self, name: str) -> T:
        if name not in list_models(self.task):
            raise KeyError(name)
        return self._view(_REGISTRY[name])

    def __iter__(self) -> Iterator[str]:
        return iter(list_models(self.task))

    def __len__(self) -> int:
        return len(list_models(self.task))

    def __repr__(self) -> str:
        return f"TaskModels({self.task!r}: {', '.join(self)})"
