"""Where does the attribute donor's identity get into the default recipe's fakes? The default
(mesh) recipe on the same pairs of real faces with one synthesis rule switched off at a time,
each fake judged by SFace (keep, leak, margin), its dlib 68 points (expression and pose error
against the attribute donor) and, with ``--fid``, the FID/KID of all fakes against the real crops.

The rules: the brows, eyes and lips always in the blend mask (``feature_mask``) and the forehead
trim stopping above the brows; the occluder rule limited to the forehead (hair, hats), its hair
told from the plain skin's colour (``SKIN_TRIM``); each brow moved by the target's brow raise;
the target's eyelids and mouth shape; the source's teeth kept off the fake's lips
(``mouth_interior``); the source's upper lip left outside its mesh kept off the fake's skin
(``stray_upper_lip``); the source's mesh lips moved onto the lips its image shows
(``refine_lips``); the mesh's eyelids moved to the 68 points' lids
(``refine_eyelids``); the target's eye in an opening the source's eye cannot fill (``EYE_FROM_B``);
the hand masks; the glasses rule; the colour transfer, and its gain cap (``LCT_MAX_GAIN``); the
reshape; the outline's erosion.
The 2D recipe (``recipes/tps.toml``) is the reference row.

Usage: ``.venv/bin/python scripts/leak_ablation.py [--prep DIR] [--pairs N] [--fid] [--variants NAME ...]``.
Without ``--prep`` the shared faces whose MANIFEST.tsv row names one person are prepped first
(as ``scripts/bench_judge.py`` does). ``--variants default`` measures the recipe as the code
installed on ``PYTHONPATH`` has it (the way a previous version's row is measured).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from _bench import dump_file

from reliableswap.commands.pairs import run_pairs
from reliableswap.commands.prep import PrepConfig, run_prep
from reliableswap.evaluation import expression_error, frechet_distance, kernel_inception_distance, pose_error
from reliableswap.faces.pose import eye_openness_error
from reliableswap.faces import mesh as fm
from reliableswap.faces.landmarks import DlibLandmarks
from reliableswap.faces.occluders import glasses_score
from reliableswap.images import read_crop, to_tensor, to_uint8
from reliableswap.judge import load_judge
from reliableswap.recipes import PairsSection, TripletRecipe, load_recipe
from reliableswap.synth import meshswap
from reliableswap.synth.pipeline import Synthesizer
from triplets.records import PairRecord
from reliableswap.contracts import FaceSet

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def zero_weight(key: str):
    t = fm.topology()
    old = t[key]
    t[key] = torch.zeros_like(old)
    try:
        yield
    finally:
        t[key] = old


def _occluders_below_brows(occluders):
    """The occluder rule applied to the skin as well as the forehead (dark pixels anywhere)."""
    def f(img, labels, ref_mask, *a, **k):
        return occluders(img, torch.where(labels == fm.SKIN, torch.full_like(labels, fm.FOREHEAD_R), labels), ref_mask, *a, **k)
    return f


def variants() -> dict:
    """name → (recipe factory, context manager factory) of each row."""
    base = TripletRecipe()
    none = contextlib.nullcontext
    no_features = lambda: patched(meshswap, "feature_mask", lambda labels, *a, **k: torch.zeros_like(labels, dtype=torch.float32))  # noqa: E731

    @contextlib.contextmanager
    def uncapped_trim():
        with no_features(), patched(meshswap, "face_oval_mask", functools.partial(meshswap.face_oval_mask, brow_margin=-10.0)):
            yield

    @contextlib.contextmanager
    def no_brow_raise():
        with zero_weight("w_brow_r"), zero_weight("w_brow_l"):
            yield

    tps = lambda: load_recipe(ROOT / "recipes" / "tps.toml", TripletRecipe)  # noqa: E731
    over = lambda d: lambda: base.with_overrides(d)  # noqa: E731
    same = lambda: base  # noqa: E731
    return {  # recipes are built when their row runs: a previous version may lack a newer key
        "default": (same, none),
        "features not forced into the mask": (same, no_features),
        "forehead trim through the brows (no cap, no feature mask)": (same, uncapped_trim),
        "occluder rule below the brows too": (same, lambda: patched(meshswap, "occluders", _occluders_below_brows(meshswap.occluders))),
        "forehead hair told from all of the skin (old rule)": (same, lambda: patched(meshswap, "SKIN_TRIM", (0.0, 1.0))),
        "no brow raise from the target": (same, no_brow_raise),
        "no eyelids from the target": (same, lambda: zero_weight("w_eyes")),
        "eyelids as the mesh reads them": (same, lambda: patched(meshswap, "refine_eyelids", lambda mesh, lm: mesh)),
        "no target eye where the source's cannot open": (same, lambda: patched(meshswap, "EYE_FROM_B", 0.0)),
        "no mouth shape from the target": (same, lambda: zero_weight("w_mouth")),
        "source's teeth allowed on the lips": (same, lambda: patched(meshswap, "mouth_interior", lambda img, labels, *a, **k: labels == fm.MOUTH_R)),
        "source's upper lip outside its mesh kept": (same, lambda: patched(meshswap, "stray_upper_lip", lambda img, mesh, labels: torch.zeros_like(labels, dtype=torch.bool))),
        "source's lips as its mesh fits them": (same, lambda: patched(meshswap, "refine_lips", lambda img, mesh, *_: mesh)),
        "no hand masks": (over({"masks.hands": False}), none),
        "no glasses rule (masks.glasses = off)": (over({"masks.glasses": "off"}), none),
        "target's glasses kept (masks.glasses = keep)": (over({"masks.glasses": "keep"}), none),
        "no colour transfer": (over({"appearance.method": "none"}), none),
        "colour transfer without its gain cap": (same, lambda: patched(meshswap, "LCT_MAX_GAIN", None)),
        "no reshape": (over({"reshape.enabled": False}), none),
        "no outline erosion": (over({"blend.erode": 0.0}), none),
        "2D recipe (recipes/tps.toml)": (tps, none),
    }


class Bench:
    def __init__(self, prep: Path, pairs: list[PairRecord], fid: bool):
        faces = FaceSet.load(prep)
        byid = {r.id: r for r in faces}
        recs_a, recs_b = [byid[p.a] for p in pairs], [byid[p.b] for p in pairs]
        self.ia = to_tensor([read_crop(faces, r) for r in recs_a])
        self.ib = to_tensor([read_crop(faces, r) for r in recs_b])
        self.la = torch.tensor([r.landmarks68 for r in recs_a], dtype=torch.float32)
        self.lb = torch.tensor([r.landmarks68 for r in recs_b], dtype=torch.float32)
        self.ma = self.mb = None
        if all(r.mesh468 is not None for r in recs_a + recs_b):
            self.ma = torch.tensor([r.mesh468 for r in recs_a], dtype=torch.float32)
            self.mb = torch.tensor([r.mesh468 for r in recs_b], dtype=torch.float32)
        self.judge = load_judge("sface")
        self.ea, self.eb = self.judge.embed(self.ia), self.judge.embed(self.ib)
        self.dlib = DlibLandmarks()
        self.fidnet = self.real_feats = None
        if fid:
            from reliableswap.nets.inception import load_fid_torchscript
            self.fidnet = load_fid_torchscript()
            real = {r.id: read_crop(faces, r) for r in recs_a + recs_b}
            self.real_feats = self.features(to_tensor(list(real.values())))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.fidnet(x[i:i + 16]).double() for i in range(0, len(x), 16)])

    def run(self, recipe: TripletRecipe, batch: int = 8) -> dict:
        syn = Synthesizer(recipe)
        out: dict[str, list] = {}
        t = time.perf_counter()
        for i in range(0, len(self.ia), batch):
            s = slice(i, i + batch)
            mesh = (self.ma[s], self.mb[s]) if self.ma is not None and recipe.uses_mesh else (None, None)
            res = syn.cycle(self.ia[s], self.la[s], self.ib[s], self.lb[s], None, None, *mesh)
            for k in ("fake_st", "fake_ts", "landmarks_st", "landmarks_ts", "mesh_st", "mesh_ts"):
                if k in res:
                    out.setdefault(k, []).append(res[k])
        secs = time.perf_counter() - t
        cat = {k: torch.cat(v) for k, v in out.items()}
        row: dict = {"pairs_per_s": round(len(self.ia) / secs, 2)}
        self.per_fake: dict[str, dict[str, np.ndarray]] = {}
        for d, keep_ref, leak_ref, lm_attr in (("st", self.ea, self.eb, self.lb), ("ts", self.eb, self.ea, self.la)):
            fake = cat[f"fake_{d}"]
            lm = torch.from_numpy(self.dlib.remeasure(to_uint8(fake), cat[f"landmarks_{d}"].numpy())).float()
            emb = self.judge.embed(fake, lm)
            keep, leak = self.judge.score(emb, keep_ref), self.judge.score(emb, leak_ref)
            margin = (keep - leak).numpy()
            figs = self.per_fake[d] = {"margin": margin, "expr_err": expression_error(lm, lm_attr).numpy(),
                                       "pose_err": pose_error(lm, lm_attr).numpy(), "eye_err": eye_openness_error(lm, lm_attr).numpy()}
            row |= {f"keep_{d}": round(float(keep.mean()), 3), f"leak_{d}": round(float(leak.mean()), 3),
                    f"margin_median_{d}": round(float(np.median(margin)), 3), f"positive_{d}": round(float((margin > 0).mean()), 3),
                    f"expr_err_{d}": round(float(figs["expr_err"].mean()), 4), f"pose_err_{d}": round(float(figs["pose_err"].mean()), 2),
                    f"eye_err_{d}": round(float(figs["eye_err"].mean()), 4)}
            if f"mesh_{d}" in cat:  # how much the fakes read as wearing glasses (the rays' test below the eyes)
                row[f"glasses_{d}"] = round(float(glasses_score(fake, cat[f"mesh_{d}"]).mean()), 3)
        if self.fidnet is not None:
            f = self.features(torch.cat([cat["fake_st"], cat["fake_ts"]]))
            self.per_fake["fakes"] = {"inception": f.numpy()}  # the st fakes of every pair, then the ts fakes
            kid, _ = kernel_inception_distance(f, self.real_feats)
            row |= {"fid": round(frechet_distance(f, self.real_feats), 2), "kid": round(kid, 4)}
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    ap.add_argument("--prep", type=Path, default=None, help="a prep folder (default: prep the labelled shared faces)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "leak")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--fid", action="store_true", help="also FID/KID of the fakes against the real crops")
    ap.add_argument("--variants", nargs="*", default=None, help="row names (default: all)")
    ap.add_argument("--dump", type=Path, default=None, help="write each row's per-fake margin, expression, eye and pose error "
                    "(and with --fid the fakes' and real crops' Inception features, for scripts/fid_bootstrap.py) here")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    prep = a.prep
    if prep is None:
        from bench_judge import labelled_faces  # this script's folder is on sys.path

        prep = a.out / "prep"
        if not (prep / "faces.jsonl").is_file():
            run_prep([a.faces / f for f in sorted(labelled_faces(a.faces))], prep, PrepConfig(largest=True), workers=2)
    if not (prep / "faces.jsonl").is_file():
        raise SystemExit(f"{prep}: no faces.jsonl")
    pairs_path = a.out / "pairs.jsonl"
    if not pairs_path.is_file():
        run_pairs(prep, pairs_path, PairsSection(n=a.pairs, seed=0, max_yaw_diff=25))
    pairs = PairRecord.read(pairs_path)
    bench = Bench(prep, pairs, a.fid)
    rows = {}
    table = variants()
    for name in a.variants or table:
        recipe, ctx = table[name]
        with ctx():
            rows[name] = bench.run(recipe())
        if a.dump is not None:
            a.dump.mkdir(parents=True, exist_ok=True)
            np.savez(dump_file(a.dump, name),
                     **{f"{k}_{d}": v for d, f in bench.per_fake.items() for k, v in f.items()})
            if bench.real_feats is not None:
                np.save(a.dump / "real_inception.npy", bench.real_feats.numpy())
        print(json.dumps({"variant": name, **rows[name]}), flush=True)
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "pairs": len(pairs), "prep": str(prep), "rows": rows}
    (a.out / "leak.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
