"""Static int8 quantisation of the VGG backbones inside a model (torchao's PT2E flow).

Each target (by default every outermost :class:`~vggbackbone.VGGBackbone`: the part that
dominates the time of every task model) is exported with :func:`torch.export.export`, annotated
by torchao's ``X86InductorQuantizer``, observed on the inputs it receives while the whole model
runs on the calibration batches, converted, and compiled with inductor + freezing, which lowers
the quantise/conv/dequantise patterns to oneDNN int8 convolutions. The rest of the model (a
detector's RPN and RoI heads, decoders, BNNeck) stays fp32.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .calibration import record_submodule_inputs

__all__ = ["INT8_TOLERANCE", "QuantizedModule", "quantization_targets", "quantize_int8"]

#: Documented bounds for int8 vs the fp32 eager model (``tests/test_int8.py``, tiny random-weight
#: VGGs; real trained weights quantise better): max relative error ``max|y - y_ref| / max|y_ref|``
#: of dense outputs (backbone taps, segmentation logits), and the minimum cosine similarity of
#: each ReID embedding to its fp32 counterpart.
INT8_TOLERANCE: dict[str, float] = {"relative_error": 0.15, "embedding_cosine": 0.99}


def quantization_targets(model: nn.Module) -> list[str]:
    """Qualified names of the outermost :class:`~vggbackbone.VGGBackbone` modules of ``model``
    (``""``: the model itself): what :func:`quantize_int8` quantises by default."""
    from ..vgg import VGGBackbone

    names: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, VGGBackbone) and not any(name.startswith(f"{n}.") or n == "" for n in names):
            names.append(name)
    return names


def _example_for_export(t: Any) -> Any:
    # torch.export specialises dimensions of size 1 (a one-image batch would fix N = 1), so the
    # traced example gets 2 images; calibration itself sees the real inputs.
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == 1:
        return torch.cat([t, t])
    return t


def _dynamic_shapes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    from torch.export import Dim

    return tuple(
        {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() == 4 else None for a in args
    )


class QuantizedModule(nn.Module):
    """A submodule replaced by its int8 graph (made by :func:`quantize_int8`).

    ``forward`` validates the input as the original did (``_check_input`` where the original
    has one) and runs the quantised graph, compiled with inductor and ``freezing`` when
    ``compiled`` (the first call per input shape compiles). Attributes of the original
    (``return_layers``, ``feature_info``, ``out_channels`` ...) stay reachable; the original's
    weights are kept off the state dict.
    """

    def __init__(self, quantized: nn.Module, original: nn.Module, compiled: bool) -> None:
        super().__init__()
        self.quantized = quantized
        self.compiled = compiled
        self.training = False
        self.__dict__["original"] = original  # attributes only: not a registered submodule
        self.__dict__["_runner"] = torch.compile(quantized) if compiled else quantized

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        check = getattr(self.original, "_check_input", None)
        if check is not None and args and isinstance(args[0], torch.Tensor):
            check(args[0])
        if not self.compiled:
            return self._runner(*args, **kwargs)
        # Inductor's int8 weight prepacking (onednn.qconv_prepack) only runs when ``freezing`` is
        # set in the global config while compiling: torch.compile(options={"freezing": True}) fails
        # on this graph with "UnsupportedOperatorException: onednn.qconv_prepack" (torch 2.14).
        with torch._inductor.config.patch(freezing=True):
            return self._runner(*args, **kwargs)

    def train(self, mode: bool = True) -> QuantizedModule:
        # an exported graph refuses .train()/.eval() (torchao's move_exported_model_to_eval is the
        # way); it is put in eval mode once, when made, and there is no training mode to go to
        if mode:
            raise RuntimeError("an int8 QuantizedModule cannot be trained; quantise the trained model again")
        self.training = False
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"], name)

    def extra_repr(self) -> str:
        return f"original={type(self.original).__name__}, compiled={self.compiled}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_int8(
    model: nn.Module,
    calibration: Iterable[Any],
    targets: list[str] | None = None,
    *,
    compile: bool = True,
) -> nn.Module:
    """Quantise ``targets`` of ``model`` to int8 with torchao's PT2E flow; returns the model.

    Static quantisation for x86 (``X86InductorQuantizer`` with its default config: per-channel
    symmetric int8 weights, per-tensor affine uint8 activations observed with a histogram):
    each target is exported with :func:`torch.export.export` (batch, height and width dynamic),
    annotated, observed on the inputs it receives while the *whole* model runs on the
    ``calibration`` batches, converted, and optionally compiled with inductor + freezing (which
    lowers the quantise/conv/dequantise patterns to oneDNN int8 convolutions; without
    compiling, the graph runs reference kernels and is slow: for checking accuracy only).

    Args:
        model: an eval-mode model on the CPU; modified in place (targets are replaced by
            :class:`QuantizedModule`).
        calibration: input batches, each passed as ``model(batch)`` (a tensor, or for a
            detector a list of images); a few batches of real images suffice.
        targets: qualified submodule names to quantise (``""`` = the whole model); default:
            :func:`quantization_targets` (every outermost :class:`~vggbackbone.VGGBackbone`; a
            detector's RPN/RoI heads stay fp32), or the whole model when it contains none.
        compile: compile the quantised graphs.

    Does not look at the CPU's features (see :func:`~vggbackbone.deploy.hardware.int8_supported`);
    the kernels run on any x86 CPU with AVX2, fast with VNNI/AMX.
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    if model.training:
        raise ValueError("quantize_int8 needs an eval-mode model")
    if targets is None:
        targets = quantization_targets(model) or [""]
    modules = {name: model.get_submodule(name) if name else model for name in targets}
    recorded = record_submodule_inputs(model, modules, calibration)

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    for name, module in modules.items():
        args, kwargs = recorded[name][0]
        example = tuple(_example_for_export(a) for a in args)
        with torch.no_grad():
            graph = torch.export.export(module, example, kwargs, dynamic_shapes=_dynamic_shapes(example)).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for a, k in recorded[name]:
                prepared(*a, **k)
        quantized = QuantizedModule(move_exported_model_to_eval(convert_pt2e(prepared)), module, compiled=compile)
        if name:
            _set_submodule(model, name, quantized)
        else:
            model = quantized
    return model
