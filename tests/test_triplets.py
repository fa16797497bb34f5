"""pairs → triplets end to end on the shared faces; TripletDataset on ours and the official sample."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reliableswap.commands.triplets import run_triplets
from reliableswap.pairs import make_pairs
from reliableswap.recipes import PairsSection, TripletRecipe, load_recipe
from triplets import TripletDataset
from triplets.layout import FILES, TYPE_TABLE
from triplets.records import ManifestRecord, PairRecord, RejectRecord
from reliableswap.contracts import FaceRecord
from triplets.webdataset import iter_shard
from conftest import CLI, run_cli

CYCLE = Path(__file__).parents[1] / "recipes" / "cycle.toml"
#: The 2D recipe (no QC): for the tests of output formats, sharding and encoders, where what is
#: synthesized does not matter and the mesh recipe's cost would.
TPS = load_recipe(Path(__file__).parents[1] / "recipes" / "tps.toml", TripletRecipe)


def load_faces(folder):
    return FaceRecord.read(Path(folder) / "faces.jsonl")


#: QC measured and no pair dropped (these tests are about layout and resume, not the leak rate).
QC_ALL = {"qc.enabled": True, "qc.min_id_margin": -2.0}

@pytest.fixture(scope="module")
def pairs_file(prepped, tmp_path_factory):
    out, _ = prepped
    ps = make_pairs(load_faces(out), PairsSection(n=20, max_yaw_diff=20, seed=3))
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    PairRecord.write(path, ps)
    return path


@pytest.fixture(scope="module")
def triplet_run(prepped, pairs_file, tmp_path_factory):
    out, _ = prepped
    dst = tmp_path_factory.mktemp("trip")
    recipe = load_recipe(CYCLE, TripletRecipe).with_overrides(QC_ALL)
    summary = run_triplets(out, pairs_file, dst, recipe, device="cpu", batch=8)
    return dst, summary


def test_pairs_deterministic_and_never_same_identity(prepped):
    out, _ = prepped
    faces = load_faces(out)
    by_id = {f.id: f for f in faces}
    cfg = PairsSection(n=30, max_yaw_diff=15, seed=7)
    p1 = make_pairs(faces, cfg)
    assert p1 == make_pairs(faces, cfg)
    assert p1 != make_pairs(faces, cfg.model_copy(update={"seed": 8}))
    for p in p1:
        a, b = by_id[p.a], by_id[p.b]
        d = np.linalg.norm(np.subtract(a.embedding, b.embedding))
        assert d >= 0.6 and abs(p.pose_delta.yaw) <= 15
    # London neutral/smiling of one person are never paired (embedding distance)
    for p in make_pairs(faces, PairsSection(strategy="random", seed=1)):
        na, nb = (Path(by_id[k].origin.path).stem for k in (p.a, p.b))
        if na.startswith("london_") and nb.startswith("london_"):
            assert na.split("_")[1] != nb.split("_")[1]
    labelled = [f.model_copy(update={"identity": "same"}) for f in faces[:10]]
    assert make_pairs(labelled, PairsSection(strategy="random")) == []


def test_triplet_folders_official_layout_and_manifest(triplet_run):
    dst, s = triplet_run
    recs = ManifestRecord.read(dst / "manifest.jsonl")
    assert s["counts"]["written"] == len(recs) >= 17
    for r in recs:
        folder = dst / r.folder
        assert sorted(p.name for p in folder.iterdir()) == sorted(FILES.values())
        im = Image.open(folder / "output_st.jpg")
        assert im.size == (256, 256) and im.mode == "RGB"
        assert set(r.qc) >= {"id_margin_st", "id_margin_ts", "pose_err_st", "pose_err_ts", "seam_st", "seam_ts"}
    assert load_recipe(dst / "recipe.resolved.toml", TripletRecipe) == load_recipe(CYCLE, TripletRecipe).with_overrides(
        QC_ALL)
    assert s["details"]["synthesis"]["geometry"].startswith("468-point face mesh")


def test_qc_measures_keep_leak_and_margin_with_the_judge(triplet_run):
    """Every fake's identity by SFace: keep (vs its identity donor), leak (vs its attribute donor),
    margin = keep − leak; on average a fake looks more like its identity donor (by how much is the
    default recipe's identity leak: BENCHMARKS.md)."""
    dst, s = triplet_run
    qc = s["details"]["qc"]
    for r in ManifestRecord.read(dst / "manifest.jsonl"):
        assert r.judge == "sface"
        for d in ("st", "ts"):
            assert abs(r.qc[f"id_margin_{d}"] - (r.qc[f"id_keep_{d}"] - r.qc[f"id_leak_{d}"])) < 2e-4
    assert qc["id_keep_st"]["mean"] > qc["id_leak_st"]["mean"] and qc["id_keep_ts"]["mean"] > qc["id_leak_ts"]["mean"], qc


def test_dataset_reads_our_output_per_type_table(triplet_run):
    dst, _ = triplet_run
    ds = TripletDataset(dst, use_real=True)
    recs = ManifestRecord.read(dst / "manifest.jsonl")
    assert len(ds) == 4 * len(recs)
    for i in range(8):
        item = ds[i]
        code = int(item["type_code"])
        assert code == 2 + i % 4
        ks, kt, kr = TYPE_TABLE[code]
        folder = dst / recs[i // 4].folder
        ref = torch.from_numpy(np.array(Image.open(folder / FILES[kr]))).permute(2, 0, 1).float() / 255
        assert torch.equal(item["reference"], ref) and bool(item["has_reference"]) and not bool(item["same"])


def test_official_triplet_loads(faces_dir):
    folder = faces_dir / "triplet_official"
    ds = TripletDataset(folder)  # official default: cycle types 4 and 5
    assert len(ds) == 2 and [int(ds[i]["type_code"]) for i in range(2)] == [4, 5]
    load = lambda n: torch.from_numpy(np.array(Image.open(folder / n).convert("RGB"))).permute(2, 0, 1).float() / 255  # noqa: E731
    a = ds[0]
    assert torch.equal(a["source"], load("output_st.jpg")) and torch.equal(a["target"], load("output_ts.jpg"))
    assert torch.equal(a["reference"], load("source.jpg"))
    b = ds[1]
    assert torch.equal(b["reference"], load("target.jpg")) and torch.equal(b["source"], load("output_ts.jpg"))
    real = TripletDataset(folder, use_real=True, value_range=(-1, 1), image_size=128)
    assert [int(real[i]["type_code"]) for i in range(4)] == [2, 3, 4, 5]
    assert real[0]["source"].shape == (3, 128, 128) and real[0]["source"].min() < -0.5


def test_dataset_mixing_and_rec_code(faces_dir, triplet_run, tmp_path):
    dst, _ = triplet_run
    same = TripletDataset(dst, same_rate=1.0)
    it = same[0]
    assert int(it["type_code"]) == 1 and bool(it["same"]) and torch.equal(it["source"], it["target"])
    van = TripletDataset(dst, vanilla_rate=1.0)
    it = van[3]
    assert int(it["type_code"]) == 0 and not bool(it["has_reference"]) and float(it["reference"].abs().max()) == 0
    sel = TripletDataset(dst, rec_code=(4,))
    assert bool(sel[0]["has_reference"]) and not bool(sel[1]["has_reference"])
    mixed = TripletDataset(dst, vanilla_rate=0.3, same_rate=0.2, seed=5)
    codes = [int(mixed[i]["type_code"]) for i in range(len(mixed))]
    assert codes == [int(TripletDataset(dst, vanilla_rate=0.3, same_rate=0.2, seed=5)[i]["type_code"]) for i in range(len(mixed))]
    assert {0, 4, 5} <= set(codes)
    # a pickled list of folders, as the official code stores it
    import pickle

    (tmp_path / "list.pkl").write_bytes(pickle.dumps([str(faces_dir / "triplet_official")]))
    assert len(TripletDataset(tmp_path / "list.pkl")) == 2


def test_webdataset_format_and_sharding(prepped, pairs_file, tmp_path):
    out, _ = prepped
    r = TPS.with_overrides({"output.format": "webdataset", "output.shard_size": 8})
    s = run_triplets(out, pairs_file, tmp_path / "wds", r, device="cpu", batch=8)
    shards = sorted((tmp_path / "wds").glob("shard-*.tar"))
    assert len(shards) == 3 and s["counts"]["written"] == len(TripletDataset(tmp_path / "wds")) // 2
    assert len(TripletDataset(tmp_path / "wds" / "manifest.jsonl")) == len(TripletDataset(tmp_path / "wds"))
    # two processes' shards into one folder give the whole set
    for i in range(2):
        run_triplets(out, pairs_file, tmp_path / "sh", TPS, device="cpu", batch=8, shard_index=i, num_shards=2)
    assert len(ManifestRecord.read(tmp_path / "sh" / "manifest.jsonl")) == s["counts"]["written"]


@pytest.mark.slow
def test_kill_and_resume_gives_identical_folders(prepped, pairs_file, tmp_path):
    """kill -9 of a triplets run once its first chunk is recorded; the re-run resumes to the
    uninterrupted run's folders, manifest (QC figures included) and all, byte for byte. (The 2D
    recipe with QC: resuming does not depend on the synthesis, and the mesh recipe's cost would.)"""
    out, _ = prepped
    ref_dir, cut = tmp_path / "ref", tmp_path / "cut"
    recipe = str(Path(__file__).parents[1] / "recipes" / "tps.toml")
    args = ["triplets", str(out), "--pairs", str(pairs_file), "--recipe", recipe, "--device", "cpu", "--batch", "8",
            "--qc", "--min-id-margin", "-2"]
    assert run_cli(*args, "--out", ref_dir).returncode == 0
    proc = subprocess.Popen([*CLI, *args, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((cut / ".triplets" / "units").glob("chunk-*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((cut / ".triplets" / "units").glob("chunk-*.json")))
    assert 1 <= done < 3
    assert run_cli(*args, "--out", cut).returncode == 0  # the resume, in this process
    recs = ManifestRecord.read(ref_dir / "manifest.jsonl")
    assert len(recs) >= 17 and all(r.qc for r in recs)
    for r in recs:
        for f in FILES.values():
            assert (cut / r.folder / f).read_bytes() == (ref_dir / r.folder / f).read_bytes(), (r.folder, f)
    assert (cut / "manifest.jsonl").read_bytes() == (ref_dir / "manifest.jsonl").read_bytes()
    assert not list(cut.glob(".*.tmp"))


def test_bad_pairs_are_skipped_with_reason(prepped, pairs_file, tmp_path):
    out, _ = prepped
    good = PairRecord.read(pairs_file)[:2]
    bad = good[0].model_copy(update={"b": "no-such-face"})
    PairRecord.write(tmp_path / "p.jsonl", [good[0], bad, good[1]])
    s = run_triplets(out, tmp_path / "p.jsonl", tmp_path / "o", device="cpu", batch=8)
    assert s["counts"]["written"] == 2 and s["counts"]["rejected"] == 1
    rej = RejectRecord.read(tmp_path / "o" / "rejects.jsonl")
    assert "no-such-face" in rej[0].reason and rej[0].pair["b"] == "no-such-face"


def test_cli_user_errors_have_no_traceback(prepped, sface_cache, tmp_path, cli):
    out, _ = prepped
    sface_cache(tmp_path)
    r = cli("triplets", tmp_path, "--pairs", tmp_path / "x.jsonl", "--out", tmp_path / "o")
    assert r.returncode == 2 and "faces.jsonl" in r.stderr and "Traceback" not in r.stderr
    r = cli("pairs", out, "--out", tmp_path / "p.jsonl", "--strategy", "nope")
    assert r.returncode == 2 and "--strategy" in r.stderr
    r = cli("pairs", out, "--out", tmp_path / "p.jsonl", "--n", "5")
    assert r.returncode == 0 and len(PairRecord.read(tmp_path / "p.jsonl")) == 5


@pytest.mark.parametrize("fmt", ["folder", "webdataset"])
def test_both_encoder_paths_write_the_same_files(prepped, pairs_file, tmp_path, monkeypatch, fmt):
    """The nvJPEG branch of the pipeline (own encoder thread, batched call, regrouped per triplet)
    against the OpenCV branch (writer threads), with a stand-in for nvJPEG that returns OpenCV's
    bytes: the outputs must be identical, so only the encoder differs on a GPU."""
    import reliableswap.commands.triplets as cmd
    import reliableswap.images as images
    from reliableswap.images import encode_image

    out, _ = prepped
    base = TPS.with_overrides({"output.format": fmt, "output.shard_size": 8})
    run_triplets(out, pairs_file, tmp_path / "opencv", base.with_overrides({"output.encoder": "opencv"}), device="cpu", batch=8)
    fake = lambda imgs, quality: [torch.frombuffer(bytearray(encode_image(t.permute(1, 2, 0).numpy(), ".jpg", quality)), dtype=torch.uint8)  # noqa: E731
                                  for t in imgs]
    monkeypatch.setattr(images, "_tv_encode_jpeg", fake)
    monkeypatch.setattr(cmd, "gpu_jpeg_available", lambda device: True)
    monkeypatch.setattr(images, "gpu_jpeg_available", lambda device: True)
    s = run_triplets(out, pairs_file, tmp_path / "nv", base.with_overrides({"output.encoder": "nvjpeg"}), device="cpu", batch=8)
    assert s["details"]["jpeg_encoder"] == "nvjpeg"
    names = sorted(p.relative_to(tmp_path / "opencv").as_posix() for p in (tmp_path / "opencv").rglob("*")
                   if p.is_file() and not p.relative_to(tmp_path / "opencv").parts[0].startswith(".")
                   and p.name not in ("summary.json", "recipe.resolved.toml", "triplet.pickle"))
    assert names and names == sorted(p.relative_to(tmp_path / "nv").as_posix() for p in (tmp_path / "nv").rglob("*")
                                     if p.is_file() and not p.relative_to(tmp_path / "nv").parts[0].startswith(".")
                                     and p.name not in ("summary.json", "recipe.resolved.toml", "triplet.pickle"))
    for n in names:
        if n.endswith(".tar"):
            a = {m["__key__"]: m for m in iter_shard(tmp_path / "opencv" / n)}
            b = {m["__key__"]: m for m in iter_shard(tmp_path / "nv" / n)}
            assert a.keys() == b.keys() and all(a[k][f] == b[k][f] for k in a for f in FILES.values()), n
        elif n != "manifest.jsonl":  # the manifest names the recipe, which names the encoder
            assert (tmp_path / "opencv" / n).read_bytes() == (tmp_path / "nv" / n).read_bytes(), n
