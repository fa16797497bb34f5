"""FLAME landmark fitting on synthetic landmarks from known parameters (synthetic FLAME-format model).

Usage: .venv/bin/python scripts/bench_flame_fit.py [BATCH]   (default 64). Prints mean/max RMSE (px, 256 px
images) noise-free and with 1 px noise (also against the clean landmarks), and faces/s.
"""
import torch, time, tempfile, sys
from pathlib import Path
from reliableswap.flame.synthetic import write_model, write_embeddings
from reliableswap.flame.model import FlameModel, LandmarkEmbedding
from reliableswap.flame.layer import Flame, FlameParams, project
from reliableswap.flame.fit import fit_landmarks, FitConfig
torch.set_default_dtype(torch.float64)
d = Path(tempfile.mkdtemp()); write_model(d/'m.pkl', chumpy=False); e = write_embeddings(d)
fl = Flame(FlameModel.load(d/'m.pkl'), LandmarkEmbedding.load_deca(e['deca'])).double()
torch.manual_seed(0)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
g = lambda *s: torch.randn(*s)
gt = FlameParams(g(B,100), g(B,50), torch.stack([0.15*g(B), 0.3*g(B).clamp(-1.5,1.5), 0.05*g(B)],-1), torch.zeros(B,3), torch.stack([0.15*torch.rand(B), torch.zeros(B), torch.zeros(B)],-1), torch.zeros(B,6), torch.stack([7+torch.rand(B), 0.01*g(B), 0.01*g(B)],-1))
with torch.no_grad(): lm = project(fl.landmarks(gt), gt.camera, 256)
for noise in [0.0, 1.0]:
    t = time.time()
    target = lm + noise*torch.randn_like(lm)
    p, rmse = fit_landmarks(fl, target, 256)
    dt = time.time()-t
    with torch.no_grad(): clean = (project(fl.landmarks(p), p.camera, 256) - lm).pow(2).sum(-1).mean(-1).sqrt()
    print(noise, 'rmse obs', rmse.mean().item(), rmse.max().item(), 'rmse clean', clean.mean().item(), clean.max().item(), 'faces/s', B/dt)
