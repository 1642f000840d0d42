"""ONNX export of a backbone (or any model taking one image batch), verified with onnxruntime.

>>> from vggbackbone import VGGBackbone
>>> from vggbackbone.deploy import export_onnx
>>> bb = VGGBackbone("vgg16", ["conv3", "conv4", "conv5"], weights="vgg16.pth").eval()
>>> export_onnx(bb, "vgg16.onnx", torch.randn(1, 3, 224, 224))   # doctest: +SKIP

The graph takes ``images`` of shape ``(batch, C, height, width)`` (all three dynamic by default)
and has one output per returned tap, named by the output keys (``conv3``, ``conv4``...).

torch's own exporter does the work (``torch.onnx.export(..., dynamo=True)``, via
``torch.export``); this module adds what it leaves to the caller: naming the outputs after the
returned dict, dynamic batch/height/width in one flag, writing atomically, and checking the file
with onnxruntime on the example input *and* on an input of another batch size and image size,
which is what proves the dynamic axes work. Task models go through
:func:`~vggbackbone.deploy.task_export.export_task_onnx`, which sends segmentation and ReID
models here and detectors to :mod:`~vggbackbone.deploy.detector_export`; the backbone command
line (``python -m vggbackbone.export``) is :mod:`~vggbackbone.deploy.backbone_cli`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils import atomic_path
from .loggers import export_log

__all__ = ["DEFAULT_OPSET", "ExportVerificationError", "export_onnx", "output_names_of", "verify_onnx"]

#: ONNX opset written by default (supported by onnxruntime >= 1.14).
DEFAULT_OPSET = 18


class ExportVerificationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model's outputs."""


def _flatten_outputs(out: Any) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of a model output: a Tensor, a dict of Tensors, or a tuple/list of them."""
    if isinstance(out, Tensor):
        return ["output"], [out]
    if isinstance(out, Mapping):
        names = [str(k) for k in out]
        tensors = list(out.values())
    elif isinstance(out, (tuple, list)):
        names = [f"output{i}" for i in range(len(out))]
        tensors = list(out)
    else:
        raise TypeError(f"cannot export a model returning {type(out).__name__}; return a Tensor, dict or tuple")
    if not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("export_onnx handles outputs that are Tensors or a flat dict/tuple of Tensors")
    return names, tensors


def output_names_of(model: nn.Module, example_input: Tensor) -> list[str]:
    """ONNX output names for ``model``'s output on ``example_input`` (dict keys, or ``output``...)."""
    with torch.no_grad():
        return _flatten_outputs(model(example_input))[0]


def _second_input(example_input: Tensor, multiple: int) -> Tensor:
    """An input of another batch size and image size, for checking dynamic axes."""
    n, c, h, w = example_input.shape
    return torch.randn(n + 1, c, h + multiple, w + 2 * multiple, dtype=example_input.dtype)


def verify_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    inputs: Sequence[Tensor],
    *,
    input_name: str = "images",
    rtol: float = 1e-4,
    atol: float = 1e-5,
    name: str | os.PathLike[str] | None = None,
) -> float:
    """Run ``path`` with onnxruntime on each input and compare with ``model``.

    Each output passes when ``max|onnx - torch| <= atol + rtol * max|torch|``: ``rtol`` is
    relative to that output's largest magnitude (so it reads the same for taps of any scale,
    and stays tight for small outputs such as ReID embeddings), ``atol`` is absolute (it only
    matters for outputs that are all near zero). Raises :class:`ExportVerificationError`
    (naming the file, or ``name`` if given, the output and the input shape) when an output
    fails, or when shapes differ. Returns the worst relative error ``max|onnx - torch| /
    max|torch|`` over all outputs (an all-zero output counts its absolute error).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    label = name if name is not None else path  # the file's final name when checking a temp file
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            names, expected = _flatten_outputs(model(x))
        got = session.run(None, {input_name: x.detach().cpu().numpy()})
        for out_name, want, have in zip(names, expected, got):
            want = want.detach().float().cpu()
            have_t = torch.from_numpy(have).float()
            if tuple(have_t.shape) != tuple(want.shape):
                raise ExportVerificationError(
                    f"{label}: output '{out_name}' has shape {tuple(have_t.shape)} in onnxruntime but "
                    f"{tuple(want.shape)} in PyTorch for input {tuple(x.shape)}"
                )
            if want.numel() == 0:
                continue
            diff = float((have_t - want).abs().max())
            scale = float(want.abs().max())
            allowed = atol + rtol * scale
            worst = max(worst, diff / scale if scale > 0 else diff)
            if not diff <= allowed:  # NaN fails too
                raise ExportVerificationError(
                    f"{label}: output '{out_name}' differs from PyTorch by {diff:.3g} at most (its largest "
                    f"magnitude is {scale:.3g}, relative error {diff / scale if scale > 0 else float('inf'):.3g}) "
                    f"for input {tuple(x.shape)}; allowed atol + rtol * {scale:.3g} = {allowed:.3g} "
                    f"(atol={atol:g}, rtol={rtol:g})"
                )
    return worst


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor,
    dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    *,
    input_name: str = "images",
    output_names: Sequence[str] | None = None,
    verify: bool | None = None,
    verify_inputs: Sequence[Tensor] | None = None,
    size_multiple: int = 32,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export ``model`` (put in eval mode) to ONNX at ``path``, atomically; return ``path``.

    Args:
        model: takes one ``(N, C, H, W)`` tensor; returns a Tensor, a dict of Tensors (a
            :class:`~vggbackbone.VGGBackbone`: one output per tap, named by its key) or a tuple.
        path: the ``.onnx`` file, written through a temporary file and renamed only once it is
            complete (and verified, when verifying), so a failed export leaves no partial file.
        example_input: an input the graph is traced with, e.g. ``torch.randn(1, 3, 224, 224)``.
        dynamic: batch, height and width are dynamic axes (``False``: fixed to the example's).
        opset: ONNX opset version.
        input_name: name of the graph input.
        output_names: names of the graph outputs (default: the dict keys, or ``output``...).
        verify: check the file with onnxruntime against the eager model. Default: when
            onnxruntime is installed. ``True`` without onnxruntime raises ``ImportError``.
        verify_inputs: inputs to check on. Default: ``example_input`` and, when ``dynamic``, an
            input with one more image and ``size_multiple`` / ``2 * size_multiple`` more pixels
            in height / width (proves the dynamic axes work).
        size_multiple: see ``verify_inputs``; 32 suits a stride-32 network.
        rtol, atol: each output must satisfy ``max|onnx - torch| <= atol + rtol * max|torch|``
            (see :func:`verify_onnx`).
        metadata: more ONNX ``metadata_props`` (e.g. the class names of a task model), beside
            the normalisation, taps and strides written for every model.

    The whole model is stored in the one file (no external data), which limits it to 2 GiB:
    every VGG, fc6/fc7 included, fits.
    """
    path = Path(path)
    if example_input.dim() != 4:
        raise ValueError(f"example_input must be (N, C, H, W), got shape {tuple(example_input.shape)}")
    was_training = model.training
    model.eval()
    try:
        names = list(output_names) if output_names is not None else output_names_of(model, example_input)
        dynamic_shapes = None
        if dynamic:
            dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
            dynamic_shapes = (dims,)
        if verify is None:
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                verify = False
                export_log.warning("onnxruntime is not installed: %s is written without being checked", path)
            else:
                verify = True
        with torch.no_grad():
            program = torch.onnx.export(
                model,
                (example_input,),
                dynamo=True,
                input_names=[input_name],
                output_names=names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                verbose=False,
            )
        program.model.metadata_props.update({**_metadata(model), **dict(metadata or {})})
        with atomic_path(path) as tmp:
            program.save(tmp, external_data=False)
            if verify:
                inputs = list(verify_inputs) if verify_inputs is not None else [example_input]
                if verify_inputs is None and dynamic:
                    inputs.append(_second_input(example_input, size_multiple))
                worst = verify_onnx(tmp, model, inputs, input_name=input_name, rtol=rtol, atol=atol, name=path)
                export_log.info(
                    "%s matches PyTorch on %d input(s) (worst relative error %.2g)", path, len(inputs), worst
                )
    finally:
        model.train(was_training)
    return path


def _metadata(model: nn.Module) -> dict[str, str]:
    """What a consumer of the ONNX file needs to feed and read it: normalisation, taps, strides.

    Stored as ONNX ``metadata_props`` (read them with ``onnx.load(path).metadata_props`` or
    ``onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map``).
    """
    meta: dict[str, str] = {"producer": "vggbackbone"}
    for attr in ("arch", "output_stride"):
        if hasattr(model, attr):
            meta[attr] = json.dumps(getattr(model, attr))
    norm = getattr(model, "normalization", None)
    if hasattr(norm, "to_dict"):
        meta["normalization"] = json.dumps(norm.to_dict())
    info = getattr(model, "feature_info", None)
    if hasattr(info, "get_dicts"):
        meta["feature_info"] = json.dumps(info.get_dicts(keys=["key", "num_chs", "reduction"]))
    return meta
