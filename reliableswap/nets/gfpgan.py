"""GFPGAN v1 "clean" (Wang et al., CVPR 2021): ``GFPGANv1.3.pth`` / ``GFPGANv1.4.pth`` load key for
key (the ``params_ema`` entry).

A U-Net encodes the degraded face (B×3×512×512 in [-1, 1]) into per-layer W codes and, at every
decoder scale, spatial feature transforms (scale, shift) applied to half of the channels of a
bilinear-resampling StyleGAN2 decoder ("clean": no compiled ops). The decoder's noise inputs
are its stored ``noises.noise{i}`` buffers, so restoration is deterministic (the published
helper draws fresh noise per call; the checkpoints' noise weights are small).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class ModulatedConv2d(nn.Module):
    """Modulated conv with a plain ``nn.Linear`` modulation and bilinear up-sampling before the conv."""

    def __init__(self, cin: int, cout: int, k: int, style_dim: int, demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.cout, self.k, self.demodulate, self.upsample = cout, k, demodulate, upsample
        self.modulation = nn.Linear(style_dim, cin)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, k, k) / math.sqrt(cin * k * k))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weight = self.weight * self.modulation(style).view(b, 1, c, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, self.cout, 1, 1, 1)
        if self.upsample:
            x = _resize(x, 2)
        h, w = x.shape[-2:]
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * self.cout, c, self.k, self.k), padding=self.k // 2, groups=b)
        return out.view(b, self.cout, h, w)


class StyleConv(nn.Module):
    def __init__(self, cin: int, cout: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(cin, cout, 3, style_dim, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _lrelu(self.modulated_conv(x, style) * math.sqrt(2) + self.weight * noise + self.bias)


class ToRGB(nn.Module):
    def __init__(self, cin: int, style_dim: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            out = out + (_resize(skip, 2) if self.upsample else skip)
        return out


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channel, size, size))


class NormStyleCode(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)


def _channels(multiplier: float, narrow: float) -> dict[int, int]:
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    return {r: int(c * (multiplier if r >= 64 else 1) * narrow) for r, c in base.items()}


class StyleGAN2GeneratorCSFT(nn.Module):
    """The decoder: StyleGAN2 whose first conv of each scale is followed by an SFT on half its channels."""

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2, narrow: float = 1):
        super().__init__()
        self.style_mlp = nn.Sequential(NormStyleCode(), *[m for _ in range(n_mlp) for m in (nn.Linear(style_dim, style_dim), nn.LeakyReLU(0.2))])
        ch = _channels(channel_multiplier, narrow)
        self.constant_input = ConstantInput(ch[4])
        self.style_conv1 = StyleConv(ch[4], ch[4], style_dim)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.log_size = int(math.log2(size))
        num_layers = (self.log_size - 2) * 2 + 1
        self.style_convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for i in range(num_layers):
            r = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, r, r))
        cin = ch[4]
        for i in range(3, self.log_size + 1):
            cout = ch[2 ** i]
            self.style_convs.append(StyleConv(cin, cout, style_dim, upsample=True))
            self.style_convs.append(StyleConv(cout, cout, style_dim))
            self.to_rgbs.append(ToRGB(cout, style_dim))
            cin = cout

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor]) -> torch.Tensor:
        """latent: B×L×512 per-layer W codes; conditions: [scale, shift] per scale, coarse first."""
        noise = [getattr(self.noises, f"noise{i}") for i in range(len(self.style_convs) + 1)]
        out = self.style_conv1(self.constant_input.weight.expand(latent.shape[0], -1, -1, -1), latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, to_rgb in zip(self.style_convs[::2], self.style_convs[1::2], self.to_rgbs):
            out = conv1(out, latent[:, i], noise[i])
            if i < len(conditions):
                same, sft = out.chunk(2, 1)
                out = torch.cat([same, sft * conditions[i - 1] + conditions[i]], 1)
            out = conv2(out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, factor: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _lrelu(self.conv2(_resize(_lrelu(self.conv1(x)), self.factor)))
        return out + self.skip(_resize(x, self.factor))


class GFPGANv1Clean(nn.Module):
    """The configuration of the published v1.3/v1.4 weights: 512 px, channel multiplier 2,
    one W per layer, SFT on half the channels."""

    def __init__(self, size: int = 512, style_dim: int = 512, channel_multiplier: int = 2, n_mlp: int = 8, narrow: float = 1):
        super().__init__()
        ch = _channels(channel_multiplier, narrow * 0.5)
        self.log_size = int(math.log2(size))
        self.style_dim = style_dim
        self.conv_body_first = nn.Conv2d(3, ch[size], 1)
        cin = ch[size]
        self.conv_body_down = nn.ModuleList()
        for i in range(self.log_size, 2, -1):
            self.conv_body_down.append(ResBlock(cin, ch[2 ** (i - 1)], 0.5))
            cin = ch[2 ** (i - 1)]
        self.final_conv = nn.Conv2d(cin, ch[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList()
        cin = ch[4]
        for i in range(3, self.log_size + 1):
            self.conv_body_up.append(ResBlock(cin, ch[2 ** i], 2))
            cin = ch[2 ** i]
        self.toRGB = nn.ModuleList([nn.Conv2d(ch[2 ** i], 3, 1) for i in range(3, self.log_size + 1)])  # training-time outputs
        self.final_linear = nn.Linear(ch[4] * 16, (self.log_size * 2 - 2) * style_dim)
        self.stylegan_decoder = StyleGAN2GeneratorCSFT(size, style_dim, n_mlp, channel_multiplier, narrow)

        def sft(c: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))

        self.condition_scale = nn.ModuleList([sft(ch[2 ** i]) for i in range(3, self.log_size + 1)])
        self.condition_shift = nn.ModuleList([sft(ch[2 ** i]) for i in range(3, self.log_size + 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×3×512×512 in [-1, 1] → restored face, same shape and range."""
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for down in self.conv_body_down:
            feat = down(feat)
            skips.insert(0, feat)
        feat = _lrelu(self.final_conv(feat))
        latent = self.final_linear(feat.flatten(1)).view(x.shape[0], -1, self.style_dim)
        conditions = []
        for up, skip, scale, shift in zip(self.conv_body_up, skips, self.condition_scale, self.condition_shift):
            feat = up(feat + skip)
            conditions += [scale(feat), shift(feat)]
        return self.stylegan_decoder(latent, conditions)
