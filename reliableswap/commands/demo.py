"""``reliableswap demo``: prep → pairs → triplets → inspect → eval → a tiny fine-tune on default faces
taken from registry packages (no image is committed here):

- scikit-image's ``data.astronaut()`` (NASA portrait of Eileen Collins, public domain);
- ``insightface/data/images/t1.jpg`` (a group of six people) from the insightface 2.1 wheel,
  fetched with ``pip download --no-deps`` into the cache and read from the wheel (a zip).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from skimage import data as skimage_data

from reliableswap.choices import LandmarkBackend
from reliableswap.commands.eval import run_eval_triplets
from reliableswap.commands.finetune import run_finetune
from reliableswap.commands.inspect import run_inspect
from reliableswap.commands.pairs import run_pairs
from reliableswap.commands.prep import PrepConfig, run_prep
from reliableswap.commands.triplets import run_triplets
from reliableswap.images import save_image
from reliableswap.recipes import TrainRecipe, TripletRecipe, load_recipe
from triplets.jsonl import atomic_write_bytes
from reliableswap.errors import UserError

INSIGHTFACE_WHEEL = "insightface==2.1"
INSIGHTFACE_MEMBER = "insightface/data/images/t1.jpg"


class DemoFacesError(UserError, RuntimeError):
    pass


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    if cache:
        return Path(cache)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reliableswap"


def default_faces(cache: str | os.PathLike | None = None) -> Path:
    """Folder holding ``astronaut.png`` and ``insightface_t1.jpg`` (fetched once)."""
    root = cache_dir(cache)
    faces = root / "demo_faces"
    faces.mkdir(parents=True, exist_ok=True)
    astro = faces / "astronaut.png"
    if not astro.exists():
        save_image(astro, skimage_data.astronaut())
    t1 = faces / "insightface_t1.jpg"
    if not t1.exists():
        wheels = root / "wheels"
        found = sorted(wheels.glob("insightface-2.1-*.whl"))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), INSIGHTFACE_WHEEL]
            r = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(wheels.glob("insightface-2.1-*.whl"))
            if r.returncode != 0 or not found:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                raise DemoFacesError(f"could not fetch {INSIGHTFACE_WHEEL} with pip ({tail[0]})")
        with zipfile.ZipFile(found[0]) as z:
            atomic_write_bytes(t1, z.read(INSIGHTFACE_MEMBER))
    return faces


def eval_line(run: dict, where: Path) -> str:
    """One line of ``eval triplets``' figures for a run: SFace keep/leak/margin, expression and
    pose error, FID and KID with their sample counts."""
    def both(key: str, fmt: str = ".3f") -> str:
        return " / ".join(format(run[f"{key}_{d}"]["mean"], fmt) if f"{key}_{d}" in run else "–" for d in ("st", "ts"))
    fid = "FID/KID not computed" if run.get("fid") is None else (
        f"FID {run['fid']:.1f}, KID {run['kid']:.4f} ({', '.join(f'{v} {k}' for k, v in run['fid_samples'].items())}; small-sample)")
    return (f"eval: SFace keep {both('id_keep')}, leak {both('id_leak')}, margin {both('id_margin')} (st / ts means); "
            f"expression error {both('expr_err', '.4f')}, pose error {both('pose_err', '.2f')}°; {fid} → {where / 'summary.json'}")


def run_demo(out: str | os.PathLike, cache: str | os.PathLike | None = None, say: Callable[[str], None] = print,
             progress: bool = False) -> dict[str, dict]:
    """The whole chain on the default faces; returns each step's summary. Re-running resumes."""
    out = Path(out)
    faces = default_faces(cache)
    say(f"default faces in {faces}")
    recipe = load_recipe("cycle", TripletRecipe)
    # every pair of the few default faces (the identity QC drops those whose fakes look like their attribute donor)
    recipe = recipe.with_overrides({"pairs.max_yaw_diff": 25.0, "pairs.n": 24, "qc.enabled": True})
    s = {"prep": run_prep([faces], out / "prep", PrepConfig(embed=True, landmarks=LandmarkBackend.mesh), workers=2, progress=progress)}
    say(f"prep: {s['prep']['counts']['written']} faces → {run_inspect(out / 'prep', out / 'prep_sheet.png', n=16)}")
    s["pairs"] = run_pairs(out / "prep", out / "pairs.jsonl", recipe.pairs, progress=progress, judge=recipe.identity.judge.value)
    s["triplets"] = run_triplets(out / "prep", out / "pairs.jsonl", out / "triplets", recipe, device="auto", batch=8, progress=progress)
    c = s["triplets"]["counts"]
    dropped = sum(n for k, n in c["rejected_by_reason"].items() if k.startswith("identity margin"))
    note = (f" ({dropped} of {c['in']} pairs dropped by the identity QC: a fake looked more like its attribute donor to "
            f"SFace; {out / 'triplets' / 'rejects.jsonl'})") if dropped else ""
    say(f"triplets: {c['written']}{note} → {run_inspect(out / 'triplets', out / 'triplets_sheet.png', n=8)}")
    if c["written"]:
        s["eval"] = run_eval_triplets(out / "triplets", out / "eval", device="auto", progress=progress)
        say(eval_line(s["eval"]["details"]["runs"][str(out / "triplets")], out / "eval"))
    # the third use: a short CPU fine-tune
    tiny = load_recipe("tiny", TrainRecipe).with_overrides({"train.steps": 50})
    run = out / "finetune"
    s["finetune"] = run_finetune(tiny, out / "triplets", run, faces=out / "prep", device="cpu", progress=progress,
                                 resume=(run / "checkpoints" / "latest.json").is_file())
    return s
