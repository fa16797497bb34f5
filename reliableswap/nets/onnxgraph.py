"""A feed-forward ONNX graph run in torch: the few operators a face network exported to ONNX uses.

The graph is read with the ``onnx`` package (never with a runtime of its own), its constant
subgraphs (int8 block-quantized weights through ``DequantizeLinear`` and ``Reshape``) are folded to
float tensors once at load, and the remaining nodes run as torch ops: batched, on any device, in
float32 or float16, and differentiable. Graph inputs that no node reads (SFace as shipped declares
174 of them) are ignored; an operator outside :data:`OPS` is refused at load, naming the file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from triplets.jsonl import UnreadableFile, read_bounded
from reliableswap.errors import UserError

#: Largest .onnx file read (SFace int8: 10.7 MB; fp32: 37 MB).
MAX_ONNX_BYTES = 512 << 20


class OnnxError(UserError):
    """A model file that cannot be run; ``str(err)`` is one line naming it."""


def _dequantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, *, axis: int = 1,
                block_size: int = 0) -> torch.Tensor:
    """ONNX DequantizeLinear: ``(x − zero) · scale`` per tensor, per axis, or per block along ``axis``."""
    x = x.to(torch.float32)
    zero = torch.zeros((), dtype=torch.float32) if zero is None else zero.to(torch.float32)
    if scale.dim() == 0:
        return (x - zero) * scale
    axis = axis % x.dim()
    if block_size > 0:  # scale has x's shape with ceil(n / block) along axis
        n = x.shape[axis]
        scale = scale.repeat_interleave(block_size, axis).narrow(axis, 0, n)
        zero = zero.repeat_interleave(block_size, axis).narrow(axis, 0, n) if zero.dim() else zero
        return (x - zero) * scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return (x - (zero.reshape(shape) if zero.dim() else zero)) * scale.reshape(shape)


def _reshape(x: torch.Tensor, shape: torch.Tensor, *, allowzero: int = 0) -> torch.Tensor:
    dims = [int(v) for v in shape.tolist()]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, strides=(1, 1), pads=(0, 0, 0, 0),
          dilations=(1, 1), group: int = 1, kernel_shape=None, auto_pad: bytes = b"NOTSET") -> torch.Tensor:
    if auto_pad not in (b"NOTSET", "NOTSET"):
        raise OnnxError(f"Conv auto_pad={auto_pad!r} is not supported")
    k = len(pads) // 2
    if list(pads[:k]) != list(pads[k:]):  # asymmetric: pad explicitly (F.pad: last dim first)
        x = F.pad(x, [p for i in reversed(range(k)) for p in (pads[i], pads[i + k])])
        pads = (0,) * (2 * k)
    return F.conv2d(x, w.to(x.dtype), None if b is None else b.to(x.dtype), tuple(strides), tuple(pads[:k]), tuple(dilations), group)


def _batchnorm(x, gamma, beta, mean, var, *, epsilon: float = 1e-5, momentum: float = 0.9, training_mode: int = 0):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = (gamma / torch.sqrt(var + epsilon)).to(x.dtype)
    return (x - mean.to(x.dtype).reshape(shape)) * inv.reshape(shape) + beta.to(x.dtype).reshape(shape)


def _prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    slope = slope.to(x.dtype)
    per_channel = x.dim() >= 2 and slope.numel() == x.shape[1] and (slope.dim() == 1 or slope.shape[1:].numel() == 1)
    if per_channel or slope.numel() == 1:  # one slope per channel ([C], [C,1,1]) or one for all: the fused kernel
        return F.prelu(x, slope.reshape(-1))
    return torch.where(x >= 0, x, x * slope)


def _gemm(a, b, c=None, *, alpha: float = 1.0, beta: float = 1.0, transA: int = 0, transB: int = 0):
    a = a.transpose(-1, -2) if transA else a
    b = (b.transpose(-1, -2) if transB else b).to(a.dtype)
    y = alpha * (a @ b)
    return y if c is None else y + beta * c.to(a.dtype)


def _binary(f: Callable) -> Callable:
    return lambda a, b: f(a, b.to(a.dtype) if torch.is_tensor(b) and b.is_floating_point() and a.is_floating_point() else b)


#: ONNX operator → torch function of its inputs (keyword arguments: the node's attributes).
OPS: dict[str, Callable[..., torch.Tensor]] = {
    "DequantizeLinear": _dequantize,
    "Reshape": _reshape,
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "PRelu": _prelu,
    "Gemm": _gemm,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Relu": lambda x: torch.relu(x),
    "Sigmoid": lambda x: torch.sigmoid(x),
    "Flatten": lambda x, *, axis=1: x.reshape(math.prod(x.shape[:axis]) if axis else 1, -1),
    "Dropout": lambda x, *rest, seed=None: x,  # inference: identity
    "Identity": lambda x: x,
}


def _attrs(node) -> dict[str, Any]:
    from onnx import helper, numpy_helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if a.type == a.TENSOR:
            v = torch.from_numpy(np.array(numpy_helper.to_array(v)))
        out[a.name] = v
    return out


def _fold_batchnorm(steps: list, consts: dict[str, torch.Tensor], outputs: set[str]) -> list:
    """Conv → BatchNormalization (inference) with constant parameters, where the BN alone reads the
    conv's output, becomes one Conv with scaled weights and a bias (float64 arithmetic)."""
    readers: dict[str, int] = {}
    for _, ins, _, _ in steps:
        for i in ins:
            readers[i] = readers.get(i, 0) + 1
    out, skip = [], set()
    for k, (op, ins, outs, attrs) in enumerate(steps):
        if k in skip:
            continue
        nxt = steps[k + 1] if k + 1 < len(steps) else None
        if (op == "Conv" and nxt is not None and nxt[0] == "BatchNormalization" and nxt[1][0] == outs[0]
                and readers.get(outs[0]) == 1 and outs[0] not in outputs and ins[1] in consts
                and (len(ins) < 3 or not ins[2] or ins[2] in consts) and all(i in consts for i in nxt[1][1:5])):
            gamma, beta, mean, var = (consts[i].double() for i in nxt[1][1:5])
            scale = gamma / torch.sqrt(var + nxt[3].get("epsilon", 1e-5))
            w = consts[ins[1]].double()
            bias = consts[ins[2]].double() if len(ins) > 2 and ins[2] else torch.zeros(w.shape[0], dtype=torch.float64)
            wn, bn = f"{ins[1]}::bn", f"{outs[0]}::bn_bias"
            consts[wn] = (w * scale.reshape(-1, *([1] * (w.dim() - 1)))).float()
            consts[bn] = ((bias - mean) * scale + beta).float()
            out.append(("Conv", [ins[0], wn, bn], nxt[2], attrs))
            skip.add(k + 1)
            continue
        out.append((op, ins, outs, attrs))
    return out


class OnnxGraph(nn.Module):
    """The graph of one ``.onnx`` file (see the module doc). ``forward(*inputs)`` takes the graph's
    real inputs in order and returns its outputs (one tensor when it has one)."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = MAX_ONNX_BYTES):
        super().__init__()
        self.path = Path(path)
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError as e:  # pragma: no cover - install problem
            raise OnnxError(f"the 'onnx' package is needed to read {path} ({e}); run make install") from None
        try:
            data = read_bounded(self.path, max_bytes)
        except UnreadableFile as e:
            raise OnnxError(str(e)) from None
        try:
            model = onnx.load_model_from_string(data)
            graph = model.graph
            consts: dict[str, torch.Tensor] = {i.name: torch.from_numpy(np.array(numpy_helper.to_array(i))) for i in graph.initializer}
            nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]
        except Exception as e:  # noqa: BLE001 — a corrupt protobuf raises anything
            raise OnnxError(f"{path}: not a readable ONNX model ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
        self.steps: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
        for op, ins, outs, attrs in nodes:
            if op == "Constant":
                consts[outs[0]] = attrs["value"]
                continue
            if op not in OPS:
                raise OnnxError(f"{path}: operator {op} is not supported (supported: {', '.join(sorted(OPS))})")
            if all(not i or i in consts for i in ins):  # a constant subgraph: fold it now
                try:
                    consts[outs[0]] = OPS[op](*[consts[i] if i else None for i in ins], **attrs)
                except Exception as e:  # noqa: BLE001
                    raise OnnxError(f"{path}: node {op} → {outs[0]} cannot be computed ({type(e).__name__}: {e})") from None
                continue
            self.steps.append((op, ins, outs, attrs))
        self.steps = _fold_batchnorm(self.steps, consts, {o.name for o in graph.output})
        produced = {o for _, _, outs, _ in self.steps for o in outs}
        used = {i for _, ins, _, _ in self.steps for i in ins if i}
        self.inputs = [i.name for i in graph.input if i.name in used and i.name not in consts and i.name not in produced]
        self.outputs = [o.name for o in graph.output]
        missing = [o for o in self.outputs if o not in produced and o not in consts]
        if not self.steps or missing:
            raise OnnxError(f"{path}: the graph computes none of its outputs {missing or self.outputs}")
        self.input_shapes = {i.name: tuple(d.dim_value or -1 for d in i.type.tensor_type.shape.dim) for i in graph.input
                             if i.name in self.inputs}
        self._names: dict[str, str] = {}
        for k, name in enumerate(sorted(used & set(consts))):
            t = consts[name]
            self.register_buffer(f"c{k}", t.float() if t.is_floating_point() else t, persistent=False)
            self._names[name] = f"c{k}"

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.path.name} takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(inputs)}")
        # image batches channels-last: the convolutions (depthwise ones above all) run twice as fast
        # on the CPU in that layout (SFace, 32 faces: 0.80 → 0.40 s on 2 cores); values are the same
        inputs = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 and x.is_floating_point() else x
                       for x in inputs)
        env: dict[str, torch.Tensor] = dict(zip(self.inputs, inputs))
        for op, ins, outs, attrs in self.steps:
            args = [None if not i else env[i] if i in env else getattr(self, self._names[i]) for i in ins]
            env[outs[0]] = OPS[op](*args, **attrs)
        res = [env[o] for o in self.outputs]
        return res[0] if len(res) == 1 else res
