"""Reenactment: move face a onto b's pose and expression, keeping a's identity layout.

Default backend: a landmark-driven thin-plate-spline warp of a's crop. The driving landmarks are
b's feature shapes (eyelids, brows, mouth, jaw: expression and pose) placed at a's feature
positions brought into b's frame by a similarity on the rigid points (identity layout). Learned
reenactors (LIA, LivePortrait…) plug in through :class:`Reenactor` with a ``module:Class`` path.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from reliableswap.errors import UserError
from reliableswap.faces.ibug68 import GROUPS, RIGID
from reliableswap.geometry.affine import apply_affine, similarity_lstsq
from reliableswap.geometry.grid import border_points, warp_backward
from reliableswap.geometry.tps import dense_field


class Reenactor(Protocol):
    """Anything that renders identity ``img_id`` in the pose/expression of ``img_drv``.

    Images B×3×S×S in [0, 1] (aligned crops), landmarks B×68×2 crop pixels. Returns
    ``(image, landmarks)``: the reenacted face and where its 68 landmarks now are.
    """

    def __call__(self, img_id: torch.Tensor, lm_id: torch.Tensor, img_drv: torch.Tensor, lm_drv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def identity_in_frame(lm_id: torch.Tensor, lm_drv: torch.Tensor) -> torch.Tensor:
    """a's landmarks moved into b's frame by the similarity that best maps a's rigid points onto b's."""
    m = similarity_lstsq(lm_id[:, RIGID], lm_drv[:, RIGID])
    return apply_affine(lm_id, m)


def driving_landmarks(lm_id: torch.Tensor, lm_drv: torch.Tensor, identity_layout: float = 1.0) -> torch.Tensor:
    """Target landmarks for the reenacted face: b's group shapes at a's group positions.

    Args:
        lm_id, lm_drv: B×68×2.
        identity_layout: 0 = b's landmarks exactly; 1 = every group centred where a's is.
    """
    a_in_b = identity_in_frame(lm_id, lm_drv)
    out = lm_drv.clone()
    for g in GROUPS:
        shift = a_in_b[:, g].mean(1, keepdim=True) - lm_drv[:, g].mean(1, keepdim=True)
        out[:, g] = lm_drv[:, g] + identity_layout * shift
    return out


class TPSReenactor:
    """Landmark-driven dense warp (thin-plate spline through the 68 points + fixed border anchors)."""

    def __init__(self, identity_layout: float = 1.0, anchors_per_side: int = 6, reg: float = 1e-3):
        self.identity_layout = identity_layout
        self.anchors_per_side = anchors_per_side
        self.reg = reg

    def __call__(self, img_id, lm_id, img_drv, lm_drv):
        b, _, h, w = img_id.shape
        target = driving_landmarks(lm_id, lm_drv, self.identity_layout)
        anchors = border_points(h, w, self.anchors_per_side, img_id.device, target.dtype).expand(b, -1, -1)
        ctrl = torch.cat([target, anchors], 1)
        # backward map: at each target point, sample a's image where that landmark is in a
        disp = torch.cat([lm_id.to(target) - target, torch.zeros_like(anchors)], 1)
        field = dense_field(ctrl, disp, h, w, self.reg, step=8)
        return warp_backward(img_id, field, "border"), target


def load_reenactor(spec: str | None, identity_layout: float = 1.0) -> Reenactor:
    """``None``/``"tps"`` → :class:`TPSReenactor` (``identity_layout`` is its option);
    ``"package.module:Class"`` → ``Class()``, a user reenactor built with its own defaults."""
    if spec in (None, "", "tps"):
        return TPSReenactor(identity_layout=identity_layout)
    mod, _, cls = spec.partition(":")
    if not cls:
        raise UserError(f"reenactor {spec!r}: expected 'module:Class'")
    try:
        return getattr(importlib.import_module(mod), cls)()
    except (ImportError, AttributeError) as e:
        raise UserError(f"[reenact] backend {spec!r}: cannot import it ({e})") from None
