"""The original Caffe VGG weights (``.caffemodel``), read with ``protobuf`` alone: no Caffe needed.

The VGG paper's release (``VGG_ILSVRC_16_layers.caffemodel``, ``VGG_ILSVRC_19_layers.caffemodel``;
the Faster R-CNN and FCN references fine-tune ``VGG16.v2.caffemodel`` / ``vgg16-fcn.caffemodel``,
the same weights re-saved) is a serialised ``caffe.NetParameter`` message. This module declares the
part of BVLC Caffe's ``src/caffe/proto/caffe.proto`` that holds weights (``NetParameter`` with the
V2 ``layer`` and the V1 ``layers`` encodings, ``LayerParameter``, ``V1LayerParameter``,
``BlobProto``, ``BlobShape``; same field numbers and types) as a ``FileDescriptorProto``, builds
the message classes at run time (``descriptor_pool`` + ``message_factory``: no ``protoc`` step, no
generated file), parses the file and maps the layers onto torchvision's VGG state-dict keys.

Reading a data file with protobuf runs no code: the parser only fills fields of the declared
messages (numbers, strings, bytes); unknown fields are kept as bytes and never interpreted.

Layer names are Caffe's VGG names: ``conv<b>_<l>`` (weights ``(out, in, k, k)``), ``fc6``,
``fc7``, ``fc8`` (InnerProduct ``(out, in)``; V1 files store them as ``(1, 1, out, in)``; FCN's
convolutionalised copy stores fc6 as ``(4096, 512, 7, 7)``, the same numbers in the same order).
They become torchvision's ``features.<i>.*`` and ``classifier.0/3/6.*``, so
``torchvision.models.vgg16().load_state_dict(...)`` takes the result as it is. fc6 stays a
``(4096, 25088)`` matrix whose columns are pool5's ``(512, 7, 7)`` in C-major order (Caffe's
flatten, PyTorch's too); :func:`vggbackbone.weights.reshape_head` makes it the 7x7 conv.

The tensors are returned as stored: conv1_1 still takes **BGR** input on the 0-255 scale minus
the mean pixel. :func:`vggbackbone.weights.load_backbone_weights` flips conv1_1's input
channels so the backbone takes RGB, with Caffe's normalisation (``normalization="caffe"``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["CaffeModelError", "caffe_messages", "is_caffemodel", "read_caffemodel", "read_caffemodel_blobs"]

#: V1LayerParameter.LayerType values (caffe.proto) of the layers that carry VGG weights.
V1_TYPES = {4: "Convolution", 14: "InnerProduct"}

_CONV = re.compile(r"^conv(\d+)_(\d+)$")


class CaffeModelError(ValueError):
    """A ``.caffemodel`` that cannot be read, or that is not a VGG of the paper."""


# ---------------------------------------------------------------------------- message definitions
def _file_descriptor(raw_data: bool) -> Any:
    """The caffe.proto subset as a ``FileDescriptorProto`` (proto2, package ``caffe``).

    ``raw_data``: declare ``BlobProto.data``/``double_data`` (``repeated float/double [packed =
    true]`` in caffe.proto) as ``repeated bytes``. A packed field is one length-delimited record,
    the same wire type as ``bytes``, so this reads the very same file and hands over each packed
    payload untouched: ``numpy.frombuffer`` then views 100M floats at once, where protobuf's own
    float containers would build them one Python float at a time (minutes for VGG16's fc6). Files
    that store the floats unpacked do not fill these fields (their records have another wire
    type); :func:`read_caffemodel_blobs` then reads the file again with the exact declaration.
    """
    from google.protobuf import descriptor_pb2

    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    fdp = descriptor_pb2.FileDescriptorProto(name="vggbackbone_caffe_subset.proto", package="caffe", syntax="proto2")

    def message(name: str, fields: Iterable[tuple[str, int, int, int, str | None, bool]]) -> None:
        msg = fdp.message_type.add(name=name)
        for field_name, number, label, ftype, type_name, packed in fields:
            f = msg.field.add(name=field_name, number=number, label=label, type=ftype)
            if type_name:
                f.type_name = type_name
            if packed:
                f.options.packed = True

    floats: list[tuple[str, int, int, int, str | None, bool]]
    if raw_data:
        floats = [("data", 5, rep, F.TYPE_BYTES, None, False), ("double_data", 8, rep, F.TYPE_BYTES, None, False)]
    else:
        floats = [("data", 5, rep, F.TYPE_FLOAT, None, True), ("double_data", 8, rep, F.TYPE_DOUBLE, None, True)]
    message("BlobShape", [("dim", 1, rep, F.TYPE_INT64, None, True)])
    message(
        "BlobProto",
        [
            ("shape", 7, opt, F.TYPE_MESSAGE, ".caffe.BlobShape", False),
            *floats,
            ("num", 1, opt, F.TYPE_INT64, None, False),  # the deprecated 4-D shape
            ("channels", 2, opt, F.TYPE_INT64, None, False),
            ("height", 3, opt, F.TYPE_INT64, None, False),
            ("width", 4, opt, F.TYPE_INT64, None, False),
        ],
    )
    message(
        "LayerParameter",  # V2 (Caffe from 2015 on)
        [
            ("name", 1, opt, F.TYPE_STRING, None, False),
            ("type", 2, opt, F.TYPE_STRING, None, False),
            ("blobs", 7, rep, F.TYPE_MESSAGE, ".caffe.BlobProto", False),
        ],
    )
    message(
        "V1LayerParameter",  # V1 (2014: the VGG release)
        [
            # an enum (LayerType) in caffe.proto: the same varint on the wire; see V1_TYPES
            ("type", 5, opt, F.TYPE_INT32, None, False),
            ("name", 4, opt, F.TYPE_STRING, None, False),
            ("blobs", 6, rep, F.TYPE_MESSAGE, ".caffe.BlobProto", False),
            # V0LayerParameter in caffe.proto, kept as its bytes: only its presence is read
            ("layer", 1, opt, F.TYPE_BYTES, None, False),
        ],
    )
    message(
        "NetParameter",
        [
            ("name", 1, opt, F.TYPE_STRING, None, False),
            ("layer", 100, rep, F.TYPE_MESSAGE, ".caffe.LayerParameter", False),
            ("layers", 2, rep, F.TYPE_MESSAGE, ".caffe.V1LayerParameter", False),
        ],
    )
    return fdp


@cache
def caffe_messages(raw_data: bool = False) -> SimpleNamespace:
    """The message classes ``NetParameter``, ``LayerParameter``, ``V1LayerParameter``,
    ``BlobProto``, ``BlobShape`` of the caffe.proto subset (see :func:`_file_descriptor`).

    With ``raw_data=False`` (the default) they are caffe.proto's own declarations, so they also
    *write* files Caffe reads (``NetParameter(...).SerializeToString()``), as the tests do.
    """
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()  # its own pool: no clash with another "caffe" package
    pool.Add(_file_descriptor(raw_data))
    names = ("NetParameter", "LayerParameter", "V1LayerParameter", "BlobProto", "BlobShape")
    return SimpleNamespace(
        **{n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{n}")) for n in names}
    )


# ---------------------------------------------------------------------------- reading
def is_caffemodel(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a Caffe weights file (by its ``.caffemodel`` suffix)."""
    return Path(path).suffix == ".caffemodel"


def _blob_shape(blob: Any) -> tuple[int, ...]:
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    return tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))


def _blob_array(blob: Any, raw: bool) -> np.ndarray | None:
    """The blob's values as float32 (``None`` when a raw read found no packed payload)."""
    count = int(np.prod(_blob_shape(blob), dtype=np.int64))
    if raw:
        # one packed record per field as Caffe writes it (protobuf allows several: joined)
        floats = blob.data[0] if len(blob.data) == 1 else b"".join(blob.data)
        doubles = b"".join(blob.double_data)
        if len(floats) == 4 * count and not doubles:
            return np.frombuffer(floats, dtype="<f4").copy()  # protobuf's fixed32 is little-endian
        if len(doubles) == 8 * count and not floats:
            return np.frombuffer(doubles, dtype="<f8").astype(np.float32)
        return None
    values = np.asarray(blob.data, dtype=np.float32) if len(blob.data) else np.asarray(blob.double_data)
    return values.astype(np.float32, copy=False)


def _parse(data: bytes, raw: bool, source: str) -> tuple[list[tuple[str, str, list[Any]]], str, str]:
    from google.protobuf.message import DecodeError

    msgs = caffe_messages(raw)
    try:
        net = msgs.NetParameter.FromString(data)
    except DecodeError as e:
        raise CaffeModelError(f"{source}: not a Caffe NetParameter file ({e})") from e
    if len(net.layer) and len(net.layers):
        raise CaffeModelError(f"{source}: holds both V2 'layer' and V1 'layers' entries; Caffe refuses such a net too")
    if len(net.layer):
        return [(layer.name, layer.type, list(layer.blobs)) for layer in net.layer], "V2", net.name
    if any(layer.HasField("layer") for layer in net.layers):
        raise CaffeModelError(
            f"{source}: V0 layer encoding (pre-2014 Caffe); upgrade it with Caffe's upgrade_net_proto_binary first"
        )
    layers = [
        (layer.name, V1_TYPES.get(layer.type, f"V1 type {layer.type}"), list(layer.blobs)) for layer in net.layers
    ]
    return layers, "V1", net.name


def read_caffemodel_blobs(path: str | os.PathLike[str]) -> tuple[dict[str, tuple[str, list[np.ndarray]]], str, str]:
    """Every layer of ``path`` that carries blobs: ``{name: (type, [float32 array shaped as stored])}``,
    with the encoding (``"V1"``/``"V2"``) and the net's name.

    Each blob's value count must equal its shape's product; a missing or unreadable file raises
    ``FileNotFoundError`` / :class:`CaffeModelError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    data = path.read_bytes()
    layers, encoding, name = _parse(data, True, str(path))
    out: dict[str, tuple[str, list[np.ndarray]]] = {}
    exact: list[tuple[str, str, list[Any]]] | None = None
    for i, (lname, ltype, blobs) in enumerate(layers):
        if not blobs:
            continue
        arrays = [_blob_array(b, raw=True) for b in blobs]
        if any(a is None for a in arrays):  # not packed (or odd): read the file as caffe.proto declares it
            exact = exact or _parse(data, False, str(path))[0]
            arrays = [_blob_array(b, raw=False) for b in exact[i][2]]
        shaped = []
        for j, (blob, arr) in enumerate(zip(blobs, arrays)):
            shape = _blob_shape(blob)
            assert arr is not None
            if arr.size != int(np.prod(shape, dtype=np.int64)):
                raise CaffeModelError(
                    f"{path}: layer {lname!r} blob {j} holds {arr.size} values for shape {shape}: a truncated file?"
                )
            shaped.append(arr.reshape(shape))
        if lname in out:
            raise CaffeModelError(f"{path}: two layers named {lname!r} carry weights")
        out[lname] = (ltype, shaped)
    if not out:
        raise CaffeModelError(f"{path}: no layer carries weights (a net definition without weights?)")
    return out, encoding, name


def read_caffemodel(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A VGG ``.caffemodel`` as a torchvision ``VGG`` state dict, and what was read.

    Returns ``(state_dict, info)``: ``features.<i>.weight/bias`` for ``conv<b>_<l>`` (torchvision's
    flat index, blocks of conv+ReLU pairs then a pool), ``classifier.0/3/6.*`` for fc6/fc7/fc8
    (``(out, in)`` matrices); conv1_1 as stored (BGR input). ``info`` holds ``source``
    (``"caffemodel"``), ``caffe_encoding`` (``"V1"``/``"V2"``), ``caffe_name`` and ``blocks``
    (convolutions per block). Every tensor's shape is checked against the chain of layers (a
    conv's input channels are the previous conv's outputs, fc6 takes the last block's channels
    x 7 x 7...); any other layer with weights, a gap in the ``conv<b>_<l>`` numbering or a missing
    bias raises :class:`CaffeModelError` naming it.
    """
    layers, encoding, net_name = read_caffemodel_blobs(path)
    convs: dict[tuple[int, int], str] = {}
    other: list[str] = []
    for lname in layers:
        m = _CONV.match(lname)
        if m:
            convs[(int(m.group(1)), int(m.group(2)))] = lname
        elif lname not in ("fc6", "fc7", "fc8"):
            other.append(lname)
    if other:
        raise CaffeModelError(
            f"{path}: layers {other} are not part of a VGG of the paper (conv<b>_<l>, fc6, fc7, fc8): "
            f"not a VGG ImageNet model"
        )
    if not convs:
        raise CaffeModelError(f"{path}: no conv<b>_<l> layers: not a VGG model")
    blocks: list[int] = []
    for b in range(1, max(k[0] for k in convs) + 1):
        n = max((c for bb, c in convs if bb == b), default=0)
        if n == 0 or any((b, c) not in convs for c in range(1, n + 1)):
            raise CaffeModelError(
                f"{path}: the convolutions of block {b} are not conv{b}_1..conv{b}_n: {sorted(convs)}"
            )
        blocks.append(n)

    def pair(lname: str) -> tuple[np.ndarray, np.ndarray]:
        ltype, blobs = layers[lname]
        if len(blobs) != 2:
            raise CaffeModelError(f"{path}: layer {lname!r} ({ltype}) has {len(blobs)} blobs, expected weight and bias")
        return blobs[0], blobs[1]

    sd: dict[str, Tensor] = {}
    index, in_ch = 0, 3
    for b, n in enumerate(blocks, start=1):
        for c in range(1, n + 1):
            lname = f"conv{b}_{c}"
            w, bias = pair(lname)
            if w.ndim != 4 or w.shape[1] != in_ch or w.shape[2] != w.shape[3]:
                raise CaffeModelError(
                    f"{path}: {lname} weight has shape {w.shape}, expected (out, {in_ch}, k, k) after the layer before"
                )
            if bias.size != w.shape[0]:
                raise CaffeModelError(f"{path}: {lname} bias has {bias.size} values for {w.shape[0]} filters")
            sd[f"features.{index}.weight"] = torch.from_numpy(w)
            sd[f"features.{index}.bias"] = torch.from_numpy(bias.reshape(-1))
            index += 2  # conv, ReLU
            in_ch = w.shape[0]
        index += 1  # the block's max-pool

    fc_in = in_ch * 7 * 7  # pool5 (C, 7, 7) flattened
    for lname, key in (("fc6", "classifier.0"), ("fc7", "classifier.3"), ("fc8", "classifier.6")):
        if lname not in layers:
            continue
        w, bias = pair(lname)
        out = bias.size
        if w.size != out * fc_in:
            what = f"{in_ch}x7x7 = {fc_in}" if lname == "fc6" else str(fc_in)
            raise CaffeModelError(
                f"{path}: {lname} weight has shape {w.shape} ({w.size} values), expected {out} outputs x {what} inputs"
            )
        sd[f"{key}.weight"] = torch.from_numpy(w.reshape(out, fc_in))
        sd[f"{key}.bias"] = torch.from_numpy(bias.reshape(-1))
        fc_in = out
    missing_fc = [n for n in ("fc6", "fc7") if n not in layers]
    if "fc8" in layers and missing_fc:
        raise CaffeModelError(f"{path}: has fc8 but not {missing_fc}")
    info = {"source": "caffemodel", "caffe_encoding": encoding, "caffe_name": net_name, "blocks": blocks}
    return sd, info
