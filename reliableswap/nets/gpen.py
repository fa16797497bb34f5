"""GPEN blind face restoration (Yang et al., CVPR 2021), BFR-512 layout: ``GPEN-BFR-512.pth``
loads key for key.

A StyleGAN2 decoder (channel multiplier 2, 8-layer mapping net) whose noise inputs are the
encoder's features of the degraded face, appended as channels ("concat" noise). Input and output
B×3×512×512 in [-1, 1], RGB.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reliableswap.nets.ops import ConstantInput, ConvLayer, EqualLinear, ModulatedConv2d, StyledConv, Upsample, stylegan_channels

SQRT2 = math.sqrt(2.0)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)


class ToRGB(nn.Module):
    def __init__(self, cin: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample([1, 3, 3, 1])
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        return out if skip is None else out + self.upsample(skip)


class Generator(nn.Module):
    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2, narrow: float = 1, lr_mlp: float = 0.01):
        super().__init__()
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)])
        ch = stylegan_channels(channel_multiplier, narrow)
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim, concat_noise=True)
        self.to_rgb1 = ToRGB(ch[4] * 2, style_dim, upsample=False)
        self.log_size = int(math.log2(size))
        self.convs, self.upsamples, self.to_rgbs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        cin = ch[4]
        for i in range(3, self.log_size + 1):
            cout = ch[2 ** i]
            self.convs.append(StyledConv(cin * 2, cout, 3, style_dim, upsample=True, concat_noise=True))
            self.convs.append(StyledConv(cout * 2, cout, 3, style_dim, concat_noise=True))
            self.to_rgbs.append(ToRGB(cout * 2, style_dim))
            cin = cout

    def forward(self, latent: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
        """latent: B×512 (W space), noise: 1 + 2·(log2 size − 2) feature maps, coarse first."""
        out = self.conv1(self.input(latent.shape[0]), latent, noise[0])
        skip = self.to_rgb1(out, latent)
        for j, (conv1, conv2, to_rgb) in enumerate(zip(self.convs[::2], self.convs[1::2], self.to_rgbs)):
            out = conv2(conv1(out, latent, noise[1 + 2 * j]), latent, noise[2 + 2 * j])
            skip = to_rgb(out, latent, skip)
        return skip


class FullGenerator(nn.Module):
    """``FullGenerator(512)`` = GPEN-BFR-512 (channel multiplier 2, narrow 1)."""

    def __init__(self, size: int = 512, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2, narrow: float = 1):
        super().__init__()
        ch = stylegan_channels(channel_multiplier, narrow)
        self.size = size
        self.log_size = int(math.log2(size))
        self.generator = Generator(size, style_dim, n_mlp, channel_multiplier, narrow)
        self.ecd0 = nn.Sequential(ConvLayer(3, ch[size], 1, lrelu_scale=SQRT2))
        cin = ch[size]
        for i in range(self.log_size, 2, -1):
            cout = ch[2 ** (i - 1)]
            setattr(self, f"ecd{self.log_size - i + 1}", nn.Sequential(ConvLayer(cin, cout, 3, downsample=True, lrelu_scale=SQRT2)))
            cin = cout
        self.final_linear = nn.Sequential(EqualLinear(ch[4] * 16, style_dim, activation=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×3×S×S in [-1, 1] (degraded face) → restored face, same shape and range."""
        feats = []
        for i in range(self.log_size - 1):
            x = getattr(self, f"ecd{i}")(x)
            feats.append(x)
        latent = self.generator.style(self.final_linear(x.flatten(1)))  # through the mapping net
        noise = [f for f in feats[::-1] for _ in range(2)][1:]
        return self.generator(latent, noise)
