"""``reliableswap fit``: FLAME parameters per face of a prep folder → ``flame.jsonl``.

``fit`` never touches ``faces.jsonl`` (``prep`` is its only writer): it writes ``flame.jsonl`` (one
:class:`~reliableswap.contracts.FlameRecord` per face, keyed by face id), ``fit.rejects.jsonl`` (faces
whose fit stays above ``--max-rmse``) and ``fit.summary.json`` beside it. Units are batches of
faces; a re-run fits only the faces no earlier run fitted (faces ``prep`` added since included).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from reliableswap.device import resolve_device
from reliableswap.flame.fit import FitConfig, fit_faces
from reliableswap.flame.layer import load_flame
from reliableswap.flame.model import resolve_flame_path
from reliableswap.jobs import Job, NothingUsable, bad_records, reject
from triplets.jsonl import file_sha256
from reliableswap.contracts import FaceSet, FlameRecord


def flame_settings(model: str | os.PathLike | None, embedding: str | os.PathLike | None, cfg: FitConfig) -> dict:
    """What makes two FLAME fits comparable: the model file's bytes, the embedding, the fit settings."""
    path = resolve_flame_path(model)
    return {"model_sha256": file_sha256(path), "embedding": str(embedding) if embedding else "beside the model",
            "fit": asdict(cfg)}


@dataclass(frozen=True)
class FitJobConfig:
    """How ``fit`` runs (the CLI's flags).

    Args:
        embedding: FLAME's landmark embedding file (``None``: beside the model file).
        fit: the fit itself (shape and expression sizes, iterations, weights).
        batch: faces per batch (a unit of the job).
        device: ``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ``cuda:1``…
        max_rmse: faces fitted with a larger landmark RMSE (crop px) are rejected.
    """

    embedding: str | os.PathLike | None = None
    fit: FitConfig = field(default_factory=FitConfig)
    batch: int = 128
    device: str = "auto"
    max_rmse: float = 8.0


def run_fit(faces: str | os.PathLike, flame: str | os.PathLike | None, cfg: FitJobConfig = FitJobConfig(), *,
            progress: bool = False) -> dict:
    """Fit the FLAME model file ``flame`` to every face of the prep folder ``faces``; returns the
    summary (also ``fit.summary.json``)."""
    folder, model = Path(faces), flame  # the paths; ``faces``/``flame`` below hold the records and the model
    embedding, batch, max_rmse = cfg.embedding, cfg.batch, cfg.max_rmse
    device = str(resolve_device(cfg.device))
    fit_cfg = cfg.fit
    faces = FaceSet.load(folder, flame=False, strict=False)
    settings = {**flame_settings(model, embedding, fit_cfg), "max_rmse": max_rmse}
    with Job("fit", folder, settings, "faces", shared="fit", device=device, progress=progress) as job:
        with job.stage("load"):
            flame = load_flame(model, embedding, device)
        units = job.done_keys()
        by_id = {r["id"]: r for k in units for r in job.load_unit(k)["records"]}  # fitted by earlier runs
        todo = [f for f in faces if f.id not in by_id]
        n = len(units)
        job.progress(len(faces) - len(todo), len(faces))
        for i in range(0, len(todo), batch):
            with job.stage("fit"):
                recs = [r.to_json() for r in fit_faces(flame, todo[i:i + batch], fit_cfg, batch)]
            job.save_unit(f"batch-{n:06d}", {"records": recs})
            by_id.update((r["id"], r) for r in recs)
            n += 1
            job.progress(len(faces) - len(todo) + min(i + batch, len(todo)), len(faces))
        keep, rejects = [], bad_records(faces.problems)
        for f in faces:
            r = by_id[f.id]
            if r["rmse_px"] > max_rmse:
                rejects.append(reject(f.id, f"FLAME fit RMSE {r['rmse_px']:.2f} px above --max-rmse {max_rmse}"))
            else:
                keep.append(r)
        FlameRecord.write(folder / FlameRecord.FILE, keep)
        rm = np.array([by_id[f.id]["rmse_px"] for f in faces])
        if len(faces) and not keep:
            raise NothingUsable(f"no face of {folder} was fitted within --max-rmse {max_rmse} px (RMSE median {np.median(rm):.2f})")
        fit_s = job.stages["fit"]
        now = {f.id for f in todo}
        return job.finish(
            n_in=len(faces) + len(faces.problems), written=len(keep), written_this_run=sum(r["id"] in now for r in keep), skipped=len(faces) - len(todo), rejects=rejects,
            details={"model": str(resolve_flame_path(model)),
                     "rmse_px": {"mean": round(float(rm.mean()), 4), "median": round(float(np.median(rm)), 4),
                                 "max": round(float(rm.max()), 4)} if len(rm) else None,
                     "fit_faces_per_s": round(len(todo) / fit_s, 1) if fit_s > 0 and todo else None})
