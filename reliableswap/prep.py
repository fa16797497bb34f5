"""The ``prep`` pipeline: photos, folders and videos → aligned faces + ``faces.jsonl``.

Work is split into *units* (one image file, or one video file). Each unit's crops are written
atomically, then a small per-unit record under ``.prep/records/``; a re-run skips units whose
record exists, so a run killed at any point resumes and ends with the same files as an
uninterrupted one. ``faces.jsonl``, ``rejects.jsonl`` and ``summary.json`` are rebuilt from the
records at the end of every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from reliableswap import __version__
from reliableswap.io import (
    InputError,
    atomic_write_json,
    atomic_write_jsonl,
    is_image,
    is_video,
    iter_video_frames,
    pin_run_settings,
    read_image,
    reason_key,
    save_image,
    to_tensor,
    to_uint8,
)
from triplets.jsonl import read_jsonl
from triplets.schema import FACES_SCHEMA, REJECTS_SCHEMA, SUMMARY_SCHEMA


@dataclass(frozen=True)
class PrepConfig:
    """Every setting that changes what ``prep`` writes (stored in ``.prep/config.json``)."""

    size: int = 256
    align: str = "ffhq"
    landmarks: str = "dlib"
    detector: str = "hog"
    every: int = 1
    largest: bool = False
    min_face: int = 40
    embed: bool = False
    identity_from_folder: bool = False
    ext: str = ".png"
    device: str = "cpu"


@dataclass
class Unit:
    """One input file; ``key`` is stable across runs and names its record."""

    path: Path
    display: str
    key: str
    kind: str  # image | video


@dataclass
class UnitResult:
    key: str
    faces: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    frames: int = 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "input"


def discover(inputs: Iterable[str | os.PathLike]) -> tuple[list[Unit], list[dict], int]:
    """Expand files and folders (recursively) into units.

    Files named explicitly are always tried, whatever their suffix; inside folders only image and
    video suffixes are taken and other files are counted as ignored.

    Returns:
        ``(units, rejects, ignored)``: rejects for inputs that do not exist.
    """
    units: list[Unit] = []
    rejects: list[dict] = []
    ignored = 0
    seen: set[Path] = set()

    def add(p: Path) -> None:
        rp = p.resolve()
        if rp in seen:
            return
        seen.add(rp)
        digest = hashlib.sha1(str(rp).encode()).hexdigest()[:8]
        units.append(Unit(rp, str(p), f"{_slug(p.stem)}-{digest}", "video" if is_video(p) else "image"))

    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for q in sorted(p.rglob("*")):
                if q.is_file() and not q.name.startswith("."):
                    if is_image(q) or is_video(q):
                        add(q)
                    else:
                        ignored += 1
        elif p.is_file():
            add(p)
        else:
            rejects.append({"schema": REJECTS_SCHEMA, "input": str(p), "frame": None, "reason": "no such file or folder"})
    return units, rejects, ignored


class FaceProcessor:
    """Detect → landmarks → align → pose/quality (→ embed) for one RGB image. Holds the models."""

    def __init__(self, cfg: PrepConfig):
        from reliableswap.faces.detect import DlibDetector
        from reliableswap.faces.landmarks import make_landmarker

        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.detector = DlibDetector(cfg.detector)
        self.landmarker = make_landmarker(cfg.landmarks, self.device)
        self.embedder = None
        if cfg.embed:
            from reliableswap.faces.embed import DlibEmbedder

            self.embedder = DlibEmbedder()

    def __call__(self, rgb: np.ndarray, scale: float, timings: Counter) -> tuple[list[dict], list[np.ndarray], str | None]:
        """Returns ``(records, crops, reason)``; ``reason`` is set when no face is kept."""
        from kornia.filters import laplacian

        import cv2

        from reliableswap.faces.align import affine_scale, align_transform, invert_affine, transform_points, warp_faces
        from reliableswap.faces.pose import head_pose

        cfg = self.cfg
        t = time.perf_counter()
        boxes, scores = self.detector(rgb)
        timings["detect"] += time.perf_counter() - t
        if len(boxes) == 0:
            return [], [], "no face found"
        widths = (boxes[:, 2] - boxes[:, 0]) * scale
        keep = widths >= cfg.min_face
        if not keep.any():
            return [], [], f"face too small ({widths.max():.0f} px < --min-face {cfg.min_face} px)"
        boxes, scores, widths = boxes[keep], scores[keep], widths[keep]
        if cfg.largest:
            boxes, scores, widths = boxes[:1], scores[:1], widths[:1]

        t = time.perf_counter()
        lm = self.landmarker(rgb, boxes)
        timings["landmarks"] += time.perf_counter() - t

        t = time.perf_counter()
        lm_t = torch.from_numpy(lm).to(self.device, torch.float64)
        m = align_transform(lm_t, cfg.size, cfg.align)
        # Convert only the region the crops cover (big photos, small faces), shifting the matrices.
        x0, y0, x1, y1 = crop_region(m, cfg.size, rgb.shape[1], rgb.shape[0])
        roi = rgb[y0:y1, x0:x1]
        # roi pixel → image pixel: x + x0 (then, if shrunk by f, small → roi: (x + 0.5) / f − 0.5)
        pre = torch.tensor([[1, 0, x0], [0, 1, y0], [0, 0, 1]], dtype=m.dtype, device=m.device)
        f = min(1.0, 1.5 * float(affine_scale(m).max()))
        if f < 0.9:  # shrink once with INTER_AREA here, at the numpy edge (cheaper than in torch)
            roi = cv2.resize(roi, (max(1, round(roi.shape[1] * f)), max(1, round(roi.shape[0] * f))), interpolation=cv2.INTER_AREA)
            fx, fy = (x1 - x0) / roi.shape[1], (y1 - y0) / roi.shape[0]
            pre = pre @ torch.tensor([[fx, 0, 0.5 * fx - 0.5], [0, fy, 0.5 * fy - 0.5], [0, 0, 1]], dtype=m.dtype, device=m.device)
        img = to_tensor(roi, self.device)
        crops_t = warp_faces(img, (m @ pre).float(), cfg.size)
        lm_crop = transform_points(lm_t, m)
        pose = head_pose(lm_t)
        sharp = laplacian(crops_t.mean(1, keepdim=True), 3).flatten(1).var(1) * 1e3
        # crop → original-file pixels (the decoded image may be reduced by `scale`)
        inv = invert_affine(m)
        inv = inv * torch.tensor([[scale], [scale]], dtype=inv.dtype, device=inv.device)
        crops = list(to_uint8(crops_t))
        timings["align"] += time.perf_counter() - t

        emb = None
        if self.embedder is not None:
            t = time.perf_counter()
            emb = self.embedder(rgb, lm)
            timings["embed"] += time.perf_counter() - t

        recs = []
        for i in range(len(boxes)):
            r = {
                "bbox": [round(float(v) * scale, 1) for v in boxes[i]],
                "landmarks68": np.round(lm_crop[i].cpu().numpy(), 2).tolist(),
                "landmarks68_origin": np.round(lm[i] * scale, 2).tolist(),
                "pose": dict(zip(("yaw", "pitch", "roll"), (round(float(v), 2) for v in pose[i]))),
                "inverse": np.round(inv[i].cpu().numpy(), 6).tolist(),
                "quality": {
                    "det_score": round(float(scores[i]), 4),
                    "face_px": round(float(widths[i]), 1),
                    "sharpness": round(float(sharp[i]), 4),
                },
            }
            if emb is not None:
                r["embedding"] = np.round(emb[i], 5).tolist()
            recs.append(r)
        return recs, crops, None


def crop_region(m: torch.Tensor, size: int, width: int, height: int, margin: int = 2) -> tuple[int, int, int, int]:
    """Integer box ``(x0, y0, x1, y1)`` of the image covering every crop of B×2×3 image→crop ``m``."""
    from reliableswap.faces.align import invert_affine, transform_points

    corners = torch.tensor([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=m.dtype, device=m.device)
    pts = transform_points(corners.expand(m.shape[0], -1, -1), invert_affine(m)).reshape(-1, 2)
    lo = (pts.min(0).values.floor() - margin).clamp_min(0)
    hi = pts.max(0).values.ceil() + margin + 1
    return int(lo[0]), int(lo[1]), int(min(hi[0], width)), int(min(hi[1], height))


_WORKER: dict = {}


def _init_worker(cfg: PrepConfig, single_thread: bool = True) -> None:
    """Load the models for this process; a pool worker also keeps torch/OpenCV to one thread."""
    if single_thread:
        import cv2

        torch.set_num_threads(1)
        cv2.setNumThreads(1)
    _WORKER["proc"] = FaceProcessor(cfg)


def _record_path(out: Path, key: str) -> Path:
    return out / ".prep" / "records" / f"{key}.json"


def process_unit(unit: Unit, out: Path, proc: FaceProcessor | None = None) -> UnitResult:
    """Process one unit and write its crops and record (both atomically). Never raises for bad input."""
    proc = proc or _WORKER["proc"]
    cfg = proc.cfg
    res = UnitResult(unit.key)
    timings: Counter = Counter()
    identity = unit.path.parent.name if cfg.identity_from_folder else None

    def handle(rgb: np.ndarray, scale: float, frame: int | None) -> None:
        recs, crops, reason = proc(rgb, scale, timings)
        if reason:
            res.rejects.append({"schema": REJECTS_SCHEMA, "input": unit.display, "frame": frame, "reason": reason})
            return
        t = time.perf_counter()
        for k, (r, crop) in enumerate(zip(recs, crops)):
            fid = unit.key + (f"_f{frame:06d}" if frame is not None else "") + f"_{k}"
            rel = f"faces/{fid}{cfg.ext}"
            save_image(out / rel, crop)
            res.faces.append({
                "schema": FACES_SCHEMA, "id": fid, "image": rel,
                "origin": {"path": unit.display, "frame": frame, "face_index": k,
                           "size": [int(round(rgb.shape[1] * scale)), int(round(rgb.shape[0] * scale))]},
                "align": cfg.align, "size": cfg.size, "identity": identity, **r,
            })
        timings["write"] += time.perf_counter() - t

    try:
        if unit.kind == "video":
            t = time.perf_counter()
            frames = iter_video_frames(unit.path, cfg.every)
            while True:
                try:
                    idx, rgb = next(frames)
                except StopIteration:
                    break
                timings["decode"] += time.perf_counter() - t
                res.frames += 1
                handle(rgb, 1.0, idx)
                t = time.perf_counter()
        else:
            t = time.perf_counter()
            rgb, scale = read_image(unit.path)
            timings["decode"] += time.perf_counter() - t
            res.frames = 1
            handle(rgb, scale, None)
    except InputError as e:
        res.rejects.append({"schema": REJECTS_SCHEMA, "input": unit.display, "frame": None, "reason": str(e)})
    except Exception as e:  # a bug or a library failure on odd data must not stop the batch
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip(": ")
        res.rejects.append({"schema": REJECTS_SCHEMA, "input": unit.display, "frame": None, "reason": f"processing failed ({msg})"})
    res.timings = dict(timings)
    atomic_write_json(_record_path(out, unit.key), asdict(res))
    return res


def run_prep(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    cfg: PrepConfig = PrepConfig(),
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run ``prep`` and return the summary (also written to ``OUT/summary.json``).

    Args:
        inputs: files and folders.
        out: output folder (created).
        cfg: settings; a folder holding a run made with other settings is refused (ValueError).
        workers: processes (1 = in this process).
        progress: called as ``progress(done, total)`` after each unit.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pin_run_settings(out / ".prep" / "config.json", asdict(cfg), out, "prep")
    # A run killed with -9 can leave temp files of atomic writes behind: drop them.
    for stale in [*out.glob("faces/.*.tmp"), *out.glob(".prep/records/.*.tmp"), *out.glob(".*.tmp")]:
        stale.unlink(missing_ok=True)
    wall0 = time.perf_counter()
    units, missing, ignored = discover(inputs)
    todo = [u for u in units if not _record_path(out, u.key).exists()]
    done = len(units) - len(todo)
    if progress:
        progress(done, len(units))
    if todo:
        if workers <= 1 or len(todo) == 1:
            if "proc" not in _WORKER or _WORKER["proc"].cfg != cfg:
                _init_worker(cfg, single_thread=False)  # in-process: leave the caller's thread settings
            for u in todo:
                process_unit(u, out)
                done += 1
                if progress:
                    progress(done, len(units))
        else:
            # forkserver: children start from a clean process, never from one holding the
            # progress bar's thread or torch's thread pools (fork deadlocks there).
            ctx = get_context("forkserver")
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker, initargs=(cfg,)) as ex:
                for _ in ex.map(process_unit, todo, [out] * len(todo)):
                    done += 1
                    if progress:
                        progress(done, len(units))
    wall = time.perf_counter() - wall0
    return assemble(out, units, missing, ignored, cfg, wall, ran=len(todo))


def assemble(out: Path, units: list[Unit], missing: list[dict], ignored: int, cfg: PrepConfig, wall: float, ran: int) -> dict:
    """Rebuild faces.jsonl, rejects.jsonl and summary.json from the per-unit records."""
    faces: list[dict] = []
    rejects: list[dict] = list(missing)
    timings: Counter = Counter()
    frames = 0
    for u in units:
        rec = json.loads(_record_path(out, u.key).read_text())
        faces.extend(rec["faces"])
        rejects.extend(rec["rejects"])
        timings.update(rec["timings"])
        frames += rec["frames"]
    atomic_write_jsonl(out / "faces.jsonl", faces)
    atomic_write_jsonl(out / "rejects.jsonl", rejects)
    stage = {k: round(v, 3) for k, v in sorted(timings.items())}
    busy = sum(timings.values())
    summary = {
        "schema": SUMMARY_SCHEMA,
        "command": "prep",
        "version": __version__,
        "config": asdict(cfg),
        "counts": {
            "in": len(units) + len(missing),
            "frames": frames,
            "written": len(faces),
            "images_with_faces": len({(f["origin"]["path"], f["origin"]["frame"]) for f in faces}),
            "rejected": len(rejects),
            "rejected_by_reason": dict(Counter(reason_key(r["reason"]) for r in rejects).most_common()),
            "ignored_files": ignored,
            "processed_this_run": ran,
        },
        "timings": {"wall_s": round(wall, 3), "stage_cpu_s": stage},
        "throughput": {
            "faces_per_s_wall": round(len(faces) / wall, 2) if ran == len(units) and wall > 0 else None,
            "faces_per_s_per_worker": round(len(faces) / busy, 2) if busy > 0 else None,
        },
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def load_faces(folder: str | os.PathLike) -> list[dict]:
    """Records of ``folder/faces.jsonl`` (schema-checked)."""
    return list(read_jsonl(Path(folder) / "faces.jsonl", FACES_SCHEMA))
