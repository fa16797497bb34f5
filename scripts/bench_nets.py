"""Benchmark the learned backends (random weights: speed does not depend on their values), images/s
at batch 1 and batch 32, each network at its own input size, and — with the authors' checkouts
under $RELIABLESWAP_REFERENCES — their modules on the same inputs in the same run (ratio ours/theirs).

Usage: ``.venv/bin/python scripts/bench_nets.py [--device cpu] [--batches 1 32] [--only lia gpen]``
Writes bench_out/nets.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from reliableswap.nets.liveportrait import LivePortrait
from reliableswap.nets.weights import BACKENDS
from reliableswap.testing.nets import LP_CONFIG, cuda_calls_are_noops, randomize, reference_dir, reference_model

ROOT = Path(__file__).resolve().parents[1]
REF = {"lia": "LIA", "bisenet": "face-parsing.PyTorch", "gfpgan": "GFPGAN", "gpen": "GPEN", "liveportrait": "LivePortrait"}


def timed(f, device: torch.device, reps: int, warm: bool = True) -> float:
    """Best wall time of ``reps`` calls (after one warm-up call when ``warm``)."""
    if warm:
        f()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def ours_and_ref(name: str, device: torch.device):
    """(our callable on a batch, the reference's or None, input maker)."""
    if name == "liveportrait":
        ours = LivePortrait().eval()
        randomize(ours)
    else:
        ours = BACKENDS[name].files[0].build().eval()
        randomize(ours)
    ours.to(device)
    ref = None
    checkout = reference_dir(REF[name])
    if checkout is not None and name != "liveportrait":
        ref = reference_model(name, checkout).to(device)
        ref.load_state_dict(ours.state_dict())
    size = {"lia": 256, "liveportrait": 256}.get(name, 512)

    def inputs(b: int):
        return torch.rand(b, 3, size, size, device=device)

    if name == "lia":
        return (lambda x: ours(x * 2 - 1, x.flip(0) * 2 - 1)), (ref and (lambda x: ref(x * 2 - 1, x.flip(0) * 2 - 1))), inputs
    if name == "liveportrait":
        refs = None
        if checkout is not None:
            refs = {p: reference_model("liveportrait", checkout, p).to(device) for p in LP_CONFIG}
            for p, m in refs.items():
                m.load_state_dict(getattr(ours, p).state_dict())

        kp: dict = {}

        def ref_lp(x):  # the published wrapper's network calls, batched: M on both, F, W, G
            if x.shape[0] not in kp:  # the keypoint arithmetic (not timed) from ours
                kp[x.shape[0]] = ours.motion(x, x.flip(0))
            x_s, x_d = kp[x.shape[0]]
            refs["motion_extractor"](x)
            refs["motion_extractor"](x.flip(0))
            f = refs["appearance_feature_extractor"](x)
            return refs["spade_generator"](feature=refs["warping_module"](f, kp_driving=x_d, kp_source=x_s)["out"])

        return (lambda x: ours(x, x.flip(0))), (refs and ref_lp), inputs
    if name == "gfpgan":
        return ours, (ref and (lambda x: ref(x, return_rgb=False, randomize_noise=False))), inputs
    return ours, ref, inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--only", nargs="+", default=list(BACKENDS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "nets.json")
    a = ap.parse_args()
    dev = torch.device(a.device)
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", "device": str(dev),
                 "threads": torch.get_num_threads(), "rows": []}
    for name in a.only:
        ours, ref, inputs = ours_and_ref(name, dev)
        for b in a.batches:
            x = inputs(b)
            # batch 1: best of 3 after a warm-up; larger batches: one call (minutes each on a CPU), warm-up only on a GPU
            reps, warm = (3, True) if b == 1 else (1, dev.type == "cuda")
            with torch.no_grad(), cuda_calls_are_noops():
                t = timed(lambda: ours(x), dev, reps, warm)
                tr = timed(lambda: ref(x), dev, reps, warm) if ref else None
            row = {"backend": name, "batch": b, "ours_img_s": round(b / t, 3),
                   "ref_img_s": round(b / tr, 3) if tr else None, "ours_over_ref": round(tr / t, 2) if tr else None}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
