"""Hand masks: crops/s of MediaPipe's palm detector and hand landmarker run in torch (batched)
against the same two .tflite graphs in the TFLite interpreter (ai-edge-litert, one image at a time,
XNNPACK), on the same real crops, same run.

Usage: ``.venv/bin/python scripts/bench_hands.py [--prep DIR] [--batch 32]`` (``--prep``: a prep
folder; default: the shared faces' FFHQ and London-set photos prepped into bench_out/hands).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from reliableswap.commands.prep import PrepConfig, run_prep
from reliableswap.faces.hands import LANDMARK_INPUT, PALM_INPUT, HandLandmarker
from reliableswap.faces.models import WHEEL_MODELS, wheel_model
from reliableswap.images import read_crop, to_tensor
from reliableswap.contracts import FaceSet

from _bench import best  # this script's folder is on sys.path: one timing helper for the benches

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    ap.add_argument("--prep", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    prep = a.prep or ROOT / "bench_out" / "hands" / "prep"
    if not (prep / "faces.jsonl").is_file():
        run_prep([a.faces / "ffhq", a.faces / "london_set"], prep, PrepConfig(largest=True), workers=2)
    faces = FaceSet.load(prep)
    crops = to_tensor([read_crop(faces, r) for r in list(faces)[: a.batch]])
    n = len(crops)
    hl = HandLandmarker("cpu")
    res = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}", "crops": n}
    res["torch_palms_per_s"] = round(n / best(lambda: hl.palms(crops)), 1)
    res["torch_masks_per_s"] = round(n / best(lambda: hl.masks(crops)), 1)  # palms + landmarks where found + masks
    hands = hl(crops)
    res["hands_found"] = int((hands.presence >= 0.7).sum())
    from ai_edge_litert.interpreter import Interpreter

    palm_path, lmk_path = (wheel_model(m) for m in WHEEL_MODELS["hands"])
    xs = {s: F.interpolate(crops, size=(s, s), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous().numpy()
          for s in (PALM_INPUT, LANDMARK_INPUT)}
    for name, path, size in (("palm", palm_path, PALM_INPUT), ("landmark", lmk_path, LANDMARK_INPUT)):
        it = Interpreter(model_path=str(path), num_threads=torch.get_num_threads())
        it.allocate_tensors()
        idx = it.get_input_details()[0]["index"]

        def run(it=it, idx=idx, x=xs[size]) -> None:
            for i in range(len(x)):
                it.set_tensor(idx, x[i:i + 1])
                it.invoke()
        res[f"tflite_{name}_per_s"] = round(n / best(run), 1)
        with torch.no_grad():
            net = hl.palm if name == "palm" else hl.landmark
            res[f"torch_{name}_net_per_s"] = round(n / best(lambda net=net, x=xs[size]: net(torch.from_numpy(x).permute(0, 3, 1, 2))), 1)
    print(json.dumps(res, indent=1))
    out = ROOT / "bench_out" / "hands"
    out.mkdir(parents=True, exist_ok=True)
    (out / "hands.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
