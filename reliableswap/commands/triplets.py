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

import dataclasses
import functools
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from reliableswap import engine
from reliableswap.choices import JpegEncoder, OutputFormat
from reliableswap.device import check_batch_memory, resolve_device
from reliableswap.engine import RayOptions
from reliableswap.flame.fit import FitConfig, params_for_faces
from reliableswap.flame.layer import load_flame
from reliableswap.images import decode_checked, encode_image, encode_jpegs, gpu_jpeg_available, read_crop, to_uint8, to_uint8_tensor
from reliableswap.jobs import Job, NothingUsable, bad_records, reject
from reliableswap.recipes import TripletRecipe
from reliableswap.choices import GlassesRule
from reliableswap.faces.occluders import decode_masks
from reliableswap.synth.occluders import PARSER_SOURCES, stored_hand_masks
from reliableswap.synth.pipeline import Synthesizer, check_models
from reliableswap.synth.quality import QualityChecker, qc_aggregates
from triplets.jsonl import atomic_dir, atomic_write_bytes, file_sha256
from triplets.layout import FILES
from triplets.official import TRIPLET_PICKLE, write_triplet_pickle
from triplets.imaging import MAX_IMAGE_BYTES
from triplets.records import ManifestRecord, PairRecord, read_inside
from reliableswap.contracts import OCCLUDER_CHANNELS, FaceRecord, FaceSet
from triplets.schema import MANIFEST_SCHEMA
from triplets.webdataset import write_shard
from reliableswap.errors import UserError


def shard_from_env(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """Flags win; else torchrun's RANK/WORLD_SIZE; else (0, 1)."""
    if num_shards is not None:
        i = shard_index or 0
    else:
        num_shards = int(os.environ.get("WORLD_SIZE", "1"))
        i = int(os.environ.get("RANK", "0")) if shard_index is None else shard_index
    if not 0 <= i < num_shards:
        raise UserError(f"shard index {i} not in [0, {num_shards})")
    return i, num_shards


#: Peak memory of one pair (both fakes) through the synthesis at 256 px, measured on the CPU
#: (batches of 8/32/128: 343 MB / 1.1 GB / 4.1 GB); it grows with the square of the crop size.
SYNTH_BYTES_PER_PAIR = 32 * 2**20


def io_threads() -> int:
    """Threads for decoding crops and encoding JPEGs (OpenCV releases the GIL): every core, up to 16."""
    return max(2, min(16, os.cpu_count() or 2))


class CropCache:
    """Decoded crops by face id, and their JPEG bytes (``source.jpg``/``target.jpg`` of every pair
    the face is in): a face recurs across pairs. Bounded (least recently used out), thread-safe."""

    def __init__(self, faces: FaceSet, quality: int = 95, limit: int = 4096):
        self.faces, self.quality, self.limit = faces, quality, limit
        self._d: OrderedDict[str, list] = OrderedDict()  # id → [crop, jpeg bytes or None]
        self._lock = threading.Lock()

    def _entry(self, face_id: str) -> list:
        with self._lock:
            if face_id in self._d:
                self._d.move_to_end(face_id)
                return self._d[face_id]
        entry = [read_crop(self.faces, self.faces[face_id]), None]
        with self._lock:
            entry = self._d.setdefault(face_id, entry)
            while len(self._d) > self.limit:
                self._d.popitem(last=False)
        return entry

    def __call__(self, face_id: str) -> np.ndarray:
        return self._entry(face_id)[0]

    def put(self, face_id: str, crop: np.ndarray) -> None:
        """A crop decoded elsewhere (a read stage), so its JPEG bytes need no second decoding."""
        with self._lock:
            if face_id not in self._d:
                self._d[face_id] = [crop, None]
                while len(self._d) > self.limit:
                    self._d.popitem(last=False)

    def jpeg(self, face_id: str) -> bytes:
        entry = self._entry(face_id)
        if entry[1] is None:
            entry[1] = encode_image(entry[0], ".jpg", self.quality)
        return entry[1]


def chunk_size(recipe: TripletRecipe, batch: int) -> int:
    """Pairs per unit: a shard's worth for WebDataset output, else one batch."""
    return recipe.output.shard_size if recipe.output.format == OutputFormat.webdataset else batch


class LoadedPair(NamedTuple):
    """One pair as the read stage hands it on: both crops (S×S×3 uint8), both records, and the
    glasses masks and a face parser's hair masks prep stored (S×S float, or None)."""

    crop_a: np.ndarray
    crop_b: np.ndarray
    face_a: FaceRecord
    face_b: FaceRecord
    glasses_a: np.ndarray | None = None
    glasses_b: np.ndarray | None = None
    hair_a: np.ndarray | None = None
    hair_b: np.ndarray | None = None


class HostBatch(NamedTuple):
    """A batch ready for the device: ``part`` (pair index, :class:`LoadedPair`) per row, uint8 crops
    B×S×S×3, landmarks B×68×2, and what prep stored when every face of the batch has it (else
    None: the synthesizer measures it): meshes B×468×3, hand and glasses masks B×1×S×S, and the
    hair masks a face parser made, B×1×S×S (None: the forehead colour rule alone)."""

    part: list
    ua: torch.Tensor
    ub: torch.Tensor
    la: torch.Tensor
    lb: torch.Tensor
    ma: torch.Tensor | None = None
    mb: torch.Tensor | None = None
    ha: torch.Tensor | None = None
    hb: torch.Tensor | None = None
    ga: torch.Tensor | None = None
    gb: torch.Tensor | None = None
    ra: torch.Tensor | None = None
    rb: torch.Tensor | None = None


class ChunkReader:
    """Decodes the pairs of a chunk (thread pool, shared crop cache): the work of the read stage
    (:class:`TripletReadWorker`)."""

    def __init__(self, faces: FaceSet, pairs: list[PairRecord], recipe: TripletRecipe, batch: int, job: Job,
                 threads: int | None = None):
        self.faces, self.pairs, self.r, self.batch, self.job = faces, pairs, recipe, batch, job
        self.chunk = chunk_size(recipe, batch)
        self.crop = CropCache(faces, recipe.output.quality)
        self.pool = ThreadPoolExecutor(threads or io_threads())

    def close(self) -> None:
        self.pool.shutdown()

    def chunk_pairs(self, k: int) -> list[int]:
        return list(range(k * self.chunk, min(len(self.pairs), (k + 1) * self.chunk)))

    def read(self, idx: list[int]) -> list[tuple[int, str | None, LoadedPair | None]]:
        """``(pair index, reason to skip or None, the pair)`` per pair."""
        with self.job.stage("decode"):
            return [(i, err, v) for i, (err, v) in zip(idx, self.pool.map(self._load, idx))]

    def _load(self, i: int) -> tuple[str | None, tuple | None]:
        """Both crops and records of pair ``i``, or a one-line reason to skip it."""
        pair = self.pairs[i]
        try:
            for fid in (pair.a, pair.b):
                if fid not in self.faces:
                    raise LookupError(f"face id {fid} not in faces.jsonl")
            ia, ib = self.crop(pair.a), self.crop(pair.b)
            if ia.shape != ib.shape:
                raise UserError(f"crop sizes differ ({ia.shape[1]} vs {ib.shape[1]} px)")
            fa, fb = self.faces[pair.a], self.faces[pair.b]
            names = []  # the stored masks this recipe reads, when both faces have them
            if self.r.uses_mesh and fa.occluders and fb.occluders:
                if self.r.masks.glasses != GlassesRule.off:
                    names.append("glasses")
                if all(f.occluders.sources.get("hair") == PARSER_SOURCES["hair"] for f in (fa, fb)):
                    names.append("hair")  # a face parser's (the colour rule's is measured on the render)
            got_a, got_b = self.channels(fa, names), self.channels(fb, names)
            return None, LoadedPair(ia, ib, fa, fb, got_a.get("glasses"), got_b.get("glasses"), got_a.get("hair"), got_b.get("hair"))
        except Exception as e:  # missing file, bad crop: skip the pair with a reason
            return f"{type(e).__name__}: {e}".splitlines()[0], None

    def glasses(self, face: FaceRecord) -> np.ndarray:
        """The glasses mask prep stored for ``face`` (S×S float32 in [0, 1]); see :meth:`channels`."""
        return self.channels(face, ["glasses"])["glasses"]

    def channels(self, face: FaceRecord, names: list[str]) -> dict[str, np.ndarray]:
        """The occluder masks ``names`` (:data:`OCCLUDER_CHANNELS`) prep stored for ``face``, S×S
        float32 in [0, 1] each: its PNG read once, inside the prep folder, bounded, the crop's
        size; an empty mask (most) reads nothing."""
        zeros = np.zeros((face.size, face.size), np.float32)
        full = [n for n in names if getattr(face.occluders.area, n) > 0]
        if not full:
            return {n: zeros for n in names}
        rel = face.occluders.mask
        data = read_inside(self.faces.folder, rel, face.where, "occluders.mask", MAX_IMAGE_BYTES)
        masks = decode_masks(torch.from_numpy(decode_checked(data, (face.size, face.size), name=rel)))
        return {n: masks[OCCLUDER_CHANNELS.index(n)].numpy() if n in full else zeros for n in names}


def stack_batches(loaded: list, recipe: TripletRecipe, batch: int, pin: bool) -> list[HostBatch]:
    """The readable pairs of ``loaded`` (:meth:`ChunkReader.read`) as device batches of ``batch``
    pairs (tensors pinned when ``pin``)."""
    ok = [(i, v) for i, err, v in loaded if not err]
    batches = []
    for s in range(0, len(ok), batch):
        part = ok[s:s + batch]
        rows = [v for _, v in part]
        ua = torch.from_numpy(np.stack([v.crop_a for v in rows]))
        ub = torch.from_numpy(np.stack([v.crop_b for v in rows]))
        la = torch.from_numpy(np.asarray([v.face_a.landmarks68 for v in rows], np.float32))
        lb = torch.from_numpy(np.asarray([v.face_b.landmarks68 for v in rows], np.float32))
        ma = mb = ha = hb = None
        if recipe.uses_mesh and all(v.face_a.mesh468 is not None and v.face_b.mesh468 is not None for v in rows):
            ma = torch.from_numpy(np.asarray([v.face_a.mesh468 for v in rows], np.float32))
            mb = torch.from_numpy(np.asarray([v.face_b.mesh468 for v in rows], np.float32))
        if recipe.uses_mesh and recipe.masks.hands and all(v.face_a.hands is not None and v.face_b.hands is not None for v in rows):
            # hands stored by prep: their masks are drawn here instead of detected per pair
            ha = stored_hand_masks([v.face_a.hands for v in rows], ua.shape[1:3])
            hb = stored_hand_masks([v.face_b.hands for v in rows], ua.shape[1:3])
        ga, gb = _stacked([v.glasses_a for v in rows], [v.glasses_b for v in rows])
        ra, rb = _stacked([v.hair_a for v in rows], [v.hair_b for v in rows])
        tensors = (t.pin_memory() if pin and t is not None else t for t in (ua, ub, la, lb, ma, mb, ha, hb, ga, gb, ra, rb))
        batches.append(HostBatch(part, *tensors))
    return batches


def _stacked(a: list[np.ndarray | None], b: list[np.ndarray | None]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-row S×S masks of both faces as B×1×S×S tensors, when every row has them (else None)."""
    if any(m is None for m in a + b):
        return None, None
    return torch.from_numpy(np.stack(a))[:, None], torch.from_numpy(np.stack(b))[:, None]


class TripletRun:
    """Synthesizes chunks of pairs into the job's folder: a chunk's batches are rendered on the
    device while thread pools encode and write the folders (or shard) of the batches before them;
    a chunk's unit record is written once all its folders are in place (:meth:`finish`)."""

    def __init__(self, faces: FaceSet, pairs: list[PairRecord], job: Job, recipe: TripletRecipe, device: torch.device,
                 batch: int, threads: int | None = None):
        self.faces, self.pairs, self.job, self.r = faces, pairs, job, recipe
        self.device, self.batch = device, batch
        self.flame = load_flame(recipe.flame.model or None, recipe.flame.embedding or None, device) if recipe.uses_flame else None
        self.fitted_on_the_fly = 0
        self.synth = Synthesizer(recipe, self.flame)
        n = threads or io_threads()
        self.crop = CropCache(faces, recipe.output.quality)  # the read stage's crops, for their JPEG bytes
        self.write_pool = ThreadPoolExecutor(n)
        self.encoder, self.sharder = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        self.checker = QualityChecker(self.synth.parser, recipe.identity.judge.value, device) if recipe.qc_on else None
        self.webdataset = recipe.output.format == OutputFormat.webdataset
        self.jpeg = choose_encoder(recipe.output.encoder, device)
        self.steps = recipe.steps()  # stored with every triplet

    def close(self) -> None:
        for pool in (self.encoder, self.sharder, self.write_pool):
            pool.shutdown()

    def render_read(self, k: int, loaded: list, batches: list[HostBatch] | None) -> tuple[dict, list]:
        """Render chunk ``k`` from the pairs a read stage decoded, stacked into device batches there
        or (``None``) here (:class:`ChunkRead`); returns its unit record and the futures writing its
        outputs (:meth:`finish` waits for them)."""
        for i, err, v in loaded:
            if not err:
                self.crop.put(self.pairs[i].a, v.crop_a)
                self.crop.put(self.pairs[i].b, v.crop_b)
        if batches is None:
            with self.job.stage("decode"):
                batches = stack_batches(loaded, self.r, self.batch, self.device.type == "cuda")
        return self.render_chunk(k, loaded, batches)

    def finish(self, k: int, record: dict, writes: list) -> None:
        """Wait until chunk ``k``'s outputs are written, then write its unit record."""
        with self.job.stage("wait_writes"):
            while writes:  # a future may hand back more futures (the nvJPEG thread submits the writes)
                got = writes.pop().result()  # an output-side failure (disk full…) stops the run here
                if isinstance(got, list):
                    writes.extend(got)
        self.job.save_unit(f"chunk-{k:06d}", record)

    def render_chunk(self, k: int, loaded: list, batches: list[HostBatch]) -> tuple[dict, list]:
        """Synthesize chunk ``k``; returns its unit record and the futures writing its outputs."""
        rejects = [reject(f"pair {i}", err, pair=self.pairs[i].to_json()) for i, err, _ in loaded if err]
        records: list[dict] = []
        writes: list = []
        samples: list = []
        for hb in batches:
            part = hb.part
            with self.job.stage("synth"):
                res, tensors = self._synthesize(hb)
                finite = (torch.isfinite(res["fake_st"]).flatten(1).all(1) & torch.isfinite(res["fake_ts"]).flatten(1).all(1)).cpu().numpy()
                left = (res["glasses_left_st"] | res["glasses_left_ts"]).cpu().numpy() if "glasses_left_st" in res else None
            qc = [dict() for _ in part]
            if self.checker is not None:
                with self.job.stage("qc"):
                    qc = self._qc(part, res, *tensors)
            keep, margin, max_pose = [], self.r.qc.id_margin_bound, self.r.qc.max_pose_err
            for j, (i, _) in enumerate(part):
                pair, q = self.pairs[i], qc[j]
                # the pair's worst fake by each QC figure (empty without QC)
                low_margin = min(q["id_margin_st"], q["id_margin_ts"]) if q else None
                high_pose = max(q["pose_err_st"], q["pose_err_ts"]) if q else None
                if not finite[j]:
                    rejects.append(reject(f"pair {i}", "synthesis produced NaN/inf", pair=pair.to_json()))
                elif left is not None and left[j]:
                    rejects.append(reject(f"pair {i}", "an identity donor's glasses frame is still visible in its fake "
                                          "(the fill could not clean it)", pair=pair.to_json()))
                elif margin is not None and low_margin < margin:
                    why = "; a fake looks more like its attribute donor" if margin == 0 else ""
                    rejects.append(reject(f"pair {i}", f"identity margin below --min-id-margin {margin} "
                                          f"({self.checker.judge.name}: {low_margin:.3f}{why})", pair=pair.to_json()))
                elif high_pose is not None and high_pose > max_pose:
                    rejects.append(reject(f"pair {i}", f"pose error above [qc] max_pose_err {max_pose:g}° "
                                          f"({high_pose:.1f}°: a fake is not in its attribute donor's pose)",
                                          pair=pair.to_json()))
                else:
                    keep.append(j)
            keys, recs = [], []
            for j in keep:  # plain dicts here (the hot loop); manifest.jsonl validates them once
                i = part[j][0]
                pair, key = self.pairs[i], f"{i:08d}"
                rec = {"schema": MANIFEST_SCHEMA, "pair": {"index": i, "a": pair.a, "b": pair.b}, "folder": key,
                       "files": dict(FILES), "steps": self.steps, "qc": qc[j], "shard": None, "key": None}
                if self.checker is not None:
                    rec["judge"] = self.checker.judge.name
                if self.webdataset:
                    rec |= {"folder": None, "shard": f"shard-{k:06d}.tar", "key": key}
                keys.append(key)
                recs.append(rec)
                records.append(rec)
            if keep:
                with self.job.stage("encode_submit"):
                    writes.extend(self._encode_and_write(part, res, tensors, keep, keys, recs, samples))
        if self.webdataset and samples:
            writes.append(self.sharder.submit(self._write_shard, k, samples))
        return {"records": records, "rejects": rejects}, writes

    def _encode_and_write(self, part: list, res: dict, tensors: tuple, keep: list[int], keys: list[str],
                          recs: list[dict], samples: list) -> list:
        """Hand the kept fakes to the encoder; returns futures to wait for. nvJPEG runs in its own
        thread (one batched call, then it submits the folder writes); OpenCV runs in the writer
        threads (each encodes and writes one folder). For shards the encoded images are collected in
        ``samples`` for the shard writer instead."""
        q = self.r.output.quality
        ids = [(self.pairs[part[j][0]].a, self.pairs[part[j][0]].b) for j in keep]
        if self.jpeg == JpegEncoder.nvjpeg:
            sel = torch.as_tensor(keep, device=res["fake_st"].device)
            stack = torch.cat([to_uint8_tensor(x[sel]) for x in (res["fake_st"], res["fake_ts"])])
            n = len(keep)

            def encode() -> list[dict[str, bytes]]:
                blobs = encode_jpegs(stack, q)  # st…, ts…; the real faces' bytes come from the cache
                return [{"source": self.crop.jpeg(a), "target": self.crop.jpeg(b), "output_st": blobs[m],
                         "output_ts": blobs[n + m]} for m, (a, b) in enumerate(ids)]

            if self.webdataset:
                samples.append(("batch", keys, recs, self.encoder.submit(encode)))
                return []
            return [self.encoder.submit(lambda: [self.write_pool.submit(self._write_folder, key, d)
                                                 for key, d in zip(keys, encode())])]
        st, ts = to_uint8(res["fake_st"][keep]), to_uint8(res["fake_ts"][keep])
        jobs = [functools.partial(self._encode_four, a, b, st[m], ts[m]) for m, (a, b) in enumerate(ids)]
        if self.webdataset:
            samples.extend(("one", [key], [rec], self.write_pool.submit(lambda f=f: [f()])) for key, rec, f in zip(keys, recs, jobs))
            return []
        return [self.write_pool.submit(self._write_folder, key, f) for key, f in zip(keys, jobs)]

    def _encode_four(self, a: str, b: str, st: np.ndarray, ts: np.ndarray) -> dict[str, bytes]:
        q = self.r.output.quality
        return {"source": self.crop.jpeg(a), "target": self.crop.jpeg(b), "output_st": encode_image(st, ".jpg", q),
                "output_ts": encode_image(ts, ".jpg", q)}

    def _write_folder(self, key: str, data) -> None:
        with self.job.stage("write"):
            data = data() if callable(data) else data
            with atomic_dir(self.job.out / key) as tmp:
                for name, d in data.items():
                    (tmp / FILES[name]).write_bytes(d)

    def _write_shard(self, k: int, samples: list) -> None:
        """One tar of the chunk's samples, once their encodings are ready (``samples``: per entry
        keys, records and a future giving each key's ``{name: bytes}``)."""
        members = []
        for _, keys, recs, fut in samples:
            for key, rec, data in zip(keys, recs, fut.result()):
                members.append({"__key__": key, **{FILES[name]: d for name, d in data.items()},
                                "json": json.dumps(rec).encode()})
        with self.job.stage("write"):
            write_shard(self.job.out / f"shard-{k:06d}.tar", members)

    def _synthesize(self, batch: HostBatch) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        """Upload a ready batch and render both fakes; returns the fakes and the device crops and
        landmarks ``(ia, ib, la, lb)``."""
        dev = self.device

        def up(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dev, non_blocking=True)

        part = batch.part
        ia = up(batch.ua).permute(0, 3, 1, 2).float().div_(255.0)
        ib = up(batch.ub).permute(0, 3, 1, 2).float().div_(255.0)
        la, lb = up(batch.la), up(batch.lb)
        pa = pb = None
        if self.flame is not None:
            ids = [v.face_a.id for _, v in part] + [v.face_b.id for _, v in part]
            params, n_fit = params_for_faces(self.flame, self.faces, ids, FitConfig(), max(len(ids), 16))
            self.fitted_on_the_fly += n_fit
            pa, pb = params[:len(part)], params[len(part):]
        res = self.synth.cycle(ia, la, ib, lb, pa, pb, up(batch.ma), up(batch.mb), up(batch.ha), up(batch.hb),
                               up(batch.ga), up(batch.gb), up(batch.ra), up(batch.rb))
        return res, (ia, ib, la, lb)

    def _qc(self, part: list, res: dict[str, torch.Tensor], ia, ib, la, lb) -> list[dict]:
        emb_a = self._embeddings([v.face_a for _, v in part], ia, la)
        emb_b = self._embeddings([v.face_b for _, v in part], ib, lb)
        q_st = self.checker(res["fake_st"], res["landmarks_st"], emb_a, emb_b, lb, ib, res["mask_st"], res["flow_st"], res.get("mesh_st"))
        q_ts = self.checker(res["fake_ts"], res["landmarks_ts"], emb_b, emb_a, la, ia, res["mask_ts"], res["flow_ts"], res.get("mesh_ts"))
        return [{f"{k}_{d}": round(float(q[k][j]), 4) for d, q in (("st", q_st), ("ts", q_ts)) for k in q} for j in range(len(part))]

    def _embeddings(self, recs: list, imgs: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
        """The real faces' identity embeddings: with the dlib judge, the stored ``prep --embed``
        descriptors when present (they describe the original photo); else the judge's, on the crops."""
        if self.checker.judge.name == "dlib" and all(r.embedding is not None for r in recs):
            return torch.tensor([r.embedding for r in recs], dtype=torch.float32)
        return self.checker.embed(imgs, lm)


def choose_encoder(choice: JpegEncoder, device: torch.device) -> JpegEncoder:
    """``auto``: nvJPEG where it can run (measured faster than 16 OpenCV threads on an H100 host,
    BENCHMARKS.md), else OpenCV threads."""
    if choice == JpegEncoder.nvjpeg and not gpu_jpeg_available(device):
        raise UserError("output.encoder = nvjpeg needs a CUDA device and torchvision (use opencv or auto)")
    if choice == JpegEncoder.auto:
        return JpegEncoder.nvjpeg if gpu_jpeg_available(device) else JpegEncoder.opencv
    return choice


def run_triplets(faces: str | Path, pairs: str | Path, out: str | Path, recipe: TripletRecipe = TripletRecipe(), *,
                 device: str = "auto", batch: int = 16, shard_index: int | None = None, num_shards: int | None = None,
                 progress: bool = False, ray: RayOptions | None = None) -> dict:
    """Run the triplet synthesis of the pairs file ``pairs`` over the prep folder ``faces``;
    returns the summary (also ``OUT/summary.json``).

    ``ray``: run the chunks on a Ray cluster (:mod:`reliableswap.engine`) instead of in this
    process; the folder it writes is the same."""
    faces_dir, pairs_path, out = Path(faces), Path(pairs), Path(out)  # the paths; ``faces``/``pairs`` below hold what they hold
    if ray is not None and (num_shards or 1) > 1:
        raise UserError("--engine ray spreads the work itself: drop --shard-index/--num-shards")
    # flags first, before any data is read (on Ray, the workers' GPUs are checked against the cluster)
    dev = resolve_device(device) if ray is None else torch.device("cpu")
    si, ns = shard_from_env(shard_index, num_shards) if ray is None else (0, 1)
    faces = FaceSet.load(faces_dir, strict=False)
    pairs, bad_pairs = PairRecord.read_valid(pairs_path)
    if not pairs:
        first = f" ({len(bad_pairs)} lines refused, the first: {bad_pairs[0]})" if bad_pairs else ""
        raise NothingUsable(f"{pairs_path} holds no usable pair{first}")
    size = faces.faces[0].size if len(faces) else 256
    if ray is None or device == "cpu":
        check_batch_memory(min(batch, len(pairs)), SYNTH_BYTES_PER_PAIR * (size / 256) ** 2, dev)
    settings = {"recipe": recipe.model_dump(mode="json"), "batch": batch, "pairs_sha256": file_sha256(pairs_path),
                "faces_sha256": file_sha256(faces_dir / "faces.jsonl")}
    if recipe.uses_flame and (faces_dir / "flame.jsonl").is_file():
        settings["flame_sha256"] = file_sha256(faces_dir / "flame.jsonl")
    check_models(recipe)  # a missing or unusable model file stops the run before its folder is made
    lock = "triplets" if ns == 1 else f"triplets.shard-{si}-of-{ns}"
    n_chunks = (len(pairs) + chunk_size(recipe, batch) - 1) // chunk_size(recipe, batch)
    bad = bad_records(faces.problems + bad_pairs)
    with engine.joined(ray, device) as (info, gpus), \
            Job("triplets", out, settings, "triplets", device=str(device if ray else dev), progress=progress, lock=lock) as job:
        atomic_write_bytes(out / "recipe.resolved.toml", recipe.to_toml().encode())
        mine = [k for k in range(n_chunks) if k % ns == si]
        todo = [k for k in mine if not job.is_done(f"chunk-{k:06d}")]
        t0 = job.wall
        rows = engine.run(job, [ChunkUnit(k) for k in todo], _stages(job, faces_dir, faces, pairs_path, pairs, recipe, dev, gpus,
                                                                     batch, len(todo), ray, info),
                          ray=ray, info=info, done_before=len(mine) - len(todo), total=len(mine))
        written_now, fitted = sum(r.written for r in rows), sum(r.fitted for r in rows)
        jpeg = rows[0].jpeg if rows else choose_encoder(recipe.output.encoder, dev).value
        if ray is not None:
            job.device = engine.device_label(info)
        return assemble(job, recipe, n_chunks, len(pairs) + len(bad_pairs), written_now, len(mine) - len(todo), (si, ns),
                        fitted, job.wall - t0, jpeg, bad, engine.describe(ray, info))


def _stages(job: Job, faces_dir: Path, faces: FaceSet, pairs_path: Path, pairs: list[PairRecord], recipe: TripletRecipe,
            dev: torch.device, gpus: float, batch: int, n_todo: int, opts: RayOptions | None, info: dict | None) -> list[engine.Stage]:
    """The read and render stages: in this process they share the faces and pairs already read
    (and every core's I/O threads); on Ray each actor reads them from their files, and renders with
    ``gpus`` GPUs (from :func:`engine.joined`)."""
    if opts is None:
        common = {"faces": faces, "pairs": pairs, "recipe": recipe, "batch": batch, "out": str(job.out)}
        return [engine.Stage(TripletReadWorker, {**common, "pin": dev.type == "cuda"}),
                engine.Stage(TripletRenderWorker, {**common, "device": str(dev)})]
    common = {"faces": str(faces_dir), "pairs": str(pairs_path), "recipe": recipe, "batch": batch, "out": str(job.out),
              "threads": 2}
    render = engine.Stage(TripletRenderWorker, {**common, "device": "cuda" if gpus else "cpu"}, num_cpus=1.0, num_gpus=gpus)
    n_render = engine.pool_size(render, opts, info, n_todo)
    # Readers decode PNG/JPEG crops, far lighter than rendering. Beside GPU renderers, one reader
    # (a CPU) each; beside CPU renderers, one per four, reserving no CPU (else on 2 CPUs a reader
    # would cost a renderer).
    read = engine.Stage(TripletReadWorker, {**common, "stack": False}, num_cpus=1.0 if gpus else 0.0,
                        workers=n_render if gpus else max(1, n_render // 4))
    return [read, dataclasses.replace(render, workers=n_render)]


class ChunkUnit(NamedTuple):
    """A unit of ``triplets``: chunk ``chunk`` of the pairs (:func:`chunk_size` pairs)."""

    chunk: int


class ChunkRead(NamedTuple):
    """A chunk as the read stage hands it on: ``(pair index, reason to skip or None, the pair)`` per
    pair, and the readable pairs stacked into device batches (``None``: the render stage stacks
    them, so a row between processes carries each crop once)."""

    chunk: int
    loaded: list[tuple[int, str | None, LoadedPair | None]]
    batches: list[HostBatch] | None


class ChunkDone(NamedTuple):
    """A chunk written and recorded by the render stage."""

    chunk: int
    written: int  # triplets
    fitted: int  # faces fitted to FLAME on the fly
    jpeg: str  # the JPEG encoder used


def _faces_and_pairs(faces: FaceSet | str, pairs: list[PairRecord] | str) -> tuple[FaceSet, list[PairRecord]]:
    """What a stage was given, or read from the files it was given (a Ray actor)."""
    faces = faces if isinstance(faces, FaceSet) else FaceSet.load(faces, strict=False)
    return faces, pairs if isinstance(pairs, list) else PairRecord.read_valid(pairs)[0]


class TripletReadWorker:
    """The read stage: decodes a chunk's crops and records (:meth:`ChunkReader.read`).

    Args:
        faces / pairs: the prep folder's faces and the pairs (or their files, read once per worker).
        recipe / batch: the run's.
        out: the output folder (its stage timers only: the read stage writes nothing).
        threads: decoding threads (``None``: every core's, up to 16).
        stack: stack the device batches here, off the renderer's thread (when the renderer is in
            this process; else it stacks them itself: a row between processes would carry every
            crop twice).
        pin: pin the batches' memory (a CUDA renderer in this process).
    """

    def __init__(self, faces: FaceSet | str, pairs: list[PairRecord] | str, recipe: TripletRecipe, batch: int, out: str,
                 threads: int | None = None, stack: bool = True, pin: bool = False):
        self.job = Job.attach("triplets", out, "triplets")
        self.reader = ChunkReader(*_faces_and_pairs(faces, pairs), recipe, batch, self.job, threads)
        self.stack, self.pin = stack, pin

    def __call__(self, unit: ChunkUnit) -> ChunkRead:
        loaded = self.reader.read(self.reader.chunk_pairs(unit.chunk))
        if not self.stack:
            return ChunkRead(unit.chunk, loaded, None)
        with self.job.stage("decode"):
            return ChunkRead(unit.chunk, loaded, stack_batches(loaded, self.reader.r, self.reader.batch, self.pin))

    def close(self) -> None:
        self.reader.close()


class TripletRenderWorker:
    """The render stage: synthesizes, checks, encodes and writes a chunk, then its unit record
    (:class:`TripletRun`). Run as a stream (the local engine), chunk k−1's writes finish while
    chunk k renders. Arguments as :class:`TripletReadWorker`'s, and the ``device``."""

    def __init__(self, faces: FaceSet | str, pairs: list[PairRecord] | str, recipe: TripletRecipe, batch: int, out: str,
                 device: str, threads: int | None = None):
        dev = resolve_device(device)
        self.job = Job.attach("triplets", out, "triplets", str(dev))
        self.run = TripletRun(*_faces_and_pairs(faces, pairs), self.job, recipe, dev, batch, threads)

    def __call__(self, row: ChunkRead) -> ChunkDone:
        return self._finish(*self._render(row))

    def stream(self, rows: Iterator[ChunkRead]) -> Iterator[ChunkDone]:
        pending = None
        for row in rows:
            now = self._render(row)
            if pending is not None:
                yield self._finish(*pending)
            pending = now
        if pending is not None:
            yield self._finish(*pending)

    def close(self) -> None:
        self.run.close()

    def _render(self, row: ChunkRead) -> tuple[int, dict, list, int]:
        before = self.run.fitted_on_the_fly
        record, writes = self.run.render_read(row.chunk, row.loaded, row.batches)
        return row.chunk, record, writes, self.run.fitted_on_the_fly - before

    def _finish(self, k: int, record: dict, writes: list, fitted: int) -> ChunkDone:
        self.run.finish(k, record, writes)
        return ChunkDone(k, len(record["records"]), fitted, self.run.jpeg.value)


def assemble(job: Job, recipe: TripletRecipe, n_chunks: int, n_pairs: int, written_now: int, skipped: int,
             shard: tuple[int, int], fitted: int, wall: float, jpeg: str, bad: list[dict], eng: dict) -> dict:
    """manifest.jsonl, triplet.pickle, rejects.jsonl and summary.json from every chunk record present
    (``bad``: lines of faces.jsonl / pairs.jsonl refused on reading; ``n_pairs`` counts them)."""
    records, rejects = [], list(bad)
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
                if recipe.uses_flame else "468-point face mesh (MediaPipe), z-buffered 3D" if recipe.uses_mesh
                else "2D landmarks (no FLAME file given)")
    return job.finish(
        n_in=n_pairs, written=len(records), written_this_run=written_now, skipped=skipped, rejects=rejects, wall=wall,
        details={"shard": {"index": shard[0], "count": shard[1]}, "chunks_done": present, "chunks": n_chunks,
                 "synthesis": {"reenact": recipe.reenact.backend, "geometry": geometry,
                               "appearance": recipe.appearance.method.value, "blend": recipe.blend.method.value,
                               "reshape": recipe.reshape.method.value if recipe.reshape.enabled else False},
                 "jpeg_encoder": jpeg, "engine": eng, "stages_note": "stages overlap (a pipeline of threads): wall_s is what counts",
                 "qc": qc_aggregates([r["qc"] for r in records])})
