"""Analytic dense flows from FLAME mesh correspondences (FlowFace++'s shape flow, computed, not learned).

For a pair (a, b) with fitted parameters: M2 = FLAME(β_b, θ_b, ψ_b) and M12 = FLAME(β_a, θ_b, ψ_b)
(a's shape in b's pose and expression), both projected with b's camera. Every mesh vertex moves
from its M2 pixel to its M12 pixel; rasterizing gives that displacement at every pixel the head
covers, and a harmonic extension (zero on the image border) carries it smoothly over the rest of
the image, so warping leaves no seam.

Two fields, both B×2×H×W in pixels, on b's image:

* ``forward``: on M2's pixels, where each point goes (``P2 + forward(P2) = P12``);
* ``backward``: on M12's pixels, where to sample b (``warped(q) = b(q + backward(q))``), which
  is what :func:`reliableswap.geometry.grid.warp_backward` takes to reshape b's face into a's shape.

The same machinery gives FLAME reenactment: pixels of FLAME(β_a, θ_b, ψ_b) under b's camera map to
their points on FLAME(β_a, θ_a, ψ_a) under a's camera, i.e. a backward warp of a's image.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from reliableswap.flame.layer import Flame, FlameParams, project
from reliableswap.geometry.fields import harmonic_fill
from reliableswap.geometry.raster import interpolate, rasterize


def correspondence_flow(uv_src: torch.Tensor, depth_src: torch.Tensor, uv_dst: torch.Tensor, faces: torch.Tensor,
                        size: int, backend: str = "auto", fill: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Displacement from each pixel of the source render to the same surface point in the destination.

    Args:
        uv_src: B×V×2 projected vertices; depth_src: B×V (larger nearer); uv_dst: B×V×2k — k
            destinations of the same mesh topology side by side, all served by one rasterization.
    Returns:
        flow B×2k×S×S (harmonically extended off the mesh when ``fill``) and coverage B×1×S×S bool.
    """
    p2f, bary = rasterize(uv_src, depth_src, faces, (size, size), backend)
    covered = (p2f >= 0).unsqueeze(1)
    flow = interpolate(uv_dst - uv_src.repeat(1, 1, uv_dst.shape[-1] // 2), faces, p2f, bary)
    if fill:
        flow = harmonic_fill(flow, covered)
    return flow, covered


def shape_flow(flame: Flame, pa: FlameParams, pb: FlameParams, size: int, backend: str = "auto",
               forward: bool = True, reenact: bool = False) -> dict[str, torch.Tensor]:
    """FlowFace++ shape flow for B pairs (a, b) on b's ``size``×``size`` image.

    Returns dict: ``forward`` (with ``forward=True``), ``backward`` (B×2×S×S px), ``mask2``/``mask12``
    (B×1×S×S coverage of M2 and M12), ``p2``/``p12`` (B×68×2 landmarks of M2 and M12 under b's camera;
    0–16 contour). ``reenact=True`` adds ``reenact``: :func:`reenact_map`'s backward warp of a's image,
    from the same M12 rasterization (M12 is the reenacted head FLAME(β_a, θ_b, ψ_b)).
    """
    p12 = replace(pb, shape=pa.shape)
    v2, v12 = flame.vertices(pb), flame.vertices(p12)
    uv2, uv12 = project(v2, pb.camera, size), project(v12, pb.camera, size)
    dst = torch.cat([uv2, project(flame.vertices(pa), pa.camera, size)], -1) if reenact else uv2
    back, m12 = correspondence_flow(uv12, v12[..., 2], dst, flame.faces, size, backend)
    out = {"backward": back[:, :2], "mask12": m12}
    if reenact:
        out["reenact"] = back[:, 2:]
    if forward:
        out["forward"], out["mask2"] = correspondence_flow(uv2, v2[..., 2], uv12, flame.faces, size, backend)
    if flame.embedding is not None:
        out["p2"] = project(flame.landmarks(pb), pb.camera, size)
        out["p12"] = project(flame.landmarks(p12), pb.camera, size)
    return out


def reenact_map(flame: Flame, pa: FlameParams, pb: FlameParams, size: int, backend: str = "auto") -> dict[str, torch.Tensor]:
    """Dense FLAME reenactment of a into b's frame: FLAME(β_a, θ_b, ψ_b) under b's camera.

    Returns dict: ``backward`` B×2×S×S (sample a's image at ``q + backward(q)``), ``mask`` B×1×S×S
    (pixels the reenacted head covers) and ``landmarks`` B×68×2 of the reenacted face.
    """
    pab = replace(pb, shape=pa.shape)
    vab, va = flame.vertices(pab), flame.vertices(pa)
    uv_ab, uv_a = project(vab, pb.camera, size), project(va, pa.camera, size)
    bwd, mask = correspondence_flow(uv_ab, vab[..., 2], uv_a, flame.faces, size, backend)
    out = {"backward": bwd, "mask": mask}
    if flame.embedding is not None:
        out["landmarks"] = project(flame.landmarks(pab), pb.camera, size)
    return out


