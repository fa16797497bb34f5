"""``reliableswap flows``: a dense FLAME shape flow per pair (FlowFace++'s shape flow, computed).

For each pair (a, b): ``flows/{a}__{b}.npz`` (float16 H×W×2 ``forward`` and ``backward`` fields,
coverage masks, FLAME landmarks P2/P12), ``previews/{a}__{b}.png`` (b | colour wheel over b with
contour arrows P2→P12 | b warped into a's shape; a name whose ids hold ``__`` ends in ``.{hash}``
of the pair, so no two pairs share one), then ``manifest.jsonl``
(:class:`~triplets.records.FlowRecord`), ``rejects.jsonl`` and ``summary.json``. Faces without
``fit`` parameters are fitted on the fly (and held to ``--max-rmse`` like ``fit``). Units are
pairs; a re-run keeps the flows already written. File names come from the face ids, which the
contracts keep to safe names.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch

from reliableswap import engine
from reliableswap.choices import Rasterizer
from reliableswap.faces.ibug68 import JAW
from reliableswap.commands.fit import flame_settings
from reliableswap.device import resolve_device
from reliableswap.engine import RayOptions
from reliableswap.flame.fit import FitConfig, params_for_faces
from reliableswap.flame.flow import shape_flow
from reliableswap.flame.layer import Flame, load_flame
from reliableswap.flame.model import resolve_flame_path
from reliableswap.geometry.fields import flow_to_color
from reliableswap.geometry.grid import warp_backward
from reliableswap.geometry.raster import available_backends
from reliableswap.images import encode_image, read_crop, to_tensor, to_uint8
from reliableswap.jobs import Job, bad_records, reject
from triplets.jsonl import atomic_write_bytes, file_sha256
from triplets.records import FlowRecord, PairRecord
from reliableswap.contracts import FaceSet


def preview(img_b: np.ndarray, fwd: torch.Tensor, bwd: torch.Tensor, mask: torch.Tensor, p2: np.ndarray, p12: np.ndarray) -> bytes:
    """PNG: b | colour wheel of the forward flow over b with contour arrows P2→P12 | b warped by the flow."""
    b = to_tensor(img_b)
    wheel = flow_to_color(fwd[None])
    over = torch.where(mask[None], 0.4 * b + 0.6 * wheel, b)
    over = np.ascontiguousarray(to_uint8(over)[0])
    for s, e in zip(p2[JAW], p12[JAW]):
        cv2.arrowedLine(over, tuple(int(round(v)) for v in s), tuple(int(round(v)) for v in e), (255, 255, 255), 1,
                        cv2.LINE_AA, tipLength=0.3)
    warped = to_uint8(warp_backward(b, bwd[None], "border"))[0]
    return encode_image(np.concatenate([img_b, over, warped], 1), ".png")


@dataclass(frozen=True)
class FlowsConfig:
    """How ``flows`` runs (the CLI's flags).

    Args:
        embedding: FLAME's landmark embedding file (``None``: beside the model file).
        fit: the fit of faces ``fit`` has not fitted (done on the fly).
        batch: pairs per batch (a unit of the job).
        device: ``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ``cuda:1``…
        previews: write a preview PNG per pair.
        backend: rasterizer (``auto``: pytorch3d when it imports, else torch).
        max_rmse: pairs with a face fitted above this landmark RMSE (crop px) are rejected.
    """

    embedding: str | os.PathLike | None = None
    fit: FitConfig = field(default_factory=FitConfig)
    batch: int = 8
    device: str = "auto"
    previews: bool = True
    backend: Rasterizer = Rasterizer.auto
    max_rmse: float = 8.0


def run_flows(faces: str | os.PathLike, pairs: str | os.PathLike, out: str | os.PathLike,
              flame: str | os.PathLike | None, cfg: FlowsConfig = FlowsConfig(), *, progress: bool = False,
              ray: RayOptions | None = None) -> dict:
    """Shape flows for every pair of the pairs file ``pairs`` over the prep folder ``faces`` with
    the FLAME model file ``flame``; returns the summary (also ``OUT/summary.json``). ``ray``: run
    the batches on a Ray cluster (:mod:`reliableswap.engine`); the folder is the same."""
    folder, pairs_file, model, out = Path(faces), pairs, flame, Path(out)  # the paths; the names below hold what they hold
    embedding, batch, previews, backend, max_rmse = cfg.embedding, cfg.batch, cfg.previews, cfg.backend, cfg.max_rmse
    device = str(resolve_device(cfg.device)) if ray is None else str(cfg.device)
    fit_cfg = cfg.fit
    faces = FaceSet.load(folder, strict=False)
    pairs, bad_pairs = PairRecord.read_valid(pairs_file)
    backend = Rasterizer(backend)
    settings = {**flame_settings(model, embedding, fit_cfg), "max_rmse": max_rmse, "previews": previews,
                "rasterizer": backend.value, "pairs_sha256": file_sha256(pairs_file),
                "faces_sha256": file_sha256(folder / "faces.jsonl"),
                "flame_sha256": file_sha256(folder / "flame.jsonl") if (folder / "flame.jsonl").is_file() else None}
    with engine.joined(ray, device) as (info, gpus), \
            Job("flows", out, settings, "pairs", temp_dirs=("flows", "previews"), device=device, progress=progress) as job:
        with job.stage("load"):
            flame = load_flame(model, embedding, device if ray is None else "cpu")
        rejects, todo = bad_records(faces.problems + bad_pairs), {}  # key → pair (a repeated pair once)
        for p in pairs:
            key = flow_key(p.a, p.b)
            if key in todo and (todo[key].a, todo[key].b) != (p.a, p.b):  # a backstop: flow_key is one-to-one
                rejects.append(reject(key, f"output name already used by the pair ({todo[key].a}, {todo[key].b}) at {todo[key].where}"))
            elif p.a not in faces or p.b not in faces:
                rejects.append(reject(key, "pair names a face missing from faces.jsonl"))
            elif faces[p.a].size != faces[p.b].size:
                rejects.append(reject(key, "faces of the pair have different crop sizes"))
            else:
                todo[key] = p
        pending = [(k, p) for k, p in todo.items() if not job.is_done(k)]
        chunks = [FlowChunk(pending[i:i + batch]) for i in range(0, len(pending), batch)]
        args = {"cfg": fit_cfg, "batch": batch, "backend": backend.value, "previews": previews, "max_rmse": max_rmse}
        if ray is not None:  # the workers load the faces and the model themselves
            stage = engine.Stage(FlowWorker, {"faces": str(folder), "out": str(out), "model": model, "embedding": embedding,
                                              "device": "cuda" if gpus else "cpu", **args}, num_cpus=1.0, num_gpus=gpus)
        else:
            stage = engine.Stage(FlowWorker, {"faces": faces, "out": str(out), "model": flame, "embedding": None,
                                              "device": device, **args})
        rows = engine.run(job, chunks, [stage], ray=ray, info=info, done_before=len(todo) - len(pending), total=len(todo))
        fitted, done_now = sum(r.fitted for r in rows), sum(r.written for r in rows)
        if ray is not None:
            job.device = engine.device_label(info)
        manifest = []
        for key in todo:
            rec = job.load_unit(key) if job.is_done(key) else None
            if rec is None:
                continue
            if "reason" in rec:
                rejects.append(rec)
            else:
                manifest.append(rec)
        FlowRecord.write(out / FlowRecord.FILE, manifest)
        used = "pytorch3d" if backend != Rasterizer.torch and "pytorch3d" in available_backends() else "torch"
        return job.finish(n_in=len(pairs) + len(bad_pairs), written=len(manifest), written_this_run=done_now,
                          skipped=len(todo) - len(pending), rejects=rejects,
                          details={"model": str(resolve_flame_path(model)), "rasterizer": used,
                                   "faces_fitted_on_the_fly": fitted,
                                   "engine": engine.describe(ray, info)})


def flow_chunk(job: Job, faces: FaceSet, flame, chunk: list[tuple[str, PairRecord]], cfg: FitConfig, batch: int,
               backend: str, previews: bool, max_rmse: float) -> tuple[int, int]:
    """Fit (where needed), flow and write one batch of pairs ``(key, pair)``, each with its unit
    record; returns (faces fitted on the fly, flows written)."""
    with job.stage("fit"):
        ids = [p.a for _, p in chunk] + [p.b for _, p in chunk]
        params, n_fit = params_for_faces(flame, faces, ids, cfg, max(batch * 2, 16))
    n = len(chunk)
    with job.stage("flow"), torch.no_grad():
        fl = shape_flow(flame, params[:n], params[n:], faces[chunk[0][1].b].size, backend)
    written = 0
    with job.stage("write"):
        for j, (key, p) in enumerate(chunk):
            written += _write_one(job, faces, key, p, fl, j, previews, max_rmse)
    return n_fit, written


class FlowChunk(NamedTuple):
    """A unit of ``flows``: a batch of pairs, each with its output name."""

    pairs: list[tuple[str, PairRecord]]


class FlowsDone(NamedTuple):
    """What the flow stage did with a :class:`FlowChunk`."""

    fitted: int  # faces fitted on the fly
    written: int  # flows written


class FlowWorker:
    """The flows stage: one batch of pairs fitted, flowed and written (:func:`flow_chunk`).

    Args:
        faces: the prep folder's faces (or the folder, loaded once per worker).
        out: the output folder.
        model: the FLAME model (or its file, loaded once per worker, with ``embedding``).
        device: where the model is loaded from a file.
        args: :func:`flow_chunk`'s options.
    """

    def __init__(self, faces: FaceSet | str, out: str, model: Flame | str | None, embedding: str | None, device: str, **args):
        self.job = Job.attach("flows", out, "pairs", device)
        self.faces = faces if isinstance(faces, FaceSet) else FaceSet.load(faces, strict=False)
        self.flame = model if isinstance(model, Flame) else load_flame(model, embedding, device)
        self.args = args

    def __call__(self, chunk: FlowChunk) -> FlowsDone:
        return FlowsDone(*flow_chunk(self.job, self.faces, self.flame, chunk.pairs, **self.args))


def flow_key(a: str, b: str) -> str:
    """The output name of pair (a, b): ``{a}__{b}``, one-to-one. Where an id holds ``__`` (or an
    underscore touches the separator) the plain join could name two pairs alike ((x__y, z) and
    (x, y__z)), so such a key ends in ``.{hash}`` of the pair, which no plain key does with a
    separator run like its own."""
    plain = f"{a}__{b}"
    if "__" not in a and "__" not in b and not a.endswith("_") and not b.startswith("_"):
        return plain
    h = hashlib.sha256(f"{a}\0{b}".encode()).hexdigest()[:12]
    return f"{plain[:229]}.{h}"


def _write_one(job: Job, faces: FaceSet, key: str, p: PairRecord, fl: dict, j: int, previews: bool, max_rmse: float) -> int:
    """Write pair ``key``'s flow (and preview), then its unit record; 1 if a flow was written."""
    fits = [faces.flame[p.a].rmse_px, faces.flame[p.b].rmse_px]
    fwd, bwd = fl["forward"][j], fl["backward"][j]
    if max(fits) > max_rmse:
        job.save_unit(key, reject(key, f"FLAME fit RMSE {max(fits):.2f} px above --max-rmse {max_rmse}"))
        return 0
    if not (torch.isfinite(fwd).all() and torch.isfinite(bwd).all()):
        job.save_unit(key, reject(key, "non-finite flow"))
        return 0
    p2, p12 = fl["p2"][j].cpu().numpy(), fl["p12"][j].cpu().numpy()
    buf = io.BytesIO()
    np.savez_compressed(buf, forward=fwd.permute(1, 2, 0).cpu().numpy().astype(np.float16),
                        backward=bwd.permute(1, 2, 0).cpu().numpy().astype(np.float16),
                        mask2=fl["mask2"][j, 0].cpu().numpy(), mask12=fl["mask12"][j, 0].cpu().numpy(),
                        p2=p2.astype(np.float32), p12=p12.astype(np.float32))
    atomic_write_bytes(job.out / "flows" / f"{key}.npz", buf.getvalue())
    if previews:
        img_b = read_crop(faces, faces[p.b])
        atomic_write_bytes(job.out / "previews" / f"{key}.png",
                           preview(img_b, fwd.cpu(), bwd.cpu(), fl["mask2"][j].cpu(), p2, p12))
    shift = float(np.linalg.norm(p12[JAW] - p2[JAW], axis=-1).mean())
    job.save_unit(key, FlowRecord(key=key, a=p.a, b=p.b, flow=f"flows/{key}.npz",
                                  preview=f"previews/{key}.png" if previews else None, size=int(fwd.shape[-1]),
                                  contour_shift_px=round(shift, 3)).to_json())
    return 1
