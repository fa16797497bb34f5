"""Hands in face crops: MediaPipe's palm detector and 21-point hand landmarker, run in torch, and a
soft hand mask per image, so that synthesis keeps a hand where it was (the target's hand stays in
its fake; the source's hand is never pasted into one).

The two ``.tflite`` files (Apache-2.0) ship in the ``mediapipe==0.10.21`` wheel; ``reliableswap
weights fetch hands`` extracts just them (:data:`reliableswap.faces.models.WHEEL_MODELS`), and
:class:`reliableswap.faces.tflite.TfliteNet` runs them (float16 weights widened once at load).
MediaPipe's own runtime is never imported.

The chain follows MediaPipe's hand-tracking graph:

1. palm detection on the image letterboxed to 192² px in [0, 1]: 2016 SSD anchors (strides 8, 16,
   16, 16; fixed-size anchors), 18 values each (box centre and size, 7 palm keypoints), sigmoid
   scores, weighted non-maximum suppression;
2. the hand's rotated square region: rotated so that the wrist → middle-finger-knuckle line points
   up, moved half a box up along it, 2.6 times the box's long side;
3. 21 landmarks on that region resampled to 224² px, mapped back to the image, with the model's
   hand-presence score;
4. the mask: the palm polygon and a capsule along every finger bone (radius from the hand's
   size), feathered.

Images are B×3×H×W in [0, 1] on any device; landmarks are pixels (x, y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import warp_affine

from reliableswap.choices import OccluderKind
from reliableswap.errors import UserError
from reliableswap.faces.models import WHEEL_MODELS, wheel_model
from reliableswap.faces.tflite import TfliteNet
from reliableswap.geometry.affine import apply_affine, invert_affine
from reliableswap.geometry.raster import polygon_mask
from reliableswap.images import read_crop, to_tensor
from triplets.occlusion import ObjectOccluders, Occluder
from reliableswap.contracts import FaceSet

PALM_INPUT, LANDMARK_INPUT = 192, 224
#: MediaPipe's palm-detection anchors: (stride, anchors per cell).
ANCHOR_LAYERS = ((8, 2), (16, 6))
#: MediaPipe keeps hands at presence 0.5; faces close up give the odd false palm near 0.5, so 0.7 here.
MIN_PALM_SCORE, NMS_IOU, MIN_PRESENCE = 0.5, 0.3, 0.7
ROI_SCALE, ROI_SHIFT_Y = 2.6, -0.5
#: The 21 points' bones (wrist 0; thumb 1-4, index 5-8, middle 9-12, ring 13-16, little 17-20).
BONES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (5, 9), (9, 10), (10, 11), (11, 12),
         (9, 13), (13, 14), (14, 15), (15, 16), (13, 17), (0, 17), (17, 18), (18, 19), (19, 20))
PALM = (0, 1, 2, 5, 9, 13, 17)


def palm_anchors(device=None) -> torch.Tensor:
    """The 2016 anchor centres (2016×2, in [0, 1]) in the network's output order."""
    out = []
    for stride, per_cell in ANCHOR_LAYERS:
        n = PALM_INPUT // stride
        c = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        out.append(torch.stack([xx, yy], -1).reshape(-1, 1, 2).expand(-1, per_cell, 2).reshape(-1, 2))
    return torch.cat(out).to(device)


@dataclass
class Hands:
    """Hands found in a batch: ``image`` (N long, which image each hand is in), ``landmarks``
    N×21×2 px, ``presence`` N, ``palm_score`` N."""

    image: torch.Tensor
    landmarks: torch.Tensor
    presence: torch.Tensor
    palm_score: torch.Tensor


class HandLandmarker:
    """Palm detection + hand landmarks (see the module doc) on ``device``."""

    def __init__(self, device: str | torch.device = "cpu", weights=None, max_hands: int = 2):
        palm, landmark = (wheel_model(m, weights) for m in WHEEL_MODELS["hands"])
        self.device = torch.device(device)
        self.palm = TfliteNet(palm).to(self.device).eval()
        self.landmark = TfliteNet(landmark).to(self.device).eval()
        self.anchors = palm_anchors(self.device)
        self.max_hands = max_hands

    @torch.no_grad()
    def palms(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per image, K×(1 + 4 + 14): score, box (cx, cy, w, h) and 7 keypoints, in image pixels."""
        b, _, h, w = images.shape
        side = max(h, w)
        padded = F.pad(images.to(self.device, torch.float32), ((side - w) // 2, side - w - (side - w) // 2,
                                                                  (side - h) // 2, side - h - (side - h) // 2))
        x = F.interpolate(padded, size=(PALM_INPUT, PALM_INPUT), mode="bilinear", align_corners=False, antialias=True)
        raw, logit = self.palm(x)
        score = torch.sigmoid(logit[..., 0].clamp(-100, 100))  # B×2016
        a = self.anchors
        box = raw[..., :4] / PALM_INPUT
        cxy = box[..., :2] + a
        kps = raw[..., 4:].reshape(b, -1, 7, 2) / PALM_INPUT + a[None, :, None]
        off = torch.tensor([(side - w) // 2, (side - h) // 2], device=self.device, dtype=torch.float32)
        det = torch.cat([score[..., None], cxy * side - off, box[..., 2:] * side,
                         (kps * side - off).reshape(b, -1, 14)], -1)
        return [weighted_nms(d[d[:, 0] > MIN_PALM_SCORE], NMS_IOU)[: self.max_hands] for d in det]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Hands:
        """Hands of B images (B×3×H×W in [0, 1])."""
        palms = self.palms(images)
        idx = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(palms)]).to(self.device)
        if not len(idx):
            z = torch.zeros(0, device=self.device)
            return Hands(idx, z.view(0, 21, 2), z, z)
        d = torch.cat(palms)
        m = roi_matrices(d)  # N×2×3 image → 224 crop
        crops = warp_affine(images.to(self.device, torch.float32)[idx], m, (LANDMARK_INPUT, LANDMARK_INPUT),
                            padding_mode="zeros", align_corners=False)
        lm, presence, _, _ = self.landmark(crops)
        back = apply_affine(lm.view(-1, 21, 3)[..., :2], invert_affine(m))
        return Hands(idx, back, presence.view(-1), d[:, 0])

    def masks(self, images: torch.Tensor, feather: float = 0.02) -> torch.Tensor:
        """B×1×H×W soft mask of every hand found (presence ≥ :data:`MIN_PRESENCE`) in each image."""
        hands = self(images)
        keep = hands.presence >= MIN_PRESENCE
        return hand_mask(hands.landmarks[keep], hands.image[keep], images.shape[0], images.shape[-2:], feather)


def weighted_nms(d: torch.Tensor, iou: float) -> torch.Tensor:
    """MediaPipe's weighted non-maximum suppression of K×19 detections (score, cx, cy, w, h, 14
    keypoint values): each kept detection is the score-weighted mean of those overlapping it by more
    than ``iou``, its score the highest of them. Highest score first."""
    d = d[d[:, 0].argsort(descending=True)]
    out = []
    while len(d):
        x0, y0 = d[:, 1] - d[:, 3] / 2, d[:, 2] - d[:, 4] / 2
        x1, y1 = d[:, 1] + d[:, 3] / 2, d[:, 2] + d[:, 4] / 2
        iw = (torch.minimum(x1[0], x1) - torch.maximum(x0[0], x0)).clamp_min(0)
        ih = (torch.minimum(y1[0], y1) - torch.maximum(y0[0], y0)).clamp_min(0)
        inter = iw * ih
        over = inter / (d[0, 3] * d[0, 4] + d[:, 3] * d[:, 4] - inter).clamp_min(1e-9) > iou
        group = d[over]
        w = group[:, :1]
        merged = torch.cat([group[:1, :1], (group[:, 1:] * w).sum(0, keepdim=True) / w.sum()], 1)
        out.append(merged)
        d = d[~over]
    return torch.cat(out) if out else d


def roi_matrices(d: torch.Tensor) -> torch.Tensor:
    """N×2×3 affine matrices from the image to the 224² landmark input, for N palm detections
    (score, box, keypoints in pixels): MediaPipe's rotated, shifted, squared and enlarged region."""
    cx, cy, w, h = d[:, 1], d[:, 2], d[:, 3], d[:, 4]
    kx, ky = d[:, 5:19:2], d[:, 6:19:2]
    # rotation that makes wrist (keypoint 0) → middle-finger knuckle (keypoint 2) point up
    angle = math.pi / 2 - torch.atan2(-(ky[:, 2] - ky[:, 0]), kx[:, 2] - kx[:, 0])
    angle = angle - 2 * math.pi * torch.floor((angle + math.pi) / (2 * math.pi))
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx = cx - h * ROI_SHIFT_Y * sin
    cy = cy + h * ROI_SHIFT_Y * cos
    side = torch.maximum(w, h) * ROI_SCALE
    # image → crop: rotate by −angle about the centre, scale side → 224, centre → crop centre
    s = LANDMARK_INPUT / side
    m = torch.stack([torch.stack([cos * s, sin * s], -1), torch.stack([-sin * s, cos * s], -1)], 1)  # N×2×2
    t = LANDMARK_INPUT / 2 - (m @ torch.stack([cx, cy], -1).unsqueeze(-1)).squeeze(-1)
    return torch.cat([m, t.unsqueeze(-1)], -1)


def hand_mask(landmarks: torch.Tensor, image: torch.Tensor, batch: int, size: tuple[int, int],
              feather: float = 0.02) -> torch.Tensor:
    """B×1×H×W soft mask of N hands (N×21×2 px, ``image`` N: which of the ``batch`` images): the
    palm polygon and a capsule along each bone, radius a sixth of the wrist → middle-knuckle
    length (at least 2 px), feathered by ``feather`` × the image side."""
    h, w = size
    if not len(landmarks):
        return torch.zeros(batch, 1, h, w, device=landmarks.device)
    lm = landmarks.float()
    palm = polygon_mask(lm[:, list(PALM)], h, w)  # N×1×H×W
    radius = ((lm[:, 9] - lm[:, 0]).norm(dim=-1) / 6).clamp_min(2.0)
    ys, xs = torch.meshgrid(torch.arange(h, device=lm.device, dtype=lm.dtype), torch.arange(w, device=lm.device, dtype=lm.dtype), indexing="ij")
    p = torch.stack([xs, ys], -1).view(1, h * w, 2)
    dist = torch.full((len(lm), h * w), float("inf"), device=lm.device, dtype=lm.dtype)
    for i, j in BONES:  # one bone at a time: memory N×H×W whatever the number of bones
        a, ab = lm[:, i:i + 1], lm[:, j:j + 1] - lm[:, i:i + 1]
        t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)).clamp(0, 1)
        dist = torch.minimum(dist, (p - (a + t.unsqueeze(-1) * ab)).norm(dim=-1))
    bones = (dist <= radius.unsqueeze(-1)).float().view(-1, 1, h, w)
    each = torch.maximum(palm, bones)
    onehot = (image.to(lm.device).view(1, -1) == torch.arange(batch, device=lm.device).view(-1, 1)).to(each.dtype)  # B×N
    out = (onehot.view(batch, -1, 1) * each.view(1, len(lm), -1)).amax(1).view(batch, 1, h, w)
    if feather > 0:
        sigma = max(feather * max(h, w), 0.5)
        k = int(2 * round(3 * sigma) + 1)
        out = torch.maximum(out, gaussian_blur2d(out, (k, k), (sigma, sigma)) * 2).clamp(0, 1)
    return out


__all__ = ["BONES", "HandLandmarker", "Hands", "hand_mask", "palm_anchors", "roi_matrices", "weighted_nms"]


class HandCutouts:
    """Real hands cut out of prepped faces, for occlusion augmentation (a
    :class:`triplets.occlusion.OccluderSource`): every hand stored in ``faces.jsonl`` (``prep
    --landmarks mesh``), its mask (:func:`hand_mask`, the bones and palm) and the crop's pixels
    under it, cut to the mask's box. ``sample`` scales one to the target crop (with the size ratio
    it had on its own crop, ±20 %) and mirrors it half the time.

    Args:
        faces: a prep folder's faces (only records with ``hands`` are read; at most ``limit`` hands).
    """

    def __init__(self, faces: FaceSet, limit: int = 256):
        self.cutouts: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # rgb 3×h×w, alpha 1×h×w, crop size
        for face in faces.faces:
            if not face.hands or len(self.cutouts) >= limit:
                continue
            img = to_tensor(read_crop(faces, face))[0]
            size = face.size
            for hand in face.hands[: limit - len(self.cutouts)]:
                pts = torch.tensor(hand, dtype=torch.float32)[None]
                alpha = hand_mask(pts, torch.zeros(1, dtype=torch.long), 1, (size, size))[0]
                ys, xs = torch.nonzero(alpha[0] > 0.02, as_tuple=True)
                if len(ys) < 16:
                    continue
                y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
                self.cutouts.append((img[:, y0:y1, x0:x1].clone(), alpha[:, y0:y1, x0:x1].clone(), size))
        if not self.cutouts:
            raise UserError(f"{faces.folder}: no stored hands to cut out (faces.jsonl has none: run prep --landmarks mesh "
                            "on photos with hands, or use only the \"objects\" occluders)")

    def __len__(self) -> int:
        return len(self.cutouts)

    def sample(self, rng, size: int) -> Occluder:
        rgb, alpha, src = self.cutouts[int(rng.integers(len(self.cutouts)))]
        scale = size / src * float(rng.uniform(0.8, 1.2))
        h, w = max(4, round(rgb.shape[1] * scale)), max(4, round(rgb.shape[2] * scale))
        rgb = F.interpolate(rgb[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        alpha = F.interpolate(alpha[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        if rng.random() < 0.5:
            rgb, alpha = rgb.flip(-1), alpha.flip(-1)
        return Occluder(rgb=rgb, alpha=alpha, kind="hand")


def occluder_sources(kinds, faces, textures, named_by: str) -> list:
    """The occluder sources ``kinds`` (:class:`reliableswap.choices.OccluderKind` values) name: hands
    cut out of the prep folder ``faces``, procedural objects textured by ``textures`` (``rng →``
    a real crop). ``named_by``: the recipe key or flag that asked, for the one-line error."""
    sources = []
    if OccluderKind.hands in kinds:
        if faces is None:
            raise UserError(f"{named_by} hands cuts real hands out of a prep folder: pass --faces PREP")
        sources.append(HandCutouts(FaceSet.load(faces, flame=False)))
    if OccluderKind.objects in kinds:
        sources.append(ObjectOccluders(textures))
    return sources
