"""2D affine maps on batched points: apply, invert, compose, fit a similarity, pixel resizing.

Conventions: points are B×K×2 pixel ``(x, y)`` with pixel centres at integers; matrices are
B×2×3 (``p' = A p + t``), any float dtype, any device.
"""

from __future__ import annotations

import torch


def apply_affine(points: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Apply B×2×3 (or 2×3) matrices to B×K×2 points → B×K×2."""
    return points @ m[..., :2].transpose(-1, -2) + m[..., 2].unsqueeze(-2)


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    """Inverse of B×2×3 affine matrices → B×2×3."""
    a = m[..., :2]
    ai = torch.linalg.inv(a)
    return torch.cat([ai, -(ai @ m[..., 2:])], -1)


def compose_affine(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``outer ∘ inner`` (apply ``inner`` first): B×2×3 (broadcasting 2×3) → B×2×3."""
    a = outer[..., :2] @ inner[..., :2]
    t = outer[..., :2] @ inner[..., 2:] + outer[..., 2:]
    return torch.cat([a, t], -1)


def affine_scale(m: torch.Tensor) -> torch.Tensor:
    """Uniform scale of B×2×3 similarity matrices (sqrt of |det|) → B."""
    return m[..., :2].det().abs().sqrt()


def resize_affine(sx: float, sy: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """2×3 map from an image's pixels to the pixels of the same image resized by ``(sx, sy)``,
    pixel centres kept: ``x' = (x + 0.5)·sx − 0.5``."""
    return torch.tensor([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]], dtype=dtype, device=device)


def translate_affine(tx: float, ty: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """2×3 translation ``p' = p + (tx, ty)``."""
    return torch.tensor([[1.0, 0.0, tx], [0.0, 1.0, ty]], dtype=dtype, device=device)


def similarity_lstsq(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares 2D similarity (rotation, uniform scale, translation; no reflection).

    Solved in closed form with complex numbers: ``dst ≈ a·src + b``.

    Args:
        src: B×N×2 points.
        dst: B×N×2 or N×2 target points.
        weights: N or B×N non-negative weights (default 1).
    Returns:
        B×2×3 matrices mapping ``src`` to ``dst``.
    """
    dst = dst.to(src).expand_as(src)
    w = torch.ones(src.shape[:2], dtype=src.dtype, device=src.device) if weights is None else \
        weights.to(src).expand(src.shape[:2])
    w = w / w.sum(1, keepdim=True)
    zs = torch.complex(src[..., 0], src[..., 1])
    zd = torch.complex(dst[..., 0], dst[..., 1])
    ms = (w * zs).sum(1, keepdim=True)
    md = (w * zd).sum(1, keepdim=True)
    zs_c, zd_c = zs - ms, zd - md
    a = (w * zs_c.conj() * zd_c).sum(1) / (w * zs_c.abs() ** 2).sum(1).clamp_min(1e-12)
    b = md.squeeze(1) - a * ms.squeeze(1)
    row0 = torch.stack([a.real, -a.imag, b.real], -1)
    row1 = torch.stack([a.imag, a.real, b.imag], -1)
    return torch.stack([row0, row1], -2)
