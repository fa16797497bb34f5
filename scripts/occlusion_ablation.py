"""Occlusion augmentation with against without: the tiny FaceShifter on a triplet folder, same
seeds and data; both arms evaluate the held-out triplets with one occluder each (rate 0 names the
occluders for that evaluation and pastes none in training). Prints one JSON line per run and
writes OUT/results.json.

    .venv/bin/python scripts/occlusion_ablation.py TRIPLETS PREP OUT [--steps 300] [--seeds 0 1] [--rate 0.5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from reliableswap.commands.finetune import run_finetune
from reliableswap.recipes import TrainRecipe, load_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("triplets", type=Path)
    ap.add_argument("prep", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--holdout", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for seed in a.seeds:
        for rate in (0.0, a.rate):
            r = load_recipe("tiny", TrainRecipe).with_overrides({
                "train.steps": a.steps, "train.seed": seed, "train.sample_every": 0, "data.holdout": a.holdout,
                "augment.occluders": ["hands", "objects"], "augment.rate": rate})
            ev = run_finetune(r, a.triplets, a.out / f"s{seed}_r{rate}", faces=a.prep)["details"]["eval"]
            rows.append({"seed": seed, "rate": rate, **{k: ev[k] for k in ("cycle_l1_start", "cycle_l1_end",
                                                                           "occluder_l1_start", "occluder_l1_end")}})
            print(json.dumps(rows[-1]), flush=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
