"""Contact sheets for people to look at (numpy/OpenCV edge)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from reliableswap.images import decode_checked, read_crop, read_folder_image, save_image
from reliableswap.errors import UserError
from triplets.records import ManifestRecord, resolve_inside
from reliableswap.contracts import FaceSet
from triplets.webdataset import iter_shard


def _label(img: np.ndarray, lines: list[str]) -> np.ndarray:
    """``img`` (H×W×3 uint8) with ``lines`` of text at its top left, white on a dark translucent
    band each (an outline as thick as small letters' strokes runs them together)."""
    out = img.copy()
    scale = max(0.35, img.shape[1] / 640)
    step = int(16 * scale / 0.45)
    y = int(14 * scale / 0.45)
    for line in lines:
        (w, h), base = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        y0, y1, x1 = max(y - h - 2, 0), min(y + base, out.shape[0]), min(w + 7, out.shape[1])
        out[y0:y1, :x1] = (out[y0:y1, :x1] * 0.35).astype(out.dtype)
        cv2.putText(out, line, (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
        y += step
    return out


def draw_landmarks(img: np.ndarray, lm: np.ndarray, color=(0, 255, 0)) -> np.ndarray:
    out = img.copy()
    r = max(1, img.shape[0] // 200)
    for x, y in np.asarray(lm):
        cv2.circle(out, (int(round(x)), int(round(y))), r, color, -1, cv2.LINE_AA)
    return out


def grid(tiles: list[np.ndarray], cols: int) -> np.ndarray:
    """Tile same-size H×W×3 images row-major into one image."""
    h, w = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / cols)
    sheet = np.full((rows * h, cols * w, 3), 32, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
    return sheet


def faces_sheet(faces: FaceSet, out: Path, n: int = 16, tile: int = 192) -> Path:
    """Aligned crops with their landmarks and pose, ``n`` at most, 4 a row."""
    tiles = []
    for r in faces.faces[:n]:
        img = read_crop(faces, r)
        img = draw_landmarks(img, r.landmarks68)
        img = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        p = r.pose
        tiles.append(_label(img, [r.id[:26], f"yaw {p.yaw:.0f} pitch {p.pitch:.0f} roll {p.roll:.0f}"]))
    if not tiles:
        raise UserError("no faces to show")
    return save_image(out, grid(tiles, min(4, len(tiles))))


def _qc_label(r: ManifestRecord, d: str) -> list[str]:
    """A fake's label lines: its direction, pose error and identity figures (keep/leak by the judge
    that measured them, or dlib's margin in folders from before the judge)."""
    q = r.qc
    if f"id_margin_{d}" not in q:
        return [d]
    if f"id_keep_{d}" in q:
        return [f"{d} pose {q[f'pose_err_{d}']:.0f}", f"keep {q[f'id_keep_{d}']:.2f} leak {q[f'id_leak_{d}']:.2f}"]
    return [f"{d} id {q[f'id_margin_{d}']:+.2f} pose {q[f'pose_err_{d}']:.0f}"]


def triplets_sheet(folder: Path, out: Path, n: int = 16, tile: int = 192) -> Path:
    """One row per triplet: source, target, output_st, output_ts, with its qc figures."""
    recs = ManifestRecord.read(folder / ManifestRecord.FILE)[:n]
    if not recs:
        raise UserError("no triplets to show")
    keys = ("source", "target", "output_st", "output_ts")
    tiles = []
    shards: dict[str, dict[str, dict]] = {}  # each shard read once: key → sample
    for r in recs:
        if r.folder is None:
            if r.shard not in shards:
                shards[r.shard] = {s["__key__"]: s for s in iter_shard(resolve_inside(folder, r.shard, r.where, "shard"))}
            sample = shards[r.shard][r.key]
            imgs = [decode_checked(sample[r.files[k]]) for k in keys]
        else:
            base = resolve_inside(folder, r.folder, r.where, "folder")
            imgs = [read_folder_image(base, r.files[k], r.where, f"files.{k}") for k in keys]
        labels = [[f"{r.folder or r.key} source"], ["target"], _qc_label(r, "st"), _qc_label(r, "ts")]
        for im, lab in zip(imgs, labels):
            tiles.append(_label(cv2.resize(im, (tile, tile), interpolation=cv2.INTER_AREA), lab))
    return save_image(out, grid(tiles, 4))
