"""The networks the FaceForensics++ swap protocol measures with, written here in torch with their
published checkpoints' state-dict layouts, key for key (``reliableswap weights fetch`` lists where
each file is published; nothing is downloaded at run time):

- :class:`Sphere20` — CosFace's sphere20 (MuggleWang/CosFace_pytorch ``net.sphere(type=20)``: four
  stages of a strided 3×3 conv + PReLU and 1/2/4/1 residual blocks, ``fc`` 512·7·6 → 512), the
  identity network of ReliableSwap's FF++ evaluation (``net_sphere20_data_vggface2_acc_9955.pth``,
  trained on VGGFace2). Input B×3×112×96, ``(x·255 − 127.5) / 128``; output 512-D.
- :class:`HopeNet` — deep-head-pose's ``Hopenet(Bottleneck, [3, 4, 6, 3], 66)``: a torchvision
  ResNet-50 trunk and three 66-bin heads (``fc_yaw``, ``fc_pitch``, ``fc_roll``; the vestigial
  ``fc_finetune`` is kept so the file loads strictly). Input B×3×224×224 with ImageNet's mean and
  std; :func:`hopenet_angles` turns the bins into degrees (softmax expectation × 3 − 99).
- :class:`Deep3DRecon` — Deep3DFaceRecon_pytorch's ``ReconNetWrapper`` with ``resnet50``: the trunk
  without its last fc and seven 1×1 convolutions giving 257 coefficients (80 identity, 64
  expression, 80 texture, 3 angles, 27 lighting, 2 + 1 translation); ``epoch_20.pth`` holds it
  under ``net_recon``. Input B×3×224×224 in [0, 1]; :data:`DEEP3D_EXPRESSION` slices the 64
  expression coefficients (no BFM file needed for them).

Images are B×3×H×W in [0, 1] on any device; each wrapper resizes and normalises its input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPHERE_INPUT = (112, 96)
HOPENET_INPUT = 224
DEEP3D_INPUT = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The 257 coefficients' parts, in the order of Deep3DFaceRecon's ``final_layers``.
DEEP3D_PARTS = (("id", 80), ("exp", 64), ("tex", 80), ("angle", 3), ("gamma", 27), ("xy", 2), ("z", 1))
DEEP3D_EXPRESSION = slice(80, 144)


class _SphereBlock(nn.Module):
    def __init__(self, planes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.prelu1 = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.prelu2 = nn.PReLU(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.prelu2(self.conv2(self.prelu1(self.conv1(x))))


class Sphere20(nn.Module):
    """CosFace sphere20 (module doc): ``forward`` takes the network's own input (B×3×112×96,
    normalised); :meth:`embed` takes crops in [0, 1] of any size and returns B×512."""

    def __init__(self):
        super().__init__()
        widths, blocks = (3, 64, 128, 256, 512), (1, 2, 4, 1)
        for i, n in enumerate(blocks):
            layers = [nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1), nn.PReLU(widths[i + 1])]
            layers += [_SphereBlock(widths[i + 1]) for _ in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(512 * 7 * 6, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.flatten(1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=SPHERE_INPUT, mode="bilinear", align_corners=False, antialias=True)
        return self.features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """B×512 of crops already at 112×96 in [0, 1] (aligned to the network's template)."""
        return self(x * 255 / 128 - 127.5 / 128)


class _Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3×3 convolution), its key names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Trunk(nn.Module):
    """torchvision's ResNet-50 up to the global average pool (keys ``conv1``, ``bn1``,
    ``layer1``…``layer4``); ``forward`` returns B×2048×1×1."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, n, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
            down = None
            if stride != 1 or inplanes != planes * 4:
                down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            layers = [_Bottleneck(inplanes, planes, stride, down)] + [_Bottleneck(planes * 4, planes) for _ in range(n - 1)]
            inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1)


class HopeNet(ResNet50Trunk):
    """deep-head-pose's Hopenet (module doc): ``forward`` (224² ImageNet-normalised input) returns
    the yaw, pitch and roll logits, B×66 each; :meth:`angles` takes crops in [0, 1] and returns
    B×3 degrees (yaw, pitch, roll)."""

    def __init__(self, bins: int = 66):
        super().__init__()
        self.fc_yaw = nn.Linear(2048, bins)
        self.fc_pitch = nn.Linear(2048, bins)
        self.fc_roll = nn.Linear(2048, bins)
        self.fc_finetune = nn.Linear(2048 + 3, 3)  # vestigial in the authors' model, present in its file

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = super().forward(x).flatten(1)
        return self.fc_yaw(f), self.fc_pitch(f), self.fc_roll(f)

    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Yaw, pitch and roll logits (B×66 each) of crops in [0, 1] of any size."""
        x = F.interpolate(images.float(), size=(HOPENET_INPUT, HOPENET_INPUT), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return self((x - mean) / std)

    def angles(self, images: torch.Tensor) -> torch.Tensor:
        return hopenet_angles(*self.logits(images))


def hopenet_angles(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """HopeNet's 66-bin logits → B×3 degrees: the softmax expectation of the bin index × 3 − 99."""
    idx = torch.arange(yaw.shape[-1], device=yaw.device, dtype=torch.float32)
    return torch.stack([(F.softmax(v.float(), -1) * idx).sum(-1) * 3 - 99 for v in (yaw, pitch, roll)], -1)


class Deep3DRecon(nn.Module):
    """Deep3DFaceRecon_pytorch's ReconNetWrapper with ResNet-50 (module doc): ``forward`` (224²
    in [0, 1]) returns B×257 coefficients; :meth:`expression` takes crops and returns B×64."""

    def __init__(self):
        super().__init__()
        self.backbone = ResNet50Trunk()
        self.final_layers = nn.ModuleList([nn.Conv2d(2048, n, 1) for _, n in DEEP3D_PARTS])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        return torch.cat([layer(f) for layer in self.final_layers], 1).flatten(1)

    def expression(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(DEEP3D_INPUT, DEEP3D_INPUT), mode="bilinear", align_corners=False, antialias=True)
        return self(x)[:, DEEP3D_EXPRESSION]


__all__ = ["DEEP3D_EXPRESSION", "DEEP3D_PARTS", "Deep3DRecon", "HopeNet", "ResNet50Trunk", "Sphere20", "hopenet_angles"]
