"""Is one recipe's FID really worse than another's on the same pairs, or is it the sample? A paired
bootstrap over pairs of two ``scripts/leak_ablation.py --fid --dump D`` rows: each draw resamples
the pairs with replacement (both fakes of each drawn pair, the same draw for both rows) and
computes both rows' FID against the same real crops; the difference's percentile interval says
whether the gap outlives the choice of pairs. The real crops are resampled too (``--resample-real``
off keeps them fixed). FID is exact at these sizes (``reliableswap.evaluation.frechet_distance``,
nuclear norm of the N×M cross product: no D×D ``sqrtm``), so thousands of draws take seconds.

Usage: ``.venv/bin/python scripts/fid_bootstrap.py D ROW_A ROW_B [--draws 2000]``, rows named as
their ``.npz`` files in D (``default``, ``no_reshape``; a previous version's row dumped into another
folder is given as a path to its ``.npz``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _bench import dump_file

from reliableswap.evaluation import frechet_distance


def load_row(dump: Path, row: str) -> np.ndarray:
    """The row's fakes' Inception features: 2P×D, the st fakes of P pairs, then their ts fakes."""
    path = Path(row) if row.endswith(".npz") else dump_file(dump, row)  # a path, or the row's name or file stem
    if not path.is_file():
        raise SystemExit(f"{path}: no such row dump (rows are the .npz files leak_ablation.py --dump writes)")
    with np.load(path) as z:
        if "inception_fakes" not in z.files:
            raise SystemExit(f"{path}: no Inception features (dump it with leak_ablation.py --fid --dump)")
        return z["inception_fakes"].astype(np.float64)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, real: np.ndarray, draws: int, seed: int = 0,
                     resample_real: bool = True) -> dict:
    """FID of ``a`` and of ``b`` (2P×D each, pairs in the same order) against ``real`` (M×D), and
    the 2.5/50/97.5 percentiles of FID(b) − FID(a) over ``draws`` paired resamplings of the pairs."""
    if a.shape != b.shape or len(a) % 2:
        raise SystemExit(f"rows differ in shape or are not st/ts halves: {a.shape} against {b.shape}")
    p = len(a) // 2
    rng = np.random.default_rng(seed)
    diffs = np.empty(draws)
    for k in range(draws):
        i = rng.integers(0, p, p)
        idx = np.concatenate([i, i + p])
        r = real[rng.integers(0, len(real), len(real))] if resample_real else real
        diffs[k] = frechet_distance(b[idx], r) - frechet_distance(a[idx], r)
    lo, mid, hi = np.percentile(diffs, [2.5, 50, 97.5])
    fid_a, fid_b = frechet_distance(a, real), frechet_distance(b, real)
    return {"fid_a": round(fid_a, 2), "fid_b": round(fid_b, 2), "diff": round(fid_b - fid_a, 2),
            "diff_ci95": [round(float(lo), 2), round(float(hi), 2)], "diff_median": round(float(mid), 2),
            "share_b_worse": round(float((diffs > 0).mean()), 3), "draws": draws, "pairs": p, "real": len(real)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump", type=Path, help="a leak_ablation.py --fid --dump folder (its real_inception.npy is used)")
    ap.add_argument("row_a")
    ap.add_argument("row_b")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixed-real", action="store_true", help="keep the real crops fixed (resample the pairs only)")
    a = ap.parse_args()
    if not (a.dump / "real_inception.npy").is_file():
        raise SystemExit(f"{a.dump}: no real_inception.npy (dump the rows with leak_ablation.py --fid --dump)")
    real = np.load(a.dump / "real_inception.npy").astype(np.float64)
    res = paired_bootstrap(load_row(a.dump, a.row_a), load_row(a.dump, a.row_b), real, a.draws, a.seed, not a.fixed_real)
    print(json.dumps({"a": a.row_a, "b": a.row_b, **res}))


if __name__ == "__main__":
    main()
