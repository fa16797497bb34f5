"""``reliableswap triplets``: faces + pairs → triplet folders (or WebDataset shards) + manifest.

Units are chunks of pairs (``batch`` pairs for folders, ``shard_size`` for shards). A chunk's
folders (or shard) are written under temp names and renamed, then its unit record; a re-run
skips chunks already recorded, so a killed run resumes and ends with the same files. Chunk ``k``
belongs to shard ``k % num_shards`` (flags, or torchrun's ``RANK``/``WORLD_SIZE``), so several
processes can share one output folder. At the end: ``manifest.jsonl``, ``rejects.jsonl``,
``summary.json``, ``recipe.resolved.toml`` and, for folders, ``triplet.pickle`` (the official
trainer's list of triplet folders).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from reliableswap.choices import OutputFormat
from reliableswap.flame.fit import FitConfig, params_for_faces
from reliableswap.flame.layer import load_flame
from reliableswap.images import encode_image, load_rgb, to_tensor, to_uint8
from reliableswap.jobs import Job, NothingUsable, reject
from reliableswap.recipes import TripletRecipe
from reliableswap.synth.pipeline import Synthesizer
from reliableswap.synth.quality import QualityChecker
from triplets.jsonl import atomic_dir, atomic_write_bytes
from triplets.layout import FILES
from triplets.official import TRIPLET_PICKLE, write_triplet_pickle
from triplets.records import FaceSet, ManifestRecord, PairRecord
from triplets.webdataset import write_shard


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; any other torch device string as given."""
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


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TripletRun:
    """Synthesizes chunks of pairs into the job's folder."""

    def __init__(self, faces: FaceSet, pairs: list[PairRecord], job: Job, recipe: TripletRecipe, device: torch.device,
                 batch: int, threads: int = 2):
        self.faces, self.pairs, self.job, self.r = faces, pairs, job, recipe
        self.device, self.batch = device, batch
        self.flame = load_flame(recipe.flame.model or None, recipe.flame.embedding or None, device) if recipe.uses_flame else None
        self.fitted_on_the_fly = 0
        self.synth = Synthesizer(recipe, self.flame)
        self.pool = ThreadPoolExecutor(threads)
        self.checker = QualityChecker() if recipe.qc_on else None
        self.webdataset = recipe.output.format == OutputFormat.webdataset
        self.chunk = recipe.output.shard_size if self.webdataset else batch

    def _load(self, i: int) -> tuple[str | None, tuple | None]:
        """Both crops and records of pair ``i``, or a one-line reason to skip it."""
        pair = self.pairs[i]
        try:
            for fid in (pair.a, pair.b):
                if fid not in self.faces:
                    raise LookupError(f"face id {fid} not in faces.jsonl")
            fa, fb = self.faces[pair.a], self.faces[pair.b]
            ia, ib = load_rgb(self.faces.image_path(fa)), load_rgb(self.faces.image_path(fb))
            if ia.shape != ib.shape:
                raise ValueError(f"crop sizes differ ({ia.shape[1]} vs {ib.shape[1]} px)")
            return None, (ia, ib, fa, fb)
        except Exception as e:  # missing file, bad crop: skip the pair with a reason
            return f"{type(e).__name__}: {e}".splitlines()[0], None

    def run_chunk(self, k: int, idx: list[int]) -> dict:
        job = self.job
        with job.stage("decode"):
            loaded = list(self.pool.map(self._load, idx))
        rejects = [reject(f"pair {i}", err, pair=self.pairs[i].to_json()) for i, (err, _) in zip(idx, loaded) if err]
        ok = [(i, v) for i, (err, v) in zip(idx, loaded) if not err]
        records: list[dict] = []
        samples: list[dict] = []
        for s in range(0, len(ok), self.batch):
            part = ok[s:s + self.batch]
            with job.stage("synth"):
                res, tensors = self._synthesize(part)
                st, ts = to_uint8(res["fake_st"]), to_uint8(res["fake_ts"])
                finite = (torch.isfinite(res["fake_st"]).flatten(1).all(1) & torch.isfinite(res["fake_ts"]).flatten(1).all(1)).cpu().numpy()
            qc = [dict() for _ in part]
            if self.checker is not None:
                with job.stage("qc"):
                    qc = self._qc(part, res, *tensors)
            with job.stage("encode_write"):
                for j, (i, (a_img, b_img, fa, fb)) in enumerate(part):
                    pair = self.pairs[i]
                    if not finite[j]:
                        rejects.append(reject(f"pair {i}", "synthesis produced NaN/inf", pair=pair.to_json()))
                        continue
                    margin = self.r.qc.min_id_margin
                    if margin is not None and min(qc[j]["id_margin_st"], qc[j]["id_margin_ts"]) < margin:
                        worst = min(qc[j]["id_margin_st"], qc[j]["id_margin_ts"])
                        rejects.append(reject(f"pair {i}", f"identity margin {worst:.3f} below --min-id-margin {margin}",
                                              pair=pair.to_json()))
                        continue
                    key = f"{i:08d}"
                    imgs = {"source": a_img, "target": b_img, "output_st": st[j], "output_ts": ts[j]}
                    data = dict(zip(imgs, self.pool.map(lambda x: encode_image(x, ".jpg", self.r.output.quality), imgs.values())))
                    rec = ManifestRecord(pair={"index": i, "a": pair.a, "b": pair.b}, folder=key, steps=self.r.steps(),
                                         qc=qc[j])
                    if self.webdataset:
                        rec = rec.model_copy(update={"folder": None, "shard": f"shard-{k:06d}.tar", "key": key})
                        samples.append({"__key__": key, **{FILES[n]: d for n, d in data.items()},
                                        "json": json.dumps(rec.to_json()).encode()})
                    else:
                        with atomic_dir(job.out / key) as tmp:
                            for name, d in data.items():
                                (tmp / FILES[name]).write_bytes(d)
                    records.append(rec.to_json())
        if self.webdataset and samples:
            with job.stage("encode_write"):
                write_shard(job.out / f"shard-{k:06d}.tar", samples)
        return {"records": records, "rejects": rejects}

    def _synthesize(self, part: list) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        dev = self.device
        ia = to_tensor([v[0] for _, v in part], dev)
        ib = to_tensor([v[1] for _, v in part], dev)
        la = torch.tensor([v[2].landmarks68 for _, v in part], dtype=torch.float32, device=dev)
        lb = torch.tensor([v[3].landmarks68 for _, v in part], dtype=torch.float32, device=dev)
        pa = pb = None
        if self.flame is not None:
            ids = [v[2].id for _, v in part] + [v[3].id for _, v in part]
            params, n_fit = params_for_faces(self.flame, self.faces, ids, FitConfig(), max(len(ids), 16))
            self.fitted_on_the_fly += n_fit
            pa, pb = params[:len(part)], params[len(part):]
        return self.synth.cycle(ia, la, ib, lb, pa, pb), (ia, ib, la, lb)

    def _qc(self, part: list, res: dict[str, torch.Tensor], ia, ib, la, lb) -> list[dict]:
        emb_a = self._embeddings([v[2] for _, v in part], ia, la)
        emb_b = self._embeddings([v[3] for _, v in part], ib, lb)
        q_st = self.checker(res["fake_st"], res["landmarks_st"], emb_a, emb_b, lb, ib, res["mask_st"])
        q_ts = self.checker(res["fake_ts"], res["landmarks_ts"], emb_b, emb_a, la, ia, res["mask_ts"])
        return [{f"{k}_{d}": round(float(q[k][j]), 4) for d, q in (("st", q_st), ("ts", q_ts)) for k in q} for j in range(len(part))]

    def _embeddings(self, recs: list, imgs: torch.Tensor, lm: torch.Tensor) -> np.ndarray:
        """Stored ``prep --embed`` descriptors when present (they describe the original photo),
        else computed on the crops."""
        if all(r.embedding is not None for r in recs):
            return np.asarray([r.embedding for r in recs], np.float32)
        return self.checker.embed(imgs, lm)


def run_triplets(faces_dir: str | Path, pairs_path: str | Path, out: str | Path, recipe: TripletRecipe = TripletRecipe(),
                 device: str = "auto", batch: int = 16, shard_index: int | None = None, num_shards: int | None = None,
                 progress: bool = False) -> dict:
    """Run the triplet synthesis; returns the summary (also ``OUT/summary.json``)."""
    faces_dir, out = Path(faces_dir), Path(out)
    faces = FaceSet.load(faces_dir)
    pairs = PairRecord.read(pairs_path)
    if not pairs:
        raise NothingUsable(f"{pairs_path} holds no pair")
    si, ns = shard_from_env(shard_index, num_shards)
    dev = resolve_device(device)
    settings = {"recipe": recipe.model_dump(mode="json"), "batch": batch, "pairs_sha256": file_sha256(pairs_path),
                "faces_sha256": file_sha256(faces_dir / "faces.jsonl")}
    if recipe.uses_flame and (faces_dir / "flame.jsonl").is_file():
        settings["flame_sha256"] = file_sha256(faces_dir / "flame.jsonl")
    with Job("triplets", out, settings, "triplets", device=str(dev), progress=progress) as job:
        atomic_write_bytes(out / "recipe.resolved.toml", recipe.to_toml().encode())
        run = TripletRun(faces, pairs, job, recipe, dev, batch)
        n_chunks = (len(pairs) + run.chunk - 1) // run.chunk
        mine = [k for k in range(n_chunks) if k % ns == si]
        todo = [k for k in mine if not job.is_done(f"chunk-{k:06d}")]
        done = len(mine) - len(todo)
        job.progress(done, len(mine))
        written_now = 0
        t0 = job.wall
        for k in todo:
            res = run.run_chunk(k, list(range(k * run.chunk, min(len(pairs), (k + 1) * run.chunk))))
            written_now += len(res["records"])
            job.save_unit(f"chunk-{k:06d}", res)
            done += 1
            job.progress(done, len(mine))
        run.pool.shutdown()
        return assemble(job, recipe, n_chunks, len(pairs), written_now, len(mine) - len(todo), (si, ns),
                        run.fitted_on_the_fly, job.wall - t0)


def _qc_aggregates(records: list[dict]) -> dict:
    agg: dict = {}
    if not records or not records[0]["qc"]:
        return agg
    for key in records[0]["qc"]:
        v = np.asarray([r["qc"][key] for r in records], np.float64)
        agg[key] = {"mean": round(float(v.mean()), 4), "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}
    m = np.asarray([min(r["qc"]["id_margin_st"], r["qc"]["id_margin_ts"]) for r in records])
    agg["positive_id_margin_rate"] = round(float((m > 0).mean()), 4)
    return agg


def assemble(job: Job, recipe: TripletRecipe, n_chunks: int, n_pairs: int, written_now: int, skipped: int,
             shard: tuple[int, int], fitted: int, wall: float) -> dict:
    """manifest.jsonl, triplet.pickle, rejects.jsonl and summary.json from every chunk record present."""
    records, rejects = [], []
    present = 0
    for k in range(n_chunks):
        if job.is_done(f"chunk-{k:06d}"):
            present += 1
            d = job.load_unit(f"chunk-{k:06d}")
            records += d["records"]
            rejects += d["rejects"]
    ManifestRecord.write(job.out / ManifestRecord.FILE, records)
    if recipe.output.format == OutputFormat.folder:
        write_triplet_pickle(job.out / TRIPLET_PICKLE, [job.out / r["folder"] for r in records])
    geometry = ("FLAME 3D (" + (recipe.flame.model or "$RELIABLESWAP_FLAME") + f"; {fitted} faces fitted on the fly)"
                if recipe.uses_flame else "2D landmarks (no FLAME file given)")
    return job.finish(
        n_in=n_pairs, written=len(records), written_this_run=written_now, skipped=skipped, rejects=rejects, wall=wall,
        details={"shard": {"index": shard[0], "count": shard[1]}, "chunks_done": present, "chunks": n_chunks,
                 "synthesis": {"reenact": recipe.reenact.backend, "geometry": geometry,
                               "appearance": recipe.appearance.method.value, "blend": recipe.blend.method.value,
                               "reshape": recipe.reshape.method.value if recipe.reshape.enabled else False},
                 "qc": _qc_aggregates(records)})
