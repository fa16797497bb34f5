"""Thin-plate splines in pixel coordinates, batched: sparse displacements → dense fields.

Own implementation (a small linear solve) so that the pixel conventions are explicit: points are
``(x, y)`` pixels with pixel centres at integers, fields are B×2×H×W pixel offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reliableswap.geometry.grid import pixel_grid


def _kernel(r2: torch.Tensor) -> torch.Tensor:
    """TPS radial basis U(r) = r² log r², with U(0) = 0."""
    return r2 * torch.log(r2.clamp_min(1e-20))


def tps_fit(ctrl: torch.Tensor, values: torch.Tensor, reg: float = 0.0) -> torch.Tensor:
    """Solve a TPS interpolating ``values`` at ``ctrl``.

    Args:
        ctrl: B×N×2 control points (pixels).
        values: B×N×D values (e.g. displacements, D=2).
        reg: smoothing (added to the kernel diagonal, in units of the normalised kernel).
    Returns:
        B×(N+4)×D: N kernel weights, the affine terms for 1, x, y, and a last row holding the
        coordinate normalisation (used by :func:`tps_eval`).
    """
    b, n, _ = ctrl.shape
    dt = torch.float64
    scale = ctrl.detach().abs().amax().clamp_min(1.0)
    c = ctrl.to(dt) / scale
    k = _kernel(torch.cdist(c, c).pow(2))
    if reg:
        k = k + reg * torch.eye(n, dtype=dt, device=ctrl.device)
    p = torch.cat([torch.ones(b, n, 1, dtype=dt, device=ctrl.device), c], -1)
    top = torch.cat([k, p], -1)
    bottom = torch.cat([p.transpose(1, 2), torch.zeros(b, 3, 3, dtype=dt, device=ctrl.device)], -1)
    a = torch.cat([top, bottom], 1)
    rhs = torch.cat([values.to(dt), torch.zeros(b, 3, values.shape[-1], dtype=dt, device=ctrl.device)], 1)
    coef = torch.linalg.solve(a, rhs)
    return torch.cat([coef, scale.expand(b, 1, coef.shape[-1]).to(dt)], 1)  # scale rides along


def tps_eval(ctrl: torch.Tensor, coef: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Evaluate a fitted TPS at B×M×2 points → B×M×D."""
    n = ctrl.shape[1]
    scale = coef[:, -1:, :1]
    c = ctrl.to(coef.dtype) / scale
    q = pts.to(coef.dtype) / scale
    u = _kernel(torch.cdist(q, c).pow(2))
    out = u @ coef[:, :n] + coef[:, n:n + 1] + q[..., :1] * coef[:, n + 1:n + 2] + q[..., 1:2] * coef[:, n + 2:n + 3]
    return out.to(pts.dtype)


def dense_field(ctrl: torch.Tensor, disp: torch.Tensor, h: int, w: int, reg: float = 0.0, step: int = 4) -> torch.Tensor:
    """TPS through sparse displacements, evaluated on a grid every ``step`` px and upsampled.

    Args:
        ctrl: B×N×2 points, disp: B×N×2 displacements there.
    Returns:
        B×2×H×W displacement field (pixels), in ``disp``'s dtype.
    """
    coef = tps_fit(ctrl, disp, reg)
    hs, ws = (h + step - 1) // step + 1, (w + step - 1) // step + 1
    g = pixel_grid(hs, ws, ctrl.device, disp.dtype) * step
    f = tps_eval(ctrl, coef, g.expand(ctrl.shape[0], -1, -1)).reshape(-1, hs, ws, 2).permute(0, 3, 1, 2)
    if step == 1:
        return f[..., :h, :w]
    # coarse sample k sits at pixel k·step: resample onto the full grid (align_corners semantics)
    full = F.interpolate(f, size=((hs - 1) * step + 1, (ws - 1) * step + 1), mode="bilinear", align_corners=True)
    return full[..., :h, :w].contiguous()
