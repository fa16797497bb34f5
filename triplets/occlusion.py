"""Occlusion augmentation for triplets: something pasted in front of the attribute face, and the
same pixels pasted onto the image that is its ground truth, so the cycle target stays exact and a
swapper learns to keep what lies in front of a face (DreamID / VividFace style).

In every type code the target input and the reference share one frame (``t|t``, ``t|st``,
``s|ts``, ``ts|s``, ``st|t``): an occluder pasted at one place in both is an attribute the swap
must keep. The source (identity donor) is never touched.

Occluder sources implement :class:`OccluderSource`: ``sample(rng, size)`` → :class:`Occluder`
(RGB and alpha, in [0, 1]). :class:`ObjectOccluders` draws procedural objects (a bar, a disc, a
cup-like shape with a handle) textured from the data's own backgrounds (the crops' corners);
``reliableswap.faces.hands.HandCutouts`` cuts real hands out of prepped faces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: The kinds ``[augment] occluders`` may name.
OCCLUDER_KINDS = ("hands", "objects")


@dataclass(frozen=True)
class Occluder:
    """``rgb`` 3×h×w and ``alpha`` 1×h×w in [0, 1]; ``kind``: what it is (``hand``, ``bar``, …)."""

    rgb: torch.Tensor
    alpha: torch.Tensor
    kind: str


class OccluderSource(Protocol):
    def sample(self, rng: np.random.Generator, size: int) -> Occluder: ...


def _shape_alpha(kind: str, h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
    """1×h×w alpha of a procedural object, anti-aliased (one pixel of ramp)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    px = 2.0 / max(h, w)
    if kind == "disc":
        d = 1 - torch.sqrt(xs ** 2 + ys ** 2)
    elif kind == "bar":  # a rod or microphone: a thin rounded rectangle along a random angle
        a = float(rng.uniform(0, math.pi))
        u, v = xs * math.cos(a) + ys * math.sin(a), -xs * math.sin(a) + ys * math.cos(a)
        half = float(rng.uniform(0.12, 0.3))
        d = torch.minimum(0.95 - u.abs(), half - v.abs())
    else:  # cup: a body (rounded rectangle) and a handle (a ring) on one side
        side = 1.0 if rng.random() < 0.5 else -1.0
        body = torch.minimum(0.55 - (xs + 0.2 * side).abs(), 0.9 - ys.abs())
        r = torch.sqrt((xs - 0.62 * side) ** 2 + ys ** 2)
        ring = torch.minimum(r - 0.18, 0.34 - r)
        d = torch.maximum(body, ring)
    return (d / px + 0.5).clamp(0, 1)[None]


class ObjectOccluders:
    """Procedural occluders textured from real backgrounds.

    Args:
        textures: callable ``rng → 3×H×W`` image in [0, 1] whose corners are background (a crop
            of the data: an aligned face crop's corners are not the face).
        kinds: which shapes to draw.
    """

    def __init__(self, textures: Callable[[np.random.Generator], torch.Tensor], kinds: Sequence[str] = ("bar", "disc", "cup")):
        self.textures, self.kinds = textures, tuple(kinds)

    def sample(self, rng: np.random.Generator, size: int) -> Occluder:
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        side = max(8, int(size * rng.uniform(0.22, 0.45)))
        h, w = (side, max(8, int(side * rng.uniform(0.5, 1.0)))) if kind == "cup" else (side, side)
        img = self.textures(rng)
        H, W = img.shape[-2:]
        corner = max(4, min(H, W) // 5)
        y0 = 0 if rng.random() < 0.5 else H - corner
        x0 = 0 if rng.random() < 0.5 else W - corner
        patch = img[:, y0:y0 + corner, x0:x0 + corner][None]
        rgb = F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)[0]
        tint = torch.as_tensor(rng.uniform(0.6, 1.4, 3), dtype=rgb.dtype)[:, None, None]
        shade = torch.linspace(1.1, 0.8, w, dtype=rgb.dtype)[None, None, :]  # a little 3D shading
        rgb = (rgb * tint * shade).clamp(0, 1)
        return Occluder(rgb=rgb, alpha=_shape_alpha(kind, h, w, rng), kind=kind)


def place(rng: np.random.Generator, size: int, h: int, w: int) -> tuple[int, int]:
    """Top-left corner for an h×w occluder on an aligned face crop of side ``size``: its centre
    lands on the lower two thirds of the face (mouth, cheeks, chin, nose), where hands, cups and
    microphones are; it may stick out of the crop."""
    cy = rng.uniform(0.45, 0.9) * size
    cx = rng.uniform(0.25, 0.75) * size
    return int(round(cy - h / 2)), int(round(cx - w / 2))


def paste(images: Sequence[torch.Tensor], occ: Occluder, top: int, left: int,
          value_range: tuple[float, float] = (0.0, 1.0)) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same occluder pixels composited onto each of ``images`` (3×H×W, one frame, in
    ``value_range``) at ``(top, left)``; returns the new images (copies) and the 1×H×W alpha mask.
    Every image gets identical values wherever the mask is 1."""
    H, W = images[0].shape[-2:]
    h, w = occ.alpha.shape[-2:]
    mask = torch.zeros(1, H, W, dtype=images[0].dtype)
    rgb = torch.zeros(3, H, W, dtype=images[0].dtype)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, H), min(left + w, W)
    if y1 > y0 and x1 > x0:
        sy, sx = y0 - top, x0 - left
        mask[:, y0:y1, x0:x1] = occ.alpha[:, sy:sy + y1 - y0, sx:sx + x1 - x0].to(mask.dtype)
        lo, hi = value_range
        rgb[:, y0:y1, x0:x1] = occ.rgb[:, sy:sy + y1 - y0, sx:sx + x1 - x0].to(rgb.dtype) * (hi - lo) + lo
    # where the mask is 1 every image gets exactly ``rgb`` (img·0 + rgb): identical pixels
    return [img * (1 - mask) + rgb * mask for img in images], mask


class Occlusion:
    """What :class:`triplets.TripletDataset` applies: with probability ``rate`` per sample, one
    occluder from one of ``sources`` (chosen uniformly) pasted onto the target input and, when
    the sample has one, its reference."""

    def __init__(self, sources: Sequence[OccluderSource], rate: float):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"occlusion rate {rate} is not in [0, 1]")
        if rate > 0 and not sources:
            raise ValueError("an occlusion rate above 0 needs at least one occluder source")
        self.sources, self.rate = list(sources), float(rate)

    def apply(self, seed: int, index: int, target: torch.Tensor, reference: torch.Tensor | None,
              value_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Sample ``index`` of a dataset seeded ``seed``: ``(target, reference, extra)``, ``extra``
        the sample's ``occluder_mask`` (1×H×W, zeros when nothing is pasted), ``occluder`` (what
        was pasted: its kind, "" for none) and ``occluder_box`` (where: top, left, height, width
        in pixels of the image, clipped to it; zeros for none). The draws use their own generator
        (``[seed, index, 7]``), so a dataset's other choices for the sample are those it makes
        without occlusion."""
        rng = np.random.default_rng([seed, index, 7])
        size = target.shape[-1]
        if not self.sources or rng.random() >= self.rate:
            return target, reference, {"occluder_mask": torch.zeros(1, *target.shape[-2:], dtype=target.dtype), "occluder": "",
                                       "occluder_box": torch.zeros(4, dtype=torch.long)}
        occ = self.sources[int(rng.integers(len(self.sources)))].sample(rng, size)
        top, left = place(rng, size, *occ.alpha.shape[-2:])
        imgs, mask = paste([target] if reference is None else [target, reference], occ, top, left, value_range)
        h, w = occ.alpha.shape[-2:]
        y0, x0 = max(top, 0), max(left, 0)
        box = torch.tensor([y0, x0, min(top + h, target.shape[-2]) - y0, min(left + w, target.shape[-1]) - x0], dtype=torch.long)
        return imgs[0], (imgs[1] if reference is not None else None), {"occluder_mask": mask, "occluder": occ.kind,
                                                                       "occluder_box": box}
