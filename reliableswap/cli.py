"""Command-line interface: parses options, calls library functions. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="reliableswap: aligned faces, ReliableSwap triplets and FLAME flows for face-swap training.",
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
    with _progress() as bar:
        task = bar.add_task("prep", total=None)
        try:
            summary = run_prep(inputs, out, cfg, workers, progress=lambda d, t: bar.update(task, completed=d, total=t))
        except (ValueError, MissingWeightsError) as e:
            _fail(str(e))
    c = summary["counts"]
    err.print(f"{c['written']} faces from {c['in']} inputs ({c['frames']} images/frames); "
              f"{c['rejected']} rejected {c['rejected_by_reason'] or ''}")
    err.print(f"wrote {out / 'faces.jsonl'}, {out / 'rejects.jsonl'}, {out / 'summary.json'}")
    if c["written"] == 0:
        _fail(f"no usable face found in {c['in']} inputs (reasons in {out / 'rejects.jsonl'})", 1)


@app.command()
def inspect(
    folder: Annotated[Path, typer.Argument(help="A prep output folder (faces.jsonl).")],
    sheet: Annotated[Path, typer.Option(help="PNG contact sheet to write.")],
    n: Annotated[int, typer.Option(help="How many rows/faces to show.", min=1)] = 16,
) -> None:
    """Render a contact sheet of a prep output for people to look at."""
    from reliableswap.prep import load_faces
    from reliableswap.viz import faces_sheet

    if not (folder / "faces.jsonl").is_file():
        _fail(f"{folder} has no faces.jsonl")
    path = faces_sheet(folder, load_faces(folder), sheet, n)
    err.print(f"wrote {path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its results.")] = Path("demo_out"),
    cache: Annotated[Optional[Path], typer.Option(help="Cache for the default faces (default: ~/.cache/reliableswap).")] = None,
) -> None:
    """Run the main job on the embedded default faces (scikit-image's astronaut, insightface's t1.jpg)."""
    from reliableswap.demo import DemoFacesError, default_faces

    try:
        faces_dir = default_faces(cache)
    except DemoFacesError as e:
        _fail(str(e))
    err.print(f"default faces in {faces_dir}")
    prep([faces_dir], out / "prep", workers=2)
    inspect(out / "prep", out / "prep_sheet.png", 16)
    err.print(f"\n[bold green]done.[/] Open {out / 'prep_sheet.png'} (aligned faces with landmarks and pose); "
              f"records in {out / 'prep' / 'faces.jsonl'}, counts and timings in {out / 'prep' / 'summary.json'}.")


def main() -> None:
    app(prog_name="reliableswap")


if __name__ == "__main__":
    sys.exit(main())
