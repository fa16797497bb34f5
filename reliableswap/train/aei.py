"""A compact FaceShifter (arXiv 1912.13457): AEI-Net generator, multi-scale PatchGAN discriminator,
and FaceShifter's losses, as the reference swapper for ``reliableswap finetune``.

AEI-Net: a U-Net *multi-level attribute encoder* gives attribute maps z_att^k from 2×2 up to the
full resolution; the *AAD generator* starts from the identity embedding z_id and, at every level,
an AAD residual block mixes attribute modulation (γ, β from z_att^k), identity modulation (γ, β
from z_id) through a learned mask. Losses: hinge adversarial (multi-scale), identity
1 − cos(z_id(Y), z_id(X_s)) (needs a differentiable identity model, e.g. ArcFace), attribute
½·Σ_k mean‖z_att^k(Y) − z_att^k(X_t)‖², reconstruction ½·mean‖Y − X_t‖² on same-identity samples.
Default weights are FaceShifter's: λ_att = 10, λ_id = 5, λ_rec = 10.

The model takes and returns [0, 1] images (it maps to [−1, 1] inside).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv(i: int, o: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(i, o, k, 1, k // 2)


class AAD(nn.Module):
    """Adaptive attentional denormalization: (1 − M)·A + M·I over the normalized activation."""

    def __init__(self, h_ch: int, att_ch: int, id_dim: int):
        super().__init__()
        self.norm = nn.InstanceNorm2d(h_ch, affine=False)
        self.att_gamma, self.att_beta = _conv(att_ch, h_ch), _conv(att_ch, h_ch)
        self.id_gamma, self.id_beta = nn.Linear(id_dim, h_ch), nn.Linear(id_dim, h_ch)
        self.mask = _conv(h_ch, 1)

    def forward(self, h, z_att, z_id):
        hn = self.norm(h)
        a = self.att_gamma(z_att) * hn + self.att_beta(z_att)
        i = self.id_gamma(z_id)[..., None, None] * hn + self.id_beta(z_id)[..., None, None]
        m = torch.sigmoid(self.mask(hn))
        return (1 - m) * a + m * i


class AADResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, att_ch: int, id_dim: int):
        super().__init__()
        self.aad1, self.conv1 = AAD(cin, att_ch, id_dim), _conv(cin, cin)
        self.aad2, self.conv2 = AAD(cin, att_ch, id_dim), _conv(cin, cout)
        self.short = cin != cout
        if self.short:
            self.aad3, self.conv3 = AAD(cin, att_ch, id_dim), _conv(cin, cout)

    def forward(self, h, z_att, z_id):
        x = self.conv1(F.relu(self.aad1(h, z_att, z_id)))
        x = self.conv2(F.relu(self.aad2(x, z_att, z_id)))
        s = self.conv3(F.relu(self.aad3(h, z_att, z_id))) if self.short else h
        return x + s


def _channels(size: int, base: int, max_ch: int) -> list[int]:
    n = int(math.log2(size)) - 1  # downsamplings to 2×2
    if 2 ** (n + 1) != size or n < 2:
        raise ValueError(f"image size must be a power of two ≥ 8, got {size}")
    return [min(base * 2**i, max_ch) for i in range(n)]


class AttributeEncoder(nn.Module):
    """U-Net: [−1, 1] B×3×S×S → attribute maps from 2×2 to S×S (coarse first)."""

    def __init__(self, size: int, base: int = 32, max_ch: int = 512):
        super().__init__()
        ch = _channels(size, base, max_ch)
        self.down = nn.ModuleList()
        cin = 3
        for c in ch:
            self.down.append(nn.Sequential(nn.Conv2d(cin, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(0.1)))
            cin = c
        self.up = nn.ModuleList()
        skips = ch[::-1][1:]  # channels of the skip at each up level
        self.att_ch = [ch[-1]]
        for s in skips:
            self.up.append(nn.Sequential(nn.ConvTranspose2d(cin, s, 4, 2, 1, bias=False), nn.BatchNorm2d(s), nn.LeakyReLU(0.1)))
            cin = 2 * s
            self.att_ch.append(cin)
        self.att_ch.append(cin)  # full resolution: the last map upsampled

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for d in self.down:
            x = d(x)
            feats.append(x)
        z = [x]
        for u, skip in zip(self.up, feats[::-1][1:]):
            x = torch.cat([u(x), skip], 1)
            z.append(x)
        z.append(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
        return z


class AEINet(nn.Module):
    """Generator ``G(target [−1,1], z_id) → (result [−1,1], attribute maps of the target)``."""

    def __init__(self, size: int = 256, base: int = 32, max_ch: int = 512, id_dim: int = 512):
        super().__init__()
        self.encoder = AttributeEncoder(size, base, max_ch)
        att = self.encoder.att_ch
        h = [min(c, max_ch) for c in att]
        self.stem = nn.ConvTranspose2d(id_dim, h[0], 2, 1, 0)
        self.blocks = nn.ModuleList(AADResBlock(h[k], h[k + 1] if k + 1 < len(h) else 3, att[k], id_dim) for k in range(len(att)))

    def forward(self, target: torch.Tensor, z_id: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z_att = self.encoder(target)
        x = self.stem(z_id[..., None, None])
        for k, blk in enumerate(self.blocks):
            x = blk(x, z_att[k], z_id)
            if k + 1 < len(self.blocks):
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return torch.tanh(x), z_att


class PatchD(nn.Module):
    def __init__(self, base: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, base, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = base
        for i in range(1, layers):
            mods += [nn.Conv2d(c, min(c * 2, 512), 4, 2, 1), nn.InstanceNorm2d(min(c * 2, 512)), nn.LeakyReLU(0.2)]
            c = min(c * 2, 512)
        mods += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


class MultiscaleDiscriminator(nn.Module):
    """PatchGAN at ``scales`` resolutions (each half the previous)."""

    def __init__(self, scales: int = 2, base: int = 32, layers: int = 3):
        super().__init__()
        self.ds = nn.ModuleList(PatchD(base, layers) for _ in range(scales))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for d in self.ds:
            out.append(d(x))
            x = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
        return out


def real_images(batch: dict) -> torch.Tensor:
    """A real face per sample for the discriminator: the reference of cycle types 4/5 (real s/t),
    otherwise the target (real for types 0–3)."""
    code = batch["type_code"].view(-1, 1, 1, 1)
    return torch.where((code == 4) | (code == 5), batch["reference"], batch["target"])


class FaceShifter(nn.Module):
    """AEI-Net + multi-scale discriminator + FaceShifter losses. ``model(source, target)`` on [0, 1].

    Args:
        identity: frozen identity encoder on [0, 1] images → B×id_dim (dlib: 128, ArcFace: 512).
        differentiable_identity: whether the identity loss can back-propagate through ``identity``
            (ArcFace yes, dlib no: then the identity term is left out and logged as such).
    """

    def __init__(self, identity: Callable[[torch.Tensor], torch.Tensor], id_dim: int, size: int = 256, base: int = 32,
                 max_ch: int = 512, d_scales: int = 2, d_base: int = 32, differentiable_identity: bool = False,
                 w_adv: float = 1.0, w_att: float = 10.0, w_id: float = 5.0, w_rec: float = 10.0):
        super().__init__()
        self.G = AEINet(size, base, max_ch, id_dim)
        self.D = MultiscaleDiscriminator(d_scales, d_base)
        self.__dict__["identity"] = identity  # frozen and not part of the checkpoint
        self.differentiable_identity = differentiable_identity
        self.w = {"adv": w_adv, "att": w_att, "id": w_id, "rec": w_rec}
        self._cache: dict = {}

    def generator_parameters(self):
        return self.G.parameters()

    def discriminator_parameters(self):
        return self.D.parameters()

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z_id = self.identity(source).to(target.dtype)
        y, z_att = self.G(target * 2 - 1, z_id)
        self._cache = {"z_id": z_id, "z_att": z_att}
        return (y + 1) / 2

    def generator_loss(self, batch: dict, result: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """FaceShifter's generator objective for the last ``forward`` (result in [0, 1])."""
        y = result * 2 - 1
        adv = sum(-d.mean() for d in self.D(y))
        z_att_y = self.G.encoder(y)
        att = 0.5 * sum(F.mse_loss(a, b.detach()) for a, b in zip(z_att_y, self._cache["z_att"]))
        same = batch["same"].to(result.device).view(-1).float()
        rec = 0.5 * (((result - batch["target"].to(result)) ** 2).flatten(1).mean(1) * same).sum() / same.sum().clamp_min(1)
        loss = self.w["adv"] * adv + self.w["att"] * att + self.w["rec"] * rec
        logs = {"g/adv": float(adv.detach()), "g/att": float(att.detach()), "g/rec": float(rec.detach())}
        if self.differentiable_identity and self.w["id"] > 0:  # weight 0: no identity pass, no backward through it
            idl = (1 - F.cosine_similarity(self.identity(result), self._cache["z_id"], dim=-1)).mean()
            loss = loss + self.w["id"] * idl
            logs["g/id"] = float(idl.detach())
        return loss, logs

    def discriminator_loss(self, batch: dict, result: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        real = real_images(batch).to(result) * 2 - 1
        fake = result.detach() * 2 - 1
        lr = sum(F.relu(1 - d).mean() for d in self.D(real))
        lf = sum(F.relu(1 + d).mean() for d in self.D(fake))
        return lr + lf, {"d/real": float(lr.detach()), "d/fake": float(lf.detach())}
