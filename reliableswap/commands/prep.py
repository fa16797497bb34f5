"""``reliableswap prep``: photos, folders and videos → aligned faces + ``faces.jsonl``.

Units are input files (an image, or a whole video). Each unit's crops are written atomically,
then its record (:class:`reliableswap.jobs.Job`); ``faces.jsonl``, ``rejects.jsonl`` and
``summary.json`` are rebuilt from the unit records at the end of every run. ``prep`` is the only
writer of ``faces.jsonl``; ``fit`` writes ``flame.jsonl`` beside it, so re-running either never
loses the other's output.

With ``identity_from_folder`` the identity label is the image's parent folder, crops go to
``faces/<identity>/`` (a label that is not a safe file name: its slug and a hash of it, so two labels
never share a folder) and ``vanilla.pickle`` (the official trainer's ``(path, quality)`` list,
:mod:`triplets.official`) is written too.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import torch

from reliableswap import engine
from reliableswap.choices import Align, CropExt, Detector, LandmarkBackend, MaskBackend
from reliableswap.device import resolve_device
from reliableswap.engine import RayOptions
from reliableswap.errors import UserError
from reliableswap.faces.detect import YuNetDetector
from reliableswap.faces.landmarks import FanLandmarks
from reliableswap.faces.hands import HandLandmarker
from reliableswap.faces.mesh import load_face_mesh
from reliableswap.faces.processor import FaceProcessor
from reliableswap.faces.occluders import encode_masks
from reliableswap.images import MAX_PIXELS, InputError, is_image, is_video, iter_video_frames, read_image, save_image, to_tensor
from reliableswap.nets.weights import require, weights_dir
from reliableswap.synth.learned import FaceParser
from reliableswap.synth.occluders import PARSER_SOURCES, SOURCES, crop_occluders
from reliableswap.jobs import Job, OutputError, reject, unit_record_path, writing
from triplets.jsonl import atomic_write_json
from triplets.official import VANILLA_PICKLE, write_vanilla_pickle
from reliableswap.contracts import OCCLUDER_CHANNELS, FaceRecord


@dataclass(frozen=True)
class PrepConfig:
    """Every setting that changes what ``prep`` writes (pinned in ``.prep/settings.json``)."""

    size: int = 256
    align: Align = Align.ffhq
    landmarks: LandmarkBackend = LandmarkBackend.dlib
    detector: Detector = Detector.hog
    every: int = 1
    largest: bool = False
    min_face: int = 40
    embed: bool = False
    identity_from_folder: bool = False
    ext: CropExt = CropExt.png
    device: str = "auto"  # auto: CUDA when there is one (a Ray actor: when it holds a GPU)
    max_pixels: int = MAX_PIXELS  # larger images/video frames are rejected from their header, before decoding
    # the stored glasses and hair masks (--landmarks mesh): the mesh and colour rules, or BiSeNet's
    # classes from the user's weights folder ($RELIABLESWAP_WEIGHTS)
    occluders: MaskBackend = MaskBackend.geometry

    def settings(self) -> dict:
        out = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(self).items()}
        if self.occluders == MaskBackend.geometry:  # folders made before the choice existed resume
            del out["occluders"]
        return out

    def check_models(self) -> None:
        """Fail before any worker starts, naming a missing or unusable model file (FAN weights,
        the face-mesh ``.tflite``), instead of every worker dying on it."""
        if self.landmarks == LandmarkBackend.fan:
            FanLandmarks(self.device)
        elif self.landmarks == LandmarkBackend.mesh:
            load_face_mesh(self.device)
            HandLandmarker(self.device)  # stored beside the mesh
        if self.occluders == MaskBackend.bisenet:
            if self.landmarks != LandmarkBackend.mesh:
                raise UserError("--occluders bisenet needs --landmarks mesh (occluder masks are stored with the mesh)")
            require("bisenet", weights_dir(None), "occluders")
        if self.detector == Detector.yunet:
            YuNetDetector()

    def processor(self) -> FaceProcessor:
        return FaceProcessor(self.size, self.align, self.landmarks, self.detector, self.min_face, self.largest, self.embed,
                             self.device)


@dataclass
class Unit:
    """One input file; ``key`` is stable across runs and names its record."""

    path: Path
    display: str
    key: str
    kind: str  # image | video


@dataclass
class UnitResult:
    key: str
    faces: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    frames: int = 0


def slug(text: str, limit: int = 60) -> str:
    """A safe file-name fragment of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit] or "input"


def display_path(p: str | os.PathLike) -> str:
    """``p`` as text that can be written to JSON: a file name that is not valid UTF-8 (a Latin-1
    "café.jpg") keeps its bytes as ``\\xNN`` escapes instead of stopping the run."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def identity_folder(identity: str) -> str:
    """The crop folder of an identity label: its slug when that is the label itself, else the slug
    and a hash of the label, so labels that slug alike ("王伟" and "李娜", "Zoë" and "Zoé") stay
    apart for the official trainer, which groups faces by folder."""
    s = slug(identity)
    return s if s == identity else f"{s}-{hashlib.sha1(identity.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def discover(inputs: Iterable[str | os.PathLike], exclude: Path | None = None) -> tuple[list[Unit], list[dict], int]:
    """Expand files and folders (recursively) into units.

    Files named explicitly are always tried, whatever their suffix; inside folders only image and
    video suffixes are taken and other files are counted as ignored. Anything under ``exclude``
    (the output folder, when it lies inside an input folder) is left out.

    Returns:
        ``(units, rejects, ignored)``: rejects for inputs that do not exist.
    """
    units: list[Unit] = []
    rejects: list[dict] = []
    ignored = 0
    seen: set[Path] = set()
    skip = exclude.resolve() if exclude is not None else None

    def add(p: Path) -> None:
        rp = p.resolve()
        if rp in seen or (skip is not None and rp.is_relative_to(skip)):
            return
        seen.add(rp)
        digest = hashlib.sha1(os.fsencode(rp)).hexdigest()[:8]
        units.append(Unit(rp, display_path(p), f"{slug(display_path(p.stem))}-{digest}", "video" if is_video(p) else "image"))

    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for q in sorted(p.rglob("*")):
                if q.is_file() and not q.name.startswith("."):
                    if is_image(q) or is_video(q):
                        add(q)
                    else:
                        ignored += 1
        elif p.is_file():
            add(p)
        else:
            rejects.append(reject(display_path(p), "no such file or folder"))
    return units, rejects, ignored


_WORKER: dict = {}


def _init_worker(cfg: PrepConfig, single_thread: bool = True) -> None:
    """Load the models for this process (kept for the next run with the same settings); a worker
    of a pool keeps torch/OpenCV to one thread."""
    if single_thread:
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
    if _WORKER.get("cfg") == cfg:
        return
    _WORKER["cfg"], _WORKER["proc"] = cfg, cfg.processor()
    _WORKER["parser"] = FaceParser(weights_dir(None), amp=False) if cfg.occluders == MaskBackend.bisenet else None


def process_unit(unit: Unit, out: Path) -> UnitResult:
    """Process one unit; write its crops, then its record (both atomically). Never raises for bad input."""
    cfg: PrepConfig = _WORKER["cfg"]
    proc: FaceProcessor = _WORKER["proc"]
    res = UnitResult(unit.key)
    timings: Counter = Counter()
    identity = display_path(unit.path.parent.name) if cfg.identity_from_folder else None
    crop_dir = f"faces/{identity_folder(identity)}" if identity is not None else "faces"

    def handle(rgb: np.ndarray, scale: float, frame: int | None) -> None:
        recs, crops, reason = proc(rgb, scale, timings)
        if reason:
            res.rejects.append(reject(unit.display, reason, frame=frame))
            return
        masks = None
        if cfg.landmarks == LandmarkBackend.mesh:  # what covers each face, stored once for every later command
            t = time.perf_counter()
            masks = encode_masks(crop_occluders(to_tensor(crops), torch.tensor([r["mesh468"] for r in recs]),
                                                [r["hands"] for r in recs], _WORKER["parser"])).numpy()
            timings["occluders"] += time.perf_counter() - t
        t = time.perf_counter()
        for k, (r, crop) in enumerate(zip(recs, crops)):
            fid = unit.key + (f"_f{frame:06d}" if frame is not None else "") + f"_{k}"
            rel = f"{crop_dir}/{fid}{cfg.ext.value}"
            with writing(out / rel):  # an output failure stops the run; the input is not to blame
                save_image(out / rel, crop)
            if masks is not None:
                rel_m = f"occluders{crop_dir.removeprefix('faces')}/{fid}.png"  # beside the crop: occluders[/<identity>]/<id>.png
                with writing(out / rel_m):
                    save_image(out / rel_m, masks[k])
                r["occluders"] = {"mask": rel_m, "sources": SOURCES if _WORKER["parser"] is None else PARSER_SOURCES,
                                  "area": {c: round(float((masks[k][..., j] > 127).mean()), 5) for j, c in enumerate(OCCLUDER_CHANNELS)}}
            res.faces.append(FaceRecord(
                id=fid, image=rel, align=cfg.align.value, size=cfg.size, identity=identity,
                origin={"path": unit.display, "frame": frame, "face_index": k,
                        "size": [int(round(rgb.shape[1] * scale)), int(round(rgb.shape[0] * scale))]}, **r).to_json())
        timings["write"] += time.perf_counter() - t

    try:
        if unit.kind == "video":
            for idx, rgb in _timed(iter_video_frames(unit.path, cfg.every, cfg.max_pixels), timings):
                res.frames += 1
                handle(rgb, 1.0, idx)
        else:
            t = time.perf_counter()
            rgb, scale = read_image(unit.path, max_pixels=cfg.max_pixels)
            timings["decode"] += time.perf_counter() - t
            res.frames = 1
            handle(rgb, scale, None)
    except InputError as e:
        res.rejects.append(reject(unit.display, str(e)))
    except OutputError:
        raise
    except Exception as e:  # a bug or a library failure on odd data must not stop the batch
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip(": ")
        res.rejects.append(reject(unit.display, f"processing failed ({msg})"))
    res.timings = dict(timings)
    path = unit_record_path(out, "prep", unit.key)
    with writing(path):
        atomic_write_json(path, asdict(res))
    return res


def _timed(frames, timings: Counter):
    """Yield from a frame iterator, adding the decoding time to ``timings["decode"]``."""
    while True:
        t = time.perf_counter()
        try:
            item = next(frames)
        except StopIteration:
            return
        finally:
            timings["decode"] += time.perf_counter() - t
        yield item


def run_prep(inputs: list[str | os.PathLike], out: str | os.PathLike, cfg: PrepConfig = PrepConfig(), *, workers: int = 1,
             progress: bool = False, ray: RayOptions | None = None) -> dict:
    """Run ``prep``; returns the summary (also ``OUT/summary.json``).

    Args:
        inputs: files and folders.
        out: output folder (created); a folder holding a run made with other settings is refused.
        cfg: settings.
        workers: processes (1 = in this process); the local engine's.
        progress: show a progress bar.
        ray: run the units on a Ray cluster (:mod:`reliableswap.engine`; ``ray.workers`` actors)
            instead; the folder it writes is the same.
    """
    out = Path(out)
    if ray is None:
        cfg = replace(cfg, device=str(resolve_device(cfg.device)))
        cfg.check_models()
    else:  # the workers' GPUs are checked against the cluster; the model files here
        replace(cfg, device="cpu").check_models()
    with engine.joined(ray, cfg.device) as (info, gpus), \
            Job("prep", out, _on(cfg, gpus).settings(), "faces", temp_dirs=("faces", "faces/*", "occluders", "occluders/*"), device=cfg.device,
                progress=progress) as job:
        units, missing, ignored = discover(inputs, exclude=out)
        todo = [u for u in units if not job.is_done(u.key)]
        cores = os.cpu_count() or 1
        warning = f"--workers {workers} capped at {cores} (the CPU count)" if ray is None and workers > cores else None
        if ray is not None:
            stage = engine.Stage(PrepWorker, {"cfg": cfg, "out": str(out)}, num_cpus=1.0)
            n = engine.pool_size(stage, ray, info, len(todo))
            # dlib detection is CPU work: the CPU actors share the cluster's GPUs
            stage = replace(stage, num_gpus=min(1.0, info["gpus"] / n) if gpus else 0.0, workers=n)
        else:
            n = max(1, min(workers, cores, len(todo)))  # in this process (its thread settings kept), or a pool
            stage = engine.Stage(PrepWorker, {"cfg": cfg, "out": str(out), "single_thread": n > 1}, workers=n)
        engine.run(job, todo, [stage], ray=ray, info=info, done_before=len(units) - len(todo), total=len(units))
        if ray is not None:
            job.device = engine.device_label(info)
        return assemble(job, units, missing, ignored, cfg, {u.key for u in todo}, warning, engine.describe(ray, info))


def _on(cfg: PrepConfig, gpus: float) -> PrepConfig:
    """``cfg`` with the device its faces are processed on (``auto`` on Ray: the actors' GPU when
    they hold one), so a folder's settings read the same whichever engine made it."""
    if cfg.device != "auto":
        return cfg
    return replace(cfg, device="cuda" if gpus else "cpu")


class PrepWorker:
    """The prep stage: one input file read, its faces detected, landmarked, aligned and written,
    then its unit record (:func:`process_unit`); the models are loaded once per worker."""

    def __init__(self, cfg: PrepConfig, out: str, single_thread: bool = True):
        # on Ray the actor sees its GPU as cuda; auto: the GPU when the worker holds one
        device = "cuda" if cfg.device.startswith("cuda") else str(resolve_device(cfg.device))
        _init_worker(replace(cfg, device=device), single_thread=single_thread)
        self.out = Path(out)

    def __call__(self, unit: Unit) -> int:
        """Faces written for ``unit``."""
        return len(process_unit(unit, self.out).faces)


def assemble(job: Job, units: list[Unit], missing: list[dict], ignored: int, cfg: PrepConfig, ran: set[str],
             warning: str | None = None, eng: dict = engine.LOCAL_ENGINE) -> dict:
    """Rebuild faces.jsonl, rejects.jsonl and summary.json from the per-unit records (``ran``: the
    units processed by this run)."""
    faces: list[dict] = []
    rejects: list[dict] = list(missing)
    timings: Counter = Counter()
    frames = written_now = 0
    for u in units:
        rec = job.load_unit(u.key)
        faces.extend(rec["faces"])
        rejects.extend(rec["rejects"])
        timings.update(rec["timings"])
        frames += rec["frames"]
        written_now += len(rec["faces"]) if u.key in ran else 0
    FaceRecord.write(job.out / FaceRecord.FILE, faces)
    if cfg.identity_from_folder:
        write_vanilla_pickle(job.out / VANILLA_PICKLE, [(job.out / f["image"], f["quality"]["sharpness"]) for f in faces])
    job.stages = timings  # CPU seconds per stage, summed over this run's and earlier runs' workers
    busy = sum(timings.values())
    return job.finish(
        n_in=len(units) + len(missing), written=len(faces), written_this_run=written_now, skipped=len(units) - len(ran),
        rejects=rejects,
        details={"frames": frames, "images_with_faces": len({(f["origin"]["path"], f["origin"]["frame"]) for f in faces}),
                 "ignored_files": ignored, "faces_per_s_per_worker": round(len(faces) / busy, 2) if busy > 0 else None,
                 "warning": warning, "engine": eng})
