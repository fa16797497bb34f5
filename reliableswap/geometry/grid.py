"""Pixel grids, backward warps by dense offset fields, and bilinear sampling at points.

Fields are B×2×H×W pixel offsets ``(dx, dy)``; ``warp_backward(image, f)(p) = image(p + f(p))``.
Pixel centres sit at integer coordinates (``grid_sample`` with ``align_corners=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_grid(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """H·W×2 ``(x, y)`` pixel-centre coordinates, row-major."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(-1, 2)


def _normalize(xy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pixel ``(x, y)`` → grid_sample's [−1, 1] coordinates (align_corners=True)."""
    return torch.stack([2 * xy[..., 0] / max(w - 1, 1) - 1, 2 * xy[..., 1] / max(h - 1, 1) - 1], -1)


def warp_backward(image: torch.Tensor, offset: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """``out(p) = image(p + offset(p))`` with bilinear sampling.

    Args:
        image: B×C×H×W; offset: B×2×H×W pixel offsets (x, y).
        padding_mode: ``border``, ``zeros`` or ``reflection`` outside the image.
    Returns:
        B×C×H×W.
    """
    b, _, h, w = image.shape
    g = pixel_grid(h, w, image.device, image.dtype).reshape(1, h, w, 2) + offset.permute(0, 2, 3, 1).to(image.dtype)
    return F.grid_sample(image, _normalize(g, h, w), mode="bilinear", padding_mode=padding_mode, align_corners=True)


def sample_at(field: torch.Tensor, points: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Bilinear values of a B×C×H×W field at B×K×2 pixel points → B×K×C."""
    h, w = field.shape[-2:]
    g = _normalize(points.to(field.dtype), h, w).unsqueeze(2)
    return F.grid_sample(field, g, mode="bilinear", padding_mode=padding_mode, align_corners=True)[..., 0].transpose(1, 2)


def border_points(h: int, w: int, per_side: int = 5, device=None, dtype=torch.float32) -> torch.Tensor:
    """Points along the image border (corners included): (4·per_side)×2."""
    t = torch.linspace(0, 1, per_side + 1, device=device, dtype=dtype)[:-1]
    x1, y1 = w - 1, h - 1
    top = torch.stack([t * x1, torch.zeros_like(t)], -1)
    right = torch.stack([torch.full_like(t, x1), t * y1], -1)
    bottom = torch.stack([(1 - t) * x1, torch.full_like(t, y1)], -1)
    left = torch.stack([torch.zeros_like(t), (1 - t) * y1], -1)
    return torch.cat([top, right, bottom, left], 0)


def jacobian_determinant(offset: torch.Tensor) -> torch.Tensor:
    """det ∂(p + offset(p))/∂p of a B×2×H×W backward field by central differences → B×1×H×W.

    Positive everywhere ⇔ the warp folds nowhere (it stays one-to-one)."""
    f = F.pad(offset, (1, 1, 1, 1), mode="replicate")
    dx = (f[..., 1:-1, 2:] - f[..., 1:-1, :-2]) / 2
    dy = (f[..., 2:, 1:-1] - f[..., :-2, 1:-1]) / 2
    return ((1 + dx[:, :1]) * (1 + dy[:, 1:]) - dy[:, :1] * dx[:, 1:])
