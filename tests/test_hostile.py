"""Hostile input, crashes and limits: nothing escapes its folder, nothing explodes, nothing is lost.

Every hostile file is generated here (a PNG bomb is a few lines of zlib); faces are synthetic
(``reliableswap.testing``) unless a test needs a detector to find a real one."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from reliableswap.commands.prep import PrepConfig, discover, run_prep
from reliableswap.commands.triplets import run_triplets
from reliableswap.images import InputError, encode_image, read_image
from reliableswap.jobs import FolderBusy, Job, OutputError, SettingsMismatch
from reliableswap.testing.faces import write_synthetic_prep
from reliableswap.testing.flame import write_embeddings, write_model
from triplets import TripletDataset
from triplets.records import ContractError, FaceRecord, FaceSet, ManifestRecord, PairRecord, RejectRecord

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "reliableswap.cli"]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, **kw)


def _png_bomb(w: int, h: int) -> bytes:
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (w * 3 + 1) * 64, 9)  # a few rows; the header claims w×h
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _huge_header_jpeg(w: int, h: int) -> bytes:
    """A real small JPEG whose SOF0 header is patched to claim w×h."""
    data = bytearray(encode_image(np.full((16, 16, 3), 128, np.uint8), ".jpg", 90))
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, h, w)
    return bytes(data)


# -- files that try to explode --------------------------------------------------------------------

def test_bombs_are_refused_from_their_header_in_bounded_memory(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_bomb(17000, 17000))
    (tmp_path / "huge.jpg").write_bytes(_huge_header_jpeg(60000, 60000))
    # the child's own peak: VmHWM (ru_maxrss would keep the forking parent's high-water mark across exec)
    code = ("import re, sys, time; from reliableswap.images import read_image, InputError\n"
            "t = time.perf_counter()\n"
            "for p in sys.argv[1:]:\n"
            "    try: read_image(p)\n"
            "    except InputError as e: print(e)\n"
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "print(hwm // 1024, time.perf_counter() - t)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.png"), str(tmp_path / "huge.jpg")],
                       capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("image too large (17000x17000 px") and lines[1].startswith("image too large (60000x60000 px")
    rss_mb, secs = lines[2].split()
    assert int(rss_mb) < 600 and float(secs) < 2.0, lines[2]  # the repro took 4.3 GB and 20 s
    with pytest.raises(InputError, match="too large"):
        read_image(tmp_path / "bomb.png", max_pixels=10_000_000)
    assert read_image(tmp_path / "bomb.png", max_pixels=10**9)  # a user may lift the limit


def test_odd_files_each_get_one_line(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    frames = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(d / "two_frames.gif", save_all=True, append_images=frames[1:])
    frames[0].save(d / "two_pages.tif", save_all=True, append_images=frames[1:])
    (d / "truncated.png").write_bytes(encode_image(np.zeros((64, 64, 3), np.uint8), ".png")[:60])
    (d / "empty.jpg").write_bytes(b"")
    (d / "page\nwith newline.jpg").write_text("<html><body>not an image</body></html>")
    (d / "bomb.png").write_bytes(_png_bomb(20000, 20000))
    (d / "loop").symlink_to(d)  # a symlink loop inside an input folder
    (d / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    rgb, _ = read_image(d / "two_frames.gif")
    assert rgb.shape == (64, 64, 3) and rgb[0, 0, 0] == 10  # the first frame
    units, missing, _ = discover([d])
    assert len({u.path for u in units}) == len(units)  # the loop adds nothing twice
    s = run_prep([d], tmp_path / "out", PrepConfig(), workers=1)
    rejects = RejectRecord.read(tmp_path / "out" / "rejects.jsonl")
    assert s["counts"]["written"] == 0 and len(rejects) >= 6
    for r in rejects:
        assert r.reason and "\n" not in r.reason and len(r.reason) < 200, r
    by_name = {Path(r.input).name: r.reason for r in rejects}
    assert "too large" in by_name["bomb.png"] and "empty" in by_name["empty.jpg"] and "HTML" in by_name["page\nwith newline.jpg"]


def test_workers_are_capped_and_out_inside_the_input_is_left_out(tmp_path, faces_dir):
    d = tmp_path / "in"
    d.mkdir()
    (d / "face.jpg").write_bytes((faces_dir / "london_set" / "london_030_neutral.jpg").read_bytes())
    (d / "blank.png").write_bytes(encode_image(np.full((64, 64, 3), 90, np.uint8), ".png"))
    s = run_prep([d], d / "prep_out", PrepConfig(largest=True), workers=1000)
    assert "capped" in s["details"]["warning"] and s["counts"]["in"] == 2 and s["counts"]["written"] == 1
    assert list((d / "prep_out" / "faces").glob("*.png"))  # a crop now lies inside the input folder
    for _ in range(2):  # its own outputs are never read back as inputs (the issue: 1 → 2 → 3 faces)
        s = run_prep([d], d / "prep_out", PrepConfig(largest=True), workers=1)
        assert s["counts"]["in"] == 2 and s["counts"]["written"] == 1


def test_batch_and_device_flags_are_bounded(tmp_path, monkeypatch):
    import reliableswap.device as device

    monkeypatch.setattr(device, "available_memory", lambda dev: 8 * 2**30)
    with pytest.raises(ValueError, match=r"--batch 4096 needs about 128.0 GiB .* use --batch 153 or less"):
        device.check_batch_memory(4096, 32 * 2**20, torch.device("cpu"))
    r = _cli("triplets", tmp_path, "--pairs", tmp_path / "p.jsonl", "--out", tmp_path / "o", "--device", "banana")
    assert r.returncode == 2 and "--device 'banana' is not a device" in r.stderr and "Traceback" not in r.stderr
    if not torch.cuda.is_available():
        r = _cli("fit", tmp_path, "--device", "cuda")
        assert r.returncode == 2 and "CUDA is not available" in r.stderr


# -- paths that try to escape ---------------------------------------------------------------------

@pytest.fixture()
def synth_prep(tmp_path):
    return write_synthetic_prep(tmp_path / "prep", 8)


def test_ids_that_would_escape_never_name_a_file(synth_prep, tmp_path):
    """The issue's repro: an id ``../../../ESCAPED`` in faces.jsonl and pairs.jsonl, then `flows`."""
    lines = (synth_prep / "faces.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["id"] = "../../../ESCAPED"
    (synth_prep / "faces.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"schema": "reliableswap.pairs/1", "a": "../../../ESCAPED", "b": "synthetic_0_00001"}) + "\n"
                     + json.dumps({"schema": "reliableswap.pairs/1", "a": "/abs/ESCAPED", "b": "synthetic_0_00001"}) + "\n"
                     + PairRecord(a="synthetic_0_00002", b="synthetic_0_00003").model_dump_json(by_alias=True) + "\n")
    model = write_model(tmp_path / "generic_model.pkl")
    write_embeddings(tmp_path)
    out = synth_prep / "fl"
    r = _cli("flows", synth_prep, "--pairs", pairs, "--out", out, "--flame", model, "--max-rmse", "50", "--no-previews")
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.parent.rglob("*ESCAPED*")) and not Path("/abs").exists()
    rej = RejectRecord.read(out / "rejects.jsonl")
    assert any(x.input.endswith("faces.jsonl:1") and x.reason.startswith("bad record: id:") for x in rej), rej
    assert sum(":" in x.input and x.input.rsplit(":", 1)[0].endswith("pairs.jsonl") for x in rej) == 2, rej
    assert json.loads((out / "summary.json").read_text())["counts"]["written"] == 1


def test_contract_paths_resolve_inside_their_folder(synth_prep, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes((synth_prep / "faces" / "synthetic_0_00000.png").read_bytes())
    (synth_prep / "faces" / "synthetic_0_00000.png").unlink()
    (synth_prep / "faces" / "synthetic_0_00000.png").symlink_to(outside)  # a crop that is a link out
    lines = (synth_prep / "faces.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["image"] = "../outside.png"
    (synth_prep / "faces.jsonl").write_text("\n".join([lines[0], json.dumps(rec), *lines[2:]]) + "\n")
    PairRecord.write(tmp_path / "p.jsonl", [PairRecord(a="synthetic_0_00000", b="synthetic_0_00002"),
                                            PairRecord(a="synthetic_0_00001", b="synthetic_0_00003"),
                                            PairRecord(a="synthetic_0_00004", b="synthetic_0_00005")])
    s = run_triplets(synth_prep, tmp_path / "p.jsonl", tmp_path / "tri", device="cpu", batch=4)
    reasons = [r.reason for r in RejectRecord.read(tmp_path / "tri" / "rejects.jsonl")]
    assert s["counts"]["written"] == 1 and any("leads outside" in x for x in reasons), reasons
    assert any("image: must be a relative path" in x for x in reasons), reasons
    # a manifest whose folder points out, or a triplet folder that is a link out
    tri = tmp_path / "tri"
    good = ManifestRecord.read(tri / "manifest.jsonl")[0]
    bad = good.model_copy(update={"folder": "x"}).to_json()
    (tmp_path / "elsewhere").mkdir()
    (tri / "x").symlink_to(tmp_path / "elsewhere")
    (tri / "manifest.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ContractError, match="leads outside"):
        TripletDataset(tri)
    bad["folder"] = "../elsewhere"
    (tri / "manifest.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ContractError, match="folder: String should match pattern"):
        TripletDataset(tri)
    r = _cli("inspect", tri, "--sheet", tmp_path / "s.png")
    assert r.returncode == 2 and "manifest.jsonl:1: folder" in r.stderr and "Traceback" not in r.stderr


def test_checkpoint_pointer_cannot_lead_outside(tmp_path):
    from reliableswap.commands.finetune import run_finetune

    tri, r = _tiny_setup(tmp_path, steps=2)
    run_finetune(r, tri, tmp_path / "run", device="cpu")
    latest = tmp_path / "run" / "checkpoints" / "latest.json"
    meta = json.loads(latest.read_text())
    (tmp_path / "stolen.safetensors").write_bytes((latest.parent / meta["weights"]).read_bytes())
    latest.write_text(json.dumps(meta | {"weights": "../../stolen.safetensors"}))
    with pytest.raises(ContractError, match="weights: '../../stolen.safetensors' leads outside"):
        run_finetune(r.with_overrides({"train.steps": 4}), tri, tmp_path / "run", device="cpu", resume=True)


# -- every record is read or refused with one line ------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)
VALID = {
    FaceRecord: FaceRecord(id="f", image="faces/f.png", origin={"path": "x.jpg", "size": [100, 100]}, align="ffhq", size=256,
                           bbox=[0, 0, 1, 1], landmarks68=[[100.0, 100.0]] * 68, pose={"yaw": 0, "pitch": 0, "roll": 0},
                           inverse=[[1, 0, 0], [0, 1, 0]], quality={"det_score": 1, "face_px": 100, "sharpness": 1}).to_json(),
    PairRecord: PairRecord(a="a", b="b").to_json(),
    ManifestRecord: ManifestRecord(pair={"index": 0, "a": "a", "b": "b"}, folder="00000000").to_json(),
}


@pytest.mark.parametrize("cls", list(VALID))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_record_is_read_or_refused_with_one_line(cls, data):
    rec = json.loads(json.dumps(VALID[cls]))
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(rec) + ["extra"]))
        rec[key] = data.draw(JSON)
    line = json.dumps(rec, allow_nan=True)
    try:
        cls.parse_line(line, "x.jsonl:7")
    except ContractError as e:
        assert str(e).startswith("x.jsonl:7:") and "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_read_or_refused_with_one_line(raw):
    try:
        FaceRecord.parse_line(raw, "x.jsonl:1")
    except ContractError as e:
        assert "\n" not in str(e)


def test_self_pairs_and_duplicates_are_refused_with_file_line(synth_prep, tmp_path):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"schema": "reliableswap.pairs/1", "a": "synthetic_0_00001", "b": "synthetic_0_00001"}) + "\n"
                     + PairRecord(a="synthetic_0_00002", b="synthetic_0_00003").model_dump_json(by_alias=True) + "\n")
    s = run_triplets(synth_prep, pairs, tmp_path / "tri", device="cpu", batch=4)
    rej = RejectRecord.read(tmp_path / "tri" / "rejects.jsonl")
    assert s["counts"]["written"] == 1 and rej[0].input == f"{pairs}:1" and "self-pair" in rej[0].reason
    PairRecord.write(tmp_path / "none.jsonl", [PairRecord(a="synthetic_0_00002", b="no_such_face")])
    r = _cli("triplets", synth_prep, "--pairs", tmp_path / "none.jsonl", "--out", tmp_path / "t0", "--device", "cpu")
    assert r.returncode == 1 and "no usable triplet came out" in r.stderr  # nothing usable: exit 1
    nan = json.loads((synth_prep / "faces.jsonl").read_text().splitlines()[0])
    nan["landmarks68"][3][0] = float("nan")
    with open(synth_prep / "faces.jsonl", "a") as f:
        f.write(json.dumps(nan | {"id": "nan_face"}) + "\n")
    fs = FaceSet.load(synth_prep, strict=False)
    assert "nan_face" not in fs and "landmarks68.3.0" in str(fs.problems[0])  # NaN never reaches a fit or a triplet


def test_changed_inputs_or_settings_never_mix_into_a_folder(synth_prep, tmp_path):
    PairRecord.write(tmp_path / "p.jsonl", [PairRecord(a="synthetic_0_00000", b="synthetic_0_00001")])
    run_triplets(synth_prep, tmp_path / "p.jsonl", tmp_path / "tri", device="cpu", batch=4)
    PairRecord.write(tmp_path / "p.jsonl", [PairRecord(a="synthetic_0_00002", b="synthetic_0_00003")])
    with pytest.raises(SettingsMismatch, match="pairs_sha256"):  # same path, other pairs
        run_triplets(synth_prep, tmp_path / "p.jsonl", tmp_path / "tri", device="cpu", batch=4)
    (tmp_path / "a_file").write_text("x")
    r = _cli("triplets", synth_prep, "--pairs", tmp_path / "p.jsonl", "--out", tmp_path / "a_file", "--device", "cpu")
    assert r.returncode == 2 and "a_file" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "r.toml"
    bad.write_text('kind = "triplets"\n[reenact]\nbackend = "no_such_module:Reenactor"\n')
    r = _cli("triplets", synth_prep, "--pairs", tmp_path / "p.jsonl", "--out", tmp_path / "t2", "--recipe", bad, "--device", "cpu")
    assert r.returncode == 2 and "no_such_module" in r.stderr and "Traceback" not in r.stderr


# -- one writer per folder, output failures stop without blaming the input ------------------------

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with Job("triplets", tmp_path, {}, "t"):
        with pytest.raises(FolderBusy, match=f"pid {os.getpid()} on "):
            Job("triplets", tmp_path, {}, "t")
        Job("triplets", tmp_path, {}, "t", lock="triplets.shard-1-of-2").release()  # another shard may write beside
    Job("triplets", tmp_path, {}, "t").release()  # free again once the first has ended
    with pytest.raises(SettingsMismatch) as refused:  # kept: its traceback holds the half-made Job
        Job("triplets", tmp_path, {"other": 1}, "t")
    Job("triplets", tmp_path, {}, "t").release()  # a refused pin released the lock it had taken
    assert "other settings" in str(refused.value)


def test_disk_full_stops_the_run_and_a_rerun_completes(synth_prep, tmp_path, monkeypatch):
    import reliableswap.commands.triplets as cmd

    PairRecord.write(tmp_path / "p.jsonl", [PairRecord(a=f"synthetic_0_{i:05d}", b=f"synthetic_0_{i + 4:05d}") for i in range(4)])
    clean = run_triplets(synth_prep, tmp_path / "p.jsonl", tmp_path / "clean", device="cpu", batch=2)
    real = cmd.atomic_dir
    calls = {"n": 0}

    def full(path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(cmd, "atomic_dir", full)
    with pytest.raises(OSError, match="No space left"):
        run_triplets(synth_prep, tmp_path / "p.jsonl", tmp_path / "cut", device="cpu", batch=2)
    monkeypatch.setattr(cmd, "atomic_dir", real)
    s = run_triplets(synth_prep, tmp_path / "p.jsonl", tmp_path / "cut", device="cpu", batch=2)
    assert s["counts"]["rejected"] == 0 and s["counts"]["written"] == clean["counts"]["written"] == 4
    assert (tmp_path / "cut" / "manifest.jsonl").read_bytes() == (tmp_path / "clean" / "manifest.jsonl").read_bytes()


def test_disk_full_in_prep_is_never_recorded_against_the_input(tmp_path, monkeypatch, faces_dir):
    import reliableswap.commands.prep as prep

    inputs = [faces_dir / "london_set" / f"london_{n}_neutral.jpg" for n in ("008", "021", "030")]
    real, calls = prep.save_image, {"n": 0}

    def full(path, rgb, quality=95):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, rgb, quality)

    monkeypatch.setattr(prep, "save_image", full)
    with pytest.raises(OutputError, match="No space left on device"):
        run_prep(inputs, tmp_path / "out", PrepConfig(largest=True), workers=1)
    monkeypatch.setattr(prep, "save_image", real)
    s = run_prep(inputs, tmp_path / "out", PrepConfig(largest=True), workers=1)
    assert s["counts"]["written"] == 3 and s["counts"]["rejected"] == 0 and s["counts"]["skipped"] == 1


def test_finetune_refuses_a_used_folder_unless_resume_or_overwrite(tmp_path):
    from reliableswap.commands.finetune import run_finetune

    tri, r = _tiny_setup(tmp_path, steps=2)
    run_finetune(r, tri, tmp_path / "run", device="cpu")
    with pytest.raises(SettingsMismatch, match="--resume to continue it, --overwrite to start again"):
        run_finetune(r, tri, tmp_path / "run", device="cpu")
    s = run_finetune(r, tri, tmp_path / "run", device="cpu", overwrite=True)
    assert s["details"]["resumed_from"] == 0 and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 2


# -- kill -9, then resume -------------------------------------------------------------------------

def _tiny_setup(tmp_path: Path, steps: int):
    from reliableswap.images import save_image
    from reliableswap.recipes import TrainRecipe, load_recipe
    from reliableswap.testing.faces import synthetic_faces
    from triplets.layout import FILES

    imgs, _ = synthetic_faces(32, 64, seed=2)
    for i in range(8):
        for j, name in enumerate(FILES.values()):
            save_image(tmp_path / "tri" / f"{i:08d}" / name, imgs[4 * i + j])
    r = load_recipe(ROOT / "recipes" / "tiny.toml", TrainRecipe).with_overrides({
        "model.swapper": "reliableswap.testing.swappers:TinySwapper", "model.value_range": [-1.0, 1.0], "data.holdout": 0,
        "train.steps": steps, "train.ckpt_every": 2, "train.sample_every": 0})
    return tmp_path / "tri", r


def _kill_when(args: list, ready, timeout: float = 120) -> None:
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_kill_and_resume_fit(tmp_path):
    """`fit` killed mid-run resumes: the faces it had fitted stay, the rest are fitted, and the
    parameters equal an uninterrupted run's."""
    base = json.loads(Path(write_synthetic_prep(tmp_path / "one", 1) / "faces.jsonl").read_text())
    prep = tmp_path / "prep"
    prep.mkdir()
    rng = np.random.default_rng(0)
    recs = [base | {"id": f"f{i:05d}", "landmarks68": (np.asarray(base["landmarks68"]) + rng.normal(0, 1, (68, 2))).round(2).tolist()}
            for i in range(2000)]
    FaceRecord.write(prep / "faces.jsonl", recs)
    model = write_model(tmp_path / "generic_model.pkl")
    write_embeddings(tmp_path)
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "faces.jsonl").write_bytes((prep / "faces.jsonl").read_bytes())
    assert _cli("fit", ref, "--flame", model, "--batch", "50").returncode == 0
    _kill_when(["fit", prep, "--flame", model, "--batch", "50"], lambda: len(list((prep / ".fit" / "units").glob("*.json"))) >= 2)
    done = len(list((prep / ".fit" / "units").glob("*.json")))
    assert 2 <= done < 40 and not (prep / "flame.jsonl").exists()
    r = _cli("fit", prep, "--flame", model, "--batch", "50")
    assert r.returncode == 0, r.stderr
    s = json.loads((prep / "fit.summary.json").read_text())
    assert s["counts"]["skipped"] == 50 * done and s["counts"]["written"] == 2000
    a, b = FaceSet.load(prep).flame, FaceSet.load(ref).flame
    assert a.keys() == b.keys()
    assert max(np.abs(np.subtract(a[k].shape, b[k].shape)).max() for k in a) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("fitted_first", [True, False])
def test_kill_and_resume_flows(tmp_path, fitted_first):
    """`flows` killed mid-run resumes to the uninterrupted run's files: byte for byte when `fit`
    ran first; within float32 rounding of the fits when faces are fitted on the fly (the resumed
    run fits the remaining faces in other batches)."""
    prep = write_synthetic_prep(tmp_path / "prep", 24)
    PairRecord.write(tmp_path / "p.jsonl", [PairRecord(a=f"synthetic_0_{i:05d}", b=f"synthetic_0_{(i + 1) % 24:05d}") for i in range(24)])
    model = write_model(tmp_path / "generic_model.pkl")
    write_embeddings(tmp_path)
    if fitted_first:
        assert _cli("fit", prep, "--flame", model, "--max-rmse", "50").returncode == 0
    args = ["flows", prep, "--pairs", tmp_path / "p.jsonl", "--flame", model, "--batch", "2", "--no-previews", "--max-rmse", "50"]
    assert _cli(*args, "--out", tmp_path / "ref").returncode == 0
    _kill_when([*args, "--out", tmp_path / "cut"], lambda: len(list((tmp_path / "cut" / ".flows" / "units").glob("*.json"))) >= 2)
    done = len(list((tmp_path / "cut" / ".flows" / "units").glob("*.json")))
    assert 2 <= done < 24
    assert _cli(*args, "--out", tmp_path / "cut").returncode == 0
    a = [json.loads(line) for line in (tmp_path / "cut" / "manifest.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "ref" / "manifest.jsonl").read_text().splitlines()]
    assert [r["key"] for r in a] == [r["key"] for r in b] and len(a) == 24
    for p in sorted((tmp_path / "ref" / "flows").glob("*.npz")):
        with np.load(p) as x, np.load(tmp_path / "cut" / "flows" / p.name) as y:
            for k in x.files:
                if fitted_first:
                    assert np.array_equal(x[k], y[k]), (p.name, k)
                elif x[k].dtype == bool:  # coverage masks: a pixel on the silhouette's edge may flip
                    assert (x[k] != y[k]).mean() < 0.01, (p.name, k)
                else:
                    # a fit that differs in float32 rounding moves the flow by far less than 0.5 px,
                    # except on a few pixels where it flips which of two triangles at nearly the
                    # same depth covers the pixel (a fold) or the silhouette's edge (measured: 5 of
                    # 65536 pixels, up to 7.9 px, in one of 24 pairs)
                    d = np.abs(x[k].astype(np.float32) - y[k].astype(np.float32))
                    assert (d.max(-1) > 0.5).mean() < 1e-3 and d.mean() < 0.01, (p.name, k)
    if fitted_first:
        assert (tmp_path / "cut" / "manifest.jsonl").read_bytes() == (tmp_path / "ref" / "manifest.jsonl").read_bytes()
    assert not list((tmp_path / "cut").rglob(".*.tmp"))


@pytest.mark.slow
def test_kill_and_resume_finetune(tmp_path):
    tri, r = _tiny_setup(tmp_path, steps=40)
    recipe = tmp_path / "r.toml"
    recipe.write_text(r.to_toml())
    args = ["finetune", "--recipe", recipe, "--triplets", tri, "--device", "cpu"]
    assert _cli(*args, "--out", tmp_path / "ref").returncode == 0
    ck = tmp_path / "cut" / "checkpoints"
    _kill_when([*args, "--out", tmp_path / "cut"], lambda: len(list(ck.glob("step-*.state.pt"))) >= 3)
    assert (ck / "latest.json").is_file()
    assert _cli(*args, "--out", tmp_path / "cut", "--resume").returncode == 0
    from safetensors.torch import load_file

    a, b = load_file(str(ck / "step-0000040.safetensors")), load_file(str(tmp_path / "ref" / "checkpoints" / "step-0000040.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_prep_workers_die_with_their_parent(faces_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    proc = subprocess.Popen([*CLI, "prep", faces_dir / "london_set", faces_dir / "ffhq", "--out", tmp_path / "o", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    units = tmp_path / "o" / ".prep" / "units"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(units.glob("*.json"))) < 2:
        time.sleep(0.05)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 2
    os.kill(proc.pid, signal.SIGKILL)  # only the main process: its workers must follow
    proc.wait()
    gone, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, [p.pid for p in alive]
