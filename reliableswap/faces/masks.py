"""Soft face masks from landmarks: jaw hull with a forehead extension, feathered edge."""

from __future__ import annotations

import torch
from kornia.filters import gaussian_blur2d

from reliableswap.faces.landmarks import BROWS, JAW


def face_polygon(landmarks: torch.Tensor, forehead: float = 0.35) -> torch.Tensor:
    """Closed face outline: jaw (0→16) then the eyebrows (26→17) raised toward the forehead.

    Each brow point moves along the face's up direction (chin → brow centre) by
    ``forehead`` × face height.

    Args:
        landmarks: B×68×2.
        forehead: extension as a fraction of chin-to-brow distance.
    Returns:
        B×27×2 polygon vertices in order.
    """
    jaw = landmarks[:, JAW]
    brows = landmarks[:, BROWS].flip(1)
    up = landmarks[:, BROWS].mean(1) - landmarks[:, 8]
    raised = brows + forehead * up.unsqueeze(1)
    return torch.cat([jaw, raised], 1)


def polygon_mask(poly: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rasterize B×N×2 closed polygons (even-odd rule, pixel centres) into B×1×H×W {0, 1}."""
    dev, dt = poly.device, poly.dtype
    ys = torch.arange(height, device=dev, dtype=dt).view(1, height, 1, 1)
    xs = torch.arange(width, device=dev, dtype=dt).view(1, 1, width, 1)
    p0 = poly.unsqueeze(1).unsqueeze(1)  # B×1×1×N×2
    p1 = poly.roll(-1, 1).unsqueeze(1).unsqueeze(1)
    y0, y1 = p0[..., 1], p1[..., 1]
    x0, x1 = p0[..., 0], p1[..., 0]
    crosses = (y0 > ys) != (y1 > ys)
    t = (ys - y0) / torch.where(y1 == y0, torch.ones_like(y1), y1 - y0)
    x_at = x0 + t * (x1 - x0)
    inside = (crosses & (xs < x_at)).sum(-1) % 2
    return inside.to(dt).unsqueeze(1)


def face_mask(
    landmarks: torch.Tensor, height: int, width: int, forehead: float = 0.35, feather: float = 0.04
) -> torch.Tensor:
    """Soft face mask.

    Args:
        landmarks: B×68×2 in the target image's pixels.
        height, width: mask size.
        forehead: see :func:`face_polygon`.
        feather: Gaussian sigma as a fraction of the face height (chin to raised brows); the batch
            uses the mean face height. 0 gives a hard mask.
    Returns:
        B×1×H×W in [0, 1].
    """
    poly = face_polygon(landmarks.float(), forehead)
    if feather <= 0:
        return polygon_mask(poly, height, width)
    # The edge gets blurred anyway: rasterize at half resolution (4× less work) and upsample.
    hh, hw = (height + 1) // 2, (width + 1) // 2
    half = polygon_mask((poly + 0.5) / 2 - 0.5, hh, hw)
    hard = torch.nn.functional.interpolate(half, size=(hh * 2, hw * 2), mode="bilinear", align_corners=False)[..., :height, :width]
    face_h = (poly[:, 17:].mean(1) - landmarks[:, 8].float()).norm(dim=-1).mean()
    sigma = float((feather * face_h).clamp_min(0.5))
    k = int(2 * round(3 * sigma) + 1)
    return gaussian_blur2d(hard, (k, k), (sigma, sigma), border_type="constant").clamp_(0, 1)
