"""Does training on cycle triplets help? The same swapper from the same seed, trained with and
without triplets, evaluated on identities the training never saw (``reliableswap eval swapper``).

Variants (all from the same recipe and seed; only the data mix and the cycle weight differ):
  vanilla   vanilla pairs only (type 0 + 20 % same-face reconstructions), no cycle loss;
  official  + triplets of types 4/5 only with the cycle L1 at 0.05 (the official ReliableSwap mix);
  ours      + triplets of types 1-5 with the cycle L1 at 1.0 (recipes/tiny.toml's mix).

Identities: faces whose dlib descriptors lie within 0.6 of each other are one person (connected
components); a third of the people are held out (their pairs are the evaluation set), the rest
train. CPU default: the tiny FaceShifter at 128 px on the shared faces (minutes); ``--gpu``:
recipes/faceshifter.toml at 256 px on CUDA.

Usage: ``.venv/bin/python scripts/ablation.py [--steps 200] [--seeds 0 1 2] [--faces ../shared/data/faces] [--gpu]``
Writes bench_out/ablation/ablation.json and prints a markdown table (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from reliableswap.commands.eval import load_run_swapper, run_eval_swapper
from reliableswap.commands.finetune import run_finetune
from reliableswap.commands.pairs import run_pairs
from reliableswap.commands.prep import PrepConfig, run_prep
from reliableswap.commands.triplets import run_triplets
from reliableswap.device import resolve_device
from reliableswap.recipes import PairsSection, TrainRecipe, TripletRecipe, load_recipe
from reliableswap.contracts import FaceRecord

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "vanilla": {"data.vanilla_rate": 1.0, "loss.cycle": 0.0},
    "official": {"data.vanilla_rate": 0.5, "data.use_real": False, "data.rec_code": [4, 5], "loss.cycle": 0.05},
    "ours": {"data.vanilla_rate": 0.5},
}
METRICS = ("id_cos_mean", "id_retrieval_top1", "id_retrieval_top5", "pose_err_mean_deg", "expr_err_mean")


def people(recs: list[FaceRecord], threshold: float = 0.6) -> list[list[FaceRecord]]:
    """Connected components of 'descriptor distance < threshold' (or equal identity labels)."""
    n = len(recs)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    emb = np.asarray([r.embedding for r in recs], np.float64)
    dist = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    for i in range(n):
        for j in range(i + 1, n):
            if dist[i, j] < threshold or (recs[i].identity and recs[i].identity == recs[j].identity):
                parent[find(i)] = find(j)
    groups: dict[int, list[FaceRecord]] = {}
    for i, r in enumerate(recs):
        groups.setdefault(find(i), []).append(r)
    return sorted(groups.values(), key=lambda g: g[0].id)


def subset(prep: Path, recs: list[FaceRecord], out: Path) -> Path:
    """A prep folder holding only ``recs`` (crops copied: contract paths must stay inside)."""
    if out.exists():
        shutil.rmtree(out)
    (out / "faces").mkdir(parents=True)
    for r in recs:
        shutil.copy2(prep / r.image, out / r.image)
    FaceRecord.write(out / "faces.jsonl", recs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "ablation")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--gpu", action="store_true", help="faceshifter.toml at 256 px on CUDA")
    a = ap.parse_args()
    dev = "cuda" if a.gpu else "cpu"
    out = a.out
    t0 = time.perf_counter()
    prep = out / "prep"
    if not (prep / "summary.json").is_file():
        inputs = [a.faces / d for d in ("london_set", "ffhq", "public_domain", "cc0_one_person", "multi_face")]
        run_prep([p for p in inputs if p.is_dir()], prep, PrepConfig(embed=True), workers=2)
    recs = [r for r in FaceRecord.read(prep / "faces.jsonl") if r.embedding is not None]
    groups = people(recs)
    rng = np.random.default_rng(0)
    held = set(rng.choice(len(groups), max(2, len(groups) // 3), replace=False).tolist())
    train_recs = [r for i, g in enumerate(groups) if i not in held for r in g]
    held_recs = [r for i, g in enumerate(groups) if i in held for r in g]
    train, heldout = subset(prep, train_recs, out / "train_faces"), subset(prep, held_recs, out / "heldout_faces")
    run_pairs(train, out / "train_pairs.jsonl", PairsSection(n=4 * len(train_recs), max_yaw_diff=30.0))
    run_pairs(heldout, out / "heldout_pairs.jsonl", PairsSection(strategy="random", n=4 * len(held_recs), max_yaw_diff=180.0, seed=1))
    if not (out / "triplets" / "summary.json").is_file():
        run_triplets(train, out / "train_pairs.jsonl", out / "triplets", TripletRecipe(), device=dev, batch=16)
    base = load_recipe(ROOT / "recipes" / ("faceshifter.toml" if a.gpu else "tiny.toml"), TrainRecipe)
    size = 256 if a.gpu else 128
    base = base.with_overrides({"model.size": size, "data.image_size": size, "train.steps": a.steps, "data.holdout": 0,
                                "train.sample_every": 0, "train.ckpt_every": a.steps})
    results: dict = {"people": len(groups), "held_out_people": len(held), "train_faces": len(train_recs),
                     "heldout_faces": len(held_recs), "steps": a.steps, "size": size, "device": dev, "runs": []}
    for seed in a.seeds:
        for name, over in VARIANTS.items():
            r = base.with_overrides({**over, "train.seed": seed})
            run = out / "runs" / f"{name}-seed{seed}"
            run_finetune(r, out / "triplets", run, faces=train, device=dev, overwrite=True)
            model, label = load_run_swapper(run, resolve_device(dev))
            ev = run_eval_swapper(model, label, heldout, out / "heldout_pairs.jsonl", out / "eval" / f"{name}-seed{seed}", device=dev, batch=8)
            d = ev["details"]
            row = {"variant": name, "seed": seed, **{k: d[k] for k in METRICS}, "recon_psnr": d["reconstruction"]["psnr_db"],
                   "recon_ssim": d["reconstruction"]["ssim"]}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "ablation.json").write_text(json.dumps(results, indent=1))
    keys = [*METRICS, "recon_psnr", "recon_ssim"]
    print(f"\n{len(held)} of {len(groups)} people held out ({len(held_recs)} faces); {a.steps} steps at {size} px, seeds {a.seeds}\n")
    print("| variant | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for name in VARIANTS:
        rows = [r for r in results["runs"] if r["variant"] == name]
        cells = []
        for k in keys:
            v = np.asarray([r[k] for r in rows if r[k] is not None], np.float64)
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nwrote {out / 'ablation.json'} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
