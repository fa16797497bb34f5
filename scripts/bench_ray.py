"""Benchmark the Ray engine against the local engine, same inputs, same machine, one run:

for ``prep`` (the shared still photos), ``triplets`` (the default mesh recipe and the 2D
``recipes/tps.toml``) and ``flows`` (a synthetic FLAME-format model, faces fitted on the fly):

* ``local``: the local engine (``prep --workers`` = the CPU count; triplets/flows in this process);
* ``Ray, cluster up``: ``--engine ray`` in a cluster that is already up (what a job on a running
  cluster pays): actors still start and load their models;
* ``Ray, new cluster``: as a user runs it without ``--ray-address``: a local Ray cluster started
  and stopped by the command (on loopback), at the small size.

Two sizes (inputs once and four times) separate the fixed cost (cluster, actors, models) from
the cost per unit: ``units / (t4 − t1)`` is the throughput at scale of each engine, and their
ratio Ray's steady-state overhead on one machine. Ray buys nothing on one machine (the same work,
no second machine), only its cluster features. Each output is checked against the local one:
the same files, and how far their contents are (the local engine's torch uses 2 threads here,
a 1-CPU actor 1, and float sums split over other thread counts round differently).

Usage: ``.venv/bin/python scripts/bench_ray.py [--faces DIR] [--pairs 48] [--json out.json]`` (about 6 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reliableswap.choices import LandmarkBackend
from reliableswap.commands.flows import FlowsConfig, run_flows
from reliableswap.commands.prep import PrepConfig, run_prep
from reliableswap.commands.triplets import run_triplets
from reliableswap.engine import RayOptions, cluster
from reliableswap.images import load_rgb
from reliableswap.pairs import make_pairs
from reliableswap.recipes import PairsSection, TripletRecipe, load_recipe
from reliableswap.testing.faces import write_synthetic_prep
from reliableswap.testing.flame import write_embeddings, write_model
from triplets.records import PairRecord
from reliableswap.contracts import FaceRecord

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> tuple[float, dict]:
    t = time.perf_counter()
    s = fn()
    return time.perf_counter() - t, s


def files(folder: Path, pattern: str) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob(pattern) if not p.name.startswith(".")}


def differences(a: Path, b: Path, pattern: str) -> dict:
    """How far folder ``b``'s files are from ``a``'s: files not byte-identical; for images the
    largest grey-level difference and the share of differing values; for ``.npz`` the largest
    absolute difference of any array."""
    names = sorted(files(a, pattern))
    differ = [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]
    out = {"files": len(names), "not_identical": len(differ)}
    if pattern == "*.npz":
        worst = 0.0
        for n in differ:
            with np.load(a / n) as x, np.load(b / n) as y:
                worst = max([worst] + [float(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)).max()) for k in x.files])
        return out | {"max_abs": round(worst, 6)}
    worst, changed, total = 0, 0, 0
    for n in names:
        x, y = (load_rgb(f / n).astype(np.int16) for f in (a, b))
        d = np.abs(x - y)
        worst, changed, total = max(worst, int(d.max())), changed + int((d > 0).sum()), total + d.size
    return out | {"max_levels": worst, "changed_share": round(changed / total, 7)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    ap.add_argument("--pairs", type=int, default=48, help="pairs of the small size (the large one: 4×)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    stills = [p for p in sorted(a.faces.iterdir()) if p.is_dir() and p.name not in ("video", "hard", "triplet_official")]
    rows = []
    try:
        # inputs at two sizes: the still photos once and four times (copies: other paths, other units)
        inputs = {1: stills, 4: [work / "stills_x4"]}
        for k in range(4):
            for d in stills:
                shutil.copytree(d, work / "stills_x4" / f"copy{k}" / d.name)
        prep = work / "prep_ref"
        run_prep(stills, prep, PrepConfig(landmarks=LandmarkBackend.mesh), workers=cpus)
        faces = FaceRecord.read(prep / "faces.jsonl")
        for n in (1, 4):
            PairRecord.write(work / f"pairs{n}.jsonl", make_pairs(faces, PairsSection(n=n * a.pairs, max_yaw_diff=25, seed=0)))
            write_synthetic_prep(work / f"synth{n}", 2 * 16 * n)
            PairRecord.write(work / f"fpairs{n}.jsonl", [PairRecord(a=f"synthetic_0_{i:05d}", b=f"synthetic_0_{i + 16 * n:05d}")
                                                          for i in range(16 * n)])
        (work / "flame").mkdir()
        model = str(write_model(work / "flame" / "generic_model.pkl"))
        write_embeddings(work / "flame")
        tps = load_recipe(ROOT / "recipes" / "tps.toml", TripletRecipe)
        cases = [
            ("prep", "faces", "*.png", lambda n, out, ray: run_prep(inputs[n], out, PrepConfig(landmarks=LandmarkBackend.mesh),
                                                                    workers=cpus, ray=ray)),
            ("triplets (mesh)", "triplets", "*.jpg",
             lambda n, out, ray: run_triplets(prep, work / f"pairs{n}.jsonl", out, TripletRecipe(), device="cpu", batch=4, ray=ray)),
            ("triplets (2D tps)", "triplets", "*.jpg",
             lambda n, out, ray: run_triplets(prep, work / f"pairs{n}.jsonl", out, tps, device="cpu", batch=4, ray=ray)),
            ("flows", "pairs", "*.npz",
             lambda n, out, ray: run_flows(work / f"synth{n}", work / f"fpairs{n}.jsonl", out, model, FlowsConfig(batch=2, max_rmse=50.0), ray=ray)),
        ]
        for name, unit, pattern, fn in cases:
            r = {"case": name, "unit": unit}
            for n in (1, 4):
                t_l, s_l = timed(lambda: fn(n, work / f"{name}_{n}_local", None))
                t_w, s_w = None, None
                with cluster(RayOptions(num_cpus=cpus)):  # a cluster that is up: only the run is timed
                    t_w, s_w = timed(lambda: fn(n, work / f"{name}_{n}_warm", RayOptions()))
                same = files(work / f"{name}_{n}_warm", pattern) == files(work / f"{name}_{n}_local", pattern)
                written = s_l["counts"]["written_this_run"]
                assert written == s_w["counts"]["written_this_run"], name
                r |= {f"n{n}": written, f"local{n}_s": round(t_l, 2), f"ray{n}_s": round(t_w, 2), f"same{n}": same,
                      f"diff{n}": differences(work / f"{name}_{n}_local", work / f"{name}_{n}_warm", pattern)}
                if n == 1:  # a new local cluster, started and stopped by the command
                    t_c, _ = timed(lambda: fn(n, work / f"{name}_{n}_cold", RayOptions(num_cpus=cpus)))
                    r["ray_cold1_s"] = round(t_c, 2)
            dn = r["n4"] - r["n1"]
            r["local_marginal_per_s"] = round(dn / (r["local4_s"] - r["local1_s"]), 2)
            r["ray_marginal_per_s"] = round(dn / (r["ray4_s"] - r["ray1_s"]), 2)
            r["marginal_ratio"] = round(r["local_marginal_per_s"] / r["ray_marginal_per_s"], 2)
            r["ray_fixed_s"] = round(r["ray1_s"] - r["n1"] / r["ray_marginal_per_s"], 2)
            rows.append(r)
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), ray {__import__('ray').__version__}")
    print("| case | units (1× / 4×) | local 1× / 4× (s) | Ray, cluster up, 1× / 4× (s) | Ray, new cluster, 1× (s) "
          "| per unit at scale: local / Ray (units/s) | Ray's steady-state cost | Ray's fixed cost (s) | same files |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['n1']} / {r['n4']} {r['unit']} | {r['local1_s']} / {r['local4_s']} | {r['ray1_s']} / {r['ray4_s']} | "
              f"{r['ray_cold1_s']} | {r['local_marginal_per_s']} / {r['ray_marginal_per_s']} | {r['marginal_ratio']}× | "
              f"{r['ray_fixed_s']} | {'yes' if r['same1'] and r['same4'] else 'NO'} |")
    print("\nRay's files against the local engine's (local: 2 torch threads, Ray actors: 1), both sizes together:")
    print("| case | files | not byte-identical | largest difference | share of values that differ |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        d1, d4 = r["diff1"], r["diff4"]
        n, bad = d1["files"] + d4["files"], d1["not_identical"] + d4["not_identical"]
        if "max_abs" in d1:
            print(f"| {r['case']} | {n} | {bad} | {max(d1['max_abs'], d4['max_abs'])} (flow px) | — |")
        else:
            share = (d1["changed_share"] + d4["changed_share"]) / 2
            print(f"| {r['case']} | {n} | {bad} | {max(d1['max_levels'], d4['max_levels'])} grey levels | {share:.5%} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
