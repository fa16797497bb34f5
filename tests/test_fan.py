"""FAN backend: clear error without weights; geometry of the batched crop/heatmap decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reliableswap.faces.landmarks import FAN_WEIGHTS, FanLandmarks, MissingWeightsError, decode_heatmaps, fan_crop_transforms
from reliableswap.geometry.affine import apply_affine, invert_affine


def test_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as e:
        FanLandmarks("cpu")
    assert FAN_WEIGHTS in str(e.value) and str(tmp_path) in str(e.value)


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
    from face_alignment.models import FAN

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), tmp_path / "hub" / "checkpoints" / FAN_WEIGHTS)
    from reliableswap.images import read_image

    rgb, _ = read_image(faces_dir / "london_set/london_021_neutral.jpg")
    det, _ = dlib_models
    boxes, _ = det(rgb)
    lm = FanLandmarks("cpu")(rgb, np.repeat(boxes[:1], 2, 0))
    assert lm.shape == (2, 68, 2) and np.isfinite(lm).all()
    b = boxes[0]
    span = (b[2] - b[0]) * 1.6
    assert (lm[..., 0] > b[0] - span).all() and (lm[..., 0] < b[2] + span).all()
