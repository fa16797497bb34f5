"""``reliableswap eval ffpp`` on a small stand-in for FaceForensics++ made from the shared video
frames (three short videos named like FF++'s originals, an FF++-style split file): the whole
command end to end with swappers whose answers are known, deterministic frames, resume, and the
bad inputs a user can give it (a pair list naming missing videos, ids that are paths, a split
file that is not one) refused in one line each."""

from __future__ import annotations

import csv
import json
import os

import cv2
import pytest

from reliableswap.cli import main
from reliableswap.commands.ffpp import frame_indices, read_pair_list

pytestmark = pytest.mark.usefixtures("flush_denormals")  # random weights: see conftest.py


@pytest.fixture(scope="module")
def ffpp_videos(faces_dir, tmp_path_factory):
    """Three 16-frame videos (each shared frame twice) as ``000.mp4`` … ``002.mp4``."""
    out = tmp_path_factory.mktemp("ffpp") / "videos"
    out.mkdir()
    for i, d in enumerate(("lp_d0", "lp_d10", "lp_d18")):
        frames = sorted((faces_dir / "video_frames" / d).glob("*.jpg"))
        first = cv2.imread(str(frames[0]))
        vw = cv2.VideoWriter(str(out / f"{i:03d}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, first.shape[1::-1])
        for f in frames:
            for _ in range(2):
                vw.write(cv2.imread(str(f)))
        vw.release()
    return out


NO_FID = "RELIABLESWAP_FID_TORCHSCRIPT"


@pytest.fixture(autouse=True)
def no_fid(monkeypatch, tmp_path):
    """FID's Inception (seconds an image on one CPU thread) only in the run that checks it: the
    other runs point it at a missing file, and their summaries say FID was not computed."""
    monkeypatch.setenv(NO_FID, str(tmp_path / "no_inception.pt"))


def _run(videos, pairs, out, swapper="ReturnSource", *extra):
    code = main(["eval", "ffpp", "--videos", str(videos), "--pairs", str(pairs), "--out", str(out),
                 "--swapper", f"reliableswap.testing.swappers:{swapper}", "--frames", "4", "--device", "cpu", *extra])
    return code, (json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None)


def test_the_protocol_end_to_end_on_a_stand_in(ffpp_videos, tmp_path, monkeypatch):
    split = tmp_path / "test.json"
    split.write_text(json.dumps([["000", "001"], ["002", "009"]]))  # 009 is not there: both its swaps are skipped
    missing = os.environ[NO_FID]
    monkeypatch.delenv(NO_FID)  # this run measures FID with the wheel's Inception
    code, s = _run(ffpp_videos, split, tmp_path / "src")
    monkeypatch.setenv(NO_FID, missing)
    assert code == 0
    d = s["details"]
    # each pair both ways, 4 frames each, frame k of the target with frame k of the source
    assert d["samples"] == {"video_pairs": 2, "swaps": 8, "gallery_source_frames": 8, "fid": d["samples"]["fid"]}
    assert d["samples"]["fid"]["swaps"] == 8 and d["fid"] >= 0 and "TorchScript" in d["measured_by"]["fid"]
    assert d["comparable_with_papers"] is False and "NOT comparable" in d["metrics_note"]
    assert "dlib's 68 points" in d["alignment"] and d["measured_by"]["identity"] == "sface"
    # the swapper that returns the source: every swap is retrieved as its source video
    assert d["id_retrieval_top1_pct"] == 100.0 and d["id_cos_mean"] > 0.99
    rejects = [json.loads(line) for line in (tmp_path / "src" / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["video 009.mp4 not in --videos"] * 2
    rows = list(csv.DictReader((tmp_path / "src" / "frames.csv").open()))
    assert len(rows) == 8 and {(r["target_video"], r["source_video"]) for r in rows} == {("000", "001"), ("001", "000")}
    assert sorted({int(r["frame"]) for r in rows}) == [0, 1, 2, 3]
    # the swapper that returns the target: no pose or expression error, the wrong identity
    code, t = _run(ffpp_videos, split, tmp_path / "tgt", "ReturnTarget")
    assert code == 0 and t["details"]["pose_err_deg"] == 0.0 and t["details"]["expr_err"] == 0.0
    assert t["details"]["id_retrieval_top1_pct"] == 0.0
    # the frames are the same evenly spaced ones in both runs, and a re-run resumes from them
    a = sorted(p.name for p in (tmp_path / "src" / "frames" / "000").glob("*.png"))
    assert a == sorted(p.name for p in (tmp_path / "tgt" / "frames" / "000").glob("*.png")) == [f"000_0{k}.png" for k in range(4)]
    assert json.loads((tmp_path / "src" / "frames" / "000" / ".complete").read_text()) == {"frames": [0, 5, 10, 15], "of": 16}
    stamp = (tmp_path / "src" / "frames" / "000" / "000_00.png").stat().st_mtime_ns
    code, again = _run(ffpp_videos, split, tmp_path / "src")
    assert code == 0 and again["details"]["id_retrieval_top1_pct"] == 100.0
    assert (tmp_path / "src" / "frames" / "000" / "000_00.png").stat().st_mtime_ns == stamp


def test_frames_and_pair_lists(tmp_path):
    assert frame_indices(16, 4) == [0, 5, 10, 15] and frame_indices(500, 10)[-1] == 499 and frame_indices(3, 10) == [0, 1, 2]
    p = tmp_path / "pairs.csv"
    p.write_text("target,source\n000,001\n../etc,001\n002,003\n")
    pairs, bad = read_pair_list(p)
    assert pairs == [("000", "001"), ("002", "003")] and len(bad) == 1 and "pairs.csv:3" in bad[0]["input"]


@pytest.mark.parametrize("content, message", [
    ('[["000", "777"]]', "no pair whose two videos are in"),
    ('{"__class__": "os.system", "args": ["echo hi"]}', "a list of [id, id] pairs"),
    ('[["../../etc/passwd", "000"]]', "no pair whose two videos are in"),
    ("[[", "not JSON"),
])
def test_bad_pair_lists_are_one_line(ffpp_videos, tmp_path, capsys, content, message):
    split = tmp_path / "split.json"
    split.write_text(content)
    code, _ = _run(ffpp_videos, split, tmp_path / "o")
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "frames").exists()  # nothing is decoded for a list that names nothing usable


def test_paper_metrics_with_the_papers_networks(ffpp_videos, tmp_path, monkeypatch, capsys):
    """``--metrics paper`` with CosFace, HopeNet and Deep3DFaceRecon files in their published
    layouts (random weights here): the known answers hold, ReliableSwap's own aggregates are
    reported beside, and without the files the run stops at start-up in one line."""
    import torch

    from reliableswap.nets import weights as W
    from reliableswap.testing.nets import randomize

    split = tmp_path / "test.json"
    split.write_text(json.dumps([["000", "001"]]))
    root = tmp_path / "w"
    monkeypatch.setenv("RELIABLESWAP_WEIGHTS", str(root))
    code, _ = _run(ffpp_videos, split, tmp_path / "none", "ReturnSource", "--metrics", "paper")
    err = capsys.readouterr().err
    assert code == 2 and "net_sphere20_data_vggface2_acc_9955.pth (missing)" in err and "Traceback" not in err
    assert not (tmp_path / "none" / "frames").exists()
    torch.manual_seed(0)
    for b in ("cosface", "hopenet", "deep3d"):
        wf = W.BACKENDS[b].files[0]
        (root / b).mkdir(parents=True)
        sd = randomize(wf.build())
        torch.save({wf.entry: sd} if wf.entry else sd, root / b / wf.name)
    code, s = _run(ffpp_videos, split, tmp_path / "src", "ReturnSource", "--metrics", "paper")
    assert code == 0
    d = s["details"]
    assert d["comparable_with_papers"] is True and d["measured_by"]["identity"] == "CosFace sphere20 (VGGFace2)"
    assert d["id_retrieval_top1_pct"] == 100.0 and d["id_cos_mean"] > 0.999
    assert set(d["reliableswap_style"]) >= {"pose_logits_l2_half", "expr_rms_l2"}
    rows = list(csv.DictReader((tmp_path / "src" / "frames.csv").open()))
    assert len(rows) == 8 and {"pose_logits_yaw", "pose_logits_pitch", "pose_logits_roll"} <= set(rows[0])
    code, t = _run(ffpp_videos, split, tmp_path / "tgt", "ReturnTarget", "--metrics", "paper")
    assert code == 0 and t["details"]["pose_err_deg"] == 0.0 and t["details"]["expr_err"] == 0.0
    assert t["details"]["reliableswap_style"]["pose_logits_l2_half"] == 0.0
