"""Dense fields: harmonic (Laplace) extension from known pixels, colour-wheel rendering of flows, and
piecewise-linear functions through knots (colour quantile maps, eyelid profiles).

Fields are B×C×H×W; flows B×2×H×W pixel offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.color import hsv_to_rgb


def harmonic_fill(values: torch.Tensor, known: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """Extend ``values`` (B×C×H×W) from the ``known`` pixels (B×1×H×W bool) to the whole image by a
    harmonic (Laplace) interpolation that is zero just outside the image border; coarse-to-fine
    Jacobi so smoothness reaches far in few iterations. Known pixels keep their values exactly."""
    levels = [(values * known, known.to(values.dtype))]
    while min(levels[-1][0].shape[-2:]) > 8:
        v, m = levels[-1]
        levels.append((F.avg_pool2d(v, 2, ceil_mode=True), F.avg_pool2d(m, 2, ceil_mode=True)))
    u = None
    kernel = values.new_tensor([[0, 0.25, 0], [0.25, 0, 0.25], [0, 0.25, 0]]).view(1, 1, 3, 3).repeat(values.shape[1], 1, 1, 1)
    for v, m in reversed(levels):
        fixed = m > 1e-3
        val = v / m.clamp_min(1e-3)
        u = torch.zeros_like(v) if u is None else F.interpolate(u, size=v.shape[-2:], mode="bilinear", align_corners=False)
        for _ in range(iters):
            u = torch.where(fixed, val, F.conv2d(F.pad(u, (1, 1, 1, 1)), kernel, groups=v.shape[1]))
        u = torch.where(fixed, val, u)
    return torch.where(known, values, u)


def flow_to_color(flow: torch.Tensor, max_mag: float | None = None) -> torch.Tensor:
    """Colour-wheel rendering of B×2×H×W flow → B×3×H×W in [0, 1] (hue = direction, saturation = magnitude)."""
    mag = flow.norm(dim=1, keepdim=True)
    ang = torch.atan2(flow[:, 1:2], flow[:, 0:1]) % (2 * torch.pi)
    top = max_mag if max_mag is not None else mag.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    hsv = torch.cat([ang, (mag / top).clamp(0, 1), torch.ones_like(mag)], 1)
    return hsv_to_rgb(hsv)


def piecewise_linear(xq: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear function through the knots ``(xk, yk)`` (…×K each, ``xk`` increasing
    along the last dimension) at ``xq`` (…×N, the same leading dimensions), held flat outside the
    knots."""
    k = xk.shape[-1]
    i = torch.searchsorted(xk.contiguous(), xq.contiguous()).clamp(1, k - 1)
    x0, x1, y0, y1 = xk.gather(-1, i - 1), xk.gather(-1, i), yk.gather(-1, i - 1), yk.gather(-1, i)
    t = ((xq - x0) / (x1 - x0).clamp_min(1e-6)).clamp(0, 1)
    return y0 + t * (y1 - y0)
