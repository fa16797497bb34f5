"""Random-weight checkpoints in the published file layouts, and the authors' reference modules
imported from a checkout (for parity tests and benchmarks; nothing of theirs is in this project).

``$RELIABLESWAP_REFERENCES`` names a folder holding the checkouts, by repository name:
``LIA`` (wyhsirius/LIA), ``face-parsing.PyTorch`` (zllrunning), ``GFPGAN`` (TencentARC),
``GPEN`` (yangxy), ``LivePortrait`` (KwaiVGI). Their imports that pull in packages irrelevant to
the architectures (torchvision, basicsr's registry, a CUDA-only ``.cuda()``, a torchvision
download of ResNet weights) are stubbed for the duration of the import.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from reliableswap.nets.weights import BACKENDS
from reliableswap.testing import stub_modules

#: the published LivePortrait model configuration (src/config/models.yaml)
LP_CONFIG = {
    "appearance_feature_extractor": dict(image_channel=3, block_expansion=64, num_down_blocks=2, max_features=512,
                                         reshape_channel=32, reshape_depth=16, num_resblocks=6),
    "motion_extractor": dict(num_kp=21, backbone="convnextv2_tiny"),
    "warping_module": dict(num_kp=21, block_expansion=64, max_features=512, num_down_blocks=2, reshape_channel=32,
                           estimate_occlusion_map=True,
                           dense_motion_params=dict(block_expansion=32, max_features=1024, num_blocks=5, reshape_depth=16, compress=4)),
    "spade_generator": dict(upscale=2, block_expansion=64, max_features=512, num_down_blocks=2),
    "stitching": dict(input_size=126, hidden_sizes=[128, 128, 64], output_size=65),
}


def reference_dir(name: str) -> Path | None:
    """The checkout of reference ``name`` under $RELIABLESWAP_REFERENCES, or None."""
    root = os.environ.get("RELIABLESWAP_REFERENCES")
    if not root or not (Path(root) / name).is_dir():
        return None
    return Path(root) / name


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """Random but well-conditioned weights in place (BatchNorm statistics positive, spectral-norm
    vectors unit length); returns the state dict."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point() or k.endswith(".kernel") or k.endswith("num_batches_tracked"):
            sd[k] = v
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("weight_u") or k.endswith("weight_v"):
            sd[k] = torch.nn.functional.normalize(torch.randn(v.shape, generator=g), dim=0)
        else:
            sd[k] = v + scale * torch.randn(v.shape, generator=g)
    model.load_state_dict(sd)
    return sd


def write_random_weights(backend: str, root: Path, seed: int = 0, safetensors: bool = False,
                         only: tuple[str, ...] | None = None) -> list[Path]:
    """``root/backend/…`` files with random weights in the published layouts: LIA ``{'gen', 'args'}``,
    GFPGAN ``{'params_ema'}``, LivePortrait's stitching ``{'retarget_shoulder': {'module.…'}}``
    (or, ``safetensors``, the flattened variants), the others plain state dicts. ``only``: the
    files whose published names start with one of these (default: all)."""
    out = []
    (root / backend).mkdir(parents=True, exist_ok=True)
    for i, wf in enumerate(BACKENDS[backend].files):
        if only is not None and not wf.name.startswith(only):
            continue
        sd = randomize(wf.build(), seed + i)
        if safetensors and wf.alt and wf.alt.endswith(".safetensors"):
            from safetensors.torch import save_file
            if isinstance(wf.entry, tuple):  # flattened stitching file
                sd = {f"{wf.entry[1]}.{k}": v for k, v in sd.items()}
            path = root / backend / wf.alt
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
            out.append(path)
            continue
        obj: dict = sd
        if backend == "lia":
            obj = {"gen": sd, "args": argparse.Namespace(size=256, latent_dim_style=512)}
        elif backend == "gfpgan":
            obj = {"params_ema": sd}
        elif isinstance(wf.entry, tuple) and wf.entry[0] == "retarget_shoulder":
            obj = {"retarget_shoulder": {f"module.{k}": v for k, v in sd.items()}}
        path = root / backend / wf.name
        torch.save(obj, path)
        out.append(path)
    return out


@contextlib.contextmanager
def _on_path(path: Path) -> Iterator[None]:
    before = set(sys.modules)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        # the checkouts use generic top-level names (model, networks, src…): forget them
        for name in set(sys.modules) - before:
            mod = sys.modules[name]
            if str(path) in str(getattr(mod, "__file__", "") or ""):
                del sys.modules[name]


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def reference_model(backend: str, checkout: Path, part: str | None = None) -> nn.Module:
    """The authors' module for ``backend`` (LivePortrait: ``part`` one of :data:`LP_CONFIG`), in
    eval mode with its own (random) initialisation."""
    if backend == "lia":
        with _on_path(checkout):
            from networks.generator import Generator  # type: ignore[import-not-found]
            model = Generator(256, 512, 20, 1)
    elif backend == "bisenet":
        tv = types.ModuleType("torchvision")
        import torch.utils.model_zoo as mz
        saved = mz.load_url
        mz.load_url = lambda *a, **k: {}  # its ResNet init downloads ImageNet weights
        try:
            with _on_path(checkout), stub_modules({"torchvision": tv}):
                from model import BiSeNet  # type: ignore[import-not-found]
                model = BiSeNet(19)
        finally:
            mz.load_url = saved
    elif backend == "gpen":
        with _on_path(checkout / "face_model"):
            from gpen_model import FullGenerator  # type: ignore[import-not-found]
            model = FullGenerator(512, 512, 8, 2, narrow=1)
    elif backend == "gfpgan":
        arch = checkout / "gfpgan" / "archs"
        reg = types.SimpleNamespace(register=lambda *a, **k: (lambda c: c))
        pkg = types.ModuleType("_ref_gfpgan_archs")
        pkg.__path__ = [str(arch)]
        stubs = {"basicsr": types.ModuleType("basicsr"), "basicsr.utils": types.ModuleType("basicsr.utils"),
                 "basicsr.archs": types.ModuleType("basicsr.archs"),
                 "basicsr.utils.registry": types.SimpleNamespace(ARCH_REGISTRY=reg),
                 "basicsr.archs.arch_util": types.SimpleNamespace(default_init_weights=lambda *a, **k: None),
                 "_ref_gfpgan_archs": pkg}
        with stub_modules(stubs):
            _load_file("_ref_gfpgan_archs.stylegan2_clean_arch", arch / "stylegan2_clean_arch.py")
            mod = _load_file("_ref_gfpgan_archs.gfpganv1_clean_arch", arch / "gfpganv1_clean_arch.py")
            model = mod.GFPGANv1Clean(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                                      fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    elif backend == "liveportrait":
        with _on_path(checkout):
            mods = {
                "appearance_feature_extractor": ("src.modules.appearance_feature_extractor", "AppearanceFeatureExtractor"),
                "motion_extractor": ("src.modules.motion_extractor", "MotionExtractor"),
                "warping_module": ("src.modules.warping_network", "WarpingNetwork"),
                "spade_generator": ("src.modules.spade_generator", "SPADEDecoder"),
                "stitching": ("src.modules.stitching_retargeting_network", "StitchingRetargetingNetwork"),
            }
            m, cls = mods[part]
            model = getattr(importlib.import_module(m), cls)(**LP_CONFIG[part])
    elif backend == "inception":  # torch-fidelity's own FID Inception (no torchvision, unlike pytorch-fid's)
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = [str(checkout / "torch_fidelity")]  # its submodules, without its __init__'s imports
        with stub_modules({"torch_fidelity": pkg}), tempfile.TemporaryDirectory() as tmp:
            mod = _load_file("torch_fidelity.feature_extractor_inceptionv3", checkout / "torch_fidelity" / "feature_extractor_inceptionv3.py")
            path = Path(tmp) / "w.pth"  # its constructor reads a weight file: its own random init
            torch.save(randomize(BACKENDS["inception"].files[0].build()), path)
            model = mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
            for name in [n for n in sys.modules if n.startswith("torch_fidelity.")]:
                del sys.modules[name]
    else:
        raise ValueError(backend)
    return model.eval()


@contextlib.contextmanager
def cuda_calls_are_noops() -> Iterator[None]:
    """LIA's decoder calls ``.cuda()`` on a grid: make it a no-op on a CPU-only machine."""
    saved = torch.Tensor.cuda
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = saved  # type: ignore[method-assign]
