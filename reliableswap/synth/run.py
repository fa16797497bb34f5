"""The ``triplets`` command: faces.jsonl + pairs.jsonl → triplet folders (or shards) + manifest.

Work is split into chunks of pairs (``batch`` pairs for folders, ``shard_size`` for WebDataset
shards). A chunk's outputs are written under temp names and renamed, then one record file under
``.records/``; a re-run skips chunks whose record exists, so a killed run resumes and ends with
the same files. Chunk ``k`` belongs to shard ``k % num_shards`` (flags, or torchrun's
``RANK``/``WORLD_SIZE``), so several processes can share one output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from reliableswap import __version__
from reliableswap.io import encode_image, load_rgb, pin_run_settings, reason_key, to_tensor, to_uint8
from reliableswap.synth.pipeline import Recipe, Synthesizer
from triplets.jsonl import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, read_jsonl
from triplets.layout import FILES
from triplets.schema import FACES_SCHEMA, MANIFEST_SCHEMA, PAIRS_SCHEMA, REJECTS_SCHEMA, SUMMARY_SCHEMA
from triplets.webdataset import write_shard


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def shard_from_env(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """Flags win; else torchrun's RANK/WORLD_SIZE; else (0, 1)."""
    if num_shards is not None:
        i = shard_index or 0
    else:
        num_shards = int(os.environ.get("WORLD_SIZE", "1"))
        i = int(os.environ.get("RANK", "0")) if shard_index is None else shard_index
    if not 0 <= i < num_shards:
        raise ValueError(f"shard index {i} not in [0, {num_shards})")
    return i, num_shards


def _steps(r: Recipe) -> dict:
    return {"reenact": vars(r.reenact), "appearance": vars(r.appearance), "blend": vars(r.blend), "reshape": vars(r.reshape)}


class TripletRun:
    def __init__(self, faces_dir: Path, pairs: list[dict], out: Path, recipe: Recipe, device: torch.device,
                 batch: int, qc: bool, min_id_margin: float | None, threads: int = 2):
        self.faces_dir, self.pairs, self.out, self.r = faces_dir, pairs, out, recipe
        self.device, self.batch, self.qc_on, self.min_id_margin = device, batch, qc or min_id_margin is not None, min_id_margin
        self.faces = {f["id"]: f for f in read_jsonl(faces_dir / "faces.jsonl", FACES_SCHEMA)}
        self.flame = None
        self.fitted_on_the_fly = 0
        if recipe.uses_flame:
            from reliableswap.flame.run import load_flame

            self.flame = load_flame(recipe.flame.model or None, recipe.flame.embedding or None, device)
        self.synth = Synthesizer(recipe, self.flame)
        self.pool = ThreadPoolExecutor(threads)
        self.checker = None
        if self.qc_on:
            from reliableswap.synth.quality import QualityChecker

            self.checker = QualityChecker()
        self.fmt = recipe.output.format
        self.chunk = recipe.output.shard_size if self.fmt == "webdataset" else batch

    # -- one chunk ---------------------------------------------------------------------------
    def _load(self, pair: dict) -> tuple[np.ndarray, np.ndarray, dict, dict]:
        fa, fb = self.faces.get(pair["a"]), self.faces.get(pair["b"])
        if fa is None or fb is None:
            raise LookupError(f"face id {pair['a'] if fa is None else pair['b']} not in faces.jsonl")
        ia, ib = load_rgb(self.faces_dir / fa["image"]), load_rgb(self.faces_dir / fb["image"])
        if ia.shape != ib.shape:
            raise ValueError(f"crop sizes differ ({ia.shape[1]} vs {ib.shape[1]} px)")
        return ia, ib, fa, fb

    def run_chunk(self, k: int, idx: list[int], timings: Counter) -> dict:
        t = time.perf_counter()
        loaded = list(self.pool.map(self._safe_load, idx))
        timings["decode"] += time.perf_counter() - t
        rejects = [{"schema": REJECTS_SCHEMA, "input": f"pair {i}", "pair": self.pairs[i], "reason": err}
                   for i, (err, _) in zip(idx, loaded) if err]
        ok = [(i, v) for i, (err, v) in zip(idx, loaded) if not err]
        records: list[dict] = []
        samples: list[dict] = []
        for s in range(0, len(ok), self.batch):
            part = ok[s:s + self.batch]
            t = time.perf_counter()
            ia = to_tensor([v[0] for _, v in part], self.device)
            ib = to_tensor([v[1] for _, v in part], self.device)
            la = torch.tensor([v[2]["landmarks68"] for _, v in part], dtype=torch.float32, device=self.device)
            lb = torch.tensor([v[3]["landmarks68"] for _, v in part], dtype=torch.float32, device=self.device)
            pa = pb = None
            if self.flame is not None:
                from reliableswap.flame.run import face_params

                ids = [v[2]["id"] for _, v in part] + [v[3]["id"] for _, v in part]
                params, n_fit = face_params(self.flame, self.faces, ids, max(len(ids), 16))
                self.fitted_on_the_fly += n_fit
                pa, pb = params[:len(part)], params[len(part):]
            res = self.synth.cycle(ia, la, ib, lb, pa, pb)
            st, ts = to_uint8(res["fake_st"]), to_uint8(res["fake_ts"])
            finite = (torch.isfinite(res["fake_st"]).flatten(1).all(1) & torch.isfinite(res["fake_ts"]).flatten(1).all(1)).cpu().numpy()
            timings["synth"] += time.perf_counter() - t
            qc = [dict() for _ in part]
            if self.checker is not None:
                t = time.perf_counter()
                qc = self._qc(part, res, ia, ib, la, lb)
                timings["qc"] += time.perf_counter() - t
            t = time.perf_counter()
            for j, (i, (a_img, b_img, fa, fb)) in enumerate(part):
                pair = self.pairs[i]
                if not finite[j]:
                    rejects.append({"schema": REJECTS_SCHEMA, "input": f"pair {i}", "pair": pair, "reason": "synthesis produced NaN/inf"})
                    continue
                if self.min_id_margin is not None and min(qc[j]["id_margin_st"], qc[j]["id_margin_ts"]) < self.min_id_margin:
                    rejects.append({"schema": REJECTS_SCHEMA, "input": f"pair {i}", "pair": pair,
                                    "reason": f"identity margin {min(qc[j]['id_margin_st'], qc[j]['id_margin_ts']):.3f} below --min-id-margin {self.min_id_margin}"})
                    continue
                key = f"{i:08d}"
                imgs = {"source": a_img, "target": b_img, "output_st": st[j], "output_ts": ts[j]}
                data = dict(zip(imgs, self.pool.map(lambda x: encode_image(x, ".jpg", self.r.output.quality), imgs.values())))
                rec = {"schema": MANIFEST_SCHEMA, "pair": {"index": i, "a": pair["a"], "b": pair["b"]},
                       "folder": key, "files": dict(FILES), "steps": _steps(self.r), "qc": qc[j]}
                if self.fmt == "folder":
                    self._write_folder(key, data)
                else:
                    rec["folder"] = None
                    rec["shard"] = f"shard-{k:06d}.tar"
                    rec["key"] = key
                    samples.append({"__key__": key, **{FILES[n]: d for n, d in data.items()}, "json": json.dumps(rec).encode()})
                records.append(rec)
            timings["encode_write"] += time.perf_counter() - t
        if self.fmt == "webdataset" and samples:
            t = time.perf_counter()
            write_shard(self.out / f"shard-{k:06d}.tar", samples)
            timings["encode_write"] += time.perf_counter() - t
        return {"chunk": k, "records": records, "rejects": rejects}

    def _safe_load(self, i: int):
        try:
            return None, self._load(self.pairs[i])
        except Exception as e:  # missing file, bad crop: skip the pair with a reason
            return f"{type(e).__name__}: {e}".splitlines()[0], None

    def _write_folder(self, key: str, data: dict[str, bytes]) -> None:
        final = self.out / key
        tmp = self.out / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, d in data.items():
            (tmp / FILES[name]).write_bytes(d)
        if final.exists():  # left by a killed run before its chunk record was written
            shutil.rmtree(final)
        os.rename(tmp, final)

    def _qc(self, part, res, ia, ib, la, lb) -> list[dict]:
        n = len(part)
        emb_a = self._embeddings([v[2] for _, v in part], ia, la)
        emb_b = self._embeddings([v[3] for _, v in part], ib, lb)
        q_st = self.checker(res["fake_st"], res["landmarks_st"], emb_a, emb_b, lb, ib, res["mask_st"])
        q_ts = self.checker(res["fake_ts"], res["landmarks_ts"], emb_b, emb_a, la, ia, res["mask_ts"])
        return [{f"{k}_{d}": round(float(q[k][j]), 4) for d, q in (("st", q_st), ("ts", q_ts)) for k in q} for j in range(n)]

    def _embeddings(self, recs: list[dict], imgs: torch.Tensor, lm: torch.Tensor) -> np.ndarray:
        """Stored ``prep --embed`` descriptors when present (they describe the original photo),
        else computed on the crops."""
        if all("embedding" in r for r in recs):
            return np.asarray([r["embedding"] for r in recs], np.float32)
        return self.checker.embed(imgs, lm)


def run_triplets(
    faces_dir: str | Path, pairs_path: str | Path, out: str | Path, recipe: Recipe, device: str = "auto",
    batch: int = 16, qc: bool = False, min_id_margin: float | None = None, shard_index: int | None = None,
    num_shards: int | None = None, progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run the triplet synthesis; returns the summary (also ``OUT/summary.json``)."""
    faces_dir, out = Path(faces_dir), Path(out)
    if not (faces_dir / "faces.jsonl").is_file():
        raise FileNotFoundError(f"{faces_dir} has no faces.jsonl (run `reliableswap prep` first)")
    pairs = list(read_jsonl(pairs_path, PAIRS_SCHEMA))
    if not pairs:
        raise ValueError(f"{pairs_path} holds no pair")
    si, ns = shard_from_env(shard_index, num_shards)
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    rec_dir = out / ".records"
    cfg = {"recipe": recipe.to_dict(), "batch": batch, "qc": qc, "min_id_margin": min_id_margin,
           "pairs": str(Path(pairs_path).resolve()), "faces": str(faces_dir.resolve())}
    pin_run_settings(rec_dir / "config.json", cfg, out, "triplets")
    atomic_write_bytes(out / "recipe.resolved.toml", recipe.to_toml().encode())
    for stale in out.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)

    run = TripletRun(faces_dir, pairs, out, recipe, dev, batch, qc, min_id_margin)
    n_chunks = (len(pairs) + run.chunk - 1) // run.chunk
    mine = [k for k in range(n_chunks) if k % ns == si]
    todo = [k for k in mine if not (rec_dir / f"chunk-{k:06d}.json").exists()]
    timings: Counter = Counter()
    done = len(mine) - len(todo)
    if progress:
        progress(done, len(mine))
    wall0 = time.perf_counter()
    written_now = 0
    for k in todo:
        idx = list(range(k * run.chunk, min(len(pairs), (k + 1) * run.chunk)))
        res = run.run_chunk(k, idx, timings)
        written_now += len(res["records"])
        atomic_write_json(rec_dir / f"chunk-{k:06d}.json", res)
        done += 1
        if progress:
            progress(done, len(mine))
    wall = time.perf_counter() - wall0
    run.pool.shutdown()
    return assemble(out, n_chunks, len(pairs), dict(timings), wall, written_now, recipe, dev, run.qc_on, (si, ns),
                    run.fitted_on_the_fly)


def assemble(out: Path, n_chunks: int, n_pairs: int, timings: dict, wall: float, written_now: int, recipe: Recipe,
             device: torch.device, qc_on: bool, shard: tuple[int, int], fitted: int = 0) -> dict:
    """manifest.jsonl, rejects.jsonl and summary.json from every chunk record present."""
    records, rejects = [], []
    present = 0
    for k in range(n_chunks):
        p = out / ".records" / f"chunk-{k:06d}.json"
        if p.exists():
            present += 1
            d = json.loads(p.read_text())
            records += d["records"]
            rejects += d["rejects"]
    atomic_write_jsonl(out / "manifest.jsonl", records)
    atomic_write_jsonl(out / "rejects.jsonl", rejects)
    agg = {}
    if records and qc_on:
        for key in records[0]["qc"]:
            v = np.asarray([r["qc"][key] for r in records], np.float64)
            agg[key] = {"mean": round(float(v.mean()), 4), "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}
        m = np.asarray([min(r["qc"]["id_margin_st"], r["qc"]["id_margin_ts"]) for r in records])
        agg["positive_id_margin_rate"] = round(float((m > 0).mean()), 4)
    summary = {
        "schema": SUMMARY_SCHEMA, "command": "triplets", "version": __version__,
        "device": str(device), "shard": {"index": shard[0], "count": shard[1]},
        "synthesis": {"reenact": recipe.reenact.backend,
                      "geometry": ("FLAME 3D (" + (recipe.flame.model or "$RELIABLESWAP_FLAME") + f"; {fitted} faces fitted on the fly)")
                      if recipe.uses_flame else "2D landmarks (no FLAME file given)",
                      "appearance": recipe.appearance.method, "blend": recipe.blend.method,
                      "reshape": recipe.reshape.method if recipe.reshape.enabled else False},
        "counts": {"in": n_pairs, "written": len(records), "rejected": len(rejects),
                   "rejected_by_reason": dict(Counter(reason_key(r["reason"]) for r in rejects)),
                   "chunks_done": present, "chunks": n_chunks, "written_this_run": written_now},
        "timings": {"wall_s": round(wall, 3), "stage_s": {k: round(v, 3) for k, v in sorted(timings.items())}},
        "throughput": {"triplets_per_s": round(written_now / wall, 2) if wall > 0 and written_now else None},
        "qc": agg,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
