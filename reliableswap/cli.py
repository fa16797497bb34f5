"""Command-line interface: parses options, calls library functions. No logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="reliableswap: aligned faces, ReliableSwap triplets, FLAME shape flows, and cycle-supervised fine-tuning of face swappers.",
)
err = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )


def _with_progress(name: str, call: Callable[[Callable[[int, int], None]], dict], errors: tuple[type[Exception], ...]) -> dict:
    """Run ``call(progress)`` under a progress bar; the ``errors`` end the command with their message."""
    with _progress() as bar:
        task = bar.add_task(name, total=None)
        try:
            return call(lambda d, t: bar.update(task, completed=d, total=t))
        except errors as e:
            _fail(str(e))


@app.command()
def prep(
    inputs: Annotated[list[Path], typer.Argument(help="Image files, folders (searched recursively) and video files.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (faces/, faces.jsonl, rejects.jsonl, summary.json).")],
    size: Annotated[int, typer.Option(help="Side of the aligned crops in pixels.", min=32, max=4096)] = 256,
    align: Annotated[str, typer.Option(help="Alignment: ffhq (eye/mouth quad) or arcface (5-point template).")] = "ffhq",
    landmarks: Annotated[str, typer.Option(help="Landmark backend: dlib, or fan (needs face-alignment's 2DFAN-4 weights in the torch hub cache).")] = "dlib",
    detector: Annotated[str, typer.Option(help="dlib detector: hog (fast) or cnn (MMOD, slow on CPU).")] = "hog",
    workers: Annotated[int, typer.Option(help="Parallel worker processes.", min=1)] = 2,
    every: Annotated[int, typer.Option(help="Videos: keep every K-th frame.", min=1)] = 1,
    largest: Annotated[bool, typer.Option("--largest", help="Keep only the largest face of each image.")] = False,
    min_face: Annotated[int, typer.Option("--min-face", help="Reject faces narrower than this (original pixels).", min=1)] = 40,
    embed: Annotated[bool, typer.Option("--embed", help="Store dlib's 128-D face descriptor per face.")] = False,
    identity_from_folder: Annotated[bool, typer.Option("--identity-from-folder", help="Identity label = name of the image's parent folder.")] = False,
    ext: Annotated[str, typer.Option(help="Crop file format: .png or .jpg.")] = ".png",
    device: Annotated[str, typer.Option(help="Torch device for alignment and FAN: cpu, cuda, cuda:1 ...")] = "cpu",
    flame: Annotated[Optional[Path], typer.Option("--flame", help="FLAME model file: also fit FLAME per face (as `reliableswap fit`).")] = None,
) -> None:
    """Detect, landmark and align every face in INPUTS; write crops and faces.jsonl. Resumable."""
    from reliableswap.faces.align import ALIGN_MODES
    from reliableswap.faces.models import MissingWeightsError
    from reliableswap.prep import PrepConfig, run_prep

    if align not in ALIGN_MODES:
        _fail(f"--align must be one of {', '.join(ALIGN_MODES)}")
    if landmarks not in ("dlib", "fan"):
        _fail("--landmarks must be dlib or fan")
    if detector not in ("hog", "cnn"):
        _fail("--detector must be hog or cnn")
    if ext not in (".png", ".jpg"):
        _fail("--ext must be .png or .jpg")
    cfg = PrepConfig(size=size, align=align, landmarks=landmarks, detector=detector, every=every, largest=largest,
                     min_face=min_face, embed=embed, identity_from_folder=identity_from_folder, ext=ext, device=device)
    if landmarks == "fan":
        try:  # fail at start-up, not in every worker
            from reliableswap.faces.landmarks import FanLandmarks

            FanLandmarks(device)
        except MissingWeightsError as e:
            _fail(str(e))
    summary = _with_progress("prep", lambda progress: run_prep(inputs, out, cfg, workers, progress=progress),
                             (ValueError, MissingWeightsError))
    c = summary["counts"]
    err.print(f"{c['written']} faces from {c['in']} inputs ({c['frames']} images/frames); "
              f"{c['rejected']} rejected {c['rejected_by_reason'] or ''}")
    err.print(f"wrote {out / 'faces.jsonl'}, {out / 'rejects.jsonl'}, {out / 'summary.json'}")
    if c["written"] == 0:
        _fail(f"no usable face found in {c['in']} inputs (reasons in {out / 'rejects.jsonl'})", 1)
    if flame is not None:
        fit(out, flame=flame, device=device)


_FLAME_HELP = "FLAME model (generic_model.pkl / flame2023.pkl; default $RELIABLESWAP_FLAME). Licensed: see scripts/fetch_flame.sh."
_EMB_HELP = "Landmark embedding (DECA landmark_embedding.npy or RingNet flame_static_embedding.pkl); default: beside the model."


@app.command()
def fit(
    folder: Annotated[Path, typer.Argument(help="A prep output folder (faces.jsonl).")],
    flame: Annotated[Optional[Path], typer.Option("--flame", help=_FLAME_HELP)] = None,
    embedding: Annotated[Optional[Path], typer.Option("--embedding", help=_EMB_HELP)] = None,
    batch: Annotated[int, typer.Option(help="Faces fitted together.", min=1)] = 128,
    iterations: Annotated[int, typer.Option(help="Levenberg-Marquardt iterations.", min=1)] = 5,
    n_shape: Annotated[int, typer.Option("--n-shape", help="Shape coefficients fitted.", min=1, max=300)] = 100,
    n_expr: Annotated[int, typer.Option("--n-expr", help="Expression coefficients fitted.", min=1, max=100)] = 50,
    max_rmse: Annotated[float, typer.Option("--max-rmse", help="Faces whose fit stays above this RMSE (px) get no parameters.")] = 8.0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "cpu",
) -> None:
    """Fit FLAME (shape, expression, global/jaw pose, weak-perspective camera) to every face's landmarks;
    store the parameters in faces.jsonl ("flame" per face), fit.summary.json, fit.rejects.jsonl."""
    from reliableswap.flame.fit import FitConfig
    from reliableswap.flame.model import FlameFileError, UnsafePickleError
    from reliableswap.flame.run import run_fit

    if not (folder / "faces.jsonl").is_file():
        _fail(f"{folder} has no faces.jsonl (run `reliableswap prep` first)")
    cfg = FitConfig(n_shape=n_shape, n_expr=n_expr, iterations=iterations)
    s = _with_progress("fit", lambda progress: run_fit(folder, flame, embedding, cfg, batch, device, max_rmse, progress=progress),
                       (FlameFileError, UnsafePickleError, OSError))
    c = s["counts"]
    err.print(f"FLAME fitted to {c['written']} of {c['in']} faces (RMSE {s['rmse_px']}); {s['throughput']['faces_per_s']} faces/s")
    err.print(f"wrote {folder / 'faces.jsonl'}, {folder / 'fit.summary.json'}, {folder / 'fit.rejects.jsonl'}")


@app.command()
def flows(
    folder: Annotated[Path, typer.Argument(help="A prep output folder (faces.jsonl + crops; `fit` first, or faces are fitted on the fly).")],
    pairs_file: Annotated[Path, typer.Option("--pairs", help="pairs.jsonl from `reliableswap pairs`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (flows/*.npz, previews/*.png, manifest.jsonl, summary.json).")],
    flame: Annotated[Optional[Path], typer.Option("--flame", help=_FLAME_HELP)] = None,
    embedding: Annotated[Optional[Path], typer.Option("--embedding", help=_EMB_HELP)] = None,
    batch: Annotated[int, typer.Option(help="Pairs per batch.", min=1)] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "cpu",
    previews: Annotated[bool, typer.Option("--previews/--no-previews", help="Write a preview PNG per pair.")] = True,
    rasterizer: Annotated[str, typer.Option(help="auto (pytorch3d when it imports), torch or pytorch3d.")] = "auto",
) -> None:
    """Dense FLAME shape flow per pair (a, b): an H×W×2 float16 field moving b's face contour to a's face
    shape in b's pose and expression (FlowFace++), with previews. Resumable."""
    from reliableswap.flame.model import FlameFileError, UnsafePickleError
    from reliableswap.flame.run import run_flows

    if rasterizer not in ("auto", "torch", "pytorch3d"):
        _fail("--rasterizer must be auto, torch or pytorch3d")
    for f in (folder / "faces.jsonl", pairs_file):
        if not f.is_file():
            _fail(f"{f} does not exist")
    s = _with_progress("flows", lambda progress: run_flows(folder, pairs_file, out, flame, embedding, batch, device, previews,
                                                           backend=rasterizer, progress=progress),
                       (FlameFileError, UnsafePickleError, OSError, RuntimeError))
    c = s["counts"]
    err.print(f"{c['written']} flows of {c['in']} pairs ({c['written_this_run']} this run); {c['rejected']} rejected "
              f"{c['rejected_by_reason'] or ''}; rasterizer {s['rasterizer']}")
    err.print(f"wrote {out / 'manifest.jsonl'}, {out / 'summary.json'}")


@app.command()
def pairs(
    folder: Annotated[Path, typer.Argument(help="A prep output folder (faces.jsonl).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="pairs.jsonl to write.")],
    n: Annotated[Optional[int], typer.Option(help="Number of pairs (default: one per face).", min=1)] = None,
    strategy: Annotated[str, typer.Option(help="random, or pose (prefer partners with a similar head pose).")] = "pose",
    max_yaw_diff: Annotated[float, typer.Option("--max-yaw-diff", help="pose: largest yaw difference in degrees.")] = 20.0,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same pairs).")] = 0,
    min_face_px: Annotated[float, typer.Option("--min-face-px", help="Leave out faces narrower than this in their photo.")] = 64.0,
) -> None:
    """Pair faces of different identities (label, or dlib embedding distance >= 0.6)."""
    import time

    from reliableswap import __version__
    from reliableswap.pairs import has_identity_info, make_pairs
    from reliableswap.prep import load_faces
    from triplets.jsonl import atomic_write_json, atomic_write_jsonl
    from triplets.schema import SUMMARY_SCHEMA

    if strategy not in ("random", "pose"):
        _fail("--strategy must be random or pose")
    if not (folder / "faces.jsonl").is_file():
        _fail(f"{folder} has no faces.jsonl (run `reliableswap prep` first)")
    t = time.perf_counter()
    faces = load_faces(folder)
    with _progress() as bar:
        task = bar.add_task("pairs", total=1)
        ps = make_pairs(faces, n, strategy, max_yaw_diff, seed, min_face_px=min_face_px)
        bar.update(task, completed=1)
    warn = None
    if not has_identity_info(faces):
        warn = "faces carry neither identity labels nor embeddings: pairs may join one person with themself (use prep --embed or --identity-from-folder)"
        err.print(f"[yellow]warning:[/] {warn}")
    if not ps:
        _fail(f"no eligible pair among {len(faces)} faces (all one identity, or poses too far apart)", 1)
    atomic_write_jsonl(out, ps)
    wall = time.perf_counter() - t
    atomic_write_json(out.with_name(out.stem + ".summary.json"), {
        "schema": SUMMARY_SCHEMA, "command": "pairs", "version": __version__,
        "counts": {"in": len(faces), "written": len(ps), "rejected_by_reason": {}},
        "timings": {"wall_s": round(wall, 3)}, "throughput": {"pairs_per_s": round(len(ps) / max(wall, 1e-9), 1)},
        "settings": {"strategy": strategy, "n": n, "max_yaw_diff": max_yaw_diff, "seed": seed, "min_face_px": min_face_px},
        "warning": warn,
    })
    err.print(f"wrote {len(ps)} pairs from {len(faces)} faces to {out}")


@app.command()
def triplets(
    folder: Annotated[Path, typer.Argument(help="A prep output folder (faces.jsonl + crops).")],
    pairs_file: Annotated[Path, typer.Option("--pairs", help="pairs.jsonl from `reliableswap pairs`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (one folder per pair, manifest.jsonl, summary.json).")],
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe TOML (default: built-in cycle recipe).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    batch: Annotated[int, typer.Option(help="Pairs per batch.", min=1)] = 16,
    fmt: Annotated[Optional[str], typer.Option("--format", help="folder (official layout) or webdataset (tar shards). Overrides the recipe.")] = None,
    qc: Annotated[bool, typer.Option("--qc", help="Measure identity margin, pose error and seam per fake (dlib work per fake).")] = False,
    min_id_margin: Annotated[Optional[float], typer.Option("--min-id-margin", help="Drop pairs whose fakes have a smaller identity margin (implies --qc).")] = None,
    shard_index: Annotated[Optional[int], typer.Option("--shard-index", help="This process's shard (default: $RANK or 0).")] = None,
    num_shards: Annotated[Optional[int], typer.Option("--num-shards", help="Number of shards (default: $WORLD_SIZE or 1).")] = None,
    flame: Annotated[Optional[Path], typer.Option("--flame", help="FLAME model: reenact by FLAME(β_a, θ_b, ψ_b) and reshape by the dense shape flow (faces without `fit` parameters are fitted on the fly).")] = None,
) -> None:
    """Synthesize ReliableSwap triplets (source, target, output_st, output_ts) for every pair. Resumable.
    Without --flame (or a FLAME recipe) geometry is 2D (landmark TPS), and summary.json says so."""
    from reliableswap.synth.pipeline import Recipe
    from reliableswap.synth.run import run_triplets

    try:
        r = Recipe.load(recipe)
    except (OSError, ValueError, TypeError) as e:
        _fail(f"cannot read recipe {recipe}: {e}")
    if fmt is not None:
        if fmt not in ("folder", "webdataset"):
            _fail("--format must be folder or webdataset")
        r.output.format = fmt
    if flame is not None:
        r.flame.model = str(flame)
        r.reenact.backend = "flame"
        r.reshape.method = "flame"
    from reliableswap.flame.model import FlameFileError, UnsafePickleError

    s = _with_progress("triplets", lambda progress: run_triplets(folder, pairs_file, out, r, device, batch, qc, min_id_margin,
                                                                 shard_index, num_shards, progress=progress),
                       (FileNotFoundError, ValueError, RuntimeError, FlameFileError, UnsafePickleError))
    c = s["counts"]
    err.print(f"{c['written']} triplets of {c['in']} pairs; {c['rejected']} rejected {c['rejected_by_reason'] or ''}; "
              f"{s['throughput']['triplets_per_s']} triplets/s on {s['device']}")
    err.print(f"wrote {out / 'manifest.jsonl'}, {out / 'summary.json'}, {out / 'recipe.resolved.toml'}")


@app.command()
def finetune(
    recipe: Annotated[Path, typer.Option(help="Training recipe TOML (recipes/tiny.toml, faceshifter.toml, simswap.toml).")],
    triplets_dir: Annotated[Path, typer.Option("--triplets", help="A `reliableswap triplets` output (folders or shards).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (metrics.jsonl, samples/, checkpoints/, summary.json).")],
    faces: Annotated[Optional[Path], typer.Option("--faces", help="A prep folder: vanilla pairs of real faces are drawn from it.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Total steps (overrides the recipe).", min=1)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/latest.json (same trajectory).")] = False,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Start from these swapper weights (.safetensors, or torch file loaded weights_only).")] = None,
    swapper: Annotated[Optional[str], typer.Option(help="package.module:Class of your swapper (overrides the recipe).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ... (under torchrun: cuda:LOCAL_RANK).")] = "auto",
) -> None:
    """Fine-tune a swapper with its own loss plus ReliableSwap's cycle supervision. Resumable; data parallel under torchrun."""
    from reliableswap.train.finetune import TrainRecipe, run_finetune

    try:
        r = TrainRecipe.load(recipe)
    except (OSError, ValueError, TypeError) as e:
        _fail(f"cannot read recipe {recipe}: {e}")
    if not triplets_dir.exists():
        _fail(f"{triplets_dir} does not exist (run `reliableswap triplets` first)")
    s = _with_progress("finetune", lambda progress: run_finetune(r, triplets_dir, out, faces, steps, resume, checkpoint, swapper,
                                                                 device, progress=progress),
                       (FileNotFoundError, ValueError, RuntimeError))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return
    c, ev = s["counts"], s["eval"]
    err.print(f"{c['steps_this_run']} steps ({c['skipped_non_finite']} skipped) at {s['throughput']['steps_per_s']} steps/s on "
              f"{s['device']} x{s['world_size']}; held-out cycle L1 {ev['cycle_l1_start']} -> {ev['cycle_l1_end']}")
    err.print(f"wrote {out / 'metrics.jsonl'}, {out / 'checkpoints'}, {out / 'summary.json'}")


@app.command()
def inspect(
    folder: Annotated[Path, typer.Argument(help="A prep output (faces.jsonl) or a triplets output (manifest.jsonl).")],
    sheet: Annotated[Path, typer.Option(help="PNG contact sheet to write.")],
    n: Annotated[int, typer.Option(help="How many rows/faces to show.", min=1)] = 16,
) -> None:
    """Render a contact sheet (prep: faces with landmarks; triplets: source, target, st, ts + qc per row)."""
    from reliableswap.viz import faces_sheet, triplets_sheet

    if (folder / "manifest.jsonl").is_file():
        path = triplets_sheet(folder, sheet, n)
    elif (folder / "faces.jsonl").is_file():
        from reliableswap.prep import load_faces

        path = faces_sheet(folder, load_faces(folder), sheet, n)
    else:
        _fail(f"{folder} has neither faces.jsonl nor manifest.jsonl")
    err.print(f"wrote {path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its results.")] = Path("demo_out"),
    cache: Annotated[Optional[Path], typer.Option(help="Cache for the default faces (default: ~/.cache/reliableswap).")] = None,
) -> None:
    """Run prep → pairs → triplets → inspect on the embedded default faces (astronaut, insightface t1.jpg)."""
    from reliableswap.demo import DemoFacesError, default_faces

    try:
        faces_dir = default_faces(cache)
    except DemoFacesError as e:
        _fail(str(e))
    err.print(f"default faces in {faces_dir}")
    prep([faces_dir], out / "prep", workers=2, embed=True)
    inspect(out / "prep", out / "prep_sheet.png", 16)
    pairs(out / "prep", out / "pairs.jsonl", strategy="pose", max_yaw_diff=25.0, seed=0)
    triplets(out / "prep", out / "pairs.jsonl", out / "triplets", device="auto", batch=8, qc=True)
    inspect(out / "triplets", out / "triplets_sheet.png", 8)
    recipes = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"
    if recipes.is_file():  # a source checkout: show the third use, a short CPU fine-tune
        finetune(recipes, out / "triplets", out / "finetune", faces=out / "prep", steps=50, device="cpu")
    err.print(f"\n[bold green]done.[/] Open {out / 'triplets_sheet.png'} (per row: source, target, output_st, output_ts "
              f"with identity margins) and {out / 'prep_sheet.png'} (aligned faces, landmarks, pose). "
              f"Triplet folders in {out / 'triplets'}, records in manifest.jsonl, counts and timings in summary.json; "
              f"the tiny fine-tune's metrics and samples in {out / 'finetune'}. FLAME flows need a FLAME file: "
              f"see README (reliableswap fit / flows / triplets --flame).")


def main() -> None:
    app(prog_name="reliableswap")


if __name__ == "__main__":
    sys.exit(main())
