"""FLAME landmark fitting on synthetic landmarks from known parameters (synthetic FLAME-format model).

Usage: .venv/bin/python scripts/bench_flame_fit.py [--batch 128] [--iterations 30] [--float64]
Prints mean/max RMSE (px, 256 px images) noise-free and with 1 px noise (also against the clean
landmarks), and faces/s (2 CPU cores here; pass --device cuda on a GPU machine).
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from reliableswap.flame.fit import FitConfig, fit_landmarks
from reliableswap.flame.layer import Flame, FlameParams, project
from reliableswap.flame.model import FlameModel, LandmarkEmbedding
from reliableswap.testing.flame import write_embeddings, write_model

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--iterations", type=int, default=FitConfig.iterations)
ap.add_argument("--float64", action="store_true")
ap.add_argument("--prior", type=float, default=FitConfig.w_shape, help="shape and expression prior weight")
ap.add_argument("--device", default="cpu")
a = ap.parse_args()
dt = torch.float64 if a.float64 else torch.float32
d = Path(tempfile.mkdtemp())
write_model(d / "m.pkl", chumpy=False)
e = write_embeddings(d)
fl = Flame(FlameModel.load(d / "m.pkl"), LandmarkEmbedding.load_deca(e["deca"]), dtype=dt).to(a.device)
g = torch.Generator().manual_seed(0)
B = a.batch
r = lambda *s: torch.randn(*s, generator=g, dtype=dt)  # noqa: E731
gt = FlameParams(r(B, 100), r(B, 50), torch.stack([0.15 * r(B), 0.3 * r(B).clamp(-1.5, 1.5), 0.05 * r(B)], -1),
                 torch.zeros(B, 3, dtype=dt), torch.stack([0.15 * r(B).abs(), torch.zeros(B, dtype=dt), torch.zeros(B, dtype=dt)], -1),
                 torch.zeros(B, 6, dtype=dt), torch.stack([7 + r(B).abs(), 0.01 * r(B), 0.01 * r(B)], -1))
gt = FlameParams(*[t.to(a.device) for t in vars(gt).values()])
with torch.no_grad():
    lm = project(fl.landmarks(gt), gt.camera, 256)
cfg = FitConfig(iterations=a.iterations, w_shape=a.prior, w_expr=a.prior)
fit_landmarks(fl, lm[:8], 256, cfg)  # warm-up
print(f"batch {B}, {a.iterations} iterations, {dt}, {a.device}, threads {torch.get_num_threads()}")
for noise in [0.0, 1.0]:
    target = lm + noise * torch.randn(lm.shape, generator=g, dtype=dt).to(a.device)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    p, rmse = fit_landmarks(fl, target, 256, cfg)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    el = time.perf_counter() - t
    with torch.no_grad():
        clean = (project(fl.landmarks(p), p.camera, 256) - lm).pow(2).sum(-1).mean(-1).sqrt()
    print(f"noise {noise:.0f} px: RMSE to target mean {rmse.mean():.4f} max {rmse.max():.4f} | to clean mean "
          f"{clean.mean():.4f} max {clean.max():.4f} | {B / el:.1f} faces/s")
