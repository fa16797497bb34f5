"""The swapper contract and the adapter that feeds a model in its own value range and size.

A swapper is anything callable as ``swapper(source, target) -> result`` on B×3×H×W images. The
toolkit's batches are in [0, 1] at the triplets' size; :class:`SwapperAdapter` converts to the
model's declared range ([−1, 1] or [0, 1]) and input size, calls it, and converts the result back,
so losses always see [0, 1] images at the data's size. Identity-conditioned generators (SimSwap's
``Generator_Adain_Upsample(target, latent)``) are wrapped with ``condition="identity"`` and an
identity encoder: the adapter calls ``model(target, encoder(source))``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from reliableswap.errors import UserError


class Swapper(Protocol):
    """``swapper(source, target) -> result``: B×3×H×W tensors in the swapper's value range."""

    def __call__(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


#: Swappers the toolkit builds itself: the only names a run folder's recipe copy (data) may choose.
BUILTIN_SWAPPERS = frozenset({"faceshifter"})


def load_class(spec: str) -> type:
    """``"package.module:Class"`` → the class (a clear error when it cannot be imported)."""
    mod, _, name = spec.partition(":")
    if not name:
        raise UserError(f"swapper {spec!r}: expected 'package.module:Class'")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import swapper class {spec!r}: {e}") from e


class SwapperAdapter(nn.Module):
    """Wrap ``model`` so it takes and returns [0, 1] images at any size.

    Args:
        model: the swapper (an ``nn.Module`` to be trained, or any callable).
        value_range: the range the model expects and returns: ``(0, 1)`` or ``(-1, 1)``.
        input_size: side the model expects (inputs are resized; None = as given).
        condition: ``"pair"`` → ``model(source, target)``; ``"identity"`` → ``model(target, identity(source))``.
        identity: identity encoder for ``condition="identity"`` ([0, 1] images → B×D, no gradient needed).
    """

    def __init__(self, model: Callable[..., Any], value_range: tuple[float, float] = (0.0, 1.0), input_size: int | None = None,
                 condition: str = "pair", identity: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        if tuple(value_range) not in ((0.0, 1.0), (-1.0, 1.0)):
            raise UserError(f"value_range must be (0, 1) or (-1, 1), got {value_range}")
        if condition not in ("pair", "identity"):
            raise UserError("condition must be 'pair' or 'identity'")
        if condition == "identity" and identity is None:
            raise UserError("condition='identity' needs an identity encoder")
        self.model = model
        self.lo, self.hi = float(value_range[0]), float(value_range[1])
        self.input_size, self.condition, self.identity = input_size, condition, identity

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)
        return x * (self.hi - self.lo) + self.lo

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[0, 1] B×3×H×W source and target → [0, 1] B×3×H×W result."""
        h, w = target.shape[-2:]
        if self.condition == "identity":
            with torch.no_grad():
                z = self.identity(source)
            out = self.model(self._to_model(target), z)
        else:
            out = self.model(self._to_model(source), self._to_model(target))
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = (out - self.lo) / (self.hi - self.lo)
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out
