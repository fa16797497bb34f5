"""``reliableswap eval ffpp``: the FaceForensics++ swap protocol on the user's own copy of FF++
(licensed; never downloaded here).

1. The pair list: FF++'s JSON split files (a list of ``["953", "974"]`` pairs; each pair is swapped
   both ways, as FF++'s own fakes ``953_974`` and ``974_953`` are: target first, source second) or
   a CSV with ``target,source`` columns. Every id names ``<videos>/<id>.mp4``; a pair naming a
   video that is not there is skipped with that reason.
2. Frames: ``frames`` per video (10 in the protocol), evenly spaced over the whole video
   (``round(linspace(0, n − 1, frames))``), decoded sequentially: deterministic for a given file.
   They go to ``OUT/frames/<id>/``, and the project's own ``prep`` aligns them (``OUT/prep``; FFHQ
   alignment from dlib's 68 points, the largest face of each frame, the video id as identity).
3. Pairs: frame k of the target with frame k of the source (``OUT/pairs.jsonl``); a frame without
   a face skips its pair with that reason.
4. The swapper swaps every pair and ``eval swapper`` measures it (``OUT/eval``: its per-pair CSV,
   the sheet, its summary); ``OUT/frames.csv`` is the per-frame CSV (target video, source video,
   frame, the figures), and ``OUT/summary.json`` carries the report: ID retrieval
   (top-1 of each swap among all source frames, by video), mean identity cosine, pose and
   expression error, FID, with their sample counts and what measured each.

What measures it: the licence-clean set (``metrics = "clean"``, the only one this version has):
SFace for identity (Apache-2.0), the MediaPipe face mesh for pose (yaw/pitch/roll from its 68
points, degrees) and expression (its inner points after a similarity fit, interocular units), and
the Inception of the FID wheel. Papers use CosFace, HopeNet and Deep3DFaceRecon instead, so these
figures are NOT comparable with published FF++ numbers, and the report says so.

Every step resumes: frames already written are kept, prep resumes per frame, pairs are rebuilt
from what prep holds.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np

from reliableswap.choices import LandmarkBackend
from reliableswap.commands.eval import SwapperAdapter, run_eval_swapper
from reliableswap.commands.prep import PrepConfig, run_prep
from reliableswap.errors import NothingUsable, UserError
from reliableswap.images import MAX_PIXELS, InputError, save_image
from reliableswap.jobs import Job, reject
from triplets.jsonl import MAX_SUMMARY_BYTES, UnreadableFile, atomic_write_bytes, read_bounded
from triplets.records import FaceSet, PairRecord

#: A video id: FF++'s are three digits; letters, digits, ``_`` and ``-`` are taken, nothing that moves out of ``--videos``.
VIDEO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_PAIRS = 100_000
NOT_COMPARABLE = ("licence-clean metrics (SFace identity, face-mesh pose and expression): NOT comparable with "
                  "published FF++ numbers, which use CosFace sphere20, HopeNet and Deep3DFaceRecon")


def read_pair_list(path: str | os.PathLike) -> tuple[list[tuple[str, str]], list[dict]]:
    """``(target, source)`` video ids of an FF++ JSON split file (each pair both ways) or a
    ``target,source`` CSV; and the lines refused, each with a one-line reason."""
    path = Path(path)
    try:
        text = read_bounded(path, MAX_SUMMARY_BYTES).decode("utf-8")
    except (UnreadableFile, UnicodeDecodeError) as e:
        raise UserError(f"{path}: {e}".splitlines()[0]) from None
    out: list[tuple[str, str]] = []
    bad: list[dict] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: an FF++ split file is a list of [id, id] pairs")
        for i, p in enumerate(data):
            if not (isinstance(p, list) and len(p) == 2 and all(isinstance(v, str) and VIDEO_ID.match(v) for v in p)):
                bad.append(reject(f"{path.name}: pair {i}", "not a pair of two video ids"))
                continue
            out += [(p[0], p[1]), (p[1], p[0])]
    else:
        rows = csv.DictReader(io.StringIO(text))
        if not rows.fieldnames or not {"target", "source"} <= set(rows.fieldnames):
            raise UserError(f"{path}:1: a pair list CSV needs the columns target,source")
        for i, r in enumerate(rows, start=2):
            t, s = (r.get("target") or "").strip(), (r.get("source") or "").strip()
            if not (VIDEO_ID.match(t) and VIDEO_ID.match(s)):
                bad.append(reject(f"{path.name}:{i}", "target/source: not video ids"))
                continue
            out.append((t, s))
    if len(out) > MAX_PAIRS:
        raise UserError(f"{path}: {len(out)} pairs, more than {MAX_PAIRS}")
    return list(dict.fromkeys(out)), bad


def frame_indices(n: int, frames: int) -> list[int]:
    """``frames`` evenly spaced indices over ``n`` frames (fewer when the video is shorter)."""
    return sorted({int(i) for i in np.round(np.linspace(0, n - 1, frames))}) if n > 0 else []


def extract_frames(video: Path, folder: Path, vid: str, frames: int, max_pixels: int = MAX_PIXELS) -> int:
    """Write ``frames`` evenly spaced frames of ``video`` as ``folder/<vid>_<k>.png`` (k = 0…,
    atomic); a video whose frames are all there is not decoded again. Returns how many exist."""
    done = sorted(folder.glob(f"{vid}_*.png"))
    if done and (folder / ".complete").is_file():
        return len(done)
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise InputError("cannot open video (unsupported codec or not a video)")
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if w * h > max_pixels:
        cap.release()
        raise InputError(f"video frames too large ({w}x{h} px)")
    n = 0
    while cap.grab():  # the header's frame count is not reliable: count by decoding
        n += 1
    cap.release()
    want = frame_indices(n, frames)
    if not want:
        raise InputError("no frame")
    cap = cv2.VideoCapture(str(video))
    k = idx = 0
    try:
        while k < len(want) and cap.grab():
            if idx == want[k]:
                ok, bgr = cap.retrieve()
                if not ok or bgr is None:
                    raise InputError(f"frame {idx} cannot be decoded")
                save_image(folder / f"{vid}_{k:02d}.png", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                k += 1
            idx += 1
    finally:
        cap.release()
    atomic_write_bytes(folder / ".complete", json.dumps({"frames": want, "of": n}).encode())
    return k


def write_frames_csv(pairs_csv: Path, where: list[tuple[str, str, int]], out: Path) -> None:
    """The per-frame CSV: ``eval swapper``'s per-pair rows with the target video, source video and
    frame index in front (``where``: per pair index of ``pairs.jsonl``)."""
    rows = list(csv.DictReader(io.StringIO(pairs_csv.read_text())))
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = [k for k in (rows[0].keys() if rows else []) if k not in ("index", "source", "target")]
    w.writerow(["target_video", "source_video", "frame", *keys])
    for r in rows:
        t, s, k = where[int(r["index"])]
        w.writerow([t, s, k, *(r[c] for c in keys)])
    atomic_write_bytes(out, buf.getvalue().encode())


def run_eval_ffpp(swapper: SwapperAdapter, name: str, videos: str | os.PathLike, pair_list: str | os.PathLike,
                  out: str | os.PathLike, *, frames: int = 10, device: str = "auto", batch: int = 8,
                  inception: Path | None = None, progress: bool = False) -> dict:
    """The FF++ protocol (module doc) with ``swapper`` over the videos of ``videos`` named by
    ``pair_list``; returns the summary (also ``OUT/summary.json``)."""
    videos, out = Path(videos), Path(out)
    if not videos.is_dir():
        raise UserError(f"--videos {videos}: not a folder")
    if not 1 <= frames <= 100:
        raise UserError(f"--frames {frames}: between 1 and 100")
    pairs, bad = read_pair_list(pair_list)
    usable = []
    for t, s in pairs:
        missing = [v for v in (t, s) if not (videos / f"{v}.mp4").is_file()]
        if missing:
            bad.append(reject(f"{t} ← {s}", f"video {missing[0]}.mp4 not in --videos"))
        else:
            usable.append((t, s))
    if not usable:
        first = f" (the first: {bad[0]['input']}: {bad[0]['reason']})" if bad else ""
        raise NothingUsable(f"{pair_list}: no pair whose two videos are in {videos}{first}")
    settings = {"videos": str(videos), "pair_list": str(pair_list), "frames": frames, "swapper": name, "metrics": "clean"}
    with Job("eval-ffpp", out, settings, "pairs", device=device, progress=progress, resumable=False) as job:
        vids = sorted({v for p in usable for v in p})
        with job.stage("frames"):
            for i, v in enumerate(vids):
                try:
                    extract_frames(videos / f"{v}.mp4", out / "frames" / v, v, frames)
                except InputError as e:
                    bad.append(reject(f"{v}.mp4", str(e)))
                job.progress(i + 1, len(vids))
        with job.stage("prep"):
            prep = run_prep([out / "frames"], out / "prep", PrepConfig(largest=True, identity_from_folder=True,
                                                                      landmarks=LandmarkBackend.dlib, device=device), workers=1)
        faces = FaceSet.load(out / "prep", flame=False, strict=False)
        by_frame = {Path(f.origin.path).stem: f.id for f in faces}  # "<vid>_<k>" → face id
        rows: list[PairRecord] = []
        where: list[tuple[str, str, int]] = []  # (target video, source video, frame) of each row
        for t, s in usable:
            for k in range(frames):
                a, b = by_frame.get(f"{s}_{k:02d}"), by_frame.get(f"{t}_{k:02d}")
                if a is None or b is None:
                    if (out / "frames" / (s if a is None else t) / f"{s if a is None else t}_{k:02d}.png").is_file():
                        bad.append(reject(f"{t} ← {s} frame {k}", f"no face found in frame {k} of video {s if a is None else t}"))
                    continue
                rows.append(PairRecord(a=a, b=b))
                where.append((t, s, k))
        if not rows:
            raise NothingUsable(f"no frame pair with a face on both sides (see {out / 'rejects.jsonl'})")
        atomic_write_bytes(out / "pairs.jsonl", "".join(json.dumps(p.to_json()) + "\n" for p in rows).encode())
        with job.stage("swap_and_measure"):
            ev = run_eval_swapper(swapper, name, out / "prep", out / "pairs.jsonl", out / "eval", device=device, batch=batch,
                                  inception=inception, judge="sface", landmarks="mesh")
        d = ev["details"]
        write_frames_csv(out / "eval" / "pairs.csv", where, out / "frames.csv")
        details = {
            "protocol": f"FaceForensics++: {frames} evenly spaced frames per video, frame k of the target with frame k of the source",
            "comparable_with_papers": False, "metrics_note": NOT_COMPARABLE,
            "alignment": f"the project's prep: {faces.faces[0].align if faces.faces else 'ffhq'} crops from dlib's 68 points, "
                         f"{prep['counts']['written']} faces in {len(vids)} videos",
            "id_retrieval_top1_pct": round(100 * d["id_retrieval_top1"], 2), "id_cos_mean": d["id_cos_mean"],
            "pose_err_deg": d["pose_err_mean_deg"], "expr_err": d["expr_err_mean"], "fid": d["fid"],
            "measured_by": {"identity": d["identity"], "pose_expression": "MediaPipe face mesh (68 points read off it)",
                            "fid": d.get("fid_note")},
            "samples": {"video_pairs": len(usable), "swaps": d["pairs"], "gallery_source_frames": d["gallery"],
                        "fid": d.get("fid_samples")},
            "files": {"per_frame": "frames.csv", "sheet": "eval/sheet.png", "pairs": "pairs.jsonl"},
        }
        return job.finish(n_in=len(pairs) * frames, written=d["pairs"], written_this_run=d["pairs"], rejects=bad, details=details)
