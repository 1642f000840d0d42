"""Register :mod:`vggbackbone.timm_models` with timm when timm is imported, without importing it.

``import vggbackbone`` calls :func:`register_with_timm`: timm already imported -> the entry
points are registered at once; timm installed but not imported -> a finder at the head of
``sys.meta_path`` waits for ``import timm`` and registers them right after timm's own
``__init__`` ran (importing timm eagerly would make every ``import vggbackbone`` pay for timm);
timm absent -> nothing. Python has no "after import" hook and timm no plugin entry points, hence
this finder. It leaves timm's spec and loader in place (only the loader's ``exec_module`` of this
one import is wrapped) and removes itself after the first ``import timm``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["register_with_timm"]


def _register() -> None:
    importlib.import_module("vggbackbone.timm_models")


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != "timm":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec: ModuleSpec | None = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            try:
                _register()
            except Exception as e:  # never break the user's `import timm`; say what is missing
                warnings.warn(f"vggbackbone: the timm models vggbackbone_<arch> are not registered: {e}", stacklevel=2)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register_with_timm() -> None:
    """Make ``timm.create_model("vggbackbone_<arch>", ...)`` work (see the module docstring)."""
    if sys.modules.get("timm") is not None:
        _register()
    elif (
        "timm" not in sys.modules
        and importlib.util.find_spec("timm") is not None
        and not any(isinstance(f, _AfterTimmImport) for f in sys.meta_path)
    ):
        sys.meta_path.insert(0, _AfterTimmImport())
