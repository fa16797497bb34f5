"""FAN backend: clear error without weights; geometry of the batched crop/heatmap decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reliableswap.faces.landmarks import FAN_WEIGHTS, FanLandmarks, FanNet, MissingWeightsError, decode_heatmaps, fan_crop_transforms
from reliableswap.geometry.affine import apply_affine, invert_affine

pytestmark = pytest.mark.usefixtures("flush_denormals")  # random weights: see conftest.py


def test_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("RELIABLESWAP_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(MissingWeightsError) as e:
        FanLandmarks("cpu")
    assert str(tmp_path / "w" / "fan" / FAN_WEIGHTS) in str(e.value) and "reliableswap weights fetch fan" in str(e.value)
    assert str(tmp_path / "torch") in str(e.value)


def test_the_weights_folder_file_is_checked_and_loaded(tmp_path):
    """A 2DFAN-4 file in <weights>/fan: `weights check` reads its keys and shapes, and says it is not
    the published file (its SHA-256 does not start with the 11f355bf06 the release is named by)."""
    from reliableswap.nets.weights import check_backend
    from reliableswap.testing.nets import write_random_weights

    write_random_weights("fan", tmp_path)
    [(path, status, detail)] = check_backend("fan", tmp_path)
    assert path.endswith(FAN_WEIGHTS) and status == "ok, not published" and "11f355bf06" in detail
    lm = FanLandmarks("cpu", tmp_path)
    assert isinstance(lm.net, FanNet) and lm.net.stacks == 4


def test_decode_heatmaps_recovers_peaks():
    pts = torch.tensor([[[10.0, 20.0], [33.0, 5.0], [50.0, 60.0]]])
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    hm = torch.exp(-((xx - pts[0, :, 0, None, None]) ** 2 + (yy - pts[0, :, 1, None, None]) ** 2) / 4)[None]
    assert torch.allclose(decode_heatmaps(hm), pts)
    hm2 = torch.exp(-((xx - 10.4) ** 2 + (yy - 20.0) ** 2) / 4)[None, None]
    assert torch.allclose(decode_heatmaps(hm2), torch.tensor([[[10.25, 20.0]]]))


def test_crop_transform_matches_face_alignment_convention():
    box = torch.tensor([[100.0, 50.0, 300.0, 250.0]])
    m = fan_crop_transforms(box)
    centre = torch.tensor([[[200.0, 150.0 - 200 * 0.12]]])
    assert torch.allclose(apply_affine(centre, m), torch.tensor([[[128.0, 128.0]]]))
    assert torch.allclose(m[0, 0, 0], torch.tensor(256 / (200 * 400 / 195)))
    assert torch.allclose(apply_affine(apply_affine(centre, m), invert_affine(m)), centre)


def test_runs_batched_with_weights_in_hub_cache(tmp_path, monkeypatch, faces_dir, dlib_models):
    """With a weights file in the hub cache (random weights here: the real file cannot be had
    offline), the backend runs end to end on a real photo and returns N×68×2 inside the crops."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FanNet(4).state_dict(), tmp_path / "hub" / "checkpoints" / FAN_WEIGHTS)
    from reliableswap.images import read_image

    rgb, _ = read_image(faces_dir / "london_set/london_021_neutral.jpg")
    det, _ = dlib_models
    boxes, _ = det(rgb)
    lm = FanLandmarks("cpu")(rgb, np.repeat(boxes[:1], 2, 0))
    assert lm.shape == (2, 68, 2) and np.isfinite(lm).all()
    b = boxes[0]
    span = (b[2] - b[0]) * 1.6
    assert (lm[..., 0] > b[0] - span).all() and (lm[..., 0] < b[2] + span).all()


def test_the_network_equals_face_alignment_s_key_for_key():
    """Parity with the authors' FAN (face-alignment 1.5, installed as test reference code): the same
    state-dict keys and shapes, and the same heatmaps from the same random weights (BatchNorm
    statistics randomised too, so eval-mode BN is exercised)."""
    import importlib.util

    spec = importlib.util.find_spec("face_alignment")  # located, not imported: its __init__ wants numba
    if spec is None or spec.origin is None:
        pytest.skip("face-alignment (test reference, installed by the Makefile) not installed")
    fan_py = Path(spec.origin).parent / "models" / "fan.py"
    mod_spec = importlib.util.spec_from_file_location("_reference_face_alignment_fan", fan_py)
    ref_mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(ref_mod)
    torch.manual_seed(0)
    ref = ref_mod.FAN(4).eval()
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith(("running_mean", "running_var", "weight", "bias")) and t.dtype.is_floating_point:
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t) * 0.1)
    ours = FanNet(4).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert len(got) == len(want) == 4 and got[-1].shape == (2, 68, 64, 64)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max())), float((g - w).abs().max())


def test_a_junk_or_foreign_fan_file_is_refused_in_one_line(tmp_path):
    """Whatever the weights folder's FAN file holds — random bytes, another network's state dict —
    it is refused naming the file (a UserError: exit 2 at the CLI), never a library traceback."""
    from reliableswap.errors import UserError

    path = tmp_path / "fan" / FAN_WEIGHTS
    path.parent.mkdir()
    rng = np.random.default_rng(0)
    for n in (7, 64, 600, 5000):  # bytes that torch.load fails on in different ways (pickle opcodes, indexes, text)
        path.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        with pytest.raises(UserError, match=rf"{FAN_WEIGHTS}: (refused|not a readable checkpoint)") as e:
            FanLandmarks("cpu", tmp_path)
        assert "\n" not in str(e.value)
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match=r"key 'conv1.weight' has shape \(3,\), the architecture needs \(64, 3, 7, 7\)"):
        FanLandmarks("cpu", tmp_path)
