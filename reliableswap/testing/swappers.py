"""Small swappers for trying ``--swapper module:Class`` and for tests (not meant to swap well).

``TinySwapper`` is pair-conditioned (``C(source, target)``, [−1, 1]); ``TinyIdentityGenerator`` is
identity-conditioned like SimSwap's generator (``C(target, z_id)``, [0, 1]).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class TinySwapper(nn.Module):
    """Encoder–decoder over the concatenated source and target, residual on the target ([−1, 1])."""

    def __init__(self, ch: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(6, ch, 3, 1, 1), nn.ReLU(), nn.Conv2d(ch, ch, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(ch, ch, 4, 2, 1), nn.ReLU(), nn.Conv2d(ch, 3, 3, 1, 1))

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.tanh(target + self.net(torch.cat([source, target], 1)))


class TinyIdentityGenerator(nn.Module):
    """``G(target, z_id)``: target features modulated by the identity embedding ([0, 1])."""

    def __init__(self, id_dim: int = 128, ch: int = 16):
        super().__init__()
        self.enc = nn.Conv2d(3, ch, 3, 1, 1)
        self.mod = nn.Linear(id_dim, 2 * ch)
        self.dec = nn.Conv2d(ch, 3, 3, 1, 1)

    def forward(self, target: torch.Tensor, z_id: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.enc(target))
        g, b = self.mod(z_id).chunk(2, -1)
        return torch.sigmoid(self.dec(h * (1 + g[..., None, None]) + b[..., None, None]) + torch.logit(target.clamp(1e-3, 1 - 1e-3)))


class ReturnTarget(nn.Module):
    """Gives back the target: the worst swapper for identity (retrieval must fail), perfect pose."""

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return target


class ReturnSource(nn.Module):
    """Gives back the source: perfect identity (similarity 1), the source's pose and expression."""

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return source
