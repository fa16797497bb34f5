"""Synthesis steps on real aligned faces: blend, reshape, appearance, TPS, reenactment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from kornia.color import rgb_to_lab

from reliableswap.faces.landmarks import DlibLandmarks
from reliableswap.geometry.tps import dense_field, tps_eval, tps_fit
from reliableswap.images import load_rgb, to_tensor, to_uint8
from reliableswap.synth import appearance, blend
from reliableswap.synth.reenact import TPSReenactor, driving_landmarks
from reliableswap.synth.reshape import contour_targets, reshape, reshape_flow
from reliableswap.contracts import FaceSet


NAMES = ["london_008_neutral", "london_021_neutral", "london_025_neutral", "london_030_neutral",
         "london_042_neutral", "london_136_neutral", "ffhq_00002_512", "ffhq_00004_512"]


@pytest.fixture(scope="module")
def crops(prepped):
    """8 aligned 256 px crops of 8 different people (calm expressions) with their landmarks."""
    out, _ = prepped
    fs = FaceSet.load(out)
    by_stem = {Path(f.origin.path).stem: f for f in fs}
    faces = [by_stem[n] for n in NAMES]
    imgs = to_tensor([load_rgb(fs.image_path(f)) for f in faces])
    lms = torch.tensor([f.landmarks68 for f in faces], dtype=torch.float32)
    return imgs, lms


def test_multiband_mask_one_gives_foreground_zero_background(crops):
    imgs, _ = crops
    fg, bg = imgs[:4], imgs[4:8]
    one = torch.ones_like(fg[:, :1])
    assert (blend.multiband_blend(fg, bg, one, 6) - fg).abs().max() < 1e-5
    assert (blend.multiband_blend(fg, bg, 1 - one, 6) - bg).abs().max() < 1e-5
    assert (blend.poisson_blend(fg, bg, 1 - one) - bg).abs().max() < 1 / 255 + 1e-6


def test_multiband_half_mask_keeps_each_side_away_from_seam(crops):
    imgs, _ = crops
    fg, bg = imgs[:2], imgs[2:4]
    m = torch.zeros_like(fg[:, :1])
    m[..., :, :128] = 1
    out = blend.multiband_blend(fg, bg, m, 5)
    assert (out[..., :, :64] - fg[..., :, :64]).abs().mean() < 0.01
    assert (out[..., :, 192:] - bg[..., :, 192:]).abs().mean() < 0.01


def test_tps_interpolates_control_points():
    g = torch.Generator().manual_seed(0)
    ctrl = torch.rand(2, 30, 2, generator=g) * 255
    val = torch.randn(2, 30, 2, generator=g) * 5
    coef = tps_fit(ctrl, val)
    assert (tps_eval(ctrl, coef, ctrl) - val).abs().max() < 1e-3
    f = dense_field(ctrl, val, 256, 256, step=1)
    assert f.shape == (2, 2, 256, 256) and torch.isfinite(f).all()


def test_reshape_zero_displacement_is_identity(crops):
    imgs, lms = crops
    out, flow, lm = reshape(imgs[:3], lms[:3], lms[:3], strength=1.0)
    assert flow.abs().max() < 1e-4
    assert (out - imgs[:3]).abs().max() < 1e-4
    assert torch.allclose(lm, lms[:3], atol=1e-3)


def test_reshape_moves_contour_to_identity_shape(crops):
    imgs, lms = crops
    b, a = lms[:4], lms[4:8]
    target = contour_targets(b, a)
    flow = reshape_flow(b, target, 256, 256)
    # backward flow at each target jaw point reaches back to b's jaw point
    xy = target.round().long().clamp(0, 255)
    got = torch.stack([flow[i, :, xy[i, :, 1], xy[i, :, 0]].T for i in range(4)])
    want = b[:, :17] - target
    assert (got - want).abs().mean() < 0.75
    # inner face landmarks stay put (within the 4 px evaluation grid's interpolation error)
    inner = b[:, 36:48].round().long()
    still = torch.stack([flow[i, :, inner[i, :, 1], inner[i, :, 0]].T for i in range(4)])
    assert still.abs().max() < 1.0


def _masked_lab_stats(x, m):
    lab = rgb_to_lab(x)
    w = m / m.sum((2, 3), keepdim=True)
    mu = (lab * w).sum((2, 3))
    sd = (((lab - mu[..., None, None]) ** 2) * w).sum((2, 3)).sqrt()
    return mu, sd


def test_appearance_moves_statistics_to_target(crops):
    imgs, lms = crops
    from reliableswap.faces.masks import face_mask

    src, ref = imgs[:4], imgs[4:8]
    ms, mr = face_mask(lms[:4], 256, 256), face_mask(lms[4:8], 256, 256)
    mu_r, sd_r = _masked_lab_stats(ref, mr)
    mu_s, _ = _masked_lab_stats(src, ms)
    out = appearance.reinhard(src, ref, ms, mr)
    mu_o, sd_o = _masked_lab_stats(out, ms)
    # exact up to clipping to [0, 1] (a few saturated pixels)
    assert (mu_o - mu_r).abs().mean() < 1.0 < (mu_s - mu_r).abs().mean()
    assert (mu_o - mu_r).abs().max() < 4.0 and (sd_o - sd_r).abs().max() < 4.0
    for fn in (appearance.linear_transfer, appearance.sliced_ot):
        mu_o, _ = _masked_lab_stats(fn(src, ref, ms, mr), ms)
        assert (mu_o - mu_r).abs().mean() < 0.5 * (mu_s - mu_r).abs().mean(), fn.__name__


def test_tps_reenactment_puts_face_on_driving_landmarks(crops):
    """dlib, run again on the reenacted face, finds its landmarks where we drove them."""
    imgs, lms = crops
    a, b = slice(0, 4), slice(4, 8)
    out, target = TPSReenactor()(imgs[a], lms[a], imgs[b], lms[b])
    assert torch.allclose(target, driving_landmarks(lms[a], lms[b]))
    det = DlibLandmarks()
    ims = to_uint8(out)
    errs = []
    for im, t in zip(ims, target.numpy()):
        box = np.concatenate([t.min(0), t.max(0)])[None]
        errs.append(np.linalg.norm(det(im, box)[0] - t, axis=1).mean())
    assert np.mean(errs) < 4.0, errs
