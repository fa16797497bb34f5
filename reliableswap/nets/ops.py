"""StyleGAN2 building blocks shared by the LIA and GPEN architectures (pure torch, any device).

Module and parameter names follow rosinality's stylegan2-pytorch, which both published
architectures build on, so their checkpoints load key for key. The FIR resampling
(``upfirdn2d``) is a depthwise convolution here instead of a compiled CUDA kernel.
Images and features are B×C×H×W.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


def make_kernel(k: list[float]) -> torch.Tensor:
    """Separable FIR taps → normalised 2D kernel (K×K, sums to 1)."""
    t = torch.tensor(k, dtype=torch.float32)
    if t.ndim == 1:
        t = t[None, :] * t[:, None]
    return t / t.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative = crop), filter with ``kernel`` (K×K), subsample.

    x: B×C×H×W → B×C×((H·up + pad0 + pad1 − K + 1) / down)×(same for W).
    """
    b, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(b, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(b, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    k = torch.flip(kernel, [0, 1]).to(x)[None, None].expand(c, 1, -1, -1)
    return F.conv2d(x, k, stride=down, groups=c)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2, scale: float = SQRT2) -> torch.Tensor:
    """``scale · leaky_relu(x + bias)`` with the bias broadcast over channel dim 1."""
    return F.leaky_relu(x + bias.reshape((1, -1) + (1,) * (x.ndim - 2)), negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Bias + scaled leaky ReLU. ``bias_4d``: LIA stores the bias as 1×C×1×1, GPEN as C."""

    def __init__(self, channel: int, bias_4d: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros((1, channel, 1, 1) if bias_4d else (channel,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class ScaledLeakyReLU(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 0.2) * self.scale


class Blur(nn.Module):
    def __init__(self, kernel: list[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor ** 2)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self, kernel: list[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class EqualConv2d(nn.Module):
    """Conv with the weight scaled at run time by 1/sqrt(fan-in) (equalised learning rate)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.scale = 1 / math.sqrt(cin * k * k)
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)


class EqualLinear(nn.Module):
    def __init__(self, din: int, dout: int, bias: bool = True, bias_init: float = 0.0, lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dout, din).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((dout,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = lr_mul / math.sqrt(din)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, None if self.bias is None else self.bias * self.lr_mul)


class ModulatedConv2d(nn.Module):
    """Style-modulated (and optionally demodulated) conv, one grouped conv for the whole batch.

    x: B×Cin×H×W, style: B×D → B×Cout×H'×W' (H' = 2H when ``upsample``, H/2 when ``downsample``).
    """

    def __init__(self, cin: int, cout: int, k: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False, downsample: bool = False, blur_kernel: list[float] = (1, 3, 3, 1)):
        super().__init__()
        self.k, self.cin, self.cout = k, cin, cout
        self.upsample, self.downsample = upsample, downsample
        n = len(blur_kernel)
        if upsample:
            p = (n - 2) - (k - 1)
            self.blur = Blur(list(blur_kernel), pad=((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)
        if downsample:
            p = (n - 2) + (k - 1)
            self.blur = Blur(list(blur_kernel), pad=((p + 1) // 2, p // 2))
        self.scale = 1 / math.sqrt(cin * k * k)
        self.padding = k // 2
        self.weight = nn.Parameter(torch.randn(1, cout, cin, k, k))
        self.modulation = EqualLinear(style_dim, cin, bias_init=1)
        self.demodulate = demodulate

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, cin, h, w = x.shape
        weight = self.scale * self.weight * self.modulation(style).view(b, 1, cin, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, self.cout, 1, 1, 1)
        x = x.reshape(1, b * cin, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * cin, self.cout, self.k, self.k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=b)
            return self.blur(out.view(b, self.cout, *out.shape[-2:]))
        weight = weight.reshape(b * self.cout, cin, self.k, self.k)
        if self.downsample:
            x = self.blur(x)
            out = F.conv2d(x, weight, padding=0, stride=2, groups=b)
        else:
            out = F.conv2d(x, weight, padding=self.padding, groups=b)
        return out.view(b, self.cout, *out.shape[-2:])


class NoiseInjection(nn.Module):
    """Adds (or, ``concat``, appends as channels) ``weight · noise``; no noise → unchanged
    (LIA), or zeros appended (GPEN's layout with deterministic output)."""

    def __init__(self, concat: bool = False):
        super().__init__()
        self.concat = concat
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if self.concat:
            return torch.cat([x, self.weight * (torch.zeros_like(x) if noise is None else noise)], 1)
        return x if noise is None else x + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, style_dim: int, upsample: bool = False,
                 blur_kernel: list[float] = (1, 3, 3, 1), concat_noise: bool = False, bias_4d: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, k, style_dim, upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection(concat_noise)
        self.activate = FusedLeakyReLU(cout * (2 if concat_noise else 1), bias_4d=bias_4d)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ConvLayer(nn.Sequential):
    """[Blur] → EqualConv2d → [FusedLeakyReLU | ScaledLeakyReLU] (indices as in the checkpoints)."""

    def __init__(self, cin: int, cout: int, k: int, downsample: bool = False, blur_kernel: list[float] = (1, 3, 3, 1),
                 bias: bool = True, activate: bool = True, bias_4d: bool = False, lrelu_scale: float = 1.0):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(blur_kernel) - 2) + (k - 1)
            layers.append(Blur(list(blur_kernel), pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, k // 2
        layers.append(EqualConv2d(cin, cout, k, stride=stride, padding=padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(cout, bias_4d=bias_4d) if bias else ScaledLeakyReLU(lrelu_scale))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Two convs (the second one halving the size) plus a 1×1 skip, averaged by 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int, blur_kernel: list[float] = (1, 3, 3, 1), bias_4d: bool = False):
        super().__init__()
        self.conv1 = ConvLayer(cin, cin, 3, bias_4d=bias_4d)
        self.conv2 = ConvLayer(cin, cout, 3, downsample=True, blur_kernel=blur_kernel, bias_4d=bias_4d)
        self.skip = ConvLayer(cin, cout, 1, downsample=True, activate=False, bias=False, blur_kernel=blur_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


def stylegan_channels(multiplier: float = 1, narrow: float = 1) -> dict[int, int]:
    """Feature channels per resolution of rosinality's StyleGAN2."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16, 2048: 8}
    return {r: int(c * (multiplier if r >= 64 else 1) * narrow) for r, c in base.items()}
