"""Batched rasterization: projected triangle meshes (which triangle covers each pixel, and where) and polygons.

``rasterize`` uses pytorch3d's ``rasterize_meshes`` when pytorch3d imports, otherwise the pure-torch
rasterizer below (always available, always tested). Meshes are already projected: vertices in
pixel coordinates (pixel centres at integers) plus a depth where *larger is nearer* (FLAME's z
points toward the camera). Under a weak-perspective camera screen-space barycentrics are exact.

The torch rasterizer is exact and batched: every triangle enumerates the pixel centres of its
bounding box (triangles are grouped by box size so a few large ones do not inflate the rest),
keeps those inside by edge functions, and a scatter-max z-buffer picks the nearest per pixel.
"""

from __future__ import annotations

import torch

try:  # optional backend
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes as _p3d_rasterize
    from pytorch3d.structures import Meshes as _P3DMeshes
except Exception:  # noqa: BLE001 — any import failure means "not available"
    _p3d_rasterize = None


def available_backends() -> list[str]:
    return ["torch"] + (["pytorch3d"] if _p3d_rasterize is not None else [])


def rasterize(uv: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, size: tuple[int, int],
              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterize B projected meshes.

    Args:
        uv: B×V×2 pixel coordinates; depth: B×V (larger = nearer); faces: F×3 long;
        size: (H, W); backend: ``auto`` (pytorch3d if importable), ``torch`` or ``pytorch3d``.
    Returns:
        ``pix_to_face`` B×H×W long (−1 where empty) and ``bary`` B×H×W×3.
    """
    if backend == "pytorch3d" or (backend == "auto" and _p3d_rasterize is not None):
        if _p3d_rasterize is None:
            raise RuntimeError("pytorch3d is not importable; use backend='torch'")
        return _rasterize_p3d(uv, depth, faces, size)
    return rasterize_torch(uv, depth, faces, size)


def rasterize_torch(uv: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch rasterizer (see :func:`rasterize`)."""
    h, w = size
    b, dev, dt = uv.shape[0], uv.device, uv.dtype
    tri = uv[:, faces]  # B×F×3×2
    z = depth[:, faces]  # B×F×3
    lo = tri.amin(2).ceil()
    hi = tri.amax(2).floor()
    lo = torch.maximum(lo, lo.new_zeros(2))
    hi = torch.minimum(hi, torch.tensor([w - 1, h - 1], dtype=dt, device=dev))
    ext = (hi - lo + 1).amax(-1)  # B×F box extent (≤ 0: no pixel centre)
    e0 = tri[:, :, 1] - tri[:, :, 0]
    e1 = tri[:, :, 2] - tri[:, :, 0]
    area = e0[..., 0] * e1[..., 1] - e0[..., 1] * e1[..., 0]  # signed, both windings kept
    ok = (ext >= 1) & (area.abs() > 1e-12)
    pix_l, z_l, f_l, w_l = [], [], [], []
    k_prev = 0
    k = 2
    max_ext = int(ext[ok].max()) if bool(ok.any()) else 0
    while k_prev < max_ext:
        sel = ok & (ext > k_prev) & (ext <= k)
        bi, fi = torch.nonzero(sel, as_tuple=True)
        if bi.numel():
            off = torch.stack(torch.meshgrid(torch.arange(k, device=dev), torch.arange(k, device=dev), indexing="xy"), -1).reshape(-1, 2).to(dt)
            p = lo[bi, fi].unsqueeze(1) + off  # N×k²×2 candidate pixel centres
            t = tri[bi, fi]  # N×3×2
            a = area[bi, fi].unsqueeze(1)
            # barycentrics by edge functions (signed areas / triangle area)
            def edge(p0, p1):
                return (p1[:, None, 0] - p0[:, None, 0]) * (p[..., 1] - p0[:, None, 1]) - (p1[:, None, 1] - p0[:, None, 1]) * (p[..., 0] - p0[:, None, 0])
            w0 = edge(t[:, 1], t[:, 2]) / a
            w1 = edge(t[:, 2], t[:, 0]) / a
            w2 = 1 - w0 - w1
            bary = torch.stack([w0, w1, w2], -1)
            inside = (bary >= -1e-6).all(-1) & (p[..., 0] <= hi[bi, fi][:, None, 0]) & (p[..., 1] <= hi[bi, fi][:, None, 1])
            n, c = torch.nonzero(inside, as_tuple=True)
            pp = p[n, c].long()
            pix_l.append(bi[n] * h * w + pp[:, 1] * w + pp[:, 0])
            z_l.append((bary[n, c] * z[bi[n], fi[n]]).sum(-1))
            f_l.append(fi[n])
            w_l.append(bary[n, c])
        k_prev, k = k, k * 2
    pix_to_face = torch.full((b * h * w,), -1, dtype=torch.long, device=dev)
    bary_out = torch.zeros(b * h * w, 3, dtype=dt, device=dev)
    if pix_l:
        pix, zz, ff, ww = torch.cat(pix_l), torch.cat(z_l), torch.cat(f_l), torch.cat(w_l)
        zbuf = torch.full((b * h * w,), float("-inf"), dtype=dt, device=dev)
        zbuf.scatter_reduce_(0, pix, zz, "amax")
        win = zz >= zbuf[pix]
        # equal depths (a pixel centre on a shared edge): the highest face index wins, on every
        # device, so CPU and GPU rasterize identically (a plain scatter leaves the winner undefined)
        pix_to_face.scatter_reduce_(0, pix[win], ff[win], "amax")
        chosen = win.clone()
        chosen[win] = ff[win] == pix_to_face[pix[win]]
        bary_out[pix[chosen]] = ww[chosen]
    return pix_to_face.view(b, h, w), bary_out.view(b, h, w, 3)


def _rasterize_p3d(uv, depth, faces, size):
    """pytorch3d backend: pixel coordinates → its NDC (+x left, +y up), depth → z (smaller nearer)."""
    h, w = size
    s = min(h, w)
    x = -(2 * uv[..., 0] + 1 - w) / s
    y = -(2 * uv[..., 1] + 1 - h) / s
    verts = torch.stack([x, y, (depth.amax(1, keepdim=True) + 1 - depth)], -1).float()
    meshes = _P3DMeshes(verts=list(verts), faces=[faces] * uv.shape[0])
    p2f, _, bary, _ = _p3d_rasterize(meshes, image_size=(h, w), blur_radius=0.0, faces_per_pixel=1, perspective_correct=False)
    nf = faces.shape[0]
    p2f = p2f[..., 0]
    offs = torch.arange(uv.shape[0], device=uv.device).view(-1, 1, 1) * nf
    p2f = torch.where(p2f >= 0, p2f - offs, p2f)
    return p2f, bary[..., 0, :].to(uv.dtype)


def interpolate(values: torch.Tensor, faces: torch.Tensor, pix_to_face: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    """Barycentric interpolation of per-vertex values B×V×C over the raster → B×C×H×W (0 where empty)."""
    b, h, w = pix_to_face.shape
    f = pix_to_face.clamp_min(0).view(b, -1)  # B×HW
    vid = faces[f]  # B×HW×3
    c = values.shape[-1]
    g = torch.gather(values, 1, vid.reshape(b, -1, 1).expand(-1, -1, c)).view(b, -1, 3, c)
    out = (g * bary.view(b, -1, 3, 1)).sum(2) * (pix_to_face.view(b, -1, 1) >= 0)
    return out.permute(0, 2, 1).reshape(b, c, h, w)


def polygon_mask(poly: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rasterize B×N×2 closed polygons (even-odd rule, pixel centres) into B×1×H×W {0, 1}. Only
    the pixels of the polygons' bounding box (over the batch) are tested: a face in a large photo
    costs its own area, not the photo's (the test is B×h×w×N)."""
    dev, dt = poly.device, poly.dtype
    out = torch.zeros(poly.shape[0], 1, height, width, device=dev, dtype=dt)
    lo = poly.detach().flatten(0, 1).amin(0).floor().clamp_min(0)
    hi = poly.detach().flatten(0, 1).amax(0).ceil() + 1
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        lo, hi = lo.new_zeros(2), lo.new_tensor([width, height])
    bx0, by0 = int(lo[0]), int(lo[1])
    bx1, by1 = min(int(hi[0]), width), min(int(hi[1]), height)
    if bx1 <= bx0 or by1 <= by0:
        return out
    ys = torch.arange(by0, by1, device=dev, dtype=dt).view(1, -1, 1, 1)
    xs = torch.arange(bx0, bx1, device=dev, dtype=dt).view(1, 1, -1, 1)
    p0 = poly.unsqueeze(1).unsqueeze(1)  # B×1×1×N×2
    p1 = poly.roll(-1, 1).unsqueeze(1).unsqueeze(1)
    y0, y1 = p0[..., 1], p1[..., 1]
    x0, x1 = p0[..., 0], p1[..., 0]
    crosses = (y0 > ys) != (y1 > ys)
    t = (ys - y0) / torch.where(y1 == y0, torch.ones_like(y1), y1 - y0)
    x_at = x0 + t * (x1 - x0)
    inside = (crosses & (xs < x_at)).sum(-1) % 2
    out[:, 0, by0:by1, bx0:bx1] = inside.to(dt)
    return out
