"""68-point landmarks (iBUG/Multi-PIE layout): dlib shape predictor, or FAN (face-alignment's 2DFAN-4
weights, run by the network written here).

Both backends take an H×W×3 uint8 RGB image and N×4 boxes ``(x0, y0, x1, y1)`` and return
N×68×2 float32 pixel ``(x, y)`` with integer values at pixel centres.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import dlib
import numpy as np
import torch
from kornia.geometry.transform import warp_affine

from reliableswap.errors import UserError
from reliableswap.checkpoints import CheckpointRefused, check_state, state_bytes, torch_load
from reliableswap.faces.models import MissingWeightsError, dlib_model, model_pool, weights_dir
from reliableswap.geometry.affine import apply_affine, invert_affine


class Landmarker(Protocol):
    def __call__(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray: ...


class DlibLandmarks:
    """dlib's 68-point ensemble-of-regression-trees predictor (face_recognition_models weights)."""

    name = "dlib"

    def __init__(self) -> None:
        path = str(dlib_model("landmarks68"))
        self._pool = model_pool(path, lambda: dlib.shape_predictor(path))

    def __call__(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        out = np.zeros((len(boxes), 68, 2), np.float32)
        with self._pool.borrow() as predictor:
            for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes)):
                rect = dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1)
                shape = predictor(rgb, rect)
                out[i] = [(p.x, p.y) for p in shape.parts()]
        return out

    def remeasure(self, images: np.ndarray, hint: np.ndarray) -> np.ndarray:
        """Landmarks of each image (B×H×W×3 uint8, one face each) searched in the bounding box of
        its ``hint`` landmarks (B×68×2: where the face is expected) → B×68×2."""
        boxes = np.concatenate([hint.min(1), hint.max(1)], 1)
        return np.stack([self(im, bx[None])[0] for im, bx in zip(images, boxes)])


#: face-alignment 1.5 conventions (utils.py / detection/core.py).
FAN_WEIGHTS = "2DFAN4-11f355bf06.pth.tar"
FAN_URL = "https://www.adrianbulat.com/downloads/python-fan/" + FAN_WEIGHTS
FAN_REFERENCE_SCALE = 195.0
FAN_CENTER_Y_OFFSET = 0.12
FAN_INPUT = 256
FAN_HEATMAP = 64


class _ConvBlock(torch.nn.Module):
    """FAN's residual block: three pre-activated 3×3 convs (out/2, out/4, out/4 channels) concatenated,
    plus the input (through BN-ReLU-1×1 when the widths differ). State keys as face-alignment's."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        nn = torch.nn
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout // 2, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout // 2), nn.Conv2d(cout // 2, cout // 4, 3, padding=1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(cout // 4), nn.Conv2d(cout // 4, cout // 4, 3, padding=1, bias=False)
        self.downsample = (nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False))
                           if cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = torch.nn.functional.relu
        a = self.conv1(relu(self.bn1(x)))
        b = self.conv2(relu(self.bn2(a)))
        c = self.conv3(relu(self.bn3(b)))
        return torch.cat([a, b, c], 1) + (x if self.downsample is None else self.downsample(x))


class _HourGlass(torch.nn.Module):
    """Depth-``depth`` hourglass of :class:`_ConvBlock` (modules ``b1_L``, ``b2_L``, ``b3_L``, ``b2_plus_1``)."""

    def __init__(self, depth: int, features: int):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            for name in ("b1_", "b2_", "b3_") + (("b2_plus_",) if level == 1 else ()):
                self.add_module(f"{name}{level}", _ConvBlock(features, features))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        m = self._modules
        low = m[f"b2_{level}"](torch.nn.functional.avg_pool2d(x, 2))
        low = self._level(level - 1, low) if level > 1 else m["b2_plus_1"](low)
        return m[f"b1_{level}"](x) + torch.nn.functional.interpolate(m[f"b3_{level}"](low), scale_factor=2.0, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FanNet(torch.nn.Module):
    """The FAN stacked-hourglass landmark network (Bulat & Tzimiropoulos 2017), written here so that
    ``--landmarks fan`` needs only torch: it loads face-alignment's ``2DFAN4-*.pth.tar`` key for key.

    Input B×3×256×256 in [0, 1]; returns the list of each stack's B×68×64×64 heatmaps."""

    def __init__(self, stacks: int = 4, points: int = 68):
        super().__init__()
        nn = torch.nn
        self.stacks = stacks
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.BatchNorm2d(64)
        self.conv2, self.conv3, self.conv4 = _ConvBlock(64, 128), _ConvBlock(128, 128), _ConvBlock(128, 256)
        for i in range(stacks):
            self.add_module(f"m{i}", _HourGlass(4, 256))
            self.add_module(f"top_m_{i}", _ConvBlock(256, 256))
            self.add_module(f"conv_last{i}", nn.Conv2d(256, 256, 1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(256))
            self.add_module(f"l{i}", nn.Conv2d(256, points, 1))
            if i < stacks - 1:
                self.add_module(f"bl{i}", nn.Conv2d(256, 256, 1))
                self.add_module(f"al{i}", nn.Conv2d(points, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        relu, m = torch.nn.functional.relu, self._modules
        x = relu(self.bn1(self.conv1(x)))
        x = self.conv4(self.conv3(torch.nn.functional.avg_pool2d(self.conv2(x), 2)))
        outs = []
        for i in range(self.stacks):
            ll = relu(m[f"bn_end{i}"](m[f"conv_last{i}"](m[f"top_m_{i}"](m[f"m{i}"](x)))))
            outs.append(m[f"l{i}"](ll))
            if i < self.stacks - 1:
                x = x + m[f"bl{i}"](ll) + m[f"al{i}"](outs[-1])
        return outs


def fan_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """Where 2DFAN-4 is: ``<weights dir>/fan/2DFAN4-*.pth.tar`` (``reliableswap weights fetch fan``),
    else face-alignment's own cache ``$TORCH_HOME/hub/checkpoints/`` when it holds the file there;
    the weights-dir path when neither has it."""
    ours = weights_dir(weights) / "fan" / FAN_WEIGHTS
    hub = Path(torch.hub.get_dir()) / "checkpoints" / FAN_WEIGHTS
    return hub if not ours.is_file() and hub.is_file() else ours


def fan_crop_transforms(boxes: torch.Tensor, res: int = FAN_INPUT) -> torch.Tensor:
    """Image → FAN crop affine matrices, as face-alignment builds them from a detector box.

    Args:
        boxes: N×4 ``(x0, y0, x1, y1)``.
        res: crop resolution.
    Returns:
        N×2×3 matrices mapping image pixel coordinates to crop pixel coordinates.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    cx = (x0 + x1) / 2
    cy = (y0 + y1) / 2 - (y1 - y0) * FAN_CENTER_Y_OFFSET
    h = 200.0 * ((x1 - x0) + (y1 - y0)) / FAN_REFERENCE_SCALE
    k = res / h
    zero = torch.zeros_like(k)
    row0 = torch.stack([k, zero, res * (0.5 - cx / h)], -1)
    row1 = torch.stack([zero, k, res * (0.5 - cy / h)], -1)
    return torch.stack([row0, row1], -2)


def decode_heatmaps(hm: torch.Tensor) -> torch.Tensor:
    """Sub-pixel peak of each heatmap, in heatmap pixel coordinates (pixel centres at integers).

    Follows face-alignment: argmax, a quarter-pixel step toward the larger neighbour.

    Args:
        hm: B×K×H×W heatmaps.
    Returns:
        B×K×2 ``(x, y)``.
    """
    b, k, h, w = hm.shape
    flat = hm.reshape(b, k, h * w)
    idx = flat.argmax(-1)
    x = (idx % w).float()
    y = torch.div(idx, w, rounding_mode="floor").float()
    xi, yi = x.long(), y.long()
    inner = (xi > 0) & (xi < w - 1) & (yi > 0) & (yi < h - 1)
    xl, xr = (xi - 1).clamp(0, w - 1), (xi + 1).clamp(0, w - 1)
    yu, yd = (yi - 1).clamp(0, h - 1), (yi + 1).clamp(0, h - 1)
    g = lambda yy, xx: flat.gather(-1, (yy * w + xx).unsqueeze(-1)).squeeze(-1)  # noqa: E731
    dx = torch.sign(g(yi, xr) - g(yi, xl)) * 0.25
    dy = torch.sign(g(yd, xi) - g(yu, xi)) * 0.25
    return torch.stack([x + dx * inner, y + dy * inner], -1)


class FanLandmarks:
    """FAN 2D (face-alignment's 2DFAN-4) run batched on our own crops, on any device.

    Works only when the weights file is already on disk (:func:`fan_weights_path`); it never downloads.
    """

    name = "fan"

    def __init__(self, device: str | torch.device = "cpu", weights: str | os.PathLike | None = None):
        """``weights``: the weights folder (default ``$RELIABLESWAP_WEIGHTS``, ``~/.cache/reliableswap/weights``)."""
        path = fan_weights_path(weights)
        if not path.is_file():
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise MissingWeightsError(
                f"FAN weights not found: {path} (face-alignment's 2DFAN-4): get it with `reliableswap weights fetch fan` "
                f"(published at {FAN_URL}; face-alignment's cached copy in {hub} is used too), or use --landmarks dlib"
            )
        self.device = torch.device(device)
        net = FanNet(4)
        sd = torch_load(path, state_bytes(net))  # a bad or doctored file is refused in one line
        if not isinstance(sd, dict):
            raise CheckpointRefused(f"{path}: holds a {type(sd).__name__}, expected 2DFAN-4's state dict")
        check_state(sd, net, path)
        net.load_state_dict(sd)
        self.net = net.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if len(boxes) == 0:
            return np.zeros((0, 68, 2), np.float32)
        img = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).to(self.device).permute(2, 0, 1)[None].float().div_(255)
        b = torch.as_tensor(np.asarray(boxes), dtype=torch.float32, device=self.device)
        m = fan_crop_transforms(b)
        crops = warp_affine(img.expand(len(b), -1, -1, -1), m, (FAN_INPUT, FAN_INPUT), align_corners=True)
        out = self.net(crops)
        hm = out[-1] if isinstance(out, (list, tuple)) else out
        pts = decode_heatmaps(hm.float()) * (FAN_INPUT / FAN_HEATMAP) + (FAN_INPUT / FAN_HEATMAP - 1) / 2
        return apply_affine(pts, invert_affine(m)).cpu().numpy().astype(np.float32)


def make_landmarker(name: str, device: str | torch.device = "cpu") -> Landmarker:
    """``dlib`` or ``fan``."""
    if name == "dlib":
        return DlibLandmarks()
    if name == "fan":
        return FanLandmarks(device)
    raise UserError(f"unknown landmark backend {name!r} (dlib or fan)")
