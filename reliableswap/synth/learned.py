"""The learned steps of a recipe, batched on the crops' device from the user's weight files:
reenactment (``lia``, ``liveportrait``), face parsing for masks (``bisenet``) and restoration
(``gfpgan``, ``gpen``).

Every step takes and returns B×3×S×S crops in [0, 1]; each network sees its own input size and
range (resized with antialiasing, moved to [-1, 1] where it was trained so) and the result is
resized back to S. On CUDA the networks run under fp16 autocast (``amp``).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from reliableswap.faces.landmarks import DlibLandmarks
from reliableswap.images import to_uint8
from reliableswap.nets import bisenet
from reliableswap.nets.liveportrait import LivePortrait
from reliableswap.nets.weights import BACKENDS, load_module, require

#: parsing classes whose pixels stay the target's when blending (hair, hat, glasses, clothes,
#: ears, neck and whatever the parser calls background inside the face outline: hands, mics)
KEEP_TARGET = ("background", "eye_g", "l_ear", "r_ear", "ear_r", "neck", "neck_l", "cloth", "hair", "hat")
#: the face proper
FACE = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "nose", "mouth", "u_lip", "l_lip")
MAX_BATCH = 16  # images per network call: bounds memory whatever the recipe's batch


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """B×C×H×W → B×C×size×size (bilinear, antialiased when shrinking); unchanged at that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])


@functools.lru_cache(maxsize=8)
def _load(backend: str, root: str, device: str) -> dict[str, torch.nn.Module]:
    if device != "cpu":  # read and checked once, on the CPU; a copy per device
        return {k: copy.deepcopy(m).to(device) for k, m in _load(backend, root, "cpu").items()}
    paths = require(backend, Path(root))
    return {wf.name: load_module(wf, paths[wf.name]) for wf in BACKENDS[backend].files if wf.name in paths}


def load_nets(backend: str, root: Path, device: torch.device | str = "cpu") -> dict[str, torch.nn.Module]:
    """``backend``'s networks with the user's weights, loaded once per (backend, folder, device):
    a missing file raises ``MissingWeightsError``, an unusable one ``WeightsError``."""
    return _load(backend, str(root), str(torch.device(device)))


def _chunked(fn, *xs: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(*(x[i:i + MAX_BATCH] for x in xs)) for i in range(0, xs[0].shape[0], MAX_BATCH)])


def _amp(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")


class LearnedReenactor:
    """``lia`` / ``liveportrait`` as a :class:`~reliableswap.synth.reenact.Reenactor`: identity
    from ``img_id``, head pose and expression from ``img_drv`` (absolute motion, as the official
    synthesizer drives LIA). The reenacted face's 68 landmarks are measured on it with dlib
    (search box from the driving face's landmarks)."""

    def __init__(self, backend: str, root: Path, stitching: bool = True, amp: bool = True):
        self.backend, self.root, self.stitching, self.amp = backend, root, stitching, amp
        self.landmarks = DlibLandmarks()

    def _net(self, device: torch.device):
        nets = load_nets(self.backend, self.root, device)
        if self.backend == "lia":
            return nets["vox.pt"], 256
        stitch = nets.get("stitching_retargeting_module.pth") if self.stitching else None
        parts = {name.rsplit(".", 1)[0]: m for name, m in nets.items() if not name.startswith("stitching")}
        return LivePortrait(stitching=stitch is not None, parts={**parts, "stitching": stitch}), 256

    @torch.no_grad()
    def render(self, img_id: torch.Tensor, img_drv: torch.Tensor) -> torch.Tensor:
        """B×3×S×S identity and driving crops → B×3×S×S reenacted crops in [0, 1]."""
        net, size = self._net(img_id.device)
        s = img_id.shape[-1]

        def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            a, b = resize(a, size).float(), resize(b, size).float()
            with _amp(a.device, self.amp):
                out = net(a * 2 - 1, b * 2 - 1) * 0.5 + 0.5 if self.backend == "lia" else net(a, b)
            return resize(out.float().clamp(0, 1), s)

        return _chunked(run, img_id, img_drv).to(img_id.dtype)

    def __call__(self, img_id, lm_id, img_drv, lm_drv):
        out = self.render(img_id, img_drv)
        measured = self.landmarks.remeasure(to_uint8(out), lm_drv.detach().cpu().numpy())
        return out, torch.from_numpy(measured).to(lm_drv)


class FaceParser:
    """BiSeNet face parsing: crops B×3×S×S → class labels B×1×S×S (long, :data:`bisenet.CLASSES`)."""

    def __init__(self, root: Path, amp: bool = True):
        self.root, self.amp = root, amp

    @torch.no_grad()
    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        net = load_nets("bisenet", self.root, img.device)["79999_iter.pth"]
        mean = torch.tensor(bisenet.MEAN, device=img.device).view(1, 3, 1, 1)
        std = torch.tensor(bisenet.STD, device=img.device).view(1, 3, 1, 1)
        s = img.shape[-1]

        def run(x: torch.Tensor) -> torch.Tensor:
            with _amp(x.device, self.amp):
                logits = net((resize(x.float(), 512) - mean) / std)
            return F.interpolate(logits.float().argmax(1, keepdim=True).float(), size=(s, s), mode="nearest").long()

        return _chunked(run, img)


def class_mask(labels: torch.Tensor, names: tuple[str, ...], blur: float = 0.0) -> torch.Tensor:
    """B×1×S×S labels → B×1×S×S float mask of the named classes (Gaussian-softened by ``blur`` px)."""
    ids = torch.tensor([bisenet.CLASSES.index(n) for n in names], device=labels.device)
    m = torch.isin(labels, ids).float()
    if blur > 0:
        k = int(2 * round(3 * blur) + 1)
        m = gaussian_blur2d(m, (k, k), (blur, blur))
    return m


class Restorer:
    """GFPGAN v1.4 / GPEN-BFR-512 on B×3×S×S crops in [0, 1] (run at 512 px in [-1, 1]);
    ``strength`` mixes the restored face with the input (1 = fully restored)."""

    def __init__(self, backend: str, root: Path, strength: float = 1.0, amp: bool = True):
        self.backend, self.root, self.strength, self.amp = backend, root, strength, amp

    @torch.no_grad()
    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        nets = load_nets(self.backend, self.root, img.device)  # the files are checked at any strength
        if self.strength == 0:  # nothing of the restored face is kept: the network need not run
            return img
        net = next(iter(nets.values()))
        s = img.shape[-1]

        def run(x: torch.Tensor) -> torch.Tensor:
            with _amp(x.device, self.amp):
                out = net(resize(x.float(), 512) * 2 - 1)
            return resize((out.float() * 0.5 + 0.5).clamp(0, 1), s)

        restored = _chunked(run, img).to(img.dtype)
        return img + self.strength * (restored - img)
