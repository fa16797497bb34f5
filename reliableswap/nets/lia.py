"""LIA, the Latent Image Animator (Wang et al., ICLR 2022): the reenactor of the official
ReliableSwap synthesizer, written in torch here; loads the ``gen`` entry of the published
``vox.pt`` key for key.

The encoder maps an image (B×3×256×256 in [-1, 1]) to a latent ``w`` (B×512) and multi-scale
features; a linear motion code (B×20) of the driving image moves ``w`` along an orthonormal
motion basis (QR of the learned directions). The StyleGAN2-like decoder warps the source
features by predicted flows at every scale ("absolute" motion: ``w_src + D·α_drv``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reliableswap.nets.ops import ConvLayer, ConstantInput, EqualConv2d, EqualLinear, ModulatedConv2d, ResBlock, StyledConv, Upsample

BLUR = (1, 3, 3, 1)


class EncoderApp(nn.Module):
    def __init__(self, size: int, w_dim: int = 512):
        super().__init__()
        ch = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
        log_size = int(math.log2(size))
        self.convs = nn.ModuleList([ConvLayer(3, ch[size], 1, bias_4d=True)])
        cin = ch[size]
        for i in range(log_size, 2, -1):
            self.convs.append(ResBlock(cin, ch[2 ** (i - 1)], bias_4d=True))
            cin = ch[2 ** (i - 1)]
        self.convs.append(EqualConv2d(cin, w_dim, 4, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: B×3×S×S → (w B×512, features from 8 px up to S/2 px, coarse first)."""
        res = []
        for conv in self.convs:
            x = conv(x)
            res.append(x)
        return res[-1].flatten(1), res[::-1][2:]


class Encoder(nn.Module):
    def __init__(self, size: int, dim: int = 512, dim_motion: int = 20):
        super().__init__()
        self.net_app = EncoderApp(size, dim)
        self.fc = nn.Sequential(*[EqualLinear(dim, dim) for _ in range(4)], EqualLinear(dim, dim_motion))


class Direction(nn.Module):
    def __init__(self, motion_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(512, motion_dim))

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        """alpha: B×M motion codes → B×512 latent offsets Σ αᵢ qᵢ."""
        w = self.weight + 1e-8
        q, _ = torch.linalg.qr(w if w.dtype in (torch.float32, torch.float64) else w.float())
        return alpha @ q.T.to(alpha)


class ToRGB(nn.Module):
    def __init__(self, cin: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample(list(BLUR))
        self.conv = ConvLayer(cin, 3, 1, bias_4d=True)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x) + self.bias
        return out if skip is None else out + self.upsample(skip)


class ToFlow(nn.Module):
    """Predicts a flow (2 channels, tanh) and a mask (sigmoid) that warp the encoder feature."""

    def __init__(self, cin: int, style_dim: int):
        super().__init__()
        self.upsample = Upsample(list(BLUR))
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, feat, skip=None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        n = x.shape[2]
        xs = torch.linspace(-1, 1, n, device=x.device, dtype=torch.float64).float().to(x.dtype)
        base = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1)  # n×n×2, (x, y)
        grid = torch.tanh(out[:, :2]).permute(0, 2, 3, 1) + base
        mask = torch.sigmoid(out[:, 2:3])
        warped = F.grid_sample(feat, grid, align_corners=False) * mask
        return warped, warped + x * (1 - mask), out


class Synthesis(nn.Module):
    def __init__(self, size: int, style_dim: int = 512, motion_dim: int = 20, channel_multiplier: int = 1):
        super().__init__()
        ch = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
              256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
        self.direction = Direction(motion_dim)
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim, bias_4d=True)
        self.to_rgb1 = ToRGB(ch[4], upsample=False)
        self.log_size = int(math.log2(size))
        self.convs, self.upsamples, self.to_rgbs, self.to_flows = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        cin = ch[4]
        for i in range(3, self.log_size + 1):
            cout = ch[2 ** i]
            self.convs.append(StyledConv(cin, cout, 3, style_dim, upsample=True, bias_4d=True))
            self.convs.append(StyledConv(cout, cout, 3, style_dim, bias_4d=True))
            self.to_rgbs.append(ToRGB(cout))
            self.to_flows.append(ToFlow(cout, style_dim))
            cin = cout

    def forward(self, latent: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """latent: B×512 (already moved by the motion), feats: the source encoder's features."""
        out = self.conv1(self.input(latent.shape[0]), latent)
        skip = skip_flow = None
        for conv1, conv2, to_rgb, to_flow, feat in zip(self.convs[::2], self.convs[1::2], self.to_rgbs, self.to_flows, feats):
            out = conv2(conv1(out, latent), latent)
            out_warp, out, skip_flow = to_flow(out, latent, feat, skip_flow)
            skip = to_rgb(out_warp, skip)
        return skip


class Generator(nn.Module):
    """``Generator(256)`` = the vox/taichi/ted checkpoints' architecture (state-dict keys ``enc.*``, ``dec.*``)."""

    def __init__(self, size: int = 256, style_dim: int = 512, motion_dim: int = 20, channel_multiplier: int = 1):
        super().__init__()
        self.size = size
        self.enc = Encoder(size, style_dim, motion_dim)
        self.dec = Synthesis(size, style_dim, motion_dim, channel_multiplier)

    def forward(self, source: torch.Tensor, driving: torch.Tensor) -> torch.Tensor:
        """source, driving: B×3×S×S in [-1, 1] → source's appearance in driving's motion, B×3×S×S in [-1, 1]."""
        w, feats = self.enc.net_app(source)
        alpha = self.enc.fc(self.enc.net_app(driving)[0])
        return self.dec(w + self.dec.direction(alpha), feats)
