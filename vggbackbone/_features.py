"""``FeatureInfo``: timm's feature-map metadata interface, without depending on timm.

timm's class lives in a private module (``timm.models._features``) and would make timm a hard
dependency of a plain-PyTorch library, so the few methods users call are re-implemented here
with the same names and semantics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["FeatureInfo"]


class FeatureInfo:
    """Channels, reduction (stride) and module name of each returned feature map.

    ``info[i]`` is a dict ``{"num_chs", "reduction", "module", "key"}`` for the i-th output,
    in the order the backbone returns them.
    """

    def __init__(self, feature_info: Sequence[dict[str, Any]]) -> None:
        self.info = [dict(f) for f in feature_info]

    def _get(self, key: str, idx: int | Sequence[int] | None) -> Any:
        if idx is None:
            return [f[key] for f in self.info]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """Number of channels of each output (or of output ``idx``)."""
        return self._get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """Stride of each output with respect to the input image."""
        return self._get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """Name of the module whose output is returned (``features.conv5`` ...)."""
        return self._get("module", idx)

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        """The info dicts, optionally restricted to ``keys`` and to output(s) ``idx``."""

        def pick(f: dict[str, Any]) -> dict[str, Any]:
            return dict(f) if keys is None else {k: f[k] for k in keys}

        if idx is None:
            return [pick(f) for f in self.info]
        if isinstance(idx, (tuple, list)):
            return [pick(self.info[i]) for i in idx]
        return pick(self.info[idx])

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """Value of ``key`` for every output (or for ``idx``)."""
        return self._get(key, idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        rows = ", ".join(f"{f['key']}(C={f['num_chs']}, s={f['reduction']})" for f in self.info)
        return f"FeatureInfo([{rows}])"
