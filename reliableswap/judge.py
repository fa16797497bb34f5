"""The identity judge: who a face looks like, measured by a strong face-recognition model.

Every identity decision of the project (``pairs``' same-person test, ``triplets --qc``'s margin,
``eval``'s identity figures) goes through a :class:`Judge`. The default is SFace
(:mod:`reliableswap.nets.sface`, LFW 99.40 %); dlib's 128-D descriptor stays a choice
(``[identity] judge = "dlib"``) but its same-person and different-person distances overlap.

Scores are similarities in the judge's own units (higher = more alike): cosine for SFace,
minus the descriptor distance for dlib. Per fake: ``keep`` = score(fake, identity donor),
``leak`` = score(fake, attribute donor), ``margin`` = keep − leak (positive: the fake looks more
like its identity donor).

Images are B×3×H×W in [0, 1] on any device. Aligned crops (FFHQ layout) need no landmarks: the
ArcFace alignment comes from the FFHQ template; other images pass B×68×2 landmarks.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from reliableswap.faces.align import ARCFACE_112, template_points, warp_faces
from reliableswap.faces.embed import DlibEmbedder
from reliableswap.faces.ibug68 import five_points
from reliableswap.geometry.affine import similarity_lstsq
from reliableswap.images import to_uint8
from reliableswap.nets.sface import load_sface
from reliableswap.errors import UserError

JUDGES = ("sface", "dlib")
#: SFace's same-person cosine threshold (OpenCV Zoo's, 0.363; the shared faces' calibration in
#: BENCHMARKS.md agrees: every same-person pair above it, every different-person pair below).
SFACE_SAME_COSINE = 0.363
#: dlib's same-person distance threshold (its authors' 0.6).
DLIB_SAME_DISTANCE = 0.6


class Judge(Protocol):
    """An identity judge (see the module doc)."""

    name: str
    same_threshold: float  # in score units: score >= threshold means the same person

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """B×3×H×W in [0, 1] (+ B×68×2 landmarks, or None for FFHQ-aligned crops) → B×D."""

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise similarity of two B×D embedding batches → B."""


def arcface_matrices(landmarks: torch.Tensor | None, size: int, batch: int, device, dtype=torch.float64) -> torch.Tensor:
    """B×2×3 image → 112×112 ArcFace-template matrices: from the landmarks' five points, or from
    the FFHQ template of a ``size`` crop when ``landmarks`` is None."""
    dst = ARCFACE_112.to(device, dtype)
    if landmarks is None:
        src = template_points("ffhq", size).to(device, dtype)[None].expand(batch, -1, -1)
    else:
        src = five_points(landmarks.to(device, dtype))
    return similarity_lstsq(src, dst[None].expand(src.shape[0], -1, -1))


class SFaceJudge:
    """SFace embeddings, L2-normalised; score = cosine similarity. Differentiable in the images."""

    name = "sface"
    same_threshold = SFACE_SAME_COSINE

    def __init__(self, device: str | torch.device = "cpu", net: torch.nn.Module | None = None):
        self.device = torch.device(device)
        self.net = net if net is not None else load_sface(self.device)

    def align(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """B×3×H×W → B×3×112×112 ArcFace-aligned crops."""
        m = arcface_matrices(landmarks, images.shape[-1], images.shape[0], images.device)
        return warp_faces(images, m.to(images.dtype), 112, padding_mode="zeros")

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        dev = next(self.net.buffers()).device  # where the network is now (a trainer may have moved it)
        x = self.align(images.to(dev, torch.float32), landmarks)
        return F.normalize(self.net(x).float(), dim=-1)

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


class DlibJudge:
    """dlib's 128-D descriptor; score = −distance (not differentiable; the weak judge)."""

    name = "dlib"
    same_threshold = -DLIB_SAME_DISTANCE

    def __init__(self, device: str | torch.device = "cpu"):
        self.embedder = DlibEmbedder()

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        if landmarks is None:
            raise UserError("the dlib judge needs 68 landmarks per image")
        ims, lm = to_uint8(images), landmarks.detach().cpu().numpy()
        return torch.from_numpy(np.concatenate([self.embedder(im, pts[None]) for im, pts in zip(ims, lm)]))

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return -(a.float() - b.float()).norm(dim=-1)


def load_judge(name: str = "sface", device: str | torch.device = "cpu") -> Judge:
    """The judge called ``name`` (one of :data:`JUDGES`) on ``device``."""
    if name == "sface":
        return SFaceJudge(device)
    if name == "dlib":
        return DlibJudge(device)
    raise UserError(f"unknown identity judge {name!r} (one of {', '.join(JUDGES)})")


def keep_leak_margin(judge: Judge, fake: torch.Tensor, identity: torch.Tensor, attribute: torch.Tensor) -> dict[str, np.ndarray]:
    """Per fake (B×D embeddings of the fakes, their identity donors and attribute donors):
    ``keep``, ``leak`` and ``margin`` = keep − leak, in the judge's units."""
    keep, leak = judge.score(fake, identity), judge.score(fake, attribute)
    return {"keep": keep.cpu().numpy(), "leak": leak.cpu().numpy(), "margin": (keep - leak).cpu().numpy()}


def equal_error_rate(same: np.ndarray, different: np.ndarray) -> tuple[float, float]:
    """``(EER, threshold)`` of same-person scores against different-person scores (higher = same):
    the rate where false rejects equal false accepts, over every observed threshold."""
    same, different = np.asarray(same, np.float64), np.asarray(different, np.float64)
    best = (1.0, float("nan"))
    for t in np.unique(np.concatenate([same, different])):
        frr, far = float((same < t).mean()), float((different >= t).mean())
        rate = max(frr, far)
        if rate < best[0]:
            best = (rate, float(t))
    return best
