"""Soft face masks from landmarks: jaw hull with a forehead extension, feathered edge."""

from __future__ import annotations

import torch
from kornia.filters import gaussian_blur2d

from reliableswap.faces.ibug68 import BROWS, CHIN, JAW
from reliableswap.geometry.raster import polygon_mask


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
    up = landmarks[:, BROWS].mean(1) - landmarks[:, CHIN]
    raised = brows + forehead * up.unsqueeze(1)
    return torch.cat([jaw, raised], 1)


def face_mask(
    landmarks: torch.Tensor, height: int, width: int, forehead: float = 0.35, feather: float = 0.04
) -> torch.Tensor:
    """Soft face mask.

    Args:
        landmarks: B×68×2 in the target image's pixels.
        height, width: mask size.
        forehead: see :func:`face_polygon`.
        feather: Gaussian sigma as a fraction of each face's height (chin to raised brows). 0 gives
            a hard mask.
    Returns:
        B×1×H×W in [0, 1].
    """
    poly = face_polygon(landmarks.float(), forehead)
    if feather <= 0:
        return polygon_mask(poly, height, width)
    face_h = (poly[:, 17:].mean(1) - landmarks[:, CHIN].float()).norm(dim=-1)
    return soft_polygon_mask(poly, height, width, feather * face_h)


def soft_polygon_mask(poly: torch.Tensor, height: int, width: int, sigma: torch.Tensor) -> torch.Tensor:
    """B×N×2 closed polygons → B×1×H×W in [0, 1], edges blurred by a Gaussian of ``sigma`` (B, px)."""
    # The edge gets blurred anyway: rasterize at half resolution (4× less work) and upsample.
    hh, hw = (height + 1) // 2, (width + 1) // 2
    half = polygon_mask((poly.float() + 0.5) / 2 - 0.5, hh, hw)
    hard = torch.nn.functional.interpolate(half, size=(hh * 2, hw * 2), mode="bilinear", align_corners=False)[..., :height, :width]
    # Each face its own sigma (the kernel spans ±3σ of the widest face of the batch).
    sigma = sigma.clamp_min(0.5).to(hard.dtype)
    k = int(2 * round(3 * float(sigma.max())) + 1)
    return gaussian_blur2d(hard, (k, k), sigma[:, None].expand(-1, 2), border_type="constant").clamp_(0, 1)
