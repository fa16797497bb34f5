"""Identity keep/leak, expression and pose error of the default recipe's fakes on occluded pairs
(one face wears glasses or has a hand over it, as prep's stored occluder masks say) against clean
pairs (neither face has any), with the glasses rule ``off``, ``fill`` (the default) and ``keep``.
Each fake is judged as in ``scripts/leak_ablation.py``: SFace keep/leak/margin, dlib's 68 points
re-measured on the fake for expression and pose error against the attribute donor, and its glasses
score (the fraction of rays below the eyes that cross a sharp edge: a frame, or the ghost of one).

Usage: ``.venv/bin/python scripts/occluder_eval.py PREP [--out DIR] [--per-face N]``. ``PREP`` is
a ``prep --landmarks mesh`` folder (its records carry ``occluders``). Every occluded face is paired
with ``N`` clean faces (both directions: the occluded face is the identity donor in ``st`` and the
attribute donor in ``ts``); the clean rows use as many clean pairs. Writes ``occluded_pairs.jsonl``
(for ``reliableswap triplets`` + ``inspect --sheet``) and ``occluders.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from reliableswap.faces.occluders import MIN_RAYS, glasses_mask
from reliableswap.images import read_crop, to_tensor
from reliableswap.recipes import TripletRecipe
from triplets.records import PairRecord
from reliableswap.contracts import FaceSet

ROOT = Path(__file__).resolve().parents[1]
#: A face counts as occluded when a stored mask covers this fraction of its crop.
MIN_AREA = 0.005


def split(faces: FaceSet) -> tuple[list, list]:
    """(occluded, clean) face records of a prep folder, by their stored occluder masks."""
    occ, clean = [], []
    for r in faces:
        if r.occluders is None:
            raise SystemExit(f"{faces.folder}: {r.id} has no stored occluder masks (run prep --landmarks mesh)")
        a = r.occluders.area
        (occ if max(a.hands, a.glasses) >= MIN_AREA else clean).append(r)
    return occ, clean


def glasses_speed(faces: FaceSet, repeats: int = 3) -> dict:
    """ms per crop of :func:`glasses_mask` over every crop of the prep folder in one batch (best of
    ``repeats``), and how many of them it reads as wearing glasses."""
    recs = list(faces)
    img = to_tensor([read_crop(faces, r) for r in recs])
    mesh = torch.tensor([r.mesh468 for r in recs], dtype=torch.float32)
    glasses_mask(img[:2], mesh[:2])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _, score = glasses_mask(img, mesh)
        best = min(best, time.perf_counter() - t)
    return {"crops": len(recs), "size": int(img.shape[-1]), "ms_per_crop": round(1000 * best / len(recs), 1),
            "wearing": int((score >= MIN_RAYS).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prep", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "occluders")
    ap.add_argument("--per-face", type=int, default=12)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from leak_ablation import Bench  # this script's folder

    a.out.mkdir(parents=True, exist_ok=True)
    faces = FaceSet.load(a.prep)
    occ, clean = split(faces)
    rng = np.random.default_rng(0)
    if len(clean) < a.per_face + 1 or not occ:
        raise SystemExit(f"need occluded faces and more than {a.per_face} clean ones (have {len(occ)}, {len(clean)})")
    occluded = [PairRecord(a=o.id, b=clean[j].id) for o in occ for j in rng.choice(len(clean), a.per_face, replace=False)]
    clean_pairs = []
    while len(clean_pairs) < len(occluded):
        i, j = rng.choice(len(clean), 2, replace=False)
        clean_pairs.append(PairRecord(a=clean[i].id, b=clean[j].id))
    (a.out / "occluded_pairs.jsonl").write_text("".join(json.dumps(p.to_json()) + "\n" for p in occluded))
    rows = {}
    for name, pairs, rule in (("occluded, glasses off", occluded, "off"), ("occluded, glasses fill (default)", occluded, "fill"),
                              ("occluded, glasses keep", occluded, "keep"), ("clean (default)", clean_pairs, "fill")):
        t = time.perf_counter()
        rows[name] = Bench(a.prep, pairs, False).run(TripletRecipe().with_overrides({"masks.glasses": rule})) | {"pairs": len(pairs)}
        print(f"{name}: {rows[name]} ({time.perf_counter() - t:.0f} s)", flush=True)
    report = {"occluded_faces": [o.id for o in occ], "per_face": a.per_face, "machine": platform.processor() or platform.machine(),
              "rows": rows, "glasses_mask": glasses_speed(faces)}
    print(f"glasses test and mask: {report['glasses_mask']}")
    (a.out / "occluders.json").write_text(json.dumps(report, indent=1))
    cols = ("keep_st", "leak_st", "margin_median_st", "positive_st", "keep_ts", "leak_ts", "margin_median_ts", "positive_ts",
            "expr_err_st", "expr_err_ts", "pose_err_st", "pose_err_ts", "glasses_st", "glasses_ts")
    print("| rows | pairs | " + " | ".join(cols) + " |")
    for name, r in rows.items():
        print(f"| {name} | {r['pairs']} | " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
