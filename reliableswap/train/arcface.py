"""Identity encoders: insightface ArcFace iresnet (differentiable) and dlib's descriptor (offline).

``load_arcface(path)`` reads an insightface ``arcface_torch`` backbone checkpoint (``backbone.pth``:
a plain state dict, ``module.`` prefixes allowed) with ``weights_only`` loading, infers the depth
(r18/r34/r50/r100) from the block counts and returns :class:`ArcFaceEncoder`. The iresnet below
follows arcface_torch's ``backbones/iresnet.py`` layer names so its checkpoints load strictly.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from reliableswap.checkpoints import torch_load
from reliableswap.faces.embed import DlibEmbedder
from reliableswap.faces.landmarks import DlibLandmarks
from reliableswap.judge import SFaceJudge
from reliableswap.errors import UserError

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """ArcFace backbone: 112×112 input normalized to [−1, 1] → B×512 embedding."""

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
        mods = [IBasicBlock(self.inplanes, planes, 2, down)] + [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        self.inplanes = planes
        return nn.Sequential(*mods)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


class ArcFaceEncoder(nn.Module):
    """[0, 1] aligned face crops (B×3×H×W) → B×512 unit embeddings.

    ``crop`` is the central fraction of the crop handed to the 112×112 network (FFHQ-aligned crops
    hold more context than ArcFace's template; 0.75 keeps the face, as SimSwap/FaceShifter do).
    """

    def __init__(self, net: IResNet, crop: float = 0.75):
        super().__init__()
        self.net, self.crop = net, crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ch, cw = int(round(h * self.crop)), int(round(w * self.crop))
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        x = F.interpolate(x[..., y0:y0 + ch, x0:x0 + cw], size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
        return F.normalize(self.net(x * 2 - 1), dim=-1)


def _clean_state(sd: dict) -> dict:
    for key in ("state_dict", "model", "backbone"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {re.sub(r"^(module\.)+", "", k): v for k, v in sd.items()}


#: Largest ArcFace backbone read (iresnet200 in fp32 is about 260 MB).
ARCFACE_MAX_BYTES = 512 << 20


def load_arcface(path: str | os.PathLike, crop: float = 0.75, device: str | torch.device = "cpu") -> ArcFaceEncoder:
    """Load an insightface arcface_torch iresnet checkpoint (frozen, eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"ArcFace checkpoint {path} not found: download an insightface arcface_torch backbone "
            "(e.g. ms1mv3_arcface_r100_fp16/backbone.pth from the insightface model zoo) and pass its path")
    sd = _clean_state(torch_load(path, ARCFACE_MAX_BYTES))
    counts = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    depth = next((d for d, c in DEPTHS.items() if tuple(counts) == c), None)
    if depth is None:
        raise UserError(f"{path}: not an arcface_torch iresnet (blocks per stage {counts})")
    net = IResNet(DEPTHS[depth], num_features=sd["fc.weight"].shape[0])
    net.load_state_dict(sd, strict=True)
    return ArcFaceEncoder(net, crop).to(device).requires_grad_(False).eval()


#: where the alignment puts the face in an aligned crop: (x0, y0, x1, y1) as fractions of its side
CROP_FACE_BOX = (0.18, 0.2, 0.82, 0.92)


def crop_face_box(height: int, width: int) -> tuple[int, int, int, int]:
    """:data:`CROP_FACE_BOX` in the pixels of an aligned crop."""
    x0, y0, x1, y1 = CROP_FACE_BOX
    return int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)


class SFaceEncoder(nn.Module):
    """The identity judge's SFace on [0, 1] FFHQ-aligned crops (B×3×H×W) → B×128 unit embeddings,
    differentiable (FaceShifter's identity loss and z_id; frozen weights)."""

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self.judge = SFaceJudge(device)
        self.net = self.judge.net  # registered: moves with .to()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.embed(x)


class DlibEncoder:
    """dlib's 128-D descriptor of aligned crops ([0, 1] B×3×H×W → B×128), no gradient.

    Landmarks come from dlib's 68-point predictor run on the central box of the crop (where the
    alignment puts the face), so fakes without stored landmarks can be described too.
    """

    def __init__(self, box: tuple[float, float, float, float] = CROP_FACE_BOX):
        self._landmarks = DlibLandmarks()
        self._emb = DlibEmbedder()
        self.box = box
        self._cache: dict[bytes, np.ndarray] = {}  # sources repeat across steps: describe each image once

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        imgs = (x.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for img in imgs:
            key = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
            if key in self._cache:
                out.append(self._cache[key])
                continue
            h, w = img.shape[:2]
            # the box's right/bottom pixels inclusive, as DlibLandmarks takes them (x1 − 1, y1 − 1)
            box = np.array([[int(self.box[0] * w), int(self.box[1] * h), int(self.box[2] * w) + 1, int(self.box[3] * h) + 1]])
            lm = self._landmarks(img, box)[0]
            out.append(self._emb(np.ascontiguousarray(img), lm[None])[0])
            if len(self._cache) < 100_000:
                self._cache[key] = out[-1]
        return torch.from_numpy(np.stack(out)).to(x.device)
