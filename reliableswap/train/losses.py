"""``CycleSupervision``: ReliableSwap's triplet supervision as a loss module for any swapper.

Per sample, by type code (``triplets.layout``): 0 vanilla (no reference), 1 same identity
(reference = target), 2/3 naive fakes, 4/5 cycle (reference = the *real* face). Terms:

* ``cycle``: pixel L1 between result and reference on referenced samples of the cycle/naive codes
  in ``rec_code`` (the "cycle-supervised pixel loss"; the official code weights it 0.05 next to
  FaceShifter's losses);
* ``perceptual``: L1 between features of result and reference on the same samples, from any
  feature extractor passed in (VGG/LPIPS when the user has the weights; the official weight 0.5);
* ``identity``: 1 − cos(id(result), id(source)) on every sample, from any face-recognition model
  passed in (e.g. :func:`reliableswap.train.arcface.load_arcface`);
* ``same``: pixel L1 to the reference on same-identity samples (type 1).

Each term is the mean over the samples it applies to (0 when none does). Extractors are frozen:
gradients reach only the swapper's result.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from triplets.layout import SAME
from reliableswap.errors import UserError

CYCLE_CODES = (2, 3, 4, 5)


def _freeze(m):
    return m.requires_grad_(False).eval() if isinstance(m, nn.Module) else m


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(per_sample.dtype)
    return (per_sample * m).sum() / m.sum().clamp_min(1.0)


class CycleSupervision(nn.Module):
    """``loss, logs = sup(batch, result)``; ``batch`` from ``TripletDataset`` (images in [0, 1]),
    ``result`` B×3×H×W in [0, 1]. Weights default to a pixel-only loss."""

    def __init__(self, w_cycle: float = 1.0, w_perceptual: float = 0.0, w_identity: float = 0.0, w_same: float = 1.0,
                 rec_code: Sequence[int] = CYCLE_CODES, features: Callable[[torch.Tensor], torch.Tensor | list] | None = None,
                 identity: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.w_cycle, self.w_perceptual, self.w_identity, self.w_same = w_cycle, w_perceptual, w_identity, w_same
        self.register_buffer("rec_code", torch.tensor(sorted(set(rec_code) & set(CYCLE_CODES)), dtype=torch.long), persistent=False)
        if w_perceptual and features is None:
            raise UserError("w_perceptual > 0 needs a feature extractor")
        if w_identity and identity is None:
            raise UserError("w_identity > 0 needs an identity model")
        self.features = _freeze(features)
        self.identity = _freeze(identity)

    def masks(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(cycle, same) boolean B masks from ``type_code`` and ``has_reference``."""
        code = batch["type_code"].to(self.rec_code.device)
        has = batch["has_reference"].to(code.device)
        return has & torch.isin(code, self.rec_code), has & (code == SAME)

    def forward(self, batch: dict, result: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ref = batch["reference"].to(result).detach()
        cyc, same = self.masks(batch)
        cyc, same = cyc.to(result.device), same.to(result.device)
        l1 = (result - ref).abs().flatten(1).mean(1)
        terms = {"cycle": _masked_mean(l1, cyc), "same": _masked_mean(l1, same)}
        total = self.w_cycle * terms["cycle"] + self.w_same * terms["same"]
        if self.w_perceptual and bool(cyc.any()):
            idx = torch.nonzero(cyc).squeeze(1)
            fr, ff = self.features(result[idx]), self.features(ref[idx])
            fr, ff = (fr, ff) if isinstance(fr, (list, tuple)) else ([fr], [ff])
            terms["perceptual"] = sum(F.l1_loss(a, b.detach()) for a, b in zip(fr, ff))
            total = total + self.w_perceptual * terms["perceptual"]
        if self.w_identity:
            z_r = F.normalize(self.identity(result), dim=-1)
            with torch.no_grad():
                z_s = F.normalize(self.identity(batch["source"].to(result)), dim=-1)
            terms["identity"] = (1 - (z_r * z_s).sum(-1)).mean()
            total = total + self.w_identity * terms["identity"]
        logs = {f"sup/{k}": float(v.detach()) for k, v in terms.items()}
        logs["sup/n_cycle"], logs["sup/n_same"] = float(cyc.sum()), float(same.sum())
        return total, logs
