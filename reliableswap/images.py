"""Robust image and video reading, image encoding, tensor conversion.

This is the numpy/OpenCV edge of the project: everything past it works on tensors.
Every failure to read an input raises :class:`InputError` whose message is a one-line reason
suitable for ``rejects.jsonl``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from triplets.imaging import DECODABLE, MAX_IMAGE_BYTES, MAX_SIDE, ImageRefused, check_size, check_tiles
from triplets.jsonl import atomic_write_bytes
from triplets.records import read_inside
from reliableswap.contracts import FaceRecord, FaceSet
from reliableswap.errors import UserError

try:  # nvJPEG through torchvision, for CUDA tensors (optional: no CPU torchvision wheel exists here)
    from torchvision.io import encode_jpeg as _tv_encode_jpeg
except Exception:  # noqa: BLE001 — any import failure means "not available"
    _tv_encode_jpeg = None

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}

#: Smallest image side we try to find a face in.
MIN_IMAGE_SIDE = 32
#: JPEGs are decoded at a reduced DCT scale while the long side stays at least this big.
DECODE_MIN_SIDE = 2048

#: Largest image (width × height, read from the header before any decode) ``prep`` accepts by
#: default: 8000×8000 photos pass; a 17000×17000 PNG bomb of 0.9 MB does not (``--max-pixels``).
MAX_PIXELS = 64_000_000
# Our own check (read_image's max_pixels) runs first, with the user's limit; PIL's stays a backstop.
Image.MAX_IMAGE_PIXELS = None


class InputError(UserError):
    """An input that cannot be used. ``str(err)`` is a one-line reason."""


def _sniff(path: Path) -> str:
    head = path.open("rb").read(64).lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<svg")):
        return "not an image: file contains HTML/XML text"
    if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "not an image: file contains plain text"
    return "not an image: unknown or unsupported format"


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale integer/float arrays of any bit depth to uint8."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return np.clip(arr.astype(np.float32) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    a = arr.astype(np.float32)
    hi = 1.0 if a.max(initial=0) <= 1.0 else float(a.max())
    return np.clip(a * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode → H×W×3 uint8 RGB. Alpha is dropped (transparent pixels keep their colour)."""
    mode = img.mode
    if mode in ("RGB",):
        return np.asarray(img)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "CMYK":
        return np.asarray(img.convert("RGB"))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return np.asarray(img.convert("RGBA"))[..., :3].copy()
    return np.asarray(img.convert("RGB"))


def read_image(path: str | os.PathLike, *, min_side: int = DECODE_MIN_SIDE, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, float]:
    """Read an image file as upright RGB.

    Handles EXIF orientation, CMYK, grayscale, palette, alpha, 16-bit and float TIFF/PNG.
    Large JPEGs are decoded at a reduced DCT scale (long side stays >= ``min_side``).

    Returns:
        ``(rgb, scale)``: ``rgb`` H×W×3 uint8, and ``scale`` = original pixels per decoded pixel
        (1.0 unless the JPEG was decoded reduced), so original coordinates are ``xy * scale``.

    Raises:
        InputError: with a one-line reason (empty, not an image, corrupt/truncated, too small).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror})") from None
    if size == 0:
        raise InputError("empty file (0 bytes)")
    try:
        img = Image.open(path, formats=DECODABLE)  # formats whose header size is the decoded size
    except UnidentifiedImageError:
        raise InputError(_sniff(path)) from None
    except Image.DecompressionBombError as e:
        raise InputError(f"image too large to decode safely ({e})") from None
    except OSError as e:
        raise InputError(f"cannot open image ({e})") from None
    with img:
        w0, h0 = img.size  # from the header: nothing is decoded yet
        try:
            check_tiles(img)
        except ImageRefused as e:
            raise InputError(f"image {e}") from None
        if w0 * h0 > max_pixels:
            raise InputError(f"image too large ({w0}x{h0} px = {w0 * h0 / 1e6:.0f} MP > --max-pixels {max_pixels / 1e6:.0f} MP)")
        if min(w0, h0) < MIN_IMAGE_SIDE:
            raise InputError(f"image too small ({w0}x{h0} px, need >= {MIN_IMAGE_SIDE} px a side)")
        if img.format == "JPEG" and max(w0, h0) >= 2 * min_side:
            k = 1
            while max(w0, h0) // (k * 2) >= min_side and k < 8:
                k *= 2
            if k > 1:
                img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else "RGB", (w0 // k, h0 // k))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
        except Image.DecompressionBombError as e:
            raise InputError(f"image too large to decode safely ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"corrupt image: {msg}") from None
        scale = w0 / img.size[0]
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # broken EXIF block: keep the stored orientation
            pass
        rgb = _pil_to_rgb(img)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(f"unsupported pixel layout {rgb.shape}")
    return np.ascontiguousarray(rgb), float(scale)


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def open_video(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, limit: str = "--max-pixels") -> cv2.VideoCapture:
    """An opened capture of ``path`` whose frames (from its header) are at most ``max_pixels``;
    else :class:`InputError` (``limit``: how the message names the bound). The caller releases it."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise InputError("cannot open video (unsupported codec or not a video)")
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if w * h > max_pixels:
        cap.release()
        raise InputError(f"video frames too large ({w}x{h} px > {limit} {max_pixels / 1e6:.0f} MP)")
    return cap


def iter_video_frames(path: str | os.PathLike, every: int = 1, max_pixels: int = MAX_PIXELS) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame_index, rgb)`` for every ``every``-th frame, in order, decoding sequentially.

    Raises:
        InputError: the file cannot be opened as a video, its frames are larger than ``max_pixels``,
            or it holds no frame.
    """
    if every < 1:
        raise UserError("every must be >= 1")
    cap = open_video(path, max_pixels)
    try:
        idx, got_any = 0, False
        while True:
            if not cap.grab():
                break
            got_any = True
            if idx % every == 0:
                ok, bgr = cap.retrieve()
                if ok and bgr is not None:
                    yield idx, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            idx += 1
        if not got_any:
            raise InputError("video holds no decodable frame")
    finally:
        cap.release()


def encode_image(rgb: np.ndarray, ext: str = ".png", quality: int = 95) -> bytes:
    """Encode H×W×3 uint8 RGB (or H×W gray) to bytes with OpenCV (``.png``, ``.jpg``, ``.webp``)."""
    ext = ext.lower()
    arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    params: list[int] = []
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif ext == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    ok, buf = cv2.imencode(ext, arr, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {ext}")
    return buf.tobytes()


def gpu_jpeg_available(device: torch.device | str) -> bool:
    """Whether :func:`encode_jpegs` encodes on this device (CUDA with torchvision's nvJPEG)."""
    return _tv_encode_jpeg is not None and torch.device(device).type == "cuda"


def encode_jpegs(images: torch.Tensor, quality: int = 95) -> list[bytes]:
    """B×3×H×W uint8 RGB → JPEG bytes each: batched nvJPEG for CUDA tensors when torchvision is
    there (:func:`gpu_jpeg_available`), else OpenCV per image."""
    if gpu_jpeg_available(images.device):
        return [t.cpu().numpy().tobytes() for t in _tv_encode_jpeg(list(images.contiguous()), quality=int(quality))]
    return [encode_image(im, ".jpg", quality) for im in images.permute(0, 2, 3, 1).cpu().numpy()]


def save_image(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> Path:
    """Encode and write an RGB uint8 image atomically (format from the suffix)."""
    path = Path(path)
    return atomic_write_bytes(path, encode_image(rgb, path.suffix, quality))


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Fast read of a file this project wrote (no EXIF/mode handling): H×W×3 uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_checked(data: bytes, expect: tuple[int, int] | None = None, max_side: int = MAX_SIDE, name: str = "image") -> np.ndarray:
    """Decode image bytes read from a data folder: H×W×3 uint8 RGB, refused (:class:`InputError`)
    unless the header's size is ``expect`` (a crop: its record's size) or within ``max_side``,
    checked before any pixel is decoded."""
    try:
        w, h = check_size(data, expect, max_side)
    except ImageRefused as e:
        raise InputError(f"{name} {e}") from None
    rgb = decode_rgb(data)
    if rgb.shape[:2] != (h, w):
        raise InputError(f"{name} decodes to {rgb.shape[1]}x{rgb.shape[0]} px, its header says {w}x{h}")
    return rgb


def read_crop(faces: FaceSet, face: FaceRecord) -> np.ndarray:
    """The crop of ``face`` (H×W×3 uint8 RGB): opened once inside the prep folder (a link swapped in
    after the check is refused), bounded in bytes, and the size its record says."""
    data = read_inside(faces.folder, face.image, face.where, "image", MAX_IMAGE_BYTES)
    try:
        return decode_checked(data, (face.size, face.size), name=face.image)
    except InputError as e:
        raise InputError(f"{face.where}: image: {e}") from None


def read_folder_image(base: str | os.PathLike, rel: str, where: str, field: str, max_side: int = MAX_SIDE) -> np.ndarray:
    """An image a record names inside ``base`` (a triplet's file): opened once inside it, bounded in
    bytes and in pixels (at most ``max_side`` a side)."""
    data = read_inside(base, rel, where, field, MAX_IMAGE_BYTES)
    try:
        return decode_checked(data, None, max_side, name=rel)
    except InputError as e:
        raise InputError(f"{where}: {field}: {e}") from None


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes this project wrote (a shard member): H×W×3 uint8 RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError("cannot decode image bytes")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_tensor(rgb: np.ndarray | list[np.ndarray], device: torch.device | str | None = None, pin: bool = False) -> torch.Tensor:
    """H×W×3 uint8 (or a list of same-size ones) → B×3×H×W float32 in [0, 1] on ``device``
    (``pin``: through pinned memory, the copy to a GPU overlapping the host's work)."""
    arr = np.stack(rgb) if isinstance(rgb, list) else rgb[None]
    t = torch.from_numpy(np.require(arr, requirements=["C", "W"]))
    if pin:
        t = t.pin_memory()
    t = t.to(device=device, non_blocking=pin)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8_tensor(images: torch.Tensor) -> torch.Tensor:
    """B×3×H×W float in [0, 1] → B×3×H×W uint8 on the same device (rounded)."""
    return images.detach().clamp(0, 1).mul(255.0).add_(0.5).to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B×3×H×W float in [0, 1] → B×H×W×3 uint8 (on the CPU)."""
    return to_uint8_tensor(images).permute(0, 2, 3, 1).cpu().numpy()
