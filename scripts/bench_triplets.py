"""Benchmark triplet synthesis, side by side in one run:

1. triplets/s from prepped 256 px faces (``run_triplets``): the default mesh recipe (no QC and
   with ``--qc``) and the 2D recipe ``recipes/tps.toml``, on the same pairs;
2. the same pairs with only the I/O (decode two crops, encode four JPEGs, write the folder):
   the ratio synthesis-run / I/O-only says how much the synthesis adds;
3. multi-band blending of a batch of 32 at 256 px: ``synth.blend.multiband_blend`` against
   OpenCV's ``cv2.detail_MultiBandBlender`` with the same number of bands.

Usage: ``.venv/bin/python scripts/bench_triplets.py [--faces DIR] [--pairs 64] [--device cpu] [--mesh] [--work DIR]``
(``--mesh``: the prep stores meshes and hands, as ``prep --landmarks mesh`` does; without it the
default recipe measures them per pair).
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

from reliableswap.commands.prep import PrepConfig, run_prep
from reliableswap.commands.triplets import run_triplets
from reliableswap.images import encode_image, load_rgb
from reliableswap.pairs import make_pairs
from reliableswap.recipes import PairsSection, TripletRecipe, load_recipe
from reliableswap.synth.blend import GraphedMultiband, multiband_blend
from triplets.records import PairRecord
from reliableswap.contracts import FaceSet

ROOT = Path(__file__).resolve().parents[1]


def io_only(prep: Path, pairs: list[PairRecord], out: Path) -> float:
    faces = FaceSet.load(prep)
    t = time.perf_counter()
    for i, p in enumerate(pairs):
        a, b = load_rgb(faces.image_path(faces[p.a])), load_rgb(faces.image_path(faces[p.b]))
        d = out / f"{i:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for name, img in (("source", a), ("target", b), ("output_st", b), ("output_ts", a)):
            (d / f"{name}.jpg").write_bytes(encode_image(img, ".jpg", 95))
    return time.perf_counter() - t


def blend_bench(device: str, levels: int = 6, n: int = 32, reps: int = 3, graphed: bool = False,
                dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)
    fg = torch.rand(n, 3, 256, 256, generator=g)
    bg = torch.rand(n, 3, 256, 256, generator=g)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    mask = (((xx - 128) ** 2 + (yy - 128) ** 2) < 80 ** 2).float().expand(n, 1, -1, -1).contiguous()
    dev = torch.device(device)
    f, b, m = fg.to(dev, dtype), bg.to(dev, dtype), mask.to(dev, dtype)
    blend = GraphedMultiband(levels) if graphed else (lambda x, y, z: multiband_blend(x, y, z, levels))
    blend(f, b, m)
    ts = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        blend(f, b, m)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    f8 = (fg.permute(0, 2, 3, 1).numpy() * 255).astype(np.int16)
    b8 = (bg.permute(0, 2, 3, 1).numpy() * 255).astype(np.int16)
    m8 = (mask[:, 0].numpy() * 255).astype(np.uint8)
    tc = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(n):
            bl = cv2.detail_MultiBandBlender(0, levels - 1)  # OpenCV counts bands above the base
            bl.prepare((0, 0, 256, 256))
            bl.feed(f8[i], m8[i], (0, 0))
            bl.feed(b8[i], 255 - m8[i], (0, 0))
            bl.blend(None, None)
        tc.append(time.perf_counter() - t)
    ours, ocv = min(ts), min(tc)
    return {"batch": n, "size": 256, "levels": levels, "device": device, "cuda_graph": graphed, "dtype": str(dtype),
            "ours_s": round(ours, 5),
            "opencv_s": round(ocv, 4), "speedup_vs_opencv": round(ocv / ours, 2),
            "torch_threads": torch.get_num_threads(), "opencv_threads": cv2.getNumThreads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--mesh", action="store_true", help="prep with --landmarks mesh (meshes and hands stored, as the default recipe expects)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench_out", help="where the prep, pairs and outputs go")
    a = ap.parse_args()
    work = a.work
    prep = work / ("prep_mesh" if a.mesh else "prep_shared")
    if not (prep / "faces.jsonl").exists():
        from reliableswap.choices import LandmarkBackend

        cfg = PrepConfig(embed=True, landmarks=LandmarkBackend.mesh) if a.mesh else PrepConfig(embed=True)
        run_prep([a.faces / d for d in ("london_set", "cc0_one_person", "ffhq", "video_frames", "triplet_official", "public_domain")],
                 prep, cfg, workers=2)
    pairs = make_pairs(FaceSet.load(prep).faces, PairsSection(n=a.pairs, max_yaw_diff=25, seed=0))
    PairRecord.write(work / "pairs.jsonl", pairs)
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", "pairs": len(pairs)}
    tps = load_recipe(ROOT / "recipes" / "tps.toml", TripletRecipe)
    for name, recipe in (("triplets", TripletRecipe()), ("triplets_qc", TripletRecipe().with_overrides({"qc.enabled": True})),
                         ("triplets_tps", tps)):
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        s = run_triplets(prep, work / "pairs.jsonl", out, recipe, device=a.device, batch=a.batch)
        wall = time.perf_counter() - t
        res[name] = {"written": s["counts"]["written"], "wall_s": round(wall, 2),
                     "triplets_per_s": round(s["counts"]["written"] / wall, 2), "stages_s": s["timings"]["stages_s"]}
    shutil.rmtree(work / "io_only", ignore_errors=True)
    t_io = io_only(prep, pairs, work / "io_only")
    res["io_only"] = {"wall_s": round(t_io, 2), "triplets_per_s": round(len(pairs) / t_io, 2)}
    res["synthesis_over_io"] = round(res["triplets"]["wall_s"] / t_io, 2)
    res["tps_over_io"] = round(res["triplets_tps"]["wall_s"] / t_io, 2)
    res["multiband"] = blend_bench(a.device)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
