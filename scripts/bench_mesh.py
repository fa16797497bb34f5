"""Benchmark face-mesh landmarks, side by side in one run on the same aligned crops:

1. our torch network (``FaceMesh``, batched, one pass on ready 192×192 inputs);
2. the TFLite interpreter (ai-edge-litert, XNNPACK, one image per call, as MediaPipe runs it);
3. dlib's 68-point shape predictor on the same faces (box from the stored landmarks).

Usage: ``.venv/bin/python scripts/bench_mesh.py [--prep bench_out/prep_shared] [--batch 32] [--device cpu]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
from _bench import best  # this script's folder is on sys.path
from kornia.geometry.transform import warp_affine

from reliableswap.faces import mesh as fm
from reliableswap.faces.landmarks import DlibLandmarks
from reliableswap.images import load_rgb
from reliableswap.contracts import FaceRecord

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prep", type=Path, default=ROOT / "bench_out" / "prep_shared")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    recs = FaceRecord.read(a.prep / "faces.jsonl")
    rgb = [load_rgb(a.prep / r.image) for r in recs]
    imgs = torch.stack([torch.from_numpy(x.copy()).permute(2, 0, 1).float() / 255 for x in rgb])
    lm = torch.tensor([r.landmarks68 for r in recs], dtype=torch.float64)
    n = len(recs)
    x = warp_affine(imgs, fm.roi_from_landmarks68(lm).float(), (fm.INPUT, fm.INPUT), align_corners=True)
    dev = torch.device(a.device)
    net = fm.FaceMesh().to(dev).eval()
    xd = x.to(dev)
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", "faces": n,
                 "device": a.device, "batch": a.batch}

    def torch_run():
        with torch.no_grad():
            for s in range(0, n, a.batch):
                net(xd[s:s + a.batch])
        if dev.type == "cuda":
            torch.cuda.synchronize()
    torch_run()
    res["torch_mesh_faces_per_s"] = round(n / best(torch_run), 1)

    def full_run():  # ROI cut + two passes (first from the 68 points, then from the mesh), as prep does
        for s in range(0, n, a.batch):
            net.from_landmarks68(imgs[s:s + a.batch].to(dev), lm[s:s + a.batch].to(dev))
    res["torch_mesh_two_pass_faces_per_s"] = round(n / best(full_run), 1)
    try:
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(fm.mesh_model_path()), num_threads=os.cpu_count())
        it.allocate_tensors()
        inp = it.get_input_details()[0]["index"]
        xs = [x[i:i + 1].permute(0, 2, 3, 1).contiguous().numpy() for i in range(n)]

        def tflite_run():
            for xi in xs:
                it.set_tensor(inp, xi)
                it.invoke()
        tflite_run()
        res["tflite_interpreter_faces_per_s"] = round(n / best(tflite_run), 1)
        res["torch_over_tflite"] = round(res["torch_mesh_faces_per_s"] / res["tflite_interpreter_faces_per_s"], 2)
    except ImportError:
        res["tflite_interpreter_faces_per_s"] = "ai-edge-litert not installed"
    dl = DlibLandmarks()
    boxes = np.concatenate([lm.numpy().min(1), lm.numpy().max(1)], 1)

    def dlib_run():
        for im, bx in zip(rgb, boxes):
            dl(im, bx[None])
    res["dlib68_faces_per_s"] = round(n / best(dlib_run), 1)
    res["torch_mesh_over_dlib68"] = round(res["torch_mesh_faces_per_s"] / res["dlib68_faces_per_s"], 2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
