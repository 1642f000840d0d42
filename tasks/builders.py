"""How a task reaches its model builder without copying the builder's argument list.

A task names a small registry of builders (``{"fasterrcnn": fasterrcnn_vgg}``, ``{"fcn8s": ...,
"unet": unet_vgg}``) and takes the builders' own arguments as ``**model_kwargs``.
:func:`builder_signature` then gives the task's ``__init__`` a signature made of its own
parameters plus every builder parameter (type and default read from the builder), so
LightningCLI/jsonargparse offers them as ``model.<name>`` keys, types them, and refuses unknown
ones; :class:`BuilderArgs` checks the same in Python (an unknown key is an error naming it and
the accepted ones) and gives the full argument set of the chosen builder, defaults filled in, so a
checkpoint stores every structural choice as an ordinary hyper-parameter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = ["BuilderArgs", "builder_signature"]

_EMPTY = inspect.Parameter.empty


def _params(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def _union(annotations: list[Any]) -> Any:
    """The union of the builders' annotations of one option, plus ``None``; strings (postponed
    annotations) stay a string, resolved like the builders' own."""
    if all(isinstance(a, str) for a in annotations):
        return " | ".join([*dict.fromkeys(a.removesuffix(" | None") for a in annotations), "None"])
    unique = list(dict.fromkeys(annotations))
    return Union[(*unique, type(None))]


@dataclass(frozen=True)
class BuilderArgs:
    """The builder parameters a task exposes, from a registry ``{name: builder}``.

    Args:
        builders: registry of builders; the options of all of them are offered.
        supplied: parameters the task fills itself (``num_classes``, ``weights_backbone``...).
        excluded: builder parameters not offered (callables such as ``norm_layer``...).
        extra: further parameters from other callables, e.g. ``{"norm_eval": VGGBackbone}``:
            offered with that callable's type and default, passed to the builder by name (for
            builders that forward ``**kwargs`` to it).
        passthrough: name of the dict option that carries the builder's own ``**kwargs``
            (``detector`` for torchvision's ``FasterRCNN`` arguments), or ``None``.
    """

    builders: Mapping[str, Callable[..., Any]]
    supplied: frozenset[str] = frozenset()
    excluded: frozenset[str] = frozenset()
    extra: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    passthrough: str | None = None

    def per_builder_defaults(self) -> frozenset[str]:
        """Options whose default differs between builders (``min_size``: 600 for Faster R-CNN, 800
        for RetinaNet): offered with the default ``None``, which means "the chosen builder's default"."""
        seen: dict[str, Any] = {}
        differ: set[str] = set()
        for builder in self.builders.values():
            for name, p in _params(builder).items():
                if name in self.supplied or name in self.excluded:  # not options (fcn's variant: the head)
                    continue
                if name in seen and seen[name] != p.default:
                    differ.add(name)
                seen.setdefault(name, p.default)
        return frozenset(differ)

    def parameters(self) -> dict[str, inspect.Parameter]:
        """Every offered option, keyword-only, typed and defaulted by the first builder that has it
        (``None``, the chosen builder's default, where builders disagree: :meth:`per_builder_defaults`)."""
        out: dict[str, inspect.Parameter] = {}
        sources = [_params(b) for b in self.builders.values()]
        sources += [{n: _params(fn)[n]} for n, fn in self.extra.items()]
        per_builder = self.per_builder_defaults()
        for params in sources:
            for name, p in params.items():
                if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or name in self.supplied or name in self.excluded:
                    continue
                if name in per_builder:
                    if name not in out:
                        annotation = _union(
                            [_params(b)[name].annotation for b in self.builders.values() if name in _params(b)]
                        )
                        out[name] = p.replace(kind=p.KEYWORD_ONLY, default=None, annotation=annotation)
                    continue
                # a tuple default is written as a YAML list: give it as one, so it round-trips
                default = list(p.default) if isinstance(p.default, tuple) else p.default
                out.setdefault(name, p.replace(kind=p.KEYWORD_ONLY, default=default))
        if self.passthrough:
            out[self.passthrough] = inspect.Parameter(
                self.passthrough, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=dict[str, Any] | None
            )
        return out

    def resolve(self, owner: str, name: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """Arguments of builder ``name`` from the options ``given``: defaults filled in, checked.

        Raises ``ValueError`` naming the key for an option no builder has, or an option of another
        builder set to a value other than its default.
        """
        if name not in self.builders:
            raise ValueError(f"{owner}: unknown model {name!r}; registered: {', '.join(self.builders)}")
        offered = self.parameters()
        unknown = sorted(set(given) - set(offered))
        if unknown:
            raise ValueError(f"{owner}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(offered))}")
        own = _params(self.builders[name])
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in own.values())
        per_builder = self.per_builder_defaults()
        out: dict[str, Any] = {}
        for key, p in offered.items():
            if key == self.passthrough:
                continue
            accepted = key in own or (key in self.extra and takes_kwargs)
            value = given.get(key, p.default)
            if key in per_builder and value is None and key in own:
                value = own[key].default  # None: this builder's own default
            if accepted:
                if value is not _EMPTY:
                    out[key] = value
            elif key in given and given[key] != p.default:
                raise ValueError(f"{owner}: option {key!r} does not apply to model {name!r}")
        return out

    def hparams(self, name: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every offered option's value (given or default): what a checkpoint stores."""
        own = _params(self.builders[name]) if name in self.builders else {}
        per_builder = self.per_builder_defaults()
        values = {k: given.get(k, p.default) for k, p in self.parameters().items()}
        for k in per_builder & set(own):
            if values.get(k) is None:
                d = own[k].default
                values[k] = list(d) if isinstance(d, tuple) else d  # the chosen builder's default, stored
        return {k: v for k, v in values.items() if v is not _EMPTY}


def builder_signature(args: BuilderArgs, renamed_options: Iterable[str] = ()) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: ``cls.__init__`` (whose last parameter is ``**model_kwargs``) gets a
    signature with the builders' options after its own, so LightningCLI offers ``model.<option>``.

    ``renamed_options``: old option names still accepted (typed ``Any``, default ``None``), with
    those the class declares (``renamed_options``, ``moved_options``, ``old_options`` of
    :class:`tasks.module.TaskModule`).
    """

    def wrap(cls: type[Any]) -> type[Any]:
        own = [p for p in _params(cls.__init__).values() if p.kind != p.VAR_KEYWORD]
        names = {p.name for p in own}
        extra = [p for n, p in args.parameters().items() if n not in names]
        declared = [*getattr(cls, "renamed_options", {}), *getattr(cls, "moved_options", {})]
        old = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Any)
            for n in dict.fromkeys([*renamed_options, *declared, *getattr(cls, "old_options", ())])
            if n not in names
        ]
        positional = [p for p in own if p.kind != p.KEYWORD_ONLY]
        keyword = [p for p in own if p.kind == p.KEYWORD_ONLY]
        cls.__init__.__signature__ = inspect.Signature(positional + keyword + extra + old)  # type: ignore[attr-defined]
        cls.builder_args = args
        return cls

    return wrap
