"""What covers a face in its own crop, found from the face mesh and the crop's pixels: glasses
frames (the mesh's eyes and the crop's edges), and the per-crop occluder masks prep stores beside
``faces.jsonl`` (hands, glasses, hair: :data:`CHANNELS`, one soft mask each in the channels of an
RGB PNG).

Glasses: a frame is a thin line that runs round the eye, under it across the cheek, where bare
skin is smooth. So the test looks along :data:`RAYS` rays below each eye (from just outside the
eye's mesh contour to :data:`RING_OUT` eye half-widths) for a sharp lightness edge; a face wears
glasses when at least :data:`MIN_RAYS` of the rays of both eyes together cross one. On the shared
faces this separates the three faces with glasses (0.93–0.97) from the 26 without (≤ 0.70). The
mask is then the crop's edges inside the ring round each eye (the eye and the brows left out) and
the horizontal edges over the nose bridge, dilated across the frame's width.

The analysis runs on the crop resized to :data:`WORK` px, so thresholds do not depend on the crop
size. Images are B×3×S×S in [0, 1] on any device, meshes B×468×3 in crop pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_lab
from kornia.filters import gaussian_blur2d, spatial_gradient
from kornia.morphology import bottom_hat

from reliableswap.faces import mesh as fm
from reliableswap.geometry.raster import polygon_mask
from reliableswap.contracts import OCCLUDER_CHANNELS as CHANNELS

WORK = 256
#: Lightness edge (CIE L / 100 per pixel at :data:`WORK` px, after a σ = 1 px blur) a frame makes.
EDGE = 0.04
RAYS, RING_IN, RING_OUT = 15, 0.12, 2.0
MIN_RAYS = 0.8
#: A frame's dark body: at least DARK (L / 100) below the lightness closed over DARK_LINE px.
DARK, DARK_LINE = 0.08, 9
#: The frame's ring round an eye (eye half-widths): horizontal and vertical semi-axes.
RING_AXES = (2.5, 1.7)


def _eye_frames(mesh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per face and eye: the mesh's eye contour (B×2×16×2), its centre (B×2×2, the contour's mean)
    and its half-width in px (B×2)."""
    eyes = torch.stack([mesh[:, fm.RIGHT_EYE, :2], mesh[:, fm.LEFT_EYE, :2]], 1).float()
    half = (eyes[..., 0].amax(2) - eyes[..., 0].amin(2)) / 2
    return eyes, eyes.mean(2), half


def _edges(img: torch.Tensor, mesh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lightness of B×3×W×W crops (CIE L / 100, σ = 1 px blur) and its gradient: (L, magnitude,
    |∂/∂y|), each B×1×W×W, computed in the band of rows that holds every eye's ring (zeros
    elsewhere: a third of the work on aligned crops). ``mesh``: B×468×3 at W px."""
    _, centre, half = _eye_frames(mesh)
    reach = RING_AXES[1] * half + 4
    w = img.shape[-1]
    y0 = max(int((centre[..., 1] - reach).min().floor()), 0)
    y1 = min(int((centre[..., 1] + reach).max().ceil()) + 1, w)
    if y1 - y0 < 8:  # no eye on the crop (a broken mesh): nothing to find
        z = img.new_zeros(img.shape[0], 1, w, w)
        return z, z, z
    band = img[..., max(y0 - 3, 0):min(y1 + 3, w), :]  # + the blur's and gradient's reach
    ell = gaussian_blur2d(rgb_to_lab(band.clamp(0, 1).float())[:, :1] / 100, (5, 5), (1.0, 1.0))
    g = spatial_gradient(ell)[:, 0]  # B×2×h×W (x, y)
    pad = (0, 0, max(y0 - 3, 0), w - min(y1 + 3, w))
    return F.pad(ell, pad), F.pad(g.norm(dim=1, keepdim=True), pad), F.pad(g[:, 1:2].abs(), pad)


def _analyse(img: torch.Tensor, mesh: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """B crops at :data:`WORK` px: (their meshes at that size, :func:`_edges`, the glasses score B)."""
    s = img.shape[-1]
    small = F.interpolate(img.float(), size=(WORK, WORK), mode="bilinear", align_corners=False, antialias=s > WORK)
    m = mesh.float() * (WORK / s)
    edges = _edges(small, m)
    return m, edges, _ray_hits(edges[1], m).float().mean(1)


def glasses_score(img: torch.Tensor, mesh: torch.Tensor) -> torch.Tensor:
    """B in [0, 1]: the fraction of the rays below both eyes that cross a sharp edge (see the
    module doc); ≥ :data:`MIN_RAYS` reads as glasses."""
    return _analyse(img, mesh)[2]


def _ray_hits(mag: torch.Tensor, mesh: torch.Tensor) -> torch.Tensor:
    """B×(2·RAYS) bool: which rays below each eye cross an edge stronger than :data:`EDGE`."""
    b = mag.shape[0]
    eyes, centre, half = _eye_frames(mesh)
    th = torch.linspace(math.radians(20), math.radians(160), RAYS, device=mag.device)  # below the eye (y down)
    d = torch.stack([th.cos(), th.sin()], -1)  # R×2
    # the eye contour's reach along each ray, then samples from just outside it to RING_OUT half-widths
    reach = torch.einsum("bepc,rc->berp", eyes - centre.unsqueeze(2), d).amax(-1)  # B×2×R
    t = torch.linspace(0, 1, 40, device=mag.device)
    r0 = reach + RING_IN * half.unsqueeze(-1)
    r1 = (RING_OUT * half).unsqueeze(-1).expand_as(r0)
    radius = r0.unsqueeze(-1) + (r1 - r0).clamp_min(0).unsqueeze(-1) * t  # B×2×R×T
    pts = centre.view(b, 2, 1, 1, 2) + radius.unsqueeze(-1) * d.view(1, 1, -1, 1, 2)
    grid = pts / (mag.shape[-1] - 1) * 2 - 1
    v = F.grid_sample(mag, grid.view(b, 1, -1, 2), mode="bilinear", align_corners=True, padding_mode="zeros")
    return (v.view(b, 2, RAYS, -1).amax(-1) > EDGE).view(b, -1)


def glasses_mask(img: torch.Tensor, mesh: torch.Tensor, dilate: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Glasses frames in B crops: (soft mask B×1×S×S, all zeros for a face read as wearing none;
    score B, :func:`glasses_score`). ``dilate``: px at :data:`WORK` px by which the edges grow to
    cover the frame between them. Only the faces read as wearing glasses pay for the mask."""
    b, _, s, _ = img.shape
    m, (ell, mag, gy), score = _analyse(img, mesh)
    mask = torch.zeros(b, 1, s, s, device=img.device, dtype=img.dtype)
    worn = torch.nonzero(score >= MIN_RAYS).flatten()
    if len(worn):
        frame = _frame(ell[worn], mag[worn], gy[worn], m[worn], dilate)
        if s != WORK:
            frame = F.interpolate(frame, size=(s, s), mode="bilinear", align_corners=False).clamp(0, 1)
        mask[worn] = frame.to(img.dtype)
    return mask, score


def _frame(ell: torch.Tensor, mag: torch.Tensor, gy: torch.Tensor, m: torch.Tensor, dilate: int) -> torch.Tensor:
    """B×1×W×W soft frame mask of faces that wear glasses, from their lightness, its gradient
    (:func:`_edges`) and their meshes (at :data:`WORK` px)."""
    b = ell.shape[0]
    dev = ell.device
    _, centre, half = _eye_frames(m)
    ys, xs = torch.meshgrid(torch.arange(WORK, device=dev, dtype=torch.float32),
                            torch.arange(WORK, device=dev, dtype=torch.float32), indexing="ij")
    p = torch.stack([xs, ys], -1).view(1, 1, WORK, WORK, 2)
    q = (p - centre.view(b, 2, 1, 1, 2)) / half.view(b, 2, 1, 1, 1).clamp_min(1.0)
    ring = ((q[..., 0] / RING_AXES[0]) ** 2 + (q[..., 1] / RING_AXES[1]) ** 2 <= 1).any(1, keepdim=True)  # B×1×W×W
    grow = max(1, round(0.25 * float(half.mean())))
    eyes = torch.maximum(polygon_mask(m[:, fm.RIGHT_EYE, :2], WORK, WORK), polygon_mask(m[:, fm.LEFT_EYE, :2], WORK, WORK))
    brows = torch.maximum(polygon_mask(m[:, fm.RIGHT_BROW, :2], WORK, WORK), polygon_mask(m[:, fm.LEFT_BROW, :2], WORK, WORK))
    # the eyes grown (lashes, eyelids, liner), the brows as drawn: a rim over a brow's edge is kept
    features = (F.max_pool2d(eyes, 2 * grow + 1, 1, grow) > 0.5) | (brows > 0.5)
    # the bridge: between the inner eye corners, from the brows' lower edge down to the eye line
    inner_r, inner_l = m[:, 133, :2], m[:, 362, :2]
    brow_low = m[:, [55, 285], 1].amax(1)  # the brows' inner lower points
    x0, x1 = inner_r[:, 0].view(b, 1, 1, 1), inner_l[:, 0].view(b, 1, 1, 1)
    y0 = brow_low.view(b, 1, 1, 1)
    y1 = ((inner_r[:, 1] + inner_l[:, 1]) / 2).view(b, 1, 1, 1)
    bridge = (xs > x0) & (xs < x1) & (ys > y0) & (ys < y1)
    # the temples: beyond each ring's outer end, out to the face's outline, in the rows from the
    # brows' lower edge to the eye centre (where the arms run back to the ears)
    oval_x = m[:, fm.FACE_OVAL, 0]
    out_r = (centre[:, 0, 0] - RING_AXES[0] * half[:, 0]).view(b, 1, 1, 1)
    out_l = (centre[:, 1, 0] + RING_AXES[0] * half[:, 1]).view(b, 1, 1, 1)
    top = (brow_low - 0.2 * half.mean(1)).view(b, 1, 1, 1)
    eye_y = centre[..., 1].mean(1).view(b, 1, 1, 1)
    rows = (ys > top) & (ys < eye_y)
    temples = rows & (((xs < out_r + 2) & (xs > oval_x.amin(1).view(b, 1, 1, 1)))
                      | ((xs > out_l - 2) & (xs < oval_x.amax(1).view(b, 1, 1, 1))))
    # and the body of a thick dark frame, which has no edge inside: lines darker than the
    # lightness closed over DARK_LINE px (a bottom-hat)
    dark = bottom_hat(ell, torch.ones(DARK_LINE, DARK_LINE, device=dev)) > DARK
    edges = (((mag > EDGE) & ring) | ((gy > EDGE) & (bridge | temples)) | (dark & (ring | bridge | temples))) & ~features
    k = 2 * dilate + 1
    mask = F.max_pool2d(edges.float(), k, 1, dilate)
    return gaussian_blur2d(mask, (5, 5), (1.0, 1.0)).clamp(0, 1)


def encode_masks(masks: torch.Tensor) -> torch.Tensor:
    """B×3×S×S soft masks in [0, 1] (:data:`CHANNELS` order) → B×S×S×3 uint8 for the PNG."""
    return (masks.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def decode_masks(pixels: torch.Tensor) -> torch.Tensor:
    """S×S×3 uint8 PNG pixels → 3×S×S float in [0, 1] (:data:`CHANNELS` order)."""
    return pixels.permute(2, 0, 1).float() / 255


__all__ = ["CHANNELS", "decode_masks", "encode_masks", "glasses_mask", "glasses_score"]
