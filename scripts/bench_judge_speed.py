"""SFace crops/s (batch 32 of 112 px crops) and the time of one FID (96 against 96 2048-D
features) with the code on ``PYTHONPATH`` (run it once per worktree to compare two commits).

    .venv/bin/python scripts/bench_judge_speed.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import reliableswap
from reliableswap.evaluation import frechet_distance
from reliableswap.nets.sface import load_sface


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    net = load_sface("cpu")
    x = torch.rand(32, 3, 112, 112)
    times = []
    with torch.no_grad():
        net(x)
        for _ in range(5):
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    g = np.random.default_rng(0)
    f, r = g.normal(size=(96, 2048)), g.normal(size=(96, 2048)) + 0.1
    t = time.perf_counter()
    v = frechet_distance(f, r)
    fid_s = time.perf_counter() - t
    print(f"{reliableswap.__file__}: SFace {32 / min(times):.1f} crops/s; FID(96x2048) {fid_s:.3f} s = {v:.4f}")


if __name__ == "__main__":
    main()
