"""The synthesis pipeline: reenact → appearance → blend → reshape, from a recipe, batched.

For a batch of pairs (a, b) one call renders both fakes: ``st`` (a's identity on b) and ``ts``
(b's identity on a), by running the chain on the identity batch [a; b] against the attribute
batch [b; a].
"""

from __future__ import annotations

import torch

from reliableswap.choices import BlendMethod, ReshapeMethod
from reliableswap.faces.ibug68 import INNER, MIRROR68
from reliableswap.faces.masks import face_mask
from reliableswap.faces.pose import head_pose
from reliableswap.flame.flow import reenact_map, shape_flow
from reliableswap.flame.layer import Flame, FlameParams
from reliableswap.geometry.grid import warp_backward
from reliableswap.recipes import TripletRecipe
from reliableswap.synth import appearance, blend
from reliableswap.synth.reenact import load_reenactor
from reliableswap.synth.reshape import reshape


def mirror_toward(img: torch.Tensor, lm: torch.Tensor, lm_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the faces whose yaw is closer to the reference's once flipped (B×3×H×W, B×68×2)."""
    yaw = head_pose(lm)[:, 0]
    yaw_ref = head_pose(lm_ref)[:, 0]
    flip = (yaw + yaw_ref).abs() < (yaw - yaw_ref).abs()
    if not bool(flip.any()):
        return img, lm
    w = img.shape[-1]
    lm_f = lm[:, MIRROR68].clone()
    lm_f[..., 0] = w - 1 - lm_f[..., 0]
    f4 = flip.view(-1, 1, 1, 1)
    return torch.where(f4, img.flip(-1), img), torch.where(flip.view(-1, 1, 1), lm_f, lm)


class Synthesizer:
    """Renders fakes from aligned crops with 68 landmarks (crop pixels), on the crops' device.

    With a FLAME recipe (reenact backend ``flame`` and/or reshape method ``flame``) pass the loaded
    ``flame`` model, and per-face FLAME parameters to :meth:`render` / :meth:`cycle`.
    """

    def __init__(self, recipe: TripletRecipe, flame: Flame | None = None):
        self.r = recipe
        self.flame = flame
        if recipe.uses_flame and flame is None:
            raise ValueError("this recipe uses FLAME (reenact backend or reshape method 'flame'): pass --flame PATH")
        self.reenactor = None if recipe.reenact.backend == "flame" else load_reenactor(recipe.reenact.backend, recipe.reenact.identity_layout)

    def blend_mask(self, lm: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Soft region where the reenacted face replaces the target (B×1×H×W)."""
        c = lm[:, INNER].mean(1, keepdim=True)
        shrunk = c + (lm - c) * (1 - self.r.blend.erode)
        return face_mask(shrunk, h, w, forehead=self.r.blend.forehead, feather=self.r.blend.feather)

    @torch.no_grad()
    def render(self, img_id: torch.Tensor, lm_id: torch.Tensor, img_attr: torch.Tensor, lm_attr: torch.Tensor,
               p_id=None, p_attr=None) -> dict[str, torch.Tensor]:
        """One direction: identity of ``img_id`` on the attributes of ``img_attr``.

        Args:
            img_id, img_attr: B×3×S×S in [0, 1]; lm_id, lm_attr: B×68×2;
            p_id, p_attr: FLAME parameters of both (``FlameParams``, B rows) for FLAME recipes.
        Returns:
            dict with ``fake`` B×3×S×S, ``landmarks`` B×68×2 (where the fake's landmarks are),
            ``mask`` B×1×S×S (blend region), ``flow`` B×2×S×S (reshape backward flow, zeros if off).

        FLAME path: the target is first reshaped by the dense shape flow (b's outline takes a's
        shape: M2 → M12), then a's face is warped densely onto FLAME(β_a, θ_b, ψ_b) under b's
        camera — the same geometry M12 — and blended in, so face and outline agree.
        """
        h, w = img_attr.shape[-2:]
        zero = torch.zeros(img_attr.shape[0], 2, h, w, dtype=img_attr.dtype, device=img_attr.device)
        flame_shape = self.r.reshape.enabled and self.r.reshape.method == ReshapeMethod.flame
        flow = zero
        sf = None
        if flame_shape:
            # one M12 rasterization serves the reshape and, with FLAME reenactment, the reenact warp
            sf = shape_flow(self.flame, p_id, p_attr, h, self.r.flame.rasterizer.value, forward=False, reenact=self.reenactor is None)
            flow = self.r.reshape.strength * sf["backward"].to(img_attr.dtype)
            img_attr = warp_backward(img_attr, flow, "border")
            lm_attr = sf["p12"].to(lm_attr.dtype)
        if self.reenactor is None:
            if sf is None:
                rm = reenact_map(self.flame, p_id, p_attr, h, self.r.flame.rasterizer.value)
                back, lm_back = rm["backward"], rm["landmarks"]
            else:
                back, lm_back = sf["reenact"], sf["p12"]
            reen, lm_reen = warp_backward(img_id, back.to(img_id.dtype), "border"), lm_back.to(lm_id.dtype)
        else:
            if self.r.reenact.mirror:
                img_id, lm_id = mirror_toward(img_id, lm_id, lm_attr)
            reen, lm_reen = self.reenactor(img_id, lm_id, img_attr, lm_attr)
        mask = self.blend_mask(lm_reen, h, w)
        m_attr = self.blend_mask(lm_attr, h, w)
        reen = appearance.transfer(self.r.appearance.method.value, reen, img_attr, mask, m_attr)
        if self.r.blend.method == BlendMethod.multiband:
            fake = blend.multiband_blend(reen, img_attr, mask, self.r.blend.levels)
        else:
            fake = blend.poisson_blend(reen, img_attr, mask)
        lm_out = lm_reen
        if self.r.reshape.enabled and not flame_shape:
            fake, flow, lm_out = reshape(fake, lm_reen, lm_id, self.r.reshape.strength)
        if not torch.isfinite(fake).all():
            bad = (~torch.isfinite(fake)).flatten(1).any(1)
            fake = torch.where(bad.view(-1, 1, 1, 1), torch.full_like(fake, float("nan")), fake)
        return {"fake": fake.clamp(0, 1), "landmarks": lm_out, "mask": mask, "flow": flow}

    def cycle(self, img_a, lm_a, img_b, lm_b, p_a=None, p_b=None) -> dict[str, torch.Tensor]:
        """Both fakes of B pairs in one batched call: ``st`` (a on b) and ``ts`` (b on a).
        ``p_a``, ``p_b``: FLAME parameters (FLAME recipes only)."""
        p_id = p_attr = None
        if p_a is not None:
            p_id, p_attr = FlameParams.cat([p_a, p_b]), FlameParams.cat([p_b, p_a])
        out = self.render(torch.cat([img_a, img_b]), torch.cat([lm_a, lm_b]), torch.cat([img_b, img_a]), torch.cat([lm_b, lm_a]),
                          p_id, p_attr)
        n = img_a.shape[0]
        return {k + "_" + d: v[s] for k, v in out.items() for d, s in (("st", slice(0, n)), ("ts", slice(n, None)))}
