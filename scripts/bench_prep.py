"""Benchmark `prep` on ~1024 px photos (2 workers) against a naive single-process dlib loop.

Inputs: the shared still faces resized so the long side is 1024 px, each written twice
(``bench_out/in_1024``). Usage: ``.venv/bin/python scripts/bench_prep.py [--faces DIR] [--copies 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from reliableswap.faces.align import align_transform
from reliableswap.faces.models import dlib_model
from reliableswap.commands.prep import PrepConfig, run_prep

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(faces: Path, dst: Path, copies: int) -> int:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    n = 0
    for sub in ("london_set", "cc0_one_person", "ffhq", "video_frames"):
        for p in sorted((faces / sub).rglob("*.*")):
            img = cv2.imread(str(p))
            if img is None:
                continue
            s = 1024 / max(img.shape[:2])
            img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
            for c in range(copies):
                cv2.imwrite(str(dst / f"{p.stem}_c{c}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
                n += 1
    return n


def naive(files: list[Path], size: int) -> tuple[int, float]:
    """The usual script: full-resolution dlib HOG (upsample 1), landmarks, cv2.warpAffine, imwrite."""
    import dlib

    det = dlib.get_frontal_face_detector()
    sp = dlib.shape_predictor(str(dlib_model("landmarks68")))
    out = ROOT / "bench_out" / "naive"
    out.mkdir(parents=True, exist_ok=True)
    t, n = time.perf_counter(), 0
    for p in files:
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        for k, r in enumerate(det(rgb, 1)):
            lm = np.array([(q.x, q.y) for q in sp(rgb, r).parts()], np.float64)
            m = align_transform(torch.from_numpy(lm)[None], size, "ffhq")[0].numpy()
            crop = cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            cv2.imwrite(str(out / f"{p.stem}_{k}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
            n += 1
    return n, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    inp = ROOT / "bench_out" / "in_1024"
    n_img = make_inputs(a.faces, inp, a.copies)
    out = ROOT / "bench_out" / "prep"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = run_prep([inp], out, PrepConfig(), workers=a.workers)
    wall = time.perf_counter() - t
    files = sorted(inp.iterdir())
    n_naive, t_naive = naive(files, 256)
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "images": n_img,
        "prep": {"faces": s["counts"]["written"], "wall_s": round(wall, 2), "faces_per_s": round(s["counts"]["written"] / wall, 1),
                 "workers": a.workers, "stage_cpu_s": s["timings"]["stages_s"]},
        "naive_1proc": {"faces": n_naive, "wall_s": round(t_naive, 2), "faces_per_s": round(n_naive / t_naive, 1)},
    }
    res["speedup_vs_naive"] = round(res["prep"]["faces_per_s"] / res["naive_1proc"]["faces_per_s"], 2)
    res["speedup_per_core"] = round(res["speedup_vs_naive"] / a.workers, 2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
