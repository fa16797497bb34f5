"""The geometry and synthesis core on small synthetic tensors (no face data needed), in float32
and float64: affine maps, grids and warps, thin-plate splines, rasterization, fields, pyramids,
colour transfer, masks and head pose."""

from __future__ import annotations

import math

import pytest
import torch

from reliableswap.faces.masks import face_mask
from reliableswap.faces.pose import MEAN_FACE_68, head_pose
from reliableswap.geometry.affine import (affine_scale, apply_affine, compose_affine, invert_affine, resize_affine,
                                          similarity_lstsq, translate_affine)
from reliableswap.geometry.fields import flow_to_color, harmonic_fill
from reliableswap.geometry.grid import border_points, jacobian_determinant, pixel_grid, sample_at, warp_backward
from reliableswap.geometry.raster import interpolate, polygon_mask, rasterize_torch
from reliableswap.geometry.tps import dense_field, tps_eval, tps_fit
from reliableswap.synth import appearance, blend

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def _rand_affine(b: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(2, dtype=dtype) + 0.3 * torch.randn(b, 2, 2, generator=g, dtype=dtype)
    t = 10 * torch.randn(b, 2, 1, generator=g, dtype=dtype)
    return torch.cat([a, t], -1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_invert_compose_apply(dtype):
    m, n = _rand_affine(4, dtype, 1), _rand_affine(4, dtype, 2)
    p = torch.randn(4, 7, 2, dtype=dtype) * 50
    tol = TOL[dtype] * 100
    assert torch.allclose(apply_affine(apply_affine(p, m), invert_affine(m)), p, atol=tol)
    assert torch.allclose(apply_affine(p, compose_affine(n, m)), apply_affine(apply_affine(p, m), n), atol=tol)
    eye = compose_affine(invert_affine(m), m)
    assert torch.allclose(eye, torch.eye(2, 3, dtype=dtype).expand(4, -1, -1), atol=TOL[dtype])
    assert torch.allclose(apply_affine(p, translate_affine(3.0, -2.0, dtype)), p + torch.tensor([3.0, -2.0], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_resize_affine_keeps_pixel_centres(dtype):
    # a 4-px-wide image halved: pixel centres 0.5 and 2.5 of the big grid are the small grid's 0 and 1
    r = resize_affine(0.5, 0.5, dtype)
    big = torch.tensor([[[0.5, 0.5], [2.5, 2.5]]], dtype=dtype)
    assert torch.allclose(apply_affine(big, r), torch.tensor([[[0.0, 0.0], [1.0, 1.0]]], dtype=dtype))
    assert torch.allclose(compose_affine(resize_affine(2.0, 2.0, dtype), r), torch.eye(2, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_similarity_lstsq_recovers_a_similarity(dtype):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 9, 2, generator=g, dtype=dtype) * 30
    ang = torch.tensor([0.3, -1.0, 2.5], dtype=dtype)
    s = torch.tensor([0.5, 1.0, 3.0], dtype=dtype)
    rot = torch.stack([torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2) * s[:, None, None]
    m = torch.cat([rot, torch.tensor([[[4.0], [-7.0]]], dtype=dtype).expand(3, -1, -1)], -1)
    fit = similarity_lstsq(src, apply_affine(src, m))
    assert torch.allclose(fit, m, atol=TOL[dtype] * 10)
    assert torch.allclose(affine_scale(fit), s, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_warp_backward_identity_shift_and_sampling(dtype):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 12, 16, generator=g, dtype=dtype)
    zero = torch.zeros(2, 2, 12, 16, dtype=dtype)
    assert torch.allclose(warp_backward(img, zero), img, atol=TOL[dtype])
    shift = zero.clone()
    shift[:, 0] = 2.0  # out(x, y) = img(x + 2, y)
    out = warp_backward(img, shift)
    assert torch.allclose(out[..., :-2], img[..., 2:], atol=TOL[dtype])
    pts = torch.tensor([[[3.0, 4.0], [15.0, 11.0]]] * 2, dtype=dtype)
    assert torch.allclose(sample_at(img, pts)[:, 0], img[:, :, 4, 3], atol=TOL[dtype])
    assert torch.allclose(sample_at(img, pts)[:, 1], img[:, :, 11, 15], atol=TOL[dtype])
    half = sample_at(img, torch.tensor([[[3.5, 4.0]]] * 2, dtype=dtype))[:, 0]
    assert torch.allclose(half, (img[:, :, 4, 3] + img[:, :, 4, 4]) / 2, atol=TOL[dtype])
    grid = pixel_grid(3, 4, dtype=dtype)
    assert grid.shape == (12, 2) and grid[5].tolist() == [1.0, 1.0]
    bp = border_points(10, 20, 5, dtype=dtype)
    assert bp.shape == (20, 2) and ((bp[:, 0] == 0) | (bp[:, 0] == 19) | (bp[:, 1] == 0) | (bp[:, 1] == 9)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_tps_interpolates_and_reproduces_affine_maps(dtype):
    g = torch.Generator().manual_seed(1)
    ctrl = torch.rand(2, 12, 2, generator=g, dtype=dtype) * 60
    val = torch.randn(2, 12, 2, generator=g, dtype=dtype) * 3
    assert torch.allclose(tps_eval(ctrl, tps_fit(ctrl, val), ctrl), val, atol=1e-3 if dtype == torch.float32 else 1e-8)
    # an affine displacement field is reproduced everywhere (the TPS's affine part)
    m = _rand_affine(2, dtype, 3) * 0.01
    f = dense_field(ctrl, apply_affine(ctrl, m), 32, 40, step=1)
    want = apply_affine(pixel_grid(32, 40, dtype=dtype).expand(2, -1, -1), m).reshape(2, 32, 40, 2).permute(0, 3, 1, 2)
    assert f.dtype == dtype and torch.allclose(f, want, atol=1e-3 if dtype == torch.float32 else 1e-8)
    assert dense_field(ctrl, torch.zeros_like(val), 32, 40).abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_jacobian_determinant_finds_folds(dtype):
    zero = torch.zeros(1, 2, 16, 16, dtype=dtype)
    assert torch.allclose(jacobian_determinant(zero), torch.ones(1, 1, 16, 16, dtype=dtype))
    xs = torch.arange(16, dtype=dtype)
    fold = zero.clone()
    fold[:, 0] = -2.0 * xs  # x ↦ x − 2x = −x: mirrored, det −1
    assert (jacobian_determinant(fold)[..., 2:-2, 2:-2] < 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rasterizer_and_barycentric_interpolation(dtype):
    uv = torch.tensor([[[1.0, 1.0], [9.0, 1.0], [1.0, 9.0], [9.0, 9.0]]], dtype=dtype)
    depth = torch.zeros(1, 4, dtype=dtype)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    p2f, bary = rasterize_torch(uv, depth, faces, (12, 12))
    cov = p2f[0] >= 0
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    assert torch.equal(cov, (xs >= 1) & (xs <= 9) & (ys >= 1) & (ys <= 9))
    # interpolating the vertices' own positions gives back each covered pixel's position
    pos = interpolate(uv, faces, p2f, bary)[0].permute(1, 2, 0)
    assert torch.allclose(pos[cov], torch.stack([xs, ys], -1).to(dtype)[cov], atol=TOL[dtype] * 10)
    sq = polygon_mask(uv[:, [0, 1, 3, 2]], 12, 12)[0, 0] > 0
    assert sq[5, 5] and not sq[0, 0] and not sq[11, 11]


@pytest.mark.parametrize("dtype", DTYPES)
def test_harmonic_fill_keeps_known_values_and_is_smooth(dtype):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2, 32, 32, generator=g, dtype=dtype)
    known = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    known[..., 12:20, 12:20] = True
    out = harmonic_fill(v, known)
    assert torch.equal(out[known.expand_as(out)], v[known.expand_as(v)])
    assert torch.isfinite(out).all() and out[..., 0, :].abs().max() < v[known.expand_as(v)].abs().max()
    rgb = flow_to_color(out)
    assert rgb.shape == (1, 3, 32, 32) and 0 <= float(rgb.min()) and float(rgb.max()) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_pyramid_collapses_exactly_and_blend_respects_mask(dtype):
    g = torch.Generator().manual_seed(0)
    fg, bg = torch.rand(2, 3, 40, 56, generator=g, dtype=dtype), torch.rand(2, 3, 40, 56, generator=g, dtype=dtype)
    assert torch.allclose(blend.collapse(blend.laplacian_pyramid(fg, 5)), fg, atol=TOL[dtype])
    one = torch.ones(2, 1, 40, 56, dtype=dtype)
    assert torch.allclose(blend.multiband_blend(fg, bg, one, 5), fg, atol=TOL[dtype] * 10)
    assert torch.allclose(blend.multiband_blend(fg, bg, 1 - one, 5), bg, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_colour_transfer_matches_statistics(dtype):
    g = torch.Generator().manual_seed(0)
    src = (0.3 + 0.2 * torch.rand(2, 3, 24, 24, generator=g, dtype=dtype))
    ref = (0.5 + 0.3 * torch.rand(2, 3, 24, 24, generator=g, dtype=dtype)) * torch.tensor([1.0, 0.8, 0.6], dtype=dtype).view(1, 3, 1, 1)
    m = torch.ones(2, 1, 24, 24, dtype=dtype)
    out = appearance.linear_transfer(src, ref, m, m)
    assert torch.allclose(out.mean((2, 3)), ref.mean((2, 3)), atol=1e-3)
    cov = lambda x: torch.cov(x.flatten(2)[0])  # noqa: E731
    assert torch.allclose(cov(out), cov(ref), atol=1e-3)
    assert appearance.transfer("none", src, ref, m, m) is src


@pytest.mark.parametrize("yaw_deg", [-30.0, 0.0, 25.0])
def test_head_pose_recovers_a_known_yaw(yaw_deg):
    """The mean face turned by a known yaw and projected orthographically gives that yaw back."""
    t = math.radians(yaw_deg)
    r = torch.tensor([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]], dtype=torch.float64)
    pts = (MEAN_FACE_68.double() @ r.T)[:, :2] * 1.5 + 128
    yaw, pitch, roll = head_pose(pts[None])[0].tolist()
    assert abs(yaw - yaw_deg) < 1.0 and abs(roll) < 1.0


def test_face_masks_do_not_depend_on_the_batch():
    """Each face's feathering follows its own size: alone or in a batch, the same mask."""
    base = (MEAN_FACE_68[:, :2].double() + 128).float()
    lms = torch.stack([base, (base - 128) * 0.6 + 128, (base - 128) * 1.3 + 120])
    batch = face_mask(lms, 256, 256, feather=0.03)
    for i in range(3):
        alone = face_mask(lms[i:i + 1], 256, 256, feather=0.03)
        assert (batch[i] - alone[0]).abs().max() < 2 / 255


def test_polygon_mask_tests_only_the_polygons_box_and_equals_the_whole_grid_test():
    """Random polygons of a batch, some reaching past the image or wholly outside it: the mask
    computed in the polygons' box equals the even-odd test of every pixel of the image."""
    g = torch.Generator().manual_seed(3)
    h, w = 37, 53
    for _ in range(20):
        poly = torch.rand(3, 9, 2, generator=g) * torch.tensor([w * 1.6, h * 1.6]) - torch.tensor([w * 0.3, h * 0.3])
        ys = torch.arange(h, dtype=poly.dtype).view(1, h, 1, 1)
        xs = torch.arange(w, dtype=poly.dtype).view(1, 1, w, 1)
        p0, p1 = poly[:, None, None], poly.roll(-1, 1)[:, None, None]
        crosses = (p0[..., 1] > ys) != (p1[..., 1] > ys)
        t = (ys - p0[..., 1]) / torch.where(p1[..., 1] == p0[..., 1], torch.ones_like(p1[..., 1]), p1[..., 1] - p0[..., 1])
        whole = ((crosses & (xs < p0[..., 0] + t * (p1[..., 0] - p0[..., 0]))).sum(-1) % 2).float()[:, None]
        assert torch.equal(polygon_mask(poly, h, w), whole)
    assert polygon_mask(torch.tensor([[[-9.0, -9.0], [-5.0, -9.0], [-5.0, -5.0]]]), h, w).sum() == 0


def test_piecewise_linear_passes_through_its_knots_and_is_flat_outside():
    from reliableswap.geometry.fields import piecewise_linear

    xk = torch.tensor([[0.0, 1.0, 3.0], [-1.0, 0.0, 2.0]])
    yk = torch.tensor([[0.0, 2.0, 0.0], [5.0, 1.0, 1.0]])
    assert torch.allclose(piecewise_linear(xk, xk, yk), yk)
    got = piecewise_linear(torch.tensor([[0.5, 2.0, -4.0, 9.0], [-0.5, 1.0, -3.0, 3.0]]), xk, yk)
    assert torch.allclose(got, torch.tensor([[1.0, 1.0, 0.0, 0.0], [3.0, 1.0, 5.0, 1.0]]))
