"""Bounded image decoding for files read from data folders (stdlib, numpy and Pillow only).

A file's header says how large the decoded image will be; every image read from a contract folder
is checked against it before a single pixel is decoded: only formats whose header size is the size
that gets decoded are accepted (no ICO/ICNS directories pointing at an embedded image of another
size), and the size must be the one the record says (a crop) or within a bound (a triplet image).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError
from triplets.errors import UserError

#: Formats whose header size is what Pillow decodes (first frame/page only).
DECODABLE = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
#: Longest side of an image read from a triplet folder (records allow crops up to 4096 px).
MAX_SIDE = 4096
#: Largest image file read from a contract folder (a 4096² PNG of noise is about 50 MB).
MAX_IMAGE_BYTES = 96 << 20


class ImageRefused(UserError):
    """An image that is not decoded; ``str(err)`` is one line."""


def open_header(data: bytes) -> Image.Image:
    """A Pillow image over ``data`` with only its header read: refused unless its format is one
    of :data:`DECODABLE` and the size the decoder will produce is the header's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=DECODABLE)
    except UnidentifiedImageError:
        raise ImageRefused(f"is not an image of a supported format ({', '.join(DECODABLE)})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRefused(f"has a corrupt image header ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    check_tiles(img)
    return img


def check_tiles(img: Image.Image) -> None:
    """Refuse an opened (not yet decoded) image whose tiles reach outside its header's size."""
    w, h = img.size
    for t in getattr(img, "tile", None) or []:
        box = t[1] if len(t) > 1 else None
        if box is not None and (box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h):
            raise ImageRefused(f"has image tiles reaching outside its {w}x{h} px header")


def header_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` the decoder will produce for ``data`` (nothing is decoded)."""
    with open_header(data) as img:
        return img.size


def check_size(data: bytes, expect: tuple[int, int] | None = None, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """``(width, height)`` of ``data``, refused unless it is ``expect`` (when given) and no side
    exceeds ``max_side``."""
    return _within(header_size(data), expect, max_side)


def _within(size: tuple[int, int], expect: tuple[int, int] | None, max_side: int) -> tuple[int, int]:
    w, h = size
    if expect is not None and (w, h) != tuple(expect):
        raise ImageRefused(f"is {w}x{h} px, its record says {expect[0]}x{expect[1]}")
    if max(w, h) > max_side:
        raise ImageRefused(f"is {w}x{h} px, more than {max_side} px a side")
    return w, h


def decode_rgb(data: bytes, expect: tuple[int, int] | None = None, max_side: int = MAX_SIDE) -> np.ndarray:
    """Decode ``data`` to H×W×3 uint8 RGB after :func:`check_size` (Pillow)."""
    img = open_header(data)
    _within(img.size, expect, max_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRefused(f"is a corrupt image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if rgb.shape[:2] != (img.size[1], img.size[0]):
        raise ImageRefused("decodes to another size than its header's")
    return rgb
