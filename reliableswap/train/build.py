"""Building what ``finetune`` trains from a :class:`~reliableswap.recipes.TrainRecipe`: the identity
encoder, the swapper (reference FaceShifter or the user's ``package.module:Class``) in its
:class:`~reliableswap.train.swapper.SwapperAdapter`, and swapper weights from files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from reliableswap.checkpoints import CheckpointRefused, first_sentence, torch_load
from reliableswap.choices import Condition, IdentityKind
from reliableswap.errors import UserError
from reliableswap.recipes import IdentitySection, TrainRecipe
from reliableswap.train.aei import FaceShifter
from reliableswap.train.arcface import DlibEncoder, SFaceEncoder, load_arcface
from reliableswap.train.swapper import SwapperAdapter, load_class


def build_identity(cfg: IdentitySection, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, bool]:
    """``(encoder, dim, differentiable)``."""
    if cfg.kind == IdentityKind.dlib:
        return DlibEncoder(), 128, False
    if cfg.kind == IdentityKind.sface:
        return SFaceEncoder(device), 128, True
    if not cfg.checkpoint:
        raise UserError("identity.kind = arcface needs identity.checkpoint (an insightface arcface_torch backbone.pth)")
    enc = load_arcface(cfg.checkpoint, device=device)
    return enc, enc.net.fc.out_features, True


def needs_identity(r: TrainRecipe) -> bool:
    """Whether anything in the run uses an identity encoder (FaceShifter's z_id, an identity-
    conditioned generator, or the identity loss)."""
    return r.model.swapper == "faceshifter" or r.model.condition == Condition.identity or r.loss.identity > 0


def build_swapper(r: TrainRecipe, device: torch.device, identity=None) -> tuple[SwapperAdapter, Any]:
    """The trainable swapper wrapped in :class:`SwapperAdapter`, and its identity encoder (None
    when nothing needs one, so a pair-conditioned swapper never loads dlib or ArcFace)."""
    if identity is None and not needs_identity(r):
        model = load_class(r.model.swapper)(**r.model.kwargs)
        return SwapperAdapter(model, tuple(r.model.value_range), r.model.input_size or None).to(device), None
    enc, dim, diff = identity if identity is not None else build_identity(r.identity, device)
    m = r.model
    if m.swapper == "faceshifter":
        model = FaceShifter(enc, dim, m.size, m.base, m.max_ch, m.d_scales, m.d_base, diff,
                            r.loss.adv, r.loss.att, r.loss.id, r.loss.rec)
        return SwapperAdapter(model, (0.0, 1.0), m.size).to(device), enc
    model = load_class(m.swapper)(**m.kwargs)
    return SwapperAdapter(model, tuple(m.value_range), m.input_size or None, m.condition.value, enc).to(device), enc


def parameters_of(model: Any, name: str) -> list[torch.nn.Parameter] | None:
    """``model.<name>()`` as a list (``generator_parameters``…), or None when it has no such method."""
    f = getattr(model, name, None)
    return list(f()) if callable(f) else None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Swapper weights from ``.safetensors`` or a torch file (``weights_only`` loading)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        sd = torch_load(path)
    except SafetensorError as e:  # (torch_load refuses a bad torch file itself)
        raise CheckpointRefused(f"{path}: not a readable safetensors file ({first_sentence(e)})") from None
    for key in ("state_dict", "model", "generator"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd
