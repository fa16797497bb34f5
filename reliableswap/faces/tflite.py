"""A TensorFlow-Lite graph of plain float32 convolution ops, run as a torch module.

MediaPipe's face-mesh and BlazeFace networks ship as ``.tflite`` flatbuffers inside PyPI wheels.
This reads such a file with the ``tflite`` flatbuffer bindings (no TensorFlow), turns every
weight into a torch parameter in NCHW layout and executes the operator list in order: batched,
on any device, in float32 or float16. Only the ops these MobileNet-style networks use are
supported (CONV_2D, DEPTHWISE_CONV_2D, ADD, PRELU, RELU, MAX_POOL_2D, PAD, RESHAPE,
CONCATENATION, RESIZE_BILINEAR, MEAN, FULLY_CONNECTED, LOGISTIC, and DEQUANTIZE of float16
constants, which is done once at load); any other op is refused at load with its name.

TFLite's SAME padding is asymmetric (the extra row/column goes after); it is reproduced with an
explicit ``F.pad`` before the convolution or pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from triplets.jsonl import UnreadableFile, read_bounded
from reliableswap.errors import UserError

#: Largest .tflite graph read (MediaPipe's are 0.1-5 MB).
MAX_TFLITE_BYTES = 256 << 20

SUPPORTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "PRELU", "RELU", "MAX_POOL_2D", "PAD", "RESHAPE", "CONCATENATION",
             "RESIZE_BILINEAR", "MEAN", "FULLY_CONNECTED", "LOGISTIC", "DEQUANTIZE")


class TfliteError(UserError):
    """The file is not a float32 graph of the supported ops."""


@dataclass
class _Op:
    kind: str
    inputs: list[int]
    output: int
    opts: dict = field(default_factory=dict)


def _same_pad(size: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _activation(x: torch.Tensor, code: int) -> torch.Tensor:
    if code == 0:
        return x
    if code == 1:
        return F.relu(x)
    if code == 3:
        return F.relu6(x)
    raise TfliteError(f"fused activation {code} is not supported")


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], align_corners: bool, half_pixel: bool) -> torch.Tensor:
    """TFLite's RESIZE_BILINEAR on B×C×H×W: with ``half_pixel`` torch's ``align_corners=False``;
    with ``align_corners`` torch's; with neither, TensorFlow's legacy mapping (source = destination
    × in/out, no half-pixel shift), computed here by a separable gather."""
    if half_pixel or align_corners:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=bool(align_corners))
    out = x
    for dim, n_out in ((2, size[0]), (3, size[1])):
        n_in = out.shape[dim]
        src = torch.arange(n_out, device=x.device, dtype=torch.float64) * (n_in / n_out)
        i0 = src.floor().long().clamp(0, n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        w = (src - i0.double()).to(x.dtype)
        shape = [1] * out.dim()
        shape[dim] = n_out
        out = out.index_select(dim, i0) * (1 - w.view(shape)) + out.index_select(dim, i1) * w.view(shape)
    return out


class TfliteNet(nn.Module):
    """The graph of one ``.tflite`` file. ``forward(x)`` takes B×C×H×W (the model's NHWC input,
    transposed) and returns the graph's outputs as a list, 4-D outputs in NCHW."""

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            import tflite
        except ImportError as e:  # pragma: no cover - install problem
            raise TfliteError(f"the 'tflite' package is needed to read {path} ({e}); run make install") from None
        self.path = Path(path)
        try:
            buf = read_bounded(self.path, MAX_TFLITE_BYTES)
        except UnreadableFile as e:
            raise TfliteError(str(e)) from None
        try:
            self._parse(tflite, buf, path)
        except TfliteError:
            raise
        except Exception as e:  # noqa: BLE001 — a corrupt flatbuffer raises anything (struct.error, IndexError…)
            raise TfliteError(f"{path}: not a readable TFLite model ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None

    def _parse(self, tflite, buf: bytes, path) -> None:
        model = tflite.Model.GetRootAsModel(buf, 0)
        graph = model.Subgraphs(0)
        names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
        self.input_ids = [graph.Inputs(i) for i in range(graph.InputsLength())]
        self.output_ids = [graph.Outputs(i) for i in range(graph.OutputsLength())]
        self.shapes: dict[int, tuple[int, ...]] = {}
        consts: dict[int, np.ndarray] = {}
        for t in range(graph.TensorsLength()):
            ten = graph.Tensors(t)
            self.shapes[t] = tuple(int(v) for v in ten.ShapeAsNumpy()) if ten.ShapeLength() else ()
            data = model.Buffers(ten.Buffer()).DataAsNumpy()
            if isinstance(data, np.ndarray) and data.size:
                dt = {tflite.TensorType.FLOAT32: np.float32, tflite.TensorType.INT32: np.int32,
                      tflite.TensorType.FLOAT16: np.float16}.get(ten.Type())
                if dt is None:
                    raise TfliteError(f"{path}: tensor {ten.Name().decode()} has type {ten.Type()} (only float32 graphs are supported)")
                consts[t] = np.frombuffer(data.tobytes(), dt).reshape(self.shapes[t])
        self.ops: list[_Op] = []
        self.params = nn.ParameterDict()
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            kind = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?")
            if kind not in SUPPORTED:
                raise TfliteError(f"{path}: operator {kind} is not supported (supported: {', '.join(SUPPORTED)})")
            ins = [op.Inputs(j) for j in range(op.InputsLength())]
            out = op.Outputs(0)
            if kind == "DEQUANTIZE":  # float16 weights: widened once here, no op at run time
                if ins[0] not in consts:
                    raise TfliteError(f"{path}: DEQUANTIZE of a computed tensor is not supported")
                consts[out] = consts[ins[0]].astype(np.float32)
                continue
            self.ops.append(self._build(tflite, op, kind, ins, out, consts, len(self.ops)))

    def _param(self, key: str, a: np.ndarray) -> str:
        self.params[key] = nn.Parameter(torch.from_numpy(np.array(a, np.float32)), requires_grad=False)
        return key

    def _build(self, tflite, op, kind, ins, out, consts, n) -> _Op:
        opts: dict = {}
        raw = op.BuiltinOptions()
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            o = (tflite.Conv2DOptions if kind == "CONV_2D" else tflite.DepthwiseConv2DOptions)()
            o.Init(raw.Bytes, raw.Pos)
            k = consts[ins[1]]  # conv: O×kh×kw×I; depthwise: 1×kh×kw×(C·mult)
            w = k.transpose(0, 3, 1, 2) if kind == "CONV_2D" else k.transpose(3, 0, 1, 2)
            opts = {"w": self._param(f"w{n}", w), "stride": (o.StrideH(), o.StrideW()), "dil": (o.DilationHFactor(), o.DilationWFactor()),
                    "same": o.Padding() == tflite.Padding.SAME, "act": o.FusedActivationFunction(),
                    "groups": 1 if kind == "CONV_2D" else self.shapes[ins[0]][-1]}
            if len(ins) > 2 and ins[2] >= 0:
                opts["b"] = self._param(f"b{n}", consts[ins[2]])
            return _Op("conv", [ins[0]], out, opts)
        if kind == "PRELU":
            a = consts[ins[1]].reshape(-1)
            return _Op("prelu", [ins[0]], out, {"a": self._param(f"a{n}", a)})
        if kind == "MAX_POOL_2D":
            o = tflite.Pool2DOptions()
            o.Init(raw.Bytes, raw.Pos)
            return _Op("maxpool", [ins[0]], out, {"k": (o.FilterHeight(), o.FilterWidth()), "stride": (o.StrideH(), o.StrideW()),
                                                  "same": o.Padding() == tflite.Padding.SAME, "act": o.FusedActivationFunction()})
        if kind == "PAD":
            p = consts[ins[1]]  # 4×2 over N, H, W, C → F.pad's NCHW order, last dim first: (W, H, C)
            return _Op("pad", [ins[0]], out, {"pad": (int(p[2, 0]), int(p[2, 1]), int(p[1, 0]), int(p[1, 1]), int(p[3, 0]), int(p[3, 1]))})
        if kind == "ADD":
            o = tflite.AddOptions()
            act = 0
            if raw is not None:
                o.Init(raw.Bytes, raw.Pos)
                act = o.FusedActivationFunction()
            return _Op("add", ins, out, {"act": act})
        if kind == "RELU":
            return _Op("relu", [ins[0]], out)
        if kind == "CONCATENATION":
            o = tflite.ConcatenationOptions()
            o.Init(raw.Bytes, raw.Pos)
            axis = o.Axis() % len(self.shapes[out])
            return _Op("concat", ins, out, {"axis": axis})
        if kind == "RESIZE_BILINEAR":
            o = tflite.ResizeBilinearOptions()
            o.Init(raw.Bytes, raw.Pos)
            size = tuple(int(v) for v in consts[ins[1]])
            return _Op("resize", [ins[0]], out, {"size": size, "align": o.AlignCorners(), "half": o.HalfPixelCenters()})
        if kind == "MEAN":
            o = tflite.ReducerOptions()
            o.Init(raw.Bytes, raw.Pos)
            axes = [int(v) % len(self.shapes[ins[0]]) for v in np.atleast_1d(consts[ins[1]])]
            return _Op("mean", [ins[0]], out, {"axes": axes, "keep": o.KeepDims()})
        if kind == "FULLY_CONNECTED":
            o = tflite.FullyConnectedOptions()
            o.Init(raw.Bytes, raw.Pos)
            opts = {"w": self._param(f"w{n}", consts[ins[1]]), "act": o.FusedActivationFunction()}
            if len(ins) > 2 and ins[2] >= 0:
                opts["b"] = self._param(f"b{n}", consts[ins[2]])
            return _Op("fc", [ins[0]], out, opts)
        if kind == "LOGISTIC":
            return _Op("sigmoid", [ins[0]], out)
        return _Op("reshape", [ins[0]], out, {"shape": self.shapes[out]})  # RESHAPE

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: B×C×H×W; returns the graph outputs (4-D ones as B×C×H×W, others as TFLite lays them out)."""
        vals: dict[int, torch.Tensor] = {self.input_ids[0]: x}
        for op in self.ops:
            a = vals[op.inputs[0]]
            o = op.opts
            if op.kind == "conv":
                w = self.params[o["w"]].to(a.dtype)
                if o["same"]:
                    kh, kw = w.shape[-2:]
                    pt, pb = _same_pad(a.shape[-2], kh, o["stride"][0], o["dil"][0])
                    pl, pr = _same_pad(a.shape[-1], kw, o["stride"][1], o["dil"][1])
                    a = F.pad(a, (pl, pr, pt, pb))
                b = self.params[o["b"]].to(a.dtype) if "b" in o else None
                y = _activation(F.conv2d(a, w, b, o["stride"], 0, o["dil"], o["groups"]), o["act"])
            elif op.kind == "prelu":
                al = self.params[o["a"]].to(a.dtype).view(1, -1, 1, 1)
                y = torch.where(a >= 0, a, a * al)
            elif op.kind == "maxpool":
                if o["same"]:
                    pt, pb = _same_pad(a.shape[-2], o["k"][0], o["stride"][0])
                    pl, pr = _same_pad(a.shape[-1], o["k"][1], o["stride"][1])
                    a = F.pad(a, (pl, pr, pt, pb), value=float("-inf"))
                y = _activation(F.max_pool2d(a, o["k"], o["stride"]), o["act"])
            elif op.kind == "pad":
                y = F.pad(a, o["pad"])
            elif op.kind == "add":
                y = _activation(a + vals[op.inputs[1]], o["act"])
            elif op.kind == "relu":
                y = F.relu(a)
            elif op.kind == "concat":
                parts = [vals[i] for i in op.inputs]
                axis = o["axis"]
                if all(p.dim() == 4 for p in parts):  # NHWC axis → NCHW axis
                    axis = {0: 0, 1: 2, 2: 3, 3: 1}[axis]
                y = torch.cat(parts, axis)
            elif op.kind == "resize":
                y = resize_bilinear(a, o["size"], o["align"], o["half"])
            elif op.kind == "mean":
                y = (a.permute(0, 2, 3, 1) if a.dim() == 4 else a).mean(o["axes"], keepdim=o["keep"])  # TFLite's axes: NHWC
                if y.dim() == 4:
                    y = y.permute(0, 3, 1, 2)
            elif op.kind == "fc":
                flat = (a.permute(0, 2, 3, 1) if a.dim() == 4 else a).reshape(a.shape[0], -1)
                b = self.params[o["b"]].to(a.dtype) if "b" in o else None
                y = _activation(F.linear(flat, self.params[o["w"]].to(a.dtype), b), o["act"])
            elif op.kind == "sigmoid":
                y = torch.sigmoid(a)
            else:  # reshape: to TFLite's (NHWC) element order
                src = a.permute(0, 2, 3, 1) if a.dim() == 4 else a
                shape = (a.shape[0],) + tuple(op.opts["shape"][1:])
                y = src.reshape(shape)
                if y.dim() == 4:
                    y = y.permute(0, 3, 1, 2)
            vals[op.output] = y
        return [vals[i] for i in self.output_ids]
