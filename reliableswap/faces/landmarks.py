"""68-point landmarks (iBUG/Multi-PIE layout): dlib shape predictor, or FAN (face-alignment).

Both backends take an H×W×3 uint8 RGB image and N×4 boxes ``(x0, y0, x1, y1)`` and return
N×68×2 float32 pixel ``(x, y)`` with integer values at pixel centres.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import dlib
import numpy as np
import torch
from kornia.geometry.transform import warp_affine

from reliableswap.checkpoints import state_bytes, torch_load
from reliableswap.faces.models import MissingWeightsError, dlib_model
from reliableswap.geometry.affine import apply_affine, invert_affine


class Landmarker(Protocol):
    def __call__(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray: ...


class DlibLandmarks:
    """dlib's 68-point ensemble-of-regression-trees predictor (face_recognition_models weights)."""

    name = "dlib"

    def __init__(self) -> None:
        self._sp = dlib.shape_predictor(str(dlib_model("landmarks68")))

    def __call__(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        out = np.zeros((len(boxes), 68, 2), np.float32)
        for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes)):
            rect = dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1)
            shape = self._sp(rgb, rect)
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


def fan_weights_path() -> Path:
    """Where face-alignment caches 2DFAN-4: ``$TORCH_HOME/hub/checkpoints/2DFAN4-*.pth.tar``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FAN_WEIGHTS


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

    Works only when the weights file is already in the torch hub cache; it never downloads.
    """

    name = "fan"

    def __init__(self, device: str | torch.device = "cpu", weights: str | Path | None = None):
        path = Path(weights) if weights else fan_weights_path()
        if not path.is_file():
            raise MissingWeightsError(
                f"FAN weights not found: {path} (face-alignment's 2DFAN-4, {FAN_WEIGHTS}). "
                f"No download is attempted: copy the file there (it is published at {FAN_URL}), "
                "or use --landmarks dlib."
            )
        try:
            from face_alignment.models import FAN
        except ImportError as e:  # pragma: no cover - install problem
            raise MissingWeightsError(f"face-alignment is not installed ({e}); run make install") from None
        self.device = torch.device(device)
        net = FAN(4)
        net.load_state_dict(torch_load(path, state_bytes(net)))
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
    raise ValueError(f"unknown landmark backend {name!r} (dlib or fan)")
