"""How well do the identity judges tell people apart, and how fast are they? SFace against dlib's
128-D descriptor on the same pairs of the shared real faces.

Every still photo and video frame of ``../shared/data/faces`` whose MANIFEST.tsv row names a person
(london_*, lp_d*, webmorph_lisa, grace_hopper, ...) is prepped (dlib 68 landmarks, FFHQ 256 px
crops); every pair of crops is a same-person or a different-person pair. For each judge: the score
distributions, the equal-error rate, the errors at the judge's own threshold, and faces/s.
Usage: ``.venv/bin/python scripts/bench_judge.py [--faces DIR] [--out bench_out/judge]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from reliableswap.commands.prep import PrepConfig, run_prep
from reliableswap.images import read_crop, to_tensor
from reliableswap.judge import DlibJudge, SFaceJudge, equal_error_rate, load_judge
from reliableswap.contracts import FaceSet

JUDGE_CLASSES = {"dlib": DlibJudge, "sface": SFaceJudge}

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"none", "-", "identity", "", "solvay_1927_group", "skimage_cameraman"}


def labelled_faces(faces_dir: Path) -> dict[str, str]:
    """file (relative to the faces folder) → person, for rows that name one person."""
    with open(faces_dir / "MANIFEST.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["file"]: r["identity"] for r in rows if r["identity"] not in SKIP and not r["identity"].startswith(("swap", "rs_"))
            and not r["file"].startswith("video/")}


def judge_scores(judge_name: str, faces: FaceSet, recs: list, batch: int = 32) -> tuple[np.ndarray, float]:
    """N×N score matrix of one judge over the crops ``recs``, and faces/s of its embedding."""
    judge = load_judge(judge_name, "cpu")
    imgs = [read_crop(faces, r) for r in recs]
    lms = torch.tensor([r.landmarks68 for r in recs], dtype=torch.float32)
    with torch.no_grad():
        judge.embed(to_tensor(imgs[:2]), lms[:2])  # warm-up
        t = time.perf_counter()
        emb = torch.cat([judge.embed(to_tensor(imgs[i:i + batch]), lms[i:i + batch]) for i in range(0, len(imgs), batch)])
        secs = time.perf_counter() - t
    n = len(recs)
    s = torch.stack([judge.score(emb[i:i + 1].expand(n, -1), emb) for i in range(n)]).numpy()
    return s, n / secs


def _pair(recs: list, iu: tuple, k: int, v: np.ndarray) -> dict:
    name = lambda r: r.origin.path.split("faces/")[-1]  # noqa: E731
    return {"a": name(recs[iu[0][k]]), "b": name(recs[iu[1][k]]), "score": round(float(v[k]), 4)}


def detectors(faces_dir: Path, files: list[str], out: Path) -> dict:
    """prep (2 workers) over the same photos with dlib HOG and with YuNet: faces kept, faces/s."""
    import shutil

    from reliableswap.choices import Detector

    res = {}
    inputs = [faces_dir / f for f in files] + sorted((faces_dir / "hard" / "valid").iterdir())
    for det in (Detector.hog, Detector.yunet):
        dst = out / f"prep_{det.value}"
        shutil.rmtree(dst, ignore_errors=True)
        t = time.perf_counter()
        s = run_prep(inputs, dst, PrepConfig(detector=det), workers=2)
        res[det.value] = {"inputs": s["counts"]["in"], "faces": s["counts"]["written"],
                          "images_with_faces": s["details"]["images_with_faces"],
                          "faces_per_s": round(s["counts"]["written"] / (time.perf_counter() - t), 2),
                          "detect_s": round(s["timings"]["stages_s"].get("detect", 0.0), 2)}
    return res


def recipe_by_judges(prep: Path, out: Path, n: int) -> dict:
    """The default recipe's fakes on ``n`` pairs, QC'd by each judge (nothing dropped)."""
    from reliableswap.commands.pairs import run_pairs
    from reliableswap.commands.triplets import run_triplets
    from reliableswap.recipes import PairsSection, TripletRecipe

    run_pairs(prep, out / "pairs.jsonl", PairsSection(n=n, seed=0, max_yaw_diff=25))
    res = {}
    for judge in ("sface", "dlib"):
        r = TripletRecipe().with_overrides({"qc.enabled": True, "qc.min_id_margin": -100.0, "identity.judge": judge})
        dst = out / f"triplets_{judge}"
        if dst.exists():
            import shutil
            shutil.rmtree(dst)
        s = run_triplets(prep, out / "pairs.jsonl", dst, r, device="cpu", batch=8)
        q = s["details"]["qc"]
        res[judge] = {"triplets": s["counts"]["written"], "triplets_per_s": s["throughput"]["per_s"],
                      "positive_margin_rate_both": q.get("positive_id_margin_rate"),
                      **{f"{k}_{d}_mean": q[f"{k}_{d}"]["mean"] for k in ("id_keep", "id_leak", "id_margin") for d in ("st", "ts")
                         if f"{k}_{d}" in q},
                      "margin_positive_st": _rate(dst, "id_margin_st"), "margin_positive_ts": _rate(dst, "id_margin_ts"),
                      "margin_median_st": _median(dst, "id_margin_st"), "margin_median_ts": _median(dst, "id_margin_ts")}
    return res


def _column(folder: Path, key: str) -> np.ndarray:
    from triplets.records import ManifestRecord
    return np.asarray([r.qc[key] for r in ManifestRecord.read(folder / "manifest.jsonl")], np.float64)


def _rate(folder: Path, key: str) -> float:
    return round(float((_column(folder, key) > 0).mean()), 4)


def _median(folder: Path, key: str) -> float:
    return round(float(np.median(_column(folder, key))), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "judge")
    ap.add_argument("--pairs", type=int, default=24)
    a = ap.parse_args()
    labels = labelled_faces(a.faces)
    prep = a.out / "prep"
    if not (prep / "faces.jsonl").is_file():
        run_prep([a.faces / f for f in sorted(labels)], prep, PrepConfig(largest=True), workers=2)
    faces = FaceSet.load(prep)
    recs, people = [], []
    for r in faces:
        rel = Path(r.origin.path).resolve().relative_to(a.faces.resolve()).as_posix()
        if rel in labels:
            recs.append(r)
            people.append(labels[rel])
    people = np.asarray(people)
    iu = np.triu_indices(len(recs), 1)
    same_mask = (people[:, None] == people[None])[iu]
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "faces": len(recs), "people": len(set(people)), "same_pairs": int(same_mask.sum()),
              "different_pairs": int((~same_mask).sum()), "judges": {}}
    scores = {}
    for name in ("dlib", "sface"):
        s, fps = judge_scores(name, faces, recs)
        v = s[iu]
        scores[name] = v
        same, diff = v[same_mask], v[~same_mask]
        eer, thr = equal_error_rate(same, diff)
        own = JUDGE_CLASSES[name].same_threshold
        report["judges"][name] = {
            "units": "cosine" if name == "sface" else "minus descriptor distance",
            "same": {"min": round(float(same.min()), 4), "median": round(float(np.median(same)), 4)},
            "different": {"max": round(float(diff.max()), 4), "median": round(float(np.median(diff)), 4)},
            "gap": round(float(same.min() - diff.max()), 4),
            "eer": round(eer, 4), "eer_threshold": round(thr, 4), "threshold": own,
            "errors_at_threshold": int((same < own).sum() + (diff >= own).sum()),
            "false_rejects": int((same < own).sum()), "false_accepts": int((diff >= own).sum()),
            "faces_per_s": round(fps, 1),
            "hardest_same": _pair(recs, iu, np.flatnonzero(same_mask)[np.argmin(same)], v),
            "closest_different": _pair(recs, iu, np.flatnonzero(~same_mask)[np.argmax(diff)], v)}
    # pairs the two judges decide differently at their own thresholds
    d_same = scores["dlib"] >= report["judges"]["dlib"]["threshold"]
    s_same = scores["sface"] >= report["judges"]["sface"]["threshold"]
    disagree = np.flatnonzero(d_same != s_same)
    report["disagreements"] = [
        {"a": recs[iu[0][k]].origin.path.split("faces/")[-1], "b": recs[iu[1][k]].origin.path.split("faces/")[-1],
         "same_person": bool(same_mask[k]), "dlib_says_same": bool(d_same[k]), "sface_says_same": bool(s_same[k]),
         "dlib": round(float(scores["dlib"][k]), 4), "sface": round(float(scores["sface"][k]), 4)} for k in disagree[:20]]
    report["detectors"] = detectors(a.faces, sorted(labels), a.out)
    report["triplets"] = recipe_by_judges(prep, a.out, a.pairs)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "judge.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
