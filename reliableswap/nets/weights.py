"""The learned models' weight files: which file each backend needs, where it lives, how it is
loaded (never unpickling arbitrary objects) and checked (keys and shapes against the architecture).

Files live in ``<weights dir>/<backend>/<file name as published>``; the weights dir is the
recipe's ``[weights] dir``, else ``$RELIABLESWAP_WEIGHTS``, else ``~/.cache/reliableswap/weights``.
"""

from __future__ import annotations

import argparse
import os
import hashlib
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from torch import nn

from reliableswap.checkpoints import CheckpointRefused, first_sentence, state_bytes, torch_load
from reliableswap.checkpoints import check_state as check_state_against
from reliableswap.faces.landmarks import FAN_URL, FAN_WEIGHTS, FanNet
from reliableswap.faces.models import MissingWeightsError, remove_stale_parts, weights_dir  # noqa: F401 (re-exported: one weights folder rule)
from reliableswap.nets import liveportrait
from reliableswap.nets.bisenet import BiSeNet
from reliableswap.nets.gfpgan import GFPGANv1Clean
from reliableswap.nets.gpen import FullGenerator
from reliableswap.nets.inception import FID_WEIGHTS, FID_WEIGHTS_URL, FIDInceptionV3
from reliableswap.nets.lia import Generator
from reliableswap.nets.protocol import Deep3DRecon, HopeNet, Sphere20
from triplets.jsonl import file_sha256
from reliableswap.errors import UserError


class WeightsError(UserError):
    """A weight file that cannot be used; ``str(err)`` is one line naming the file and the problem."""


@dataclass(frozen=True)
class WeightFile:
    """One published file. ``entry``: the top-level key holding the state dict (None: the file is
    the state dict); ``manual``: the release is a page to download from by hand (Google Drive)."""

    name: str
    url: str
    build: Callable[[], nn.Module]
    entry: str | tuple[str, ...] | None = None
    manual: bool = False
    alt: str | None = None  # accepted alternative file name (the flattened .safetensors variant)
    sha256: str | None = None  # the published file's SHA-256 (or its leading digits, as torch.hub names files) where known
    size: int | None = None  # the published file's size in bytes where known


@dataclass(frozen=True)
class Backend:
    name: str
    step: str  # reenact | masks | restore (synthesis) | eval
    what: str
    files: tuple[WeightFile, ...]
    optional: tuple[str, ...] = ()  # file names a run works without
    licence: str = ""  # the weights' terms as their publisher states them


def _lp(part: str) -> Callable[[], nn.Module]:
    return {"F": liveportrait.AppearanceFeatureExtractor, "M": liveportrait.MotionExtractor, "W": liveportrait.WarpingNetwork,
            "G": liveportrait.SPADEDecoder, "S": liveportrait.StitchingNetwork}[part]


_HF_LP = "https://huggingface.co/KwaiVGI/LivePortrait/resolve/main/liveportrait"

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("lia", "reenact", "LIA vox generator (the official ReliableSwap reenactor), 256 px", (
        WeightFile("vox.pt", "https://drive.google.com/drive/folders/1N4QcnqUQwKUZivFV-YeBuPyH4pGJHooc", lambda: Generator(256), entry="gen", manual=True),),
        licence="MIT (wyhsirius/LIA); trained on VoxCeleb"),
    Backend("liveportrait", "reenact", "LivePortrait human model: F, M, W, G and the stitching MLP, 256 → 512 px", (
        WeightFile("appearance_feature_extractor.pth", f"{_HF_LP}/base_models/appearance_feature_extractor.pth", _lp("F"),
                   alt="appearance_feature_extractor.safetensors"),
        WeightFile("motion_extractor.pth", f"{_HF_LP}/base_models/motion_extractor.pth", _lp("M"), alt="motion_extractor.safetensors"),
        WeightFile("warping_module.pth", f"{_HF_LP}/base_models/warping_module.pth", _lp("W"), alt="warping_module.safetensors"),
        WeightFile("spade_generator.pth", f"{_HF_LP}/base_models/spade_generator.pth", _lp("G"), alt="spade_generator.safetensors"),
        WeightFile("stitching_retargeting_module.pth", f"{_HF_LP}/retargeting_models/stitching_retargeting_module.pth", _lp("S"),
                   entry=("retarget_shoulder", "retarget_shoulder_module"), alt="stitching_retargeting_module.safetensors"),
    ), optional=("stitching_retargeting_module.pth",), licence="MIT (KwaiVGI/LivePortrait model card)"),
    Backend("bisenet", "masks", "face-parsing.PyTorch BiSeNet, 19 CelebAMask-HQ classes, 512 px", (
        WeightFile("79999_iter.pth", "https://drive.google.com/open?id=154JgKpzCPW82qINcVieuPH3fZ2e0P812", lambda: BiSeNet(19), manual=True),),
        licence="no licence file (zllrunning/face-parsing.PyTorch); trained on CelebAMask-HQ, non-commercial research only"),
    Backend("gfpgan", "restore", "GFPGAN v1.4 (clean architecture), 512 px", (
        WeightFile("GFPGANv1.4.pth", "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth", GFPGANv1Clean,
                   entry=("params_ema", "params"), alt="GFPGANv1.3.pth"),),
        licence="Apache-2.0 (TencentARC/GFPGAN; its StyleGAN2 ops under NVIDIA's licence)"),
    Backend("gpen", "restore", "GPEN BFR-512", (
        WeightFile("GPEN-BFR-512.pth", "https://public-vigen-video.oss-cn-shanghai.aliyuncs.com/robin/models/GPEN-BFR-512.pth", lambda: FullGenerator(512)),),
        licence="© Alibaba 2021, academic and non-commercial use only (yangxy/GPEN)"),
    Backend("inception", "eval", "FID's Inception-v3 (the 2015 TensorFlow graph, pytorch-fid's conversion): pool3, 2048-D", (
        WeightFile(FID_WEIGHTS, FID_WEIGHTS_URL, FIDInceptionV3, sha256=FID_WEIGHTS.rsplit("-", 1)[1].removesuffix(".pth")),),
        licence="Apache-2.0 (mseitzer/pytorch-fid)"),
    Backend("cosface", "eval", "CosFace sphere20 on VGGFace2 (the identity network of ReliableSwap's FF++ evaluation; no stable download address is published), 112×96, 512-D", (
        WeightFile("net_sphere20_data_vggface2_acc_9955.pth", "https://github.com/MuggleWang/CosFace_pytorch", Sphere20, manual=True),),
        licence="no licence file (MuggleWang/CosFace_pytorch); trained on VGGFace2 (non-commercial research)"),
    Backend("hopenet", "eval", "HopeNet ResNet-50, 66 bins each for yaw, pitch and roll (deep-head-pose, 300W-LP, alpha 1, robust)", (
        WeightFile("hopenet_robust_alpha1.pkl", "https://drive.google.com/open?id=1m25PrSE7g9D2q2XJVMR6IA7RaCvWSzCR", HopeNet, manual=True),),
        licence="Apache-2.0 (natanielruiz/deep-head-pose); trained on 300W-LP"),
    Backend("deep3d", "eval", "Deep3DFaceRecon ResNet-50 coefficient regressor (257: 80 id, 64 expression, …), 224 px", (
        WeightFile("epoch_20.pth", "https://drive.google.com/drive/folders/1liaIxn9smpudjjqMaWWRpP0mXRW_qRPP", Deep3DRecon,
                   entry="net_recon", manual=True),),
        licence="MIT (sicxu/Deep3DFaceRecon_pytorch); trained on its own face collection; the BFM is not needed for expression"),
    Backend("fan", "landmarks", "FAN 2D (face-alignment's 2DFAN-4), 68 points: prep --landmarks fan", (
        WeightFile(FAN_WEIGHTS, FAN_URL, FanNet, sha256=FAN_WEIGHTS.split("-")[1].split(".")[0]),),
        licence="BSD-3-Clause (1adrianb/face-alignment)"),
)}


def file_path(backend: str, wf: WeightFile, root: Path) -> Path:
    """Where ``wf`` is: the published name, else its accepted alternative when only that exists."""
    p = root / backend / wf.name
    if not p.exists() and wf.alt and (root / backend / wf.alt).exists():
        return root / backend / wf.alt
    return p


def require(backend: str, root: Path, step: str | None = None) -> dict[str, Path]:
    """Paths of ``backend``'s files, or :class:`MissingWeightsError` naming the missing file and the
    command that gets it (called at start-up, before any work)."""
    b = BACKENDS[backend]
    out = {}
    for wf in b.files:
        p = file_path(backend, wf, root)
        if p.is_file():
            out[wf.name] = p
        elif wf.name not in b.optional:
            where = f"[{step}] backend {backend!r}" if step else f"backend {backend!r}"
            raise MissingWeightsError(f"{where} needs {p} (missing): get it with `reliableswap weights fetch {backend} --to {root}`"
                                      + (f" (a manual download from {wf.url})" if wf.manual else ""))
    return out


#: objects a published checkpoint may hold besides tensors and containers (LIA's training args)
SAFE_GLOBALS = [argparse.Namespace]


def read_checkpoint(path: Path, expected_bytes: int | None = None) -> dict:
    """The file's top-level mapping, read without running pickled code: ``.safetensors`` through
    safetensors, anything else through ``torch.load(weights_only=True)`` with :data:`SAFE_GLOBALS`."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch_load(path, expected_bytes)
    except CheckpointRefused as e:
        raise WeightsError(str(e)) from None
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise WeightsError(f"{path}: not a readable checkpoint ({first_sentence(e)})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, expected a state dict")
    return obj


def state_dict_of(obj: dict, entry: str | tuple[str, ...] | None, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: the ``entry`` (nested or flattened as ``entry.key``),
    DataParallel's ``module.`` prefixes removed."""
    if entry is not None:
        entries = (entry,) if isinstance(entry, str) else entry
        for e in entries:
            if isinstance(obj.get(e), dict):
                obj = obj[e]
                break
            flat = {k[len(e) + 1:]: v for k, v in obj.items() if k.startswith(e + ".")}
            if flat:
                obj = flat
                break
        else:
            raise WeightsError(f"{path}: no {' / '.join(repr(e) for e in entries)} entry (top-level keys: {', '.join(list(map(str, obj))[:6])})")
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: key {str(k)[:80]!r} holds a {type(v).__name__}, not a tensor")
        sd[k.removeprefix("module.")] = v
    return sd


def check_state(sd: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """:class:`WeightsError` on the first missing, unexpected or wrongly shaped key."""
    check_state_against(sd, model, path, WeightsError)


def checked_state(wf: WeightFile, path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, read safely and checked against ``model`` (:class:`WeightsError`)."""
    sd = state_dict_of(read_checkpoint(path, 4 * state_bytes(model)), wf.entry, path)
    check_state(sd, model, path)
    return sd


def load_module(wf: WeightFile, path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The architecture of ``wf`` with the file's weights, in eval mode on ``device``."""
    model = wf.build()
    want = model.state_dict()
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in checked_state(wf, path, model).items()})
    return model.eval().requires_grad_(False).to(device)


def published_differs(wf: WeightFile, path: Path) -> str | None:
    """Why the file at ``path`` is not ``wf``'s published file, where its size or SHA-256 is pinned
    (None: it is, or nothing is pinned)."""
    if wf.sha256 is None and wf.size is None:
        return None
    return verify_file(wf, path.stat().st_size, file_sha256(path))


def check_backend(backend: str, root: Path) -> list[tuple[str, str, str]]:
    """``(file, status, detail)`` per file of ``backend``: ok / missing / bad."""
    b = BACKENDS[backend]
    rows = []
    for wf in b.files:
        p = file_path(backend, wf, root)
        if not p.is_file():
            rows.append((str(p), "missing" if wf.name not in b.optional else "missing (optional)", wf.url))
            continue
        try:
            with torch.device("meta"):  # shapes only: nothing allocated
                model = wf.build()
            sd = checked_state(wf, p, model)
            n = sum(t.numel() for t in sd.values())
            why = published_differs(wf, p)
            rows.append((str(p), "ok" if why is None else "ok, not published",
                         f"{p.stat().st_size / 2**20:.1f} MiB, {len(sd)} tensors, {n / 1e6:.1f} M values"
                         + ("" if why is None else f"; not the published file ({why}): figures made with it are not comparable")))
        except WeightsError as e:
            rows.append((str(p), "bad", str(e).removeprefix(f"{p}: ")))
    return rows


def _copy_with_bar(r, out, name: str, show: bool) -> tuple[int, str, int | None]:
    """Copy the response ``r`` into ``out`` in 1 MiB blocks, with a rich progress bar when ``show``.
    Returns ``(bytes copied, their SHA-256, the Content-Length the server announced or None)``."""
    total = int(r.headers.get("Content-Length") or 0) or None
    digest, n = hashlib.sha256(), 0
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  disable=not show) as bar:
        task = bar.add_task(name, total=total)
        while block := r.read(1 << 20):
            out.write(block)
            digest.update(block)
            n += len(block)
            bar.advance(task, len(block))
    return n, digest.hexdigest(), total


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never from https to anything else (a download must stay encrypted)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if req.full_url.startswith("https:") and not newurl.startswith("https:"):
            raise urllib.error.URLError(f"refused a redirect from https to {newurl.split(':')[0]} ({newurl[:120]})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(url: str, timeout: float = 60):
    """``urlopen`` that refuses an https→http redirect."""
    return urllib.request.build_opener(_NoDowngrade).open(url, timeout=timeout)


def verify_file(wf: WeightFile, size: int, sha256: str) -> str | None:
    """Why a file of ``size`` bytes and ``sha256`` is not ``wf``'s published file (None: it is, as far
    as ``wf`` pins it)."""
    if wf.size is not None and size != wf.size:
        return f"{size} bytes, the published file has {wf.size}"
    if wf.sha256 is not None and not sha256.startswith(wf.sha256):
        return f"SHA-256 {sha256[:16]}…, the published file's is {wf.sha256[:16]}…"
    return None


def fetch(backend: str, root: Path, progress: Callable[[str], None] = print, bar: bool = False) -> list[Path]:
    """Download ``backend``'s files from their public release addresses into ``root/backend``.

    Each download goes to a temp name, is checked (the length the server announced, and the pinned
    size and SHA-256 where the published file's are known), then renamed; a short or different file
    is deleted, never kept. ``.part`` temps that a killed fetch left are removed first. Redirects
    from https to http are refused. Files published on Google Drive pages cannot be fetched without
    a browser: for those, raise naming the page and the path to put the file at."""
    dest = root / backend
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(dest)
    got = []
    for wf in BACKENDS[backend].files:
        p = file_path(backend, wf, root)
        if p.is_file():
            progress(f"{p}: already there")
            got.append(p)
            continue
        if wf.manual:
            raise MissingWeightsError(f"{wf.name} is published on a Google Drive page: download it from {wf.url} and save it as {dest / wf.name}")
        progress(f"{wf.url} → {dest / wf.name}")
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{wf.name}.{os.getpid()}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, open_url(wf.url) as r:
                n, sha, announced = _copy_with_bar(r, out, wf.name, bar)
            if announced is not None and n != announced:
                raise MissingWeightsError(f"{wf.url}: the download ended after {n} of {announced} bytes (nothing kept): try again")
            why = verify_file(wf, n, sha)
            if why is not None:
                raise MissingWeightsError(f"{wf.url}: the download is not the published file ({why}; nothing kept)")
            os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the temp file, not the weights
            os.replace(tmp, dest / wf.name)
        except OSError as e:
            raise MissingWeightsError(f"cannot download {wf.url} ({getattr(e, 'reason', None) or e}): download it by hand and save it as {dest / wf.name}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        got.append(dest / wf.name)
    return got
