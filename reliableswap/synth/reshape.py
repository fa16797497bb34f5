"""Reshaping: move b's face contour toward a's face shape with a smooth, confined dense flow.

a's jaw landmarks are brought into b's frame (similarity on the rigid points), giving sparse
contour displacements; a thin-plate spline with zero-displacement anchors on the inner face,
on a ring outside the face and on the image border turns them into a dense backward flow, which
warps the whole composite. Where the face shrinks the band between the two contours is filled by
what lay outside b's contour (b's real background/hair), so no ghost contour or hole remains.
"""

from __future__ import annotations

import torch

from reliableswap.faces.ibug68 import INNER, JAW
from reliableswap.geometry.grid import border_points, warp_backward
from reliableswap.geometry.tps import dense_field
from reliableswap.synth.reenact import identity_in_frame


def contour_targets(lm_attr: torch.Tensor, lm_id: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Where b's 17 jaw points should go: toward a's jaw in b's frame (B×17×2)."""
    a_in_b = identity_in_frame(lm_id, lm_attr)
    return lm_attr[:, JAW] + strength * (a_in_b[:, JAW] - lm_attr[:, JAW])


def reshape_flow(lm_attr: torch.Tensor, jaw_target: torch.Tensor, h: int, w: int, ring: float = 0.35, reg: float = 1e-6) -> torch.Tensor:
    """Dense backward flow (B×2×H×W, pixels) taking b's jaw to ``jaw_target``.

    The flow is zero on the inner face landmarks, on a ring ``ring`` × face size outside the jaw,
    and on the image border; zero displacement gives an exactly zero flow.
    """
    b = lm_attr.shape[0]
    jaw = lm_attr[:, JAW]
    centre = lm_attr[:, INNER].mean(1, keepdim=True)
    size = (jaw[:, -1] - jaw[:, 0]).norm(dim=-1).view(b, 1, 1)
    ring_pts = jaw_target + (jaw_target - centre) / (jaw_target - centre).norm(dim=-1, keepdim=True).clamp_min(1e-6) * ring * size
    border = border_points(h, w, 6, lm_attr.device, lm_attr.dtype).expand(b, -1, -1)
    fixed = torch.cat([lm_attr[:, INNER], ring_pts, border], 1)
    ctrl = torch.cat([jaw_target, fixed], 1)
    disp = torch.cat([jaw - jaw_target, torch.zeros_like(fixed)], 1)
    return dense_field(ctrl, disp, h, w, reg)


def reshape(image: torch.Tensor, lm_attr: torch.Tensor, lm_id: torch.Tensor, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warp ``image`` (b's frame) so b's contour takes a's shape.

    Returns:
        ``(image, flow, landmarks)``: warped B×3×H×W, the B×2×H×W backward flow, and the landmarks
        after reshaping (jaw moved, the rest unchanged).
    """
    h, w = image.shape[-2:]
    target = contour_targets(lm_attr, lm_id, strength)
    flow = reshape_flow(lm_attr, target, h, w)
    lm = lm_attr.clone()
    lm[:, JAW] = target
    return warp_backward(image, flow, "border"), flow, lm
