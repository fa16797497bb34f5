"""Face alignment (FFHQ quad, ArcFace 5-point similarity), warping, and paste-back.

Coordinates are pixel ``(x, y)`` with pixel centres at integers (kornia ``align_corners=True``).
All functions are batched: images B×3×H×W, landmarks B×68×2, matrices B×2×3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.geometry.transform import warp_affine

from reliableswap.errors import UserError
from reliableswap.faces.ibug68 import LEFT_EYE, MOUTH_LEFT, MOUTH_RIGHT, RIGHT_EYE, five_points
from reliableswap.geometry.affine import affine_scale, apply_affine, compose_affine, resize_affine, similarity_lstsq

#: ArcFace (insightface) 5-point template for 112×112: right eye, left eye, nose, mouth corners.
ARCFACE_112 = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)

#: FFHQ 5-point template for 512×512 crops (eye centres, nose tip, mouth corners), as used by
#: GFPGAN/facexlib for FFHQ-aligned faces. Where the FFHQ quad puts an average face's points.
FFHQ_512 = torch.tensor(
    [[192.98138, 239.94708], [318.90277, 240.19360], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]]
)

ALIGN_MODES = ("ffhq", "arcface")


def ffhq_transform(landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """Image → crop matrices of the FFHQ recipe (NVlabs ffhq-dataset ``recreate_aligned_images``).

    The oriented square ("quad") comes from the eye and mouth centres; its edges map onto the
    ``size``×``size`` crop's edges.

    Args:
        landmarks: B×68×2 image pixels.
        size: crop side in pixels.
    Returns:
        B×2×3 matrices (image → crop).
    """
    lm = landmarks.to(torch.float64)
    eye_r, eye_l = lm[:, RIGHT_EYE].mean(1), lm[:, LEFT_EYE].mean(1)
    eye_avg = (eye_r + eye_l) / 2
    eye_to_eye = eye_l - eye_r
    mouth_avg = (lm[:, MOUTH_RIGHT] + lm[:, MOUTH_LEFT]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    # x = eye_to_eye - flipud(eye_to_mouth) * [-1, 1]
    x = eye_to_eye - torch.stack([-eye_to_mouth[:, 1], eye_to_mouth[:, 0]], -1)
    x = x / x.norm(dim=-1, keepdim=True)
    x = x * torch.maximum(eye_to_eye.norm(dim=-1) * 2.0, eye_to_mouth.norm(dim=-1) * 1.8).unsqueeze(-1)
    y = torch.stack([-x[:, 1], x[:, 0]], -1)
    c = eye_avg + eye_to_mouth * 0.1
    # p = c + u x + v y, u, v ∈ [-1, 1]  →  crop edge coords (size/2)(1+u, 1+v); centres −0.5.
    half = size / 2.0
    rows = torch.stack([x / x.norm(dim=-1, keepdim=True) ** 2, y / y.norm(dim=-1, keepdim=True) ** 2], 1) * half
    t = half - 0.5 - (rows @ c.unsqueeze(-1)).squeeze(-1)
    return torch.cat([rows, t.unsqueeze(-1)], -1).to(landmarks.dtype)


def arcface_transform(landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """Image → crop matrices aligning the 5 points to the ArcFace template scaled to ``size``."""
    dst = (ARCFACE_112.to(landmarks) + 0.5) * (size / 112.0) - 0.5
    return similarity_lstsq(five_points(landmarks), dst)


def align_transform(landmarks: torch.Tensor, size: int, mode: str = "ffhq") -> torch.Tensor:
    """Dispatch to :func:`ffhq_transform` or :func:`arcface_transform`."""
    if mode == "ffhq":
        return ffhq_transform(landmarks, size)
    if mode == "arcface":
        return arcface_transform(landmarks, size)
    raise UserError(f"unknown alignment {mode!r} (one of {ALIGN_MODES})")


def template_points(mode: str, size: int) -> torch.Tensor:
    """5×2 template positions (eyes, nose, mouth corners) of an aligned ``size`` crop."""
    base, side = (FFHQ_512, 512.0) if mode == "ffhq" else (ARCFACE_112, 112.0)
    return (base + 0.5) * (size / side) - 0.5


def warp_faces(image: torch.Tensor, m: torch.Tensor, size: int, padding_mode: str = "reflection") -> torch.Tensor:
    """Warp faces out of images with image→crop matrices, antialiased when shrinking.

    Args:
        image: 1×C×H×W (shared by all faces) or B×C×H×W.
        m: B×2×3 image → crop matrices.
        size: crop side.
        padding_mode: kornia padding outside the image (``reflection``, ``border``, ``zeros``).
    Returns:
        B×C×size×size.
    """
    b = m.shape[0]
    s = float(affine_scale(m).max())
    if s < 0.6:
        # Shrink once with an antialiased resize so the bilinear sampler does not alias.
        f = min(1.0, s * 1.5)
        h, w = image.shape[-2:]
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        image = F.interpolate(image, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        # crop ← big image ← small image (pixel centres kept)
        m = compose_affine(m, resize_affine(w / nw, h / nh, m.dtype, m.device))
    if image.shape[0] == 1 and b > 1:
        image = image.expand(b, -1, -1, -1)
    return warp_affine(image, m.to(image.dtype), (size, size), mode="bilinear", padding_mode=padding_mode, align_corners=True)


def paste_back(image: torch.Tensor, face: torch.Tensor, inverse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return aligned faces into their images.

    Args:
        image: B×3×H×W originals.
        face: B×3×S×S aligned faces (edited or not).
        inverse: B×2×3 crop → image matrices (as stored in faces.jsonl).
        mask: B×1×S×S soft mask in crop space (1 = take the face).
    Returns:
        B×3×H×W composite.
    """
    h, w = image.shape[-2:]
    # only the box the crops land in (over the batch) changes: a face in a large photo costs its
    # own area, not the photo's
    s = face.shape[-1]
    corners = apply_affine(face.new_tensor([[0, 0], [s - 1, 0], [0, s - 1], [s - 1, s - 1]]).expand(len(face), -1, -1),
                           inverse.to(face.dtype)).flatten(0, 1)
    # bilinear sampling reaches one crop pixel past the crop's edge: that many image pixels more
    pad = int(inverse[:, :, :2].abs().sum(-1).amax().ceil()) + 1
    x0, y0 = (max(int(v) - pad, 0) for v in corners.amin(0).floor())
    x1, y1 = (int(v) + pad + 1 for v in corners.amax(0).ceil())
    x1, y1 = min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return image.clone()
    shift = inverse.to(face.dtype).clone()
    shift[:, 0, 2] -= x0
    shift[:, 1, 2] -= y0
    size = (y1 - y0, x1 - x0)
    fw = warp_affine(face, shift, size, mode="bilinear", padding_mode="zeros", align_corners=True)
    mw = warp_affine(mask.to(face.dtype), shift, size, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = image.clone()
    box = (..., slice(y0, y1), slice(x0, x1))
    out[box] = fw * mw + image[box] * (1 - mw)
    return out


__all__ = [
    "ALIGN_MODES", "ARCFACE_112", "FFHQ_512", "align_transform", "arcface_transform", "ffhq_transform", "paste_back",
    "template_points", "warp_faces",
]
