"""The synthesis pipeline: reenact → appearance → blend → reshape, from a recipe, batched.

For a batch of pairs (a, b) one call renders both fakes: ``st`` (a's identity on b) and ``ts``
(b's identity on a), by running the chain on the identity batch [a; b] against the attribute
batch [b; a].
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from reliableswap.faces.landmarks import MIRROR68
from reliableswap.faces.masks import face_mask
from reliableswap.io import sections_from_dict
from reliableswap.faces.pose import head_pose
from reliableswap.synth import appearance, blend
from reliableswap.synth.reenact import load_reenactor
from reliableswap.synth.reshape import reshape
from reliableswap.synth.tps import warp_backward


@dataclass
class ReenactCfg:
    backend: str = "tps"  # tps | flame | "package.module:Class" implementing synth.reenact.Reenactor
    identity_layout: float = 1.0
    mirror: bool = True  # flip the identity face when that brings its yaw closer to the target's


@dataclass
class AppearanceCfg:
    method: str = "lct"  # none | reinhard | lct | sot


@dataclass
class BlendCfg:
    method: str = "multiband"  # multiband | poisson
    levels: int = 6
    forehead: float = 0.1
    feather: float = 0.03
    erode: float = 0.06  # shrink the blend region by this fraction of face size


@dataclass
class ReshapeCfg:
    enabled: bool = True
    strength: float = 1.0
    method: str = "tps"  # tps (2D jaw landmarks) | flame (dense FLAME shape flow)


@dataclass
class FlameCfg:
    model: str = ""  # FLAME model file; "" → $RELIABLESWAP_FLAME (needed by reenact "flame" / reshape "flame")
    embedding: str = ""  # landmark embedding; "" → beside the model
    rasterizer: str = "auto"  # auto | torch | pytorch3d


@dataclass
class QCCfg:
    enabled: bool = False
    min_id_margin: float | None = None


@dataclass
class PairsCfg:
    strategy: str = "pose"
    n: int | None = None
    max_yaw_diff: float = 30.0
    seed: int = 0


@dataclass
class OutputCfg:
    format: str = "folder"  # folder | webdataset
    quality: int = 95
    shard_size: int = 1000


@dataclass
class Recipe:
    """Every knob of a triplet run; written next to the outputs as ``recipe.resolved.toml``."""

    name: str = "cycle"
    pairs: PairsCfg = field(default_factory=PairsCfg)
    reenact: ReenactCfg = field(default_factory=ReenactCfg)
    appearance: AppearanceCfg = field(default_factory=AppearanceCfg)
    blend: BlendCfg = field(default_factory=BlendCfg)
    reshape: ReshapeCfg = field(default_factory=ReshapeCfg)
    flame: FlameCfg = field(default_factory=FlameCfg)
    qc: QCCfg = field(default_factory=QCCfg)
    output: OutputCfg = field(default_factory=OutputCfg)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        return sections_from_dict(cls, d)

    @classmethod
    def load(cls, path: str | Path | None) -> "Recipe":
        if path is None:
            return cls()
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def uses_flame(self) -> bool:
        return self.reenact.backend == "flame" or (self.reshape.enabled and self.reshape.method == "flame")

    def to_toml(self) -> str:
        def val(v: Any) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, str):
                return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            return repr(v)

        d = self.to_dict()
        lines = [f"name = {val(d.pop('name'))}"]
        for sec, kv in d.items():
            lines.append(f"\n[{sec}]")
            lines += [f"{k} = {val(v)}" for k, v in kv.items() if v is not None]
        return "\n".join(lines) + "\n"


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

    def __init__(self, recipe: Recipe, flame=None):
        self.r = recipe
        self.flame = flame
        if recipe.uses_flame and flame is None:
            raise ValueError("this recipe uses FLAME (reenact backend or reshape method 'flame'): pass --flame PATH")
        if recipe.reshape.method not in ("tps", "flame"):
            raise ValueError(f"unknown reshape method {recipe.reshape.method!r} (tps or flame)")
        self.reenactor = None if recipe.reenact.backend == "flame" else load_reenactor(recipe.reenact.backend, recipe.reenact.identity_layout)

    def blend_mask(self, lm: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Soft region where the reenacted face replaces the target (B×1×H×W)."""
        c = lm[:, 17:].mean(1, keepdim=True)
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
        flame_shape = self.r.reshape.enabled and self.r.reshape.method == "flame"
        flow = zero
        sf = None
        if flame_shape:
            from reliableswap.flame.flow import shape_flow

            # one M12 rasterization serves the reshape and, with FLAME reenactment, the reenact warp
            sf = shape_flow(self.flame, p_id, p_attr, h, self.r.flame.rasterizer, forward=False, reenact=self.reenactor is None)
            flow = self.r.reshape.strength * sf["backward"].to(img_attr.dtype)
            img_attr = warp_backward(img_attr, flow, "border")
            lm_attr = sf["p12"].to(lm_attr.dtype)
        if self.reenactor is None:
            if sf is None:
                from reliableswap.flame.flow import reenact_map

                rm = reenact_map(self.flame, p_id, p_attr, h, self.r.flame.rasterizer)
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
        reen = appearance.transfer(self.r.appearance.method, reen, img_attr, mask, m_attr)
        if self.r.blend.method == "multiband":
            fake = blend.multiband_blend(reen, img_attr, mask, self.r.blend.levels)
        elif self.r.blend.method == "poisson":
            fake = blend.poisson_blend(reen, img_attr, mask)
        else:
            raise ValueError(f"unknown blend method {self.r.blend.method!r} (multiband or poisson)")
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
            from reliableswap.flame.layer import FlameParams

            p_id, p_attr = FlameParams.cat([p_a, p_b]), FlameParams.cat([p_b, p_a])
        out = self.render(torch.cat([img_a, img_b]), torch.cat([lm_a, lm_b]), torch.cat([img_b, img_a]), torch.cat([lm_b, lm_a]),
                          p_id, p_attr)
        n = img_a.shape[0]
        return {k + "_" + d: v[s] for k, v in out.items() for d, s in (("st", slice(0, n)), ("ts", slice(n, None)))}
