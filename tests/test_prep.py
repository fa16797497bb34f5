"""`prep` end to end on real faces: hard inputs, resume after kill -9, video order, CLI errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from reliableswap.commands.prep import PrepConfig, run_prep
from triplets.records import RejectRecord
from reliableswap.contracts import FaceRecord
from conftest import CLI


def load_faces(folder):
    return FaceRecord.read(Path(folder) / "faces.jsonl")


def test_prepped_records_follow_contract(prepped):
    out, summary = prepped
    faces = load_faces(out)
    assert summary["counts"]["written"] == len(faces) >= 60
    for f in faces[:20]:
        assert (out / f.image).is_file()
        assert len(f.landmarks68) == 68 and len(f.embedding) == 128
        assert np.asarray(f.inverse).shape == (2, 3)
    assert {f.identity for f in faces} == {None}  # no --identity-from-folder
    assert summary["throughput"]["unit"] == "faces" and summary["throughput"]["per_s"] > 0
    assert set(summary["timings"]["stages_s"]) >= {"decode", "detect", "landmarks", "align", "write", "embed"}


def test_hard_reject_every_file_rejected_with_reason(faces_dir, prepped):
    out, _ = prepped
    rejects = {Path(r.input).name: r.reason for r in RejectRecord.read(out / "rejects.jsonl")}
    faces = load_faces(out)
    for p in sorted((faces_dir / "hard" / "reject").iterdir()):
        assert p.name in rejects, f"{p.name} was not rejected"
        reason = rejects[p.name]
        assert reason and "\n" not in reason and len(reason) < 200
        assert not [f for f in faces if Path(f.origin.path).name == p.name]
    assert "truncated" in rejects["corrupt_truncated_london_021.jpg"]
    assert "empty" in rejects["zero_bytes.jpg"]
    assert "HTML" in rejects["html_named_jpg.jpg"]


def test_hard_valid_every_file_yields_its_face(faces_dir, prepped):
    out, _ = prepped
    by_file: dict[str, list[dict]] = {}
    for f in load_faces(out):
        by_file.setdefault(Path(f.origin.path).name, []).append(f)
    for p in sorted((faces_dir / "hard" / "valid").iterdir()):
        assert p.name in by_file, f"no face from {p.name}"
        f = by_file[p.name][0]
        # EXIF-rotated inputs come out upright: small roll
        assert abs(f.pose.roll) < 20, (p.name, f.pose)
    big = by_file["large_4000px_london_136.jpg"][0]
    w = big.bbox[2] - big.bbox[0]
    assert big.origin.size == (4000, 4000) and 1000 < w < 1600  # original pixels despite reduced decode


def test_generated_odd_inputs(tmp_path, faces_dir):
    """16-bit, 8000 px, many faces, grayscale PNG made from real faces."""
    src = cv2.imread(str(faces_dir / "london_set/london_030_neutral.jpg"))
    inp = tmp_path / "in"
    inp.mkdir()
    cv2.imwrite(str(inp / "rgb16.png"), src.astype(np.uint16) * 257)
    cv2.imwrite(str(inp / "huge8000.jpg"), cv2.resize(src, (8000, 8000), interpolation=cv2.INTER_LINEAR),
                [cv2.IMWRITE_JPEG_QUALITY, 80])
    cv2.imwrite(str(inp / "gray.png"), cv2.cvtColor(src, cv2.COLOR_BGR2GRAY))
    small = cv2.resize(src, (400, 400), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(inp / "three_faces.jpg"), np.hstack([small, small, small]))
    summary = run_prep([inp], tmp_path / "out", PrepConfig(), workers=1)
    faces = load_faces(tmp_path / "out")
    names = [Path(f.origin.path).name for f in faces]
    assert summary["counts"]["rejected"] == 0
    assert names.count("three_faces.jpg") == 3
    for n in ("rgb16.png", "huge8000.jpg", "gray.png"):
        assert names.count(n) == 1, n
    huge = next(f for f in faces if f.origin.path.endswith("huge8000.jpg"))
    assert 2400 < huge.bbox[2] - huge.bbox[0] < 3400  # 510 px face × 8000/1350 ≈ 3000 px


def _tree(out: Path) -> dict[str, bytes]:
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "faces").iterdir()}
    files["faces.jsonl"] = (out / "faces.jsonl").read_bytes()
    files["rejects.jsonl"] = (out / "rejects.jsonl").read_bytes()
    return files


@pytest.mark.slow
def test_kill_and_resume_gives_same_files(faces_dir, tmp_path):
    """kill -9 of the main process alone mid-run: its prep workers end with it (none is left
    running or writing), and a re-run resumes to the uninterrupted run's files, byte for byte."""
    import psutil

    inputs = [str(faces_dir / d) for d in ("london_set", "hard")]  # faces, odd files and files with no face
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    n = run_prep(inputs, ref, PrepConfig(), workers=1)["counts"]["in"]  # in this process: no worker start-ups
    proc = subprocess.Popen([*CLI, "prep", *inputs, "--out", str(cut), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = cut / ".prep" / "units"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("*.json"))) < 6:
        time.sleep(0.05)
    family = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)  # only the main process: its workers must follow
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # (should the check below fail, nothing is left running)
    assert len(family) >= 2 and not alive, ([p.pid for p in family], [p.pid for p in alive])
    n_done = len(list(records.glob("*.json")))
    assert 6 <= n_done < n, "the run must be cut mid-way"
    assert not (cut / "faces.jsonl").exists()
    summary = run_prep(inputs, cut, PrepConfig(), workers=1)
    assert summary["counts"]["skipped"] >= 6 and summary["counts"]["in"] - summary["counts"]["skipped"] <= n - 6
    assert _tree(cut) == _tree(ref)
    assert not list(cut.rglob("*.tmp"))


def test_video_frames_in_order(faces_dir, tmp_path):
    video = faces_dir / "video" / "lp_d18.mp4"
    cap = cv2.VideoCapture(str(video))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    summary = run_prep([video], tmp_path, PrepConfig(every=20, largest=True), workers=1)
    frames = [f.origin.frame for f in load_faces(tmp_path)]
    assert frames == sorted(frames) and all(i % 20 == 0 for i in frames)
    assert summary["details"]["frames"] == math.ceil(n / 20) and len(frames) >= math.ceil(n / 20) - 1


def test_identity_from_folder_and_config_guard(faces_dir, tmp_path):
    run_prep([faces_dir / "london_set"], tmp_path, PrepConfig(identity_from_folder=True, largest=True), workers=1)
    assert {f.identity for f in load_faces(tmp_path)} == {"london_set"}
    with pytest.raises(ValueError, match="other settings"):
        run_prep([faces_dir / "london_set"], tmp_path, PrepConfig(size=128), workers=1)


def test_cli_exit_codes_and_messages(faces_dir, tmp_path, cli):
    bad = cli("prep", faces_dir / "hard" / "reject", "--out", tmp_path / "r")
    assert bad.returncode == 1 and "no usable face" in bad.stderr and "Traceback" not in bad.stderr
    rej = RejectRecord.read(tmp_path / "r" / "rejects.jsonl")
    assert len(rej) == len(list((faces_dir / "hard" / "reject").iterdir()))
    arg = cli("prep", faces_dir, "--out", tmp_path / "a", "--align", "nope")
    assert arg.returncode == 2 and "--align" in arg.stderr and "Traceback" not in arg.stderr
    ok = cli("prep", faces_dir / "public_domain", "--out", tmp_path / "o", "--workers", "1")
    assert ok.returncode == 0, ok.stderr
    assert len(load_faces(tmp_path / "o")) >= 2
    sheet = cli("inspect", tmp_path / "o", "--sheet", tmp_path / "s.png")
    assert sheet.returncode == 0 and cv2.imread(str(tmp_path / "s.png")) is not None
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["command"] == "prep"
    shutil.rmtree(tmp_path / "a", ignore_errors=True)
