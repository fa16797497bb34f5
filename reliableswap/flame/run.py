"""The ``fit`` and ``flows`` commands: FLAME parameters per face, and dense shape flows per pair.

``fit`` reads ``faces.jsonl`` (aligned-crop landmarks), fits FLAME in batches and rewrites
``faces.jsonl`` with a ``flame`` record per face (atomic), plus ``fit.summary.json`` and
``fit.rejects.jsonl`` (faces whose fit stays above ``--max-rmse``: they get no ``flame`` record).

``flows`` reads pairs, takes both faces' parameters (fitting the ones that have none, in memory),
and writes per pair ``flows/{a}__{b}.npz`` (float16 H×W×2 ``forward`` and ``backward`` fields,
coverage masks, FLAME landmarks P2/P12), ``previews/{a}__{b}.png`` (b | colour wheel over b with
contour arrows P2→P12 | b warped into a's shape), ``manifest.jsonl``, ``rejects.jsonl`` and
``summary.json``. Existing flow files are kept, so a re-run resumes.
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from reliableswap import __version__
from reliableswap.flame.fit import FitConfig, fit_landmarks
from reliableswap.flame.layer import Flame, FlameParams
from reliableswap.flame.model import FlameFileError, FlameModel, LandmarkEmbedding, resolve_flame_path
from reliableswap.io import reason_key
from triplets.jsonl import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, read_jsonl
from triplets.schema import FACES_SCHEMA, FLOWS_SCHEMA, PAIRS_SCHEMA, REJECTS_SCHEMA, SUMMARY_SCHEMA

PARAM_KEYS = ("shape", "expression", "global_pose", "neck", "jaw", "eyes", "camera")
Progress = Callable[[int, int], None] | None


def load_embedding(path: str | os.PathLike) -> LandmarkEmbedding:
    """DECA's ``landmark_embedding.npy``, or RingNet's ``flame_static_embedding.pkl`` (with
    ``flame_dynamic_embedding.npy`` when it lies beside it)."""
    path = Path(path)
    if path.suffix == ".npy":
        return LandmarkEmbedding.load_deca(path)
    dyn = path.with_name("flame_dynamic_embedding.npy")
    return LandmarkEmbedding.load_ringnet(path, dyn if dyn.is_file() else None)


def find_embedding(model_path: Path) -> LandmarkEmbedding:
    """The landmark embedding beside the model (DECA's first, then RingNet's)."""
    for name in ("landmark_embedding.npy", "flame_static_embedding.pkl"):
        if (model_path.parent / name).is_file():
            return load_embedding(model_path.parent / name)
    raise FlameFileError(
        f"no landmark embedding beside {model_path}: put DECA's landmark_embedding.npy (or RingNet's "
        "flame_static_embedding.pkl + flame_dynamic_embedding.npy) there, or pass --embedding PATH")


def load_flame(model: str | os.PathLike | None, embedding: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", dtype=torch.float32) -> Flame:
    """FLAME model + landmark embedding on ``device`` (``model`` None → ``$RELIABLESWAP_FLAME``)."""
    path = resolve_flame_path(model)
    emb = find_embedding(path) if embedding is None else load_embedding(embedding)
    return Flame(FlameModel.load(path), emb, dtype=dtype).to(device)


def params_to_records(p: FlameParams, rmse: torch.Tensor, size: int) -> list[dict]:
    cols = {k: getattr(p, k).detach().cpu().double().numpy() for k in PARAM_KEYS}
    return [{"size": size, "rmse_px": round(float(rmse[i]), 4),
             **{k: np.round(cols[k][i], 6).tolist() for k in PARAM_KEYS}} for i in range(len(rmse))]


def records_to_params(recs: list[dict], device=None, dtype=torch.float32) -> FlameParams:
    """Stack ``flame`` records (same coefficient counts) into batched parameters."""
    return FlameParams(*[torch.tensor([r[k] for r in recs], device=device, dtype=dtype) for k in PARAM_KEYS])


def fit_records(flame: Flame, faces: list[dict], cfg: FitConfig, batch: int, progress: Progress = None) -> list[dict]:
    """Fit every face's ``landmarks68`` (aligned-crop pixels); returns one ``flame`` record per face."""
    dev, dt = flame.v_template.device, flame.v_template.dtype
    out: list[dict] = []
    for i in range(0, len(faces), batch):
        chunk = faces[i:i + batch]
        by_size: dict[int, list[int]] = {}
        for j, f in enumerate(chunk):
            by_size.setdefault(int(f["size"]), []).append(j)
        recs: list[dict | None] = [None] * len(chunk)
        for size, idx in by_size.items():
            lm = torch.tensor([chunk[j]["landmarks68"] for j in idx], device=dev, dtype=dt)
            p, rmse = fit_landmarks(flame, lm, size, cfg)
            for j, r in zip(idx, params_to_records(p, rmse, size)):
                recs[j] = r
        out.extend(recs)  # type: ignore[arg-type]
        if progress:
            progress(min(i + batch, len(faces)), len(faces))
    return out


def run_fit(folder: Path, model: str | None, embedding: str | None = None, cfg: FitConfig = FitConfig(),
            batch: int = 128, device: str = "cpu", max_rmse: float = 8.0, progress: Progress = None) -> dict:
    """``reliableswap fit``: store fitted FLAME parameters in ``folder/faces.jsonl``."""
    t0 = time.perf_counter()
    flame = load_flame(model, embedding, device)
    t_load = time.perf_counter() - t0
    faces = list(read_jsonl(folder / "faces.jsonl", FACES_SCHEMA))
    t = time.perf_counter()
    fits = fit_records(flame, faces, cfg, batch, progress)
    t_fit = time.perf_counter() - t
    rejects = []
    for f, r in zip(faces, fits):
        f.pop("flame", None)
        if not np.isfinite(r["rmse_px"]) or r["rmse_px"] > max_rmse:
            rejects.append({"schema": REJECTS_SCHEMA, "input": f["id"],
                            "reason": f"FLAME fit RMSE {r['rmse_px']:.2f} px above --max-rmse {max_rmse}"})
        else:
            f["flame"] = r
    atomic_write_jsonl(folder / "faces.jsonl", faces)
    atomic_write_jsonl(folder / "fit.rejects.jsonl", rejects)
    rm = np.array([r["rmse_px"] for r in fits]) if fits else np.zeros(0)
    summary = {
        "schema": SUMMARY_SCHEMA, "command": "fit", "version": __version__,
        "model": str(resolve_flame_path(model)), "device": str(device),
        "settings": {**vars(cfg), "batch": batch, "max_rmse": max_rmse},
        "counts": {"in": len(faces), "written": len(faces) - len(rejects), "rejected": len(rejects),
                   "rejected_by_reason": dict(Counter(reason_key(r["reason"]) for r in rejects))},
        "rmse_px": {"mean": round(float(rm.mean()), 4), "median": round(float(np.median(rm)), 4),
                    "max": round(float(rm.max()), 4)} if len(rm) else None,
        "timings": {"load_s": round(t_load, 3), "fit_s": round(t_fit, 3), "wall_s": round(time.perf_counter() - t0, 3)},
        "throughput": {"faces_per_s": round(len(faces) / max(t_fit, 1e-9), 1)},
    }
    atomic_write_json(folder / "fit.summary.json", summary)
    return summary


def face_params(flame: Flame, faces: dict[str, dict], ids: list[str], batch: int,
                cfg: FitConfig = FitConfig()) -> tuple[FlameParams, int]:
    """Parameters for ``ids`` from their ``flame`` records; faces without one are fitted now.
    Returns the parameters and how many were fitted on the fly."""
    missing = [i for i in dict.fromkeys(ids) if "flame" not in faces[i]]
    if missing:
        for i, r in zip(missing, fit_records(flame, [faces[i] for i in missing], cfg, batch)):
            faces[i]["flame"] = r
    dev, dt = flame.v_template.device, flame.v_template.dtype
    return records_to_params([faces[i]["flame"] for i in ids], dev, dt), len(missing)


def _preview(img_b: np.ndarray, fwd: torch.Tensor, bwd: torch.Tensor, mask: torch.Tensor, p2: np.ndarray, p12: np.ndarray) -> bytes:
    """b | colour wheel of the forward flow over b with contour arrows P2→P12 | b warped by the flow."""
    import cv2

    from reliableswap.flame.flow import flow_to_color
    from reliableswap.io import encode_image, to_tensor, to_uint8
    from reliableswap.synth.tps import warp_backward

    b = to_tensor(img_b)
    wheel = flow_to_color(fwd[None])
    over = torch.where(mask[None], 0.4 * b + 0.6 * wheel, b)
    over = np.ascontiguousarray(to_uint8(over)[0])
    for s, e in zip(p2[:17], p12[:17]):
        cv2.arrowedLine(over, tuple(int(round(v)) for v in s), tuple(int(round(v)) for v in e), (255, 255, 255), 1, cv2.LINE_AA, tipLength=0.3)
    warped = to_uint8(warp_backward(b, bwd[None], "border"))[0]
    return encode_image(np.concatenate([img_b, over, warped], 1), ".png")


def run_flows(folder: Path, pairs_file: Path, out: Path, model: str | None, embedding: str | None = None,
              batch: int = 8, device: str = "cpu", previews: bool = True, cfg: FitConfig = FitConfig(),
              backend: str = "auto", progress: Progress = None) -> dict:
    """``reliableswap flows``: a dense shape flow per pair (see the module docstring)."""
    from reliableswap.flame.flow import shape_flow
    from reliableswap.io import load_rgb

    t0 = time.perf_counter()
    flame = load_flame(model, embedding, device)
    faces = {f["id"]: f for f in read_jsonl(folder / "faces.jsonl", FACES_SCHEMA)}
    pairs = list(read_jsonl(pairs_file, PAIRS_SCHEMA))
    (out / "flows").mkdir(parents=True, exist_ok=True)
    if previews:
        (out / "previews").mkdir(exist_ok=True)
    manifest, rejects = [], []
    todo = []
    for p in pairs:
        key = f"{p['a']}__{p['b']}"
        if p["a"] not in faces or p["b"] not in faces:
            rejects.append({"schema": REJECTS_SCHEMA, "input": key, "reason": "pair names a face missing from faces.jsonl"})
        elif faces[p["a"]]["size"] != faces[p["b"]]["size"]:
            rejects.append({"schema": REJECTS_SCHEMA, "input": key, "reason": "faces of the pair have different crop sizes"})
        else:
            todo.append((key, p))
    timings: Counter = Counter()
    fitted = done_now = 0
    for i in range(0, len(todo), batch):
        chunk = [(k, p) for k, p in todo[i:i + batch] if not (out / "flows" / f"{k}.npz").is_file()]
        if chunk:
            t = time.perf_counter()
            ids = [p["a"] for _, p in chunk] + [p["b"] for _, p in chunk]
            params, n_fit = face_params(flame, faces, ids, max(batch * 2, 16), cfg)
            fitted += n_fit
            timings["fit_s"] += time.perf_counter() - t
            n = len(chunk)
            pa, pb = params[:n], params[n:]
            size = int(faces[chunk[0][1]["b"]]["size"])
            t = time.perf_counter()
            with torch.no_grad():
                fl = shape_flow(flame, pa, pb, size, backend)
            timings["flow_s"] += time.perf_counter() - t
            t = time.perf_counter()
            for j, (key, p) in enumerate(chunk):
                fwd, bwd = fl["forward"][j], fl["backward"][j]
                p2, p12 = fl["p2"][j].cpu().numpy(), fl["p12"][j].cpu().numpy()
                if not (torch.isfinite(fwd).all() and torch.isfinite(bwd).all()):
                    rejects.append({"schema": REJECTS_SCHEMA, "input": key, "reason": "non-finite flow"})
                    continue
                buf = io.BytesIO()
                np.savez_compressed(buf, forward=fwd.permute(1, 2, 0).cpu().numpy().astype(np.float16),
                                    backward=bwd.permute(1, 2, 0).cpu().numpy().astype(np.float16),
                                    mask2=fl["mask2"][j, 0].cpu().numpy(), mask12=fl["mask12"][j, 0].cpu().numpy(),
                                    p2=p2.astype(np.float32), p12=p12.astype(np.float32))
                if previews:
                    img_b = load_rgb(folder / faces[p["b"]]["image"])
                    atomic_write_bytes(out / "previews" / f"{key}.png",
                                       _preview(img_b, fwd.cpu(), bwd.cpu(), fl["mask2"][j].cpu(), p2, p12))
                atomic_write_bytes(out / "flows" / f"{key}.npz", buf.getvalue())  # last: its presence means done
                done_now += 1
            timings["write_s"] += time.perf_counter() - t
        for key, p in todo[i:i + batch]:
            if (out / "flows" / f"{key}.npz").is_file():
                with np.load(out / "flows" / f"{key}.npz") as z:
                    d = np.linalg.norm(z["p12"][:17] - z["p2"][:17], axis=-1)
                manifest.append({"schema": FLOWS_SCHEMA, "key": key, "a": p["a"], "b": p["b"],
                                 "flow": f"flows/{key}.npz", "preview": f"previews/{key}.png" if previews else None,
                                 "size": int(faces[p["b"]]["size"]), "contour_shift_px": round(float(d.mean()), 3)})
        if progress:
            progress(min(i + batch, len(todo)), len(todo))
    atomic_write_jsonl(out / "manifest.jsonl", manifest)
    atomic_write_jsonl(out / "rejects.jsonl", rejects)
    wall = time.perf_counter() - t0
    from reliableswap.flame.raster import available_backends

    summary = {
        "schema": SUMMARY_SCHEMA, "command": "flows", "version": __version__,
        "model": str(resolve_flame_path(model)), "device": str(device),
        "rasterizer": "pytorch3d" if backend in ("auto", "pytorch3d") and "pytorch3d" in available_backends() else "torch",
        "counts": {"in": len(pairs), "written": len(manifest), "written_this_run": done_now, "rejected": len(rejects),
                   "rejected_by_reason": dict(Counter(reason_key(r["reason"]) for r in rejects)),
                   "faces_fitted_on_the_fly": fitted},
        "timings": {k: round(v, 3) for k, v in timings.items()} | {"wall_s": round(wall, 3)},
        "throughput": {"pairs_per_s": round(done_now / wall, 2) if done_now else None},
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
