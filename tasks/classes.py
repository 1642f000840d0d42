"""Class names that travel with the model: the checkpoint's classes are the truth.

A checkpoint records what its model's outputs mean (:data:`CHECKPOINT_KEY`): class names in
index order; for detection also the COCO category id of each label; for segmentation the
names include background and the ignore index is recorded; for ReID the training identities
(the classifier's classes). Where a task meets its data (``setup``, and again when
``--ckpt_path`` brings a checkpoint: ``on_load_checkpoint``, before its weights are loaded)
every dataset's classes are checked against the model's with :func:`check_classes`:

* the same names in the same order (and, where both have them, the same category ids):
  nothing to do;
* the same set of names in another order or numbering: a :class:`ClassMap` from data labels
  to model labels, applied by the task, and one printed line saying so (e.g.
  ``instances_val.json numbers categories differently from the checkpoint: mapped by name:
  cat 3->1, dog 1->2``);
* any other set: a :class:`ClassMismatchError` naming the missing and extra names and both
  sources. Never a silent change of what a class index means.

The task side is :class:`ClassesMixin` (the model's :class:`ClassSet`, the data's per dataset,
adopting a checkpoint's); :class:`~tasks.module.TaskModule` calls :func:`meet_data`,
:func:`adopt_checkpoint_classes`, :func:`announce` and :func:`record_classes` from its hooks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CHECKPOINT_KEY",
    "ClassMap",
    "ClassMismatchError",
    "ClassSet",
    "ClassesMixin",
    "adopt_checkpoint_classes",
    "announce",
    "check_classes",
    "meet_data",
    "record_classes",
    "stage_dataset_names",
    "update_hparams",
]

#: checkpoint key holding :meth:`ClassSet.record` of the model that wrote it
CHECKPOINT_KEY = "classes"

#: the datasets each Lightning stage reads (as :attr:`tasks.module.TaskDataModule.stage_sets`)
_STAGE_DATASETS: dict[str, tuple[str, ...]] = {
    "fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)
}  # fmt: skip


class ClassMismatchError(ValueError):
    """Data whose classes are not the model's (other names, duplicates, another ignore index)."""


@dataclass(frozen=True)
class ClassSet:
    """What the indices of a model or of a dataset mean.

    Args:
        names: class names in index order (``None``: unnamed, only ``size`` is known, e.g. a
            model built in Python without names, or an old ReID checkpoint).
        source: who says so, for messages (``the checkpoint runs/x/last.ckpt``, a COCO file...).
        size: number of classes (default ``len(names)``).
        category_ids: detection: the COCO category id of each name (``None``: not a COCO file).
        ignore_index: segmentation: the mask value that is not a class (255).
        kind: ``classes``, or ``identities`` (ReID's training identities), ``categories`` (COCO).
    """

    names: tuple[str, ...] | None
    source: str
    size: int = -1
    category_ids: tuple[int, ...] | None = None
    ignore_index: int | None = None
    kind: str = "classes"

    def __post_init__(self) -> None:
        if self.names is not None:
            object.__setattr__(self, "names", tuple(str(n) for n in self.names))
            object.__setattr__(self, "size", len(self.names))
        if self.category_ids is not None:
            object.__setattr__(self, "category_ids", tuple(int(i) for i in self.category_ids))
            if len(self.category_ids) != self.size:
                raise ClassMismatchError(
                    f"{self.source}: {len(self.category_ids)} category ids for {self.size} {self.kind}"
                )

    def record(self) -> dict[str, Any]:
        """Plain data for a checkpoint or the ONNX ``metadata_props`` (lists, ints, strings)."""
        out: dict[str, Any] = {"kind": self.kind, "size": self.size}
        if self.names is not None:
            out["names"] = list(self.names)
        if self.category_ids is not None:
            out["category_ids"] = list(self.category_ids)
        if self.ignore_index is not None:
            out["ignore_index"] = self.ignore_index
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str) -> ClassSet:
        """The :meth:`record` of a checkpoint back; an error naming ``source`` when it is not one."""
        try:
            names = record.get("names")
            ids = record.get("category_ids")
            ignore = record.get("ignore_index")
            return cls(
                names=None if names is None else tuple(str(n) for n in names),
                source=source,
                size=int(record["size"]) if names is None else len(names),
                category_ids=None if ids is None else tuple(int(i) for i in ids),
                ignore_index=None if ignore is None else int(ignore),
                kind=str(record.get("kind", "classes")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ClassMismatchError(f"{source}: its class record is not readable ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class ClassMap:
    """Data labels -> model labels, by name: ``index[k]`` is the model index of the data's class ``k``.

    ``category_ids``: for detection data read from a COCO file, the file's category id of each
    model class (what evaluation and ``predict`` write, so their output matches that file).
    ``note``: the line that says the mapping was applied.
    """

    index: tuple[int, ...]
    note: str
    category_ids: tuple[int, ...] | None = None
    _luts: dict[Any, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_identity(self) -> bool:
        return all(i == k for k, i in enumerate(self.index))

    def lut(self, offset: int = 0, ignore_index: int | None = None, device: Any = None) -> Tensor:
        """A lookup table ``t`` with ``t[data_label] == model_label`` (int64).

        ``offset``: labels start there (detection: 1, 0 being background, which stays 0);
        ``ignore_index``: a value kept as it is (segmentation's 255).
        """
        key = (offset, ignore_index, str(device))
        if key not in self._luts:
            size = max(offset + len(self.index), 0 if ignore_index is None else ignore_index + 1)
            table = torch.arange(size, dtype=torch.int64)
            table[offset : offset + len(self.index)] = torch.tensor(self.index, dtype=torch.int64) + offset
            self._luts[key] = table.to(device) if device is not None else table
        return self._luts[key]

    def apply(self, labels: Tensor, offset: int = 0, ignore_index: int | None = None) -> Tensor:
        """``labels`` (any shape, data indices) as model indices; negative labels (unlabelled) stay."""
        table = self.lut(offset, ignore_index, labels.device)
        if labels.numel() == 0:
            return labels
        known = labels >= 0
        return torch.where(known, table[labels.clamp(min=0).long()], labels.long())

    def apply_numpy(self, labels: np.ndarray, offset: int = 0) -> np.ndarray:
        """As :meth:`apply` for a numpy array (detection records)."""
        return self.lut(offset).numpy()[labels.astype(np.int64)] if labels.size else labels.astype(np.int64)


def _listed(names: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(map(str, names[:limit]))
    return f"[{shown}{f' and {len(names) - limit} more' if len(names) > limit else ''}]"


def _check_unique(classes: ClassSet) -> None:
    if classes.names is None:
        return
    dup = [n for n, c in Counter(classes.names).items() if c > 1]
    if dup:
        raise ClassMismatchError(
            f"{classes.source}: the name(s) {_listed(dup)} appear more than once among its {classes.kind}: "
            "a name must say which index it is"
        )
    if classes.category_ids is not None:
        dup_ids = [i for i, c in Counter(classes.category_ids).items() if c > 1]
        if dup_ids:
            raise ClassMismatchError(f"{classes.source}: category id(s) {_listed(dup_ids)} appear more than once")


def check_classes(model: ClassSet, data: ClassSet) -> ClassMap | None:
    """How ``data``'s labels become ``model``'s, by name; ``None`` when they already are.

    Raises :class:`ClassMismatchError` naming both sources when the two name sets differ
    (listing the names missing from the data and the extra ones), when either lists a name
    twice, when the sizes differ where a side has no names, or when the ignore indices differ.
    The mapping's :attr:`ClassMap.note` says what was mapped (category ids where both sides
    have them, else indices).
    """
    _check_unique(model)
    _check_unique(data)
    kind = model.kind if model.kind != "classes" else data.kind
    if model.ignore_index is not None and data.ignore_index is not None and model.ignore_index != data.ignore_index:
        raise ClassMismatchError(
            f"{data.source} marks unlabelled pixels with {data.ignore_index}, {model.source} with "
            f"{model.ignore_index}: they must agree"
        )
    if model.names is None or data.names is None:  # unnamed: only the number of classes can be checked
        if model.size != data.size:
            raise ClassMismatchError(
                f"{data.source} has {data.size} {kind}, {model.source} has {model.size}: they must be the same "
                f"{kind}" + ("" if model.names is None else f" ({_listed(list(model.names))})")
            )
        return None
    missing = [n for n in model.names if n not in set(data.names)]
    extra = [n for n in data.names if n not in set(model.names)]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the data: {_listed(missing)}")
        if extra:
            parts.append(f"{len(extra)} unknown to the model: {_listed(extra)}")
        listing = f": {_listed(list(model.names), 30)}" if kind != "identities" else ""
        raise ClassMismatchError(
            f"{data.source} has other {kind} than {model.source} ({'; '.join(parts)}). {kind.capitalize()} are "
            f"matched by name: the data must have exactly the model's {model.size} {kind}, in any order or "
            f"numbering{listing}"
        )
    position = {n: k for k, n in enumerate(model.names)}
    index = tuple(position[n] for n in data.names)
    ids_of_data = dict(zip(data.names, data.category_ids)) if data.category_ids is not None else None
    out_ids = tuple(ids_of_data[n] for n in model.names) if ids_of_data is not None else None
    same_ids = model.category_ids is None or out_ids is None or out_ids == model.category_ids
    if all(i == k for k, i in enumerate(index)) and same_ids:
        return None
    if model.category_ids is not None and ids_of_data is not None:  # numbered by COCO category ids
        model_id = dict(zip(model.names, model.category_ids))
        changes = [f"{n} {ids_of_data[n]}->{model_id[n]}" for n in data.names if ids_of_data[n] != model_id[n]]
        verb = "numbers categories"
    else:
        changes = [f"{n} {k}->{i}" for k, (n, i) in enumerate(zip(data.names, index)) if k != i]
        verb = f"orders its {kind}"
    note = f"{data.source} {verb} differently from {model.source}: mapped by name: {', '.join(changes[:20])}"
    if len(changes) > 20:
        note += f" and {len(changes) - 20} more"
    return ClassMap(index, note, out_ids)


# ---------------------------------------------------------------------------- the task side
class ClassesMixin:
    """What a task says about its classes; :class:`~tasks.module.TaskModule` does the rest.

    Subclasses implement :meth:`class_set` (the model's), :meth:`data_class_set` (a dataset's)
    and :meth:`adopt_class_set` (take a checkpoint's), and read the mapping of the data they
    consume with :meth:`class_map`.
    """

    def class_set(self) -> ClassSet | None:
        """The model's classes (``None``: not known yet, nothing is checked)."""
        return None

    def class_set_from_hparams(self, hparams: Mapping[str, Any], source: str) -> ClassSet | None:
        """The classes of a checkpoint that has no :data:`CHECKPOINT_KEY` record (written before it)."""
        return None

    def data_class_set(self, datamodule: Any, name: str) -> ClassSet | None:
        """The classes of the datamodule's ``name`` dataset (``train``, ``val``, ``test``, ``predict``)."""
        return None

    def adopt_class_set(self, classes: ClassSet) -> None:
        """Make ``classes`` (a checkpoint's) the model's own: names, ids and the hyper-parameters."""

    def classes_source(self, default: str) -> str:
        """Who says what the model's classes are, for messages: the checkpoint they came from, else ``default``."""
        return str(self.__dict__.get("_classes_source", default))

    def class_map(self, name: str | None = None) -> ClassMap | None:
        """The mapping of dataset ``name`` (default: the one the current stage reads), ``None``: none needed."""
        if name is None:
            name = current_dataset_name(getattr(self, "_trainer", None))
        return self.__dict__.get("_class_maps", {}).get(name)


def stage_dataset_names(stage: Any) -> tuple[str, ...]:
    """``fit`` -> ``(train, val)``, ``validate`` -> ``(val,)``... (a string or Lightning's ``TrainerFn``)."""
    return _STAGE_DATASETS.get(str(getattr(stage, "value", stage) or ""), ())


def current_dataset_name(trainer: Any) -> str:
    """The dataset the trainer is reading now: ``train``, ``val`` (also the sanity check), ``test``, ``predict``."""
    if trainer is None:
        return "val"
    if getattr(trainer, "training", False):
        return "train"
    if getattr(trainer, "testing", False):
        return "test"
    if getattr(trainer, "predicting", False):
        return "predict"
    return "val"


def _maps(module: Any) -> dict[str, ClassMap | None]:
    return module.__dict__.setdefault("_class_maps", {})


def _datamodule(module: Any) -> Any:
    trainer = getattr(module, "_trainer", None)
    return getattr(trainer, "datamodule", None) if trainer is not None else None


def meet_data(module: ClassesMixin, stage: Any, model: ClassSet | None = None, *, defer: bool = False) -> None:
    """Check every dataset of ``stage`` against the model's classes; keep the mappings (see :meth:`class_map`).

    ``model``: the classes to check against (default: :meth:`ClassesMixin.class_set`). Errors
    (:class:`ClassMismatchError`) name the dataset's and the model's sources. ``defer`` (``setup``):
    keep the error for :func:`announce` to raise when the stage starts, unless a checkpoint's
    classes replace the model's in between (``--ckpt_path``: ``on_load_checkpoint`` comes after
    ``setup``), so the error names the classes that really count.
    """
    model = module.class_set() if model is None else model
    dm = _datamodule(module)
    module.__dict__.pop("_class_error", None)
    if model is None or dm is None:
        return
    maps = _maps(module)
    for name in stage_dataset_names(stage):
        data = module.data_class_set(dm, name)
        try:
            maps[name] = None if data is None else check_classes(model, data)
        except ClassMismatchError as e:
            if not defer:
                raise
            maps[name] = None
            module.__dict__.setdefault("_class_error", e)


def adopt_checkpoint_classes(module: ClassesMixin, checkpoint: Mapping[str, Any], source: str | None = None) -> None:
    """``on_load_checkpoint``: the checkpoint's classes become the model's, after checking the data against them.

    The check comes first, so data with other classes is refused naming them (not by a tensor
    shape mismatch when the weights are loaded next).
    """
    trainer = getattr(module, "_trainer", None)
    path = source or (getattr(trainer, "ckpt_path", None) if trainer is not None else None)
    where = f"the checkpoint {path}" if path else "the checkpoint"
    record = checkpoint.get(CHECKPOINT_KEY)
    if isinstance(record, Mapping):
        classes: ClassSet | None = ClassSet.from_record(record, where)
    else:
        classes = module.class_set_from_hparams(checkpoint.get("hyper_parameters") or {}, where)
    if classes is None:
        return
    stage = getattr(getattr(trainer, "state", None), "fn", None) if trainer is not None else None
    meet_data(module, stage, classes)  # raises before anything changes
    module.adopt_class_set(classes)
    module.__dict__["_classes_source"] = classes.source


def announce(module: Any) -> None:
    """When a stage starts: raise the class mismatch :func:`meet_data` deferred, if any; print, on
    global rank 0 and once per run, the note of every mapping applied to the data."""
    error = module.__dict__.pop("_class_error", None)
    if error is not None:
        raise error
    printed = module.__dict__.setdefault("_class_notes", set())
    trainer = getattr(module, "_trainer", None)
    zero = trainer is None or trainer.is_global_zero
    for cmap in _maps(module).values():
        if cmap is not None and cmap.note not in printed:
            printed.add(cmap.note)
            if zero:
                print(cmap.note, flush=True)


def update_hparams(module: Any, **values: Any) -> None:
    """Set ``values`` in the module's hyper-parameters (what checkpoints and ``hparams.yaml`` record)."""
    for hp in (getattr(module, "hparams", None), getattr(module, "_hparams_initial", None)):
        if hp is not None:
            hp.update(values)


def record_classes(module: ClassesMixin, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: store the model's classes under :data:`CHECKPOINT_KEY`."""
    classes = module.class_set()
    if classes is not None:
        checkpoint[CHECKPOINT_KEY] = classes.record()
