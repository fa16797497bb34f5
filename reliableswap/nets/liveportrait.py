"""LivePortrait (Guo et al., 2024), human model: appearance extractor F, motion extractor M,
warping module W, SPADE generator G and the stitching MLP S, written in torch here. Each module
loads its published ``base_models/*.pth`` (or the flattened ``*.safetensors``) key for key.

Images are B×3×256×256 in [0, 1]. F lifts the source into a 3D feature volume (B×32×16×64×64);
M predicts per image 21 canonical 3D keypoints, head pose (66-bin pitch/yaw/roll), expression
deltas, scale and translation; the driven keypoints ``s·(k_c R + δ) + t`` drive W, which warps
the volume by a dense 3D motion (keypoint-difference heat maps through a 3D hourglass) and G
decodes the result at 512×512.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

NUM_KP = 21
#: expression rows/components taken from the driving face with absolute motion ("all" region),
#: as the published pipeline does: the rest of δ stays the source's.
EXP_ROWS = (1, 2, 6, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20)


# -- shared blocks --------------------------------------------------------------------------------

class SameBlock2d(nn.Module):
    def __init__(self, cin: int, cout: int, lrelu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout)
        self.lrelu = lrelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.leaky_relu(x, 0.01) if self.lrelu else F.relu(x)


class DownBlock2d(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), 2)


class ResBlock3d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv3d(c, c, 3, padding=1)
        self.conv2 = nn.Conv3d(c, c, 3, padding=1)
        self.norm1 = nn.BatchNorm3d(c)
        self.norm2 = nn.BatchNorm3d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DownBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(F.relu(self.norm(self.conv(x))), (1, 2, 2))


class UpBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=(1, 2, 2)))))


class Hourglass(nn.Module):
    """3D U-Net: ``encoder.down_blocks`` / ``decoder.up_blocks`` + a final conv and norm."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()

        def ch(i: int) -> int:
            return min(max_features, block_expansion * 2 ** i)

        self.encoder = nn.Module()
        self.encoder.down_blocks = nn.ModuleList([DownBlock3d(in_features if i == 0 else ch(i), ch(i + 1)) for i in range(num_blocks)])
        self.decoder = nn.Module()
        self.decoder.up_blocks = nn.ModuleList([UpBlock3d((1 if i == num_blocks - 1 else 2) * ch(i + 1), ch(i)) for i in reversed(range(num_blocks))])
        self.out_filters = block_expansion + in_features
        self.decoder.conv = nn.Conv3d(self.out_filters, self.out_filters, 3, padding=1)
        self.decoder.norm = nn.BatchNorm3d(self.out_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [x]
        for down in self.encoder.down_blocks:
            skips.append(down(skips[-1]))
        out = skips.pop()
        for up in self.decoder.up_blocks:
            out = torch.cat([up(out), skips.pop()], 1)
        return F.relu(self.decoder.norm(self.decoder.conv(out)))


def coordinate_grid(d: int, h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
    """Normalised (x, y, z) in [-1, 1] of every voxel: d×h×w×3."""

    def axis(n: int) -> torch.Tensor:
        return 2 * (torch.arange(n, dtype=ref.dtype, device=ref.device) / (n - 1)) - 1

    z, y, x = torch.meshgrid(axis(d), axis(h), axis(w), indexing="ij")
    return torch.stack([x, y, z], -1)


def kp2gaussian(kp: torch.Tensor, size: tuple[int, int, int], variance: float = 0.01) -> torch.Tensor:
    """kp: B×K×3 normalised → Gaussian blobs B×K×d×h×w."""
    grid = coordinate_grid(*size, ref=kp)
    diff = grid[None, None] - kp[:, :, None, None, None, :]
    return torch.exp(-0.5 * diff.pow(2).sum(-1) / variance)


# -- F: appearance feature extractor --------------------------------------------------------------

class AppearanceFeatureExtractor(nn.Module):
    def __init__(self, block_expansion: int = 64, num_down_blocks: int = 2, max_features: int = 512,
                 reshape_channel: int = 32, reshape_depth: int = 16, num_resblocks: int = 6):
        super().__init__()
        self.reshape_channel, self.reshape_depth = reshape_channel, reshape_depth
        self.first = SameBlock2d(3, block_expansion)
        chans = [min(max_features, block_expansion * 2 ** i) for i in range(num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList([DownBlock2d(chans[i], chans[i + 1]) for i in range(num_down_blocks)])
        self.second = nn.Conv2d(chans[-1], max_features, 1)
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×3×256×256 in [0, 1] → feature volume B×32×16×64×64."""
        out = self.first(x)
        for down in self.down_blocks:
            out = down(out)
        out = self.second(out)
        b, _, h, w = out.shape
        return self.resblocks_3d(out.view(b, self.reshape_channel, self.reshape_depth, h, w))


# -- M: motion extractor (ConvNeXt-V2 tiny + heads) -----------------------------------------------

class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of B×C×H×W."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]


class GRN(nn.Module):
    """Global response normalisation over channels-last B×H×W×C."""

    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        return self.gamma * (x * (gx / (gx.mean(-1, keepdim=True) + 1e-6))) + self.beta + x


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.grn = GRN(4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.grn(F.gelu(self.pwconv1(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_kp: int = NUM_KP, num_bins: int = 66):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(dims[i]) for _ in range(depths[i])]) for i in range(4)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc_kp = nn.Linear(dims[-1], 3 * num_kp)
        self.fc_scale = nn.Linear(dims[-1], 1)
        self.fc_pitch = nn.Linear(dims[-1], num_bins)
        self.fc_yaw = nn.Linear(dims[-1], num_bins)
        self.fc_roll = nn.Linear(dims[-1], num_bins)
        self.fc_t = nn.Linear(dims[-1], 3)
        self.fc_exp = nn.Linear(dims[-1], 3 * num_kp)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        x = self.norm(x.mean([-2, -1]))
        return {k: getattr(self, f"fc_{k}")(x) for k in ("kp", "pitch", "yaw", "roll", "t", "exp", "scale")}


class MotionExtractor(nn.Module):
    def __init__(self, num_kp: int = NUM_KP):
        super().__init__()
        self.detector = ConvNeXtV2(num_kp=num_kp)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: B×3×256×256 in [0, 1] → raw head outputs (pose as 66-bin logits)."""
        return self.detector(x)


def bins_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """66-bin pose logits B×66 → degrees B (softmax expectation, 3° bins centred at −97.5°)."""
    idx = torch.arange(logits.shape[1], dtype=logits.dtype, device=logits.device)
    return (F.softmax(logits, 1) * idx).sum(1) * 3 - 97.5


def rotation_matrix(pitch: torch.Tensor, yaw: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Degrees B → B×3×3, the transpose of Rz·Ry·Rx (keypoints are rows: ``k @ R``)."""
    x, y, z = (torch.deg2rad(a) for a in (pitch, yaw, roll))
    o, n = torch.ones_like(x), torch.zeros_like(x)
    rx = torch.stack([o, n, n, n, x.cos(), -x.sin(), n, x.sin(), x.cos()], -1).view(-1, 3, 3)
    ry = torch.stack([y.cos(), n, y.sin(), n, o, n, -y.sin(), n, y.cos()], -1).view(-1, 3, 3)
    rz = torch.stack([z.cos(), -z.sin(), n, z.sin(), z.cos(), n, n, n, o], -1).view(-1, 3, 3)
    return (rz @ ry @ rx).transpose(1, 2)


# -- W: warping module ----------------------------------------------------------------------------

class DenseMotionNetwork(nn.Module):
    def __init__(self, block_expansion: int = 32, num_blocks: int = 5, max_features: int = 1024, num_kp: int = NUM_KP,
                 feature_channel: int = 32, reshape_depth: int = 16, compress: int = 4):
        super().__init__()
        self.num_kp = num_kp
        self.hourglass = Hourglass(block_expansion, (num_kp + 1) * (compress + 1), num_blocks, max_features)
        self.mask = nn.Conv3d(self.hourglass.out_filters, num_kp + 1, 7, padding=3)
        self.compress = nn.Conv3d(feature_channel, compress, 1)
        self.norm = nn.BatchNorm3d(compress)
        self.occlusion = nn.Conv2d(self.hourglass.out_filters * reshape_depth, 1, 7, padding=3)

    def forward(self, feature: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feature B×32×d×h×w, keypoints B×K×3 → (deformation B×d×h×w×3, occlusion B×1×h×w)."""
        feature = F.relu(self.norm(self.compress(feature)))
        b, c, d, h, w = feature.shape
        k = self.num_kp
        grid = coordinate_grid(d, h, w, kp_source)[None, None]  # 1×1×d×h×w×3
        to_source = grid - kp_driving.view(b, k, 1, 1, 1, 3) + kp_source.view(b, k, 1, 1, 1, 3)
        motions = torch.cat([grid.expand(b, 1, d, h, w, 3), to_source], 1)  # B×(K+1)×d×h×w×3
        rep = feature.unsqueeze(1).expand(b, k + 1, c, d, h, w).reshape(b * (k + 1), c, d, h, w)
        deformed = F.grid_sample(rep, motions.reshape(b * (k + 1), d, h, w, 3), align_corners=False).view(b, k + 1, c, d, h, w)
        heat = kp2gaussian(kp_driving, (d, h, w)) - kp2gaussian(kp_source, (d, h, w))
        heat = torch.cat([heat.new_zeros(b, 1, d, h, w), heat], 1).unsqueeze(2)
        pred = self.hourglass(torch.cat([heat, deformed], 2).view(b, -1, d, h, w))
        mask = F.softmax(self.mask(pred), 1).unsqueeze(2)  # B×(K+1)×1×d×h×w
        deformation = (motions.permute(0, 1, 5, 2, 3, 4) * mask).sum(1).permute(0, 2, 3, 4, 1)
        occlusion = torch.sigmoid(self.occlusion(pred.reshape(b, -1, h, w)))
        return deformation, occlusion


class WarpingNetwork(nn.Module):
    def __init__(self, num_kp: int = NUM_KP, block_expansion: int = 64, max_features: int = 512, num_down_blocks: int = 2,
                 reshape_channel: int = 32):
        super().__init__()
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, feature_channel=reshape_channel)
        c = block_expansion * 2 ** num_down_blocks
        self.third = SameBlock2d(max_features, c, lrelu=True)
        self.fourth = nn.Conv2d(c, c, 1)

    def forward(self, feature_3d: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor) -> torch.Tensor:
        """Warped, occlusion-masked 2D feature B×256×64×64."""
        deformation, occlusion = self.dense_motion_network(feature_3d, kp_driving, kp_source)
        out = F.grid_sample(feature_3d, deformation, align_corners=False)
        b, c, d, h, w = out.shape
        return self.fourth(self.third(out.view(b, c * d, h, w))) * occlusion


# -- G: SPADE generator ---------------------------------------------------------------------------

class SNConv2d(nn.Module):
    """Conv2d under spectral normalisation as stored by ``torch.nn.utils.spectral_norm``
    (``weight_orig``, ``weight_u``, ``weight_v``): σ = uᵀ W v with the stored vectors."""

    def __init__(self, cin: int, cout: int, k: int, bias: bool = True):
        super().__init__()
        self.weight_orig = nn.Parameter(torch.randn(cout, cin, k, k) * 0.02)
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.register_buffer("weight_u", F.normalize(torch.randn(cout), dim=0))
        self.register_buffer("weight_v", F.normalize(torch.randn(cin * k * k), dim=0))
        self.padding = k // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_orig
        sigma = torch.dot(self.weight_u, w.flatten(1) @ self.weight_v)
        return F.conv2d(x, w / sigma, self.bias, padding=self.padding)


class SPADE(nn.Module):
    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        actv = self.mlp_shared(F.interpolate(seg, size=x.shape[2:], mode="nearest"))
        return F.instance_norm(x) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin: int, fout: int, label_nc: int):
        super().__init__()
        self.learned_shortcut = fin != fout
        mid = min(fin, fout)
        self.conv_0 = SNConv2d(fin, mid, 3)
        self.conv_1 = SNConv2d(mid, fout, 3)
        self.norm_0 = SPADE(fin, label_nc)
        self.norm_1 = SPADE(mid, label_nc)
        if self.learned_shortcut:
            self.conv_s = SNConv2d(fin, fout, 1, bias=False)
            self.norm_s = SPADE(fin, label_nc)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        xs = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        return xs + self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))


class SPADEDecoder(nn.Module):
    def __init__(self, upscale: int = 2, max_features: int = 512, block_expansion: int = 64, out_channels: int = 64, num_down_blocks: int = 2):
        super().__init__()
        c = min(max_features, block_expansion * 2 ** num_down_blocks)
        self.fc = nn.Conv2d(c, 2 * c, 3, padding=1)
        for i in range(6):
            setattr(self, f"G_middle_{i}", SPADEResnetBlock(2 * c, 2 * c, c))
        self.up_0 = SPADEResnetBlock(2 * c, c, c)
        self.up_1 = SPADEResnetBlock(c, out_channels, c)
        self.conv_img = nn.Sequential(nn.Conv2d(out_channels, 3 * 4, 3, padding=1), nn.PixelShuffle(2)) if upscale > 1 \
            else nn.Conv2d(out_channels, 3, 3, padding=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """B×256×64×64 warped feature → image B×3×512×512 in [0, 1]."""
        x = self.fc(feature)
        for i in range(6):
            x = getattr(self, f"G_middle_{i}")(x, feature)
        x = self.up_0(F.interpolate(x, scale_factor=2), feature)
        x = self.up_1(F.interpolate(x, scale_factor=2), feature)
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))


# -- S: stitching ---------------------------------------------------------------------------------

class StitchingNetwork(nn.Module):
    """MLP on (source keypoints, driving keypoints) → Δ driving keypoints (63) + Δ(tx, ty)."""

    def __init__(self, input_size: int = 126, hidden_sizes: tuple[int, ...] = (128, 128, 64), output_size: int = 65):
        super().__init__()
        layers: list[nn.Module] = []
        sizes = [input_size, *hidden_sizes]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(sizes[-1], output_size))

    def forward(self, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> torch.Tensor:
        b, k = kp_source.shape[:2]
        delta = self.mlp(torch.cat([kp_source.reshape(b, -1), kp_driving.reshape(b, -1)], 1))
        out = kp_driving + delta[:, :3 * k].view(b, k, 3)
        return torch.cat([out[..., :2] + delta[:, None, 3 * k:3 * k + 2], out[..., 2:]], -1)


# -- the whole reenactor --------------------------------------------------------------------------

class LivePortrait(nn.Module):
    """F, M, W, G (+ S when given): :meth:`forward` renders the source with the driving face's
    head pose, translation and expression (absolute motion, the "all" animation region)."""

    def __init__(self, stitching: bool = True, parts: dict[str, nn.Module] | None = None):
        """``parts``: already loaded modules by attribute name (built here when absent)."""
        super().__init__()
        parts = parts or {}

        def part(name: str, cls: type[nn.Module]) -> nn.Module:
            return parts[name] if parts.get(name) is not None else cls()

        self.appearance_feature_extractor = part("appearance_feature_extractor", AppearanceFeatureExtractor)
        self.motion_extractor = part("motion_extractor", MotionExtractor)
        self.warping_module = part("warping_module", WarpingNetwork)
        self.spade_generator = part("spade_generator", SPADEDecoder)
        self.stitching = part("stitching", StitchingNetwork) if stitching else None

    def keypoints(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """B×3×256×256 in [0, 1] → canonical kp, exp (B×21×3), pitch/yaw/roll (degrees B), t (B×3), scale (B×1)."""
        m = self.motion_extractor(x)
        b = x.shape[0]
        return {"kp": m["kp"].view(b, -1, 3), "exp": m["exp"].view(b, -1, 3), "t": m["t"], "scale": m["scale"],
                **{k: bins_to_degrees(m[k]) for k in ("pitch", "yaw", "roll")}}

    @staticmethod
    def transform(kp: torch.Tensor, rot: torch.Tensor, exp: torch.Tensor, scale: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``scale · (kp R + exp) + t`` with t's z set to 0: B×K×3."""
        t = torch.cat([t[:, :2], torch.zeros_like(t[:, 2:])], 1)
        return scale[:, :, None] * (kp @ rot + exp) + t[:, None, :]

    def motion(self, source: torch.Tensor, driving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source and driven keypoints (B×21×3 each): the driving face's rotation, translation
        (z dropped) and expression rows on the source's canonical keypoints and scale, stitched."""
        b = source.shape[0]
        info = self.keypoints(torch.cat([source, driving]))
        s = {k: v[:b] for k, v in info.items()}
        d = {k: v[b:] for k, v in info.items()}
        x_s = self.transform(s["kp"], rotation_matrix(s["pitch"], s["yaw"], s["roll"]), s["exp"], s["scale"], s["t"])
        exp = s["exp"].clone()
        rows = list(EXP_ROWS)
        exp[:, rows] = d["exp"][:, rows]
        exp[:, 3:5, 1] = d["exp"][:, 3:5, 1]
        exp[:, 5, 2] = d["exp"][:, 5, 2]
        exp[:, 8, 2] = d["exp"][:, 8, 2]
        exp[:, 9, 1:] = d["exp"][:, 9, 1:]
        x_d = self.transform(s["kp"], rotation_matrix(d["pitch"], d["yaw"], d["roll"]), exp, s["scale"], d["t"])
        if self.stitching is not None:
            x_d = self.stitching(x_s, x_d)
        return x_s, x_d

    def forward(self, source: torch.Tensor, driving: torch.Tensor) -> torch.Tensor:
        """source, driving: B×3×256×256 in [0, 1] → B×3×512×512 in [0, 1]."""
        x_s, x_d = self.motion(source, driving)
        return self.spade_generator(self.warping_module(self.appearance_feature_extractor(source), x_d, x_s))
