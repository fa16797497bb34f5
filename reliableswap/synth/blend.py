"""Blending a face into a target: batched multi-band (Laplacian pyramid), or Poisson (OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from reliableswap.images import to_tensor, to_uint8


def _down(x: torch.Tensor) -> torch.Tensor:
    """REDUCE: 4×4 box filter at stride 2 (two 2-tap box passes ≈ the binomial [1, 3, 3, 1]/8),
    halving each side (odd sides round up). Pooling kernels make it several times faster than
    a depthwise 5-tap convolution on CPU."""
    return F.avg_pool2d(x, kernel_size=4, stride=2, padding=1, count_include_pad=False, ceil_mode=True)


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """EXPAND to ``size`` (bilinear). Any expansion works for an exact pyramid: building and
    collapsing use the same one."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def gaussian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``levels`` images, full size first (B×C×H×W each)."""
    pyr = [x]
    for _ in range(levels - 1):
        pyr.append(_down(pyr[-1]))
    return pyr


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels, then the low-pass residual; :func:`collapse` inverts it exactly."""
    g = gaussian_pyramid(x, levels)
    return [g[i] - _up(g[i + 1], g[i].shape[-2:]) for i in range(levels - 1)] + [g[-1]]


def collapse(lap: list[torch.Tensor]) -> torch.Tensor:
    x = lap[-1]
    for band in reversed(lap[:-1]):
        x = _up(x, band.shape[-2:]) + band
    return x


def max_levels(h: int, w: int, smallest: int = 4) -> int:
    n = 1
    while min(h, w) >> n >= smallest:
        n += 1
    return n


def multiband_blend(fg: torch.Tensor, bg: torch.Tensor, mask: torch.Tensor, levels: int = 6) -> torch.Tensor:
    """Multi-band blend (Burt & Adelson): each frequency band mixed with a mask blurred to its scale.

    Args:
        fg, bg: B×C×H×W images.
        mask: B×1×H×W in [0, 1] (1 = foreground).
        levels: pyramid levels (clipped to what the size allows).
    Returns:
        B×C×H×W. Mask 1 everywhere gives ``fg`` and mask 0 gives ``bg`` (up to float rounding).
    """
    levels = max(1, min(levels, max_levels(*fg.shape[-2:])))
    # The pyramid is linear: Σ m·L(fg) + (1−m)·L(bg) = L(bg) + m·L(fg − bg), so one pyramid of
    # the difference does the work of two, and collapse(L(bg)) is bg itself.
    ld = laplacian_pyramid(fg - bg, levels)
    gm = gaussian_pyramid(mask.to(fg.dtype), levels)
    return collapse([d.mul_(m) for d, m in zip(ld, gm)]).add_(bg)


def poisson_blend(fg: torch.Tensor, bg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Poisson (gradient-domain) blending with OpenCV's seamlessClone, one image at a time.

    Args as :func:`multiband_blend`; the mask is thresholded at 0.5.
    """
    out = []
    f8, b8 = to_uint8(fg), to_uint8(bg)
    m8 = (mask[:, 0] > 0.5).to(torch.uint8).mul(255).cpu().numpy()
    for f, b, m in zip(f8, b8, m8):
        m = m.copy()
        m[[0, -1], :] = 0
        m[:, [0, -1]] = 0  # seamlessClone needs the region inside the frame
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            out.append(b)
            continue
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        centre = (int((x0 + x1 + 1) // 2), int((y0 + y1 + 1) // 2))
        res = cv2.seamlessClone(np.ascontiguousarray(f[..., ::-1]), np.ascontiguousarray(b[..., ::-1]), m, centre, cv2.NORMAL_CLONE)
        out.append(res[..., ::-1])
    return to_tensor(list(out), fg.device).to(fg.dtype)


class GraphedMultiband:
    """:func:`multiband_blend` replayed from a CUDA graph captured once per input shape.

    At small batches the GPU blend is bound by kernel launches (about thirty small kernels);
    replaying a captured graph launches them as one. On other devices it calls the function.
    """

    def __init__(self, levels: int = 6):
        self.levels = levels
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, fg: torch.Tensor, bg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if fg.device.type != "cuda":
            return multiband_blend(fg, bg, mask, self.levels)
        key = (tuple(fg.shape), tuple(mask.shape), fg.dtype, mask.dtype, fg.device)
        if key not in self._graphs:
            static = [fg.clone(), bg.clone(), mask.clone()]
            side = torch.cuda.Stream(fg.device)
            side.wait_stream(torch.cuda.current_stream(fg.device))
            with torch.cuda.stream(side):  # warm up outside the capture (allocations, autotuning)
                for _ in range(2):
                    multiband_blend(*static, self.levels)
            torch.cuda.current_stream(fg.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = multiband_blend(*static, self.levels)
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for dst, src in zip(static, (fg, bg, mask)):
            dst.copy_(src)
        graph.replay()
        return out.clone()
