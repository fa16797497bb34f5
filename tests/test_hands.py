"""Hand masks from MediaPipe's palm detector and hand landmarker (the mediapipe wheel's .tflite files,
run in torch): parity with the TFLite interpreter, a hand found over a real face and none on faces
without one, and synthesis that keeps the target's hand and never pastes the source's. The wheel
fetch is tested offline: a wrong hash or size is refused and nothing partial is left behind."""

from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from reliableswap.faces import models as fmodels
from reliableswap.faces.hands import MIN_PRESENCE, HandLandmarker, hand_mask
from reliableswap.faces.models import WHEEL_MODELS, MissingWeightsError, wheel_model
from reliableswap.geometry.grid import warp_backward
from reliableswap.images import load_rgb, read_crop, to_tensor
from reliableswap.recipes import TripletRecipe
from reliableswap.synth.pipeline import Synthesizer
from reliableswap.contracts import FaceSet

HAND_OVER_FACE = "ffhq/ffhq_00005_512.png"  # a fist holding a microphone over the chin


@pytest.fixture(scope="module")
def landmarker() -> HandLandmarker:
    return HandLandmarker("cpu")


def test_both_networks_equal_the_tflite_interpreter(faces_dir):
    """The torch graphs against ai-edge-litert's interpreter on real images, every output."""
    from ai_edge_litert.interpreter import Interpreter

    from reliableswap.faces.tflite import TfliteNet

    img = to_tensor([load_rgb(faces_dir / HAND_OVER_FACE)])
    for m, size in zip(WHEEL_MODELS["hands"], (192, 224)):
        path = wheel_model(m)
        x = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
        it = Interpreter(model_path=str(path))
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x.permute(0, 2, 3, 1).contiguous().numpy())
        it.invoke()
        ref = [it.get_tensor(o["index"]) for o in it.get_output_details()]
        with torch.no_grad():
            got = TfliteNet(path)(x)
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            g = g.numpy().reshape(r.shape)
            assert np.abs(g - r).max() <= 1e-4 * max(1.0, float(np.abs(r).max())), m.file


def test_a_hand_over_a_face_is_found_and_faces_without_hands_give_none(faces_dir, landmarker):
    img = to_tensor([load_rgb(faces_dir / HAND_OVER_FACE)])
    hands = landmarker(img)
    found = hands.presence >= MIN_PRESENCE
    assert int(found.sum()) == 1 and float(hands.presence[found][0]) > 0.9
    lm = hands.landmarks[found][0]
    # the fist is over the chin and the microphone, in the lower middle of the photo
    assert 0.3 * 512 < float(lm[:, 0].mean()) < 0.7 * 512 and float(lm[:, 1].mean()) > 0.55 * 512
    mask = landmarker.masks(img)
    assert 0.02 < float(mask.mean()) < 0.2
    plain = sorted((faces_dir / "london_set").glob("*.jpg"))[:6]
    assert plain
    ims = to_tensor([load_rgb(p) for p in plain])
    assert float(landmarker.masks(ims).amax()) == 0.0


def test_hand_mask_covers_the_bones_and_nothing_far():
    lm = torch.zeros(1, 21, 2)
    lm[0, :, 0] = 100
    lm[0, :, 1] = torch.linspace(150, 50, 21)  # a straight "hand" pointing up
    m = hand_mask(lm, torch.tensor([0]), 2, (200, 200), feather=0)
    assert m.shape == (2, 1, 200, 200) and float(m[1].amax()) == 0.0
    assert float(m[0, 0, 100, 100]) == 1.0 and float(m[0, 0, 100, 180]) == 0.0 and float(m[0, 0, 190, 100]) == 0.0


def test_the_target_s_hand_stays_and_the_source_s_is_never_pasted(prepped, landmarker):
    """The default (mesh) recipe with the shared photo of a fist over a chin: as the target, the
    fist is still there, untouched, in the fake; as the source, no pixel of its fist enters the
    blend mask of the fake it gives its identity to."""
    faces = FaceSet.load(prepped[0])
    recs = list(faces)
    hand = next(r for r in recs if "ffhq_00005" in r.origin.path)
    others = [r for r in recs if "/london_set/" in r.origin.path][:3]

    def batch(rs):
        return (to_tensor([read_crop(faces, r) for r in rs]), torch.tensor([r.landmarks68 for r in rs], dtype=torch.float32),
                torch.tensor([r.mesh468 for r in rs], dtype=torch.float32))

    ia, la, ma = batch(others)
    ib, lb, mb = batch([hand] * len(others))
    syn = Synthesizer(TripletRecipe())
    hands_b = landmarker.masks(ib)
    assert float(hands_b.mean()) > 0.02
    out = syn.render_mesh(ia, la, ib, lb, ma, mb)

    where = warp_backward(hands_b, out["flow"], "zeros") > 0.99
    background = warp_backward(ib, out["flow"], "border")
    assert int(where.sum()) > 500
    assert float((out["fake"] - background).abs().amax(1, keepdim=True)[where].mean()) < 0.02
    without = Synthesizer(TripletRecipe().with_overrides({"masks.hands": False})).render_mesh(ia, la, ib, lb, ma, mb)
    assert float((without["fake"] - background).abs().amax(1, keepdim=True)[where].mean()) > 0.05  # it was painted over before
    # the other way: the fist's crop gives its identity; its hand pixels never enter the mask
    rev = syn.render_mesh(ib, lb, ia, la, mb, ma)
    pasted = rev["source_hand"] > 0.5
    assert int(pasted.sum()) > 100
    assert float(rev["mask"][pasted].max()) < 0.5 and float(rev["mask"][rev["source_hand"] > 0.99].max()) < 0.02


def test_a_wrong_or_missing_hand_file_stops_in_one_line(tmp_path, monkeypatch):
    m = WHEEL_MODELS["hands"][0]
    monkeypatch.setenv(m.env, str(tmp_path / "none.tflite"))
    with pytest.raises(MissingWeightsError, match=r"model file missing: .*none.tflite \(from RELIABLESWAP_PALM_DETECTION\)"):
        wheel_model(m)
    monkeypatch.delenv(m.env)
    with pytest.raises(MissingWeightsError, match=r"palm_detection_full.tflite not found .*weights fetch hands --to"):
        wheel_model(m, tmp_path / "empty")
    (tmp_path / "w" / "hands").mkdir(parents=True)
    (tmp_path / "w" / "hands" / m.file).write_bytes(b"x" * 100)  # in the weights folder: its hash is checked
    with pytest.raises(MissingWeightsError, match=r"palm_detection_full.tflite: SHA-256 .* weights fetch hands --to"):
        wheel_model(m, tmp_path / "w")


def _fake_pip(members: dict[str, bytes]):
    """A stand-in for `pip download` that writes a wheel holding ``members``."""
    def run(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for k, v in members.items():
                z.writestr(k, v)
        (dest / "mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(buf.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_fetch_refuses_a_wrong_hash_or_size_and_leaves_nothing(tmp_path, monkeypatch):
    palm, lmk = WHEEL_MODELS["hands"]
    wrong = {palm.member: b"\0" * palm.size, lmk.member: b"\0" * lmk.size}  # right sizes, wrong bytes
    monkeypatch.setattr(fmodels.subprocess, "run", _fake_pip(wrong))
    with pytest.raises(MissingWeightsError, match="SHA-256 is not the pinned"):
        fmodels.fetch_wheel_models("hands", tmp_path, say=lambda s: None)
    assert list((tmp_path / "hands").iterdir()) == []
    short = {palm.member: b"\0" * 10, lmk.member: b"\0" * 10}
    monkeypatch.setattr(fmodels.subprocess, "run", _fake_pip(short))
    with pytest.raises(MissingWeightsError, match="not the pinned 2339846"):
        fmodels.fetch_wheel_models("hands", tmp_path, say=lambda s: None)
    assert list((tmp_path / "hands").iterdir()) == []


def test_fetch_extracts_the_pinned_files_from_the_wheel(tmp_path, monkeypatch):
    """The real files (from the weights folder the install filled) repacked in a wheel: extracted,
    checked and renamed into <dir>/hands; a second fetch has nothing to do."""
    real = {m.member: wheel_model(m).read_bytes() for m in WHEEL_MODELS["hands"]}
    # what a fetch killed with -9 leaves (a process id that is gone): removed by the next fetch
    (tmp_path / "hands").mkdir()
    (tmp_path / "hands" / ".palm_detection_full.tflite.999999.ab12.part").write_bytes(b"half")
    (tmp_path / "hands" / ".wheel.999999.cd34xyz.part").mkdir()
    calls = []
    fake = _fake_pip(real)
    monkeypatch.setattr(fmodels.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or fake(cmd, **kw))
    got = fmodels.fetch_wheel_models("hands", tmp_path, say=lambda s: None)
    assert [p.name for p in got] == [m.file for m in WHEEL_MODELS["hands"]]
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == m.sha256 for p, m in zip(got, WHEEL_MODELS["hands"]))
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0]
    fmodels.fetch_wheel_models("hands", tmp_path, say=lambda s: None)
    assert len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "hands").iterdir()) == sorted(m.file for m in WHEEL_MODELS["hands"])
