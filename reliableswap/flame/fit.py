"""Batched FLAME fitting to 2D landmarks: shape β, expression ψ, global and jaw pose, and a
weak-perspective camera, with Gaussian priors, on CPU or GPU.

For fixed pose and camera the projected landmarks are *affine* in (β, ψ): blend shapes are
linear, the joints are linear in the shaped vertices, and skinning with fixed rotations is
linear in both. So each round (a) solves the ridge problem for (β, ψ) exactly, with the
Jacobian assembled from the landmark vertices' directions, their blended rotations and the
joint-regressor term, then (b) takes damped Gauss–Newton steps on the 9 pose/camera unknowns
(finite-difference Jacobian, batched). All faces of a batch are solved together, independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import jacfwd, vmap

from reliableswap.flame.layer import Flame, FlameParams, project
from reliableswap.flame.lbs import batch_rigid_transform, batch_rodrigues, blend_shapes, vertices2joints


@dataclass
class FitConfig:
    n_shape: int = 100
    n_expr: int = 50
    w_shape: float = 1e-3  # prior weights, in px² per unit coefficient²
    w_expr: float = 1e-3
    rounds: int = 12
    pose_steps: int = 3


def init_camera(lm: torch.Tensor, flame: Flame, size: int) -> torch.Tensor:
    """Scale and translation matching the mean face's landmark spread and centre (B×3)."""
    mean = flame.landmarks(FlameParams.zeros(1, 1, 1, device=lm.device, dtype=lm.dtype))[0]
    spread_model = (mean[:, :2] - mean[:, :2].mean(0)).norm(dim=-1).mean()
    c = lm.mean(1)
    s = (lm - c.unsqueeze(1)).norm(dim=-1).mean(1) / spread_model / (size / 2)
    tx = ((c[:, 0] + 0.5) / (size / 2) - 1) / s - mean[:, 0].mean()
    ty = (1 - (c[:, 1] + 0.5) / (size / 2)) / s - mean[:, 1].mean()
    return torch.stack([s, tx, ty], -1)


def landmark_rmse(flame: Flame, p: FlameParams, target: torch.Tensor, size: int) -> torch.Tensor:
    """Per-face RMSE in pixels (B)."""
    return (project(flame.landmarks(p), p.camera, size) - target).pow(2).sum(-1).mean(-1).sqrt()


def _coef_jacobian(flame: Flame, p: FlameParams, k_shape: int, k_expr: int) -> torch.Tensor:
    """∂(68 landmarks, 3D)/∂(β[:k_shape], ψ[:k_expr]) at fixed pose: B×68×3×K (exact: affine)."""
    b = p.shape.shape[0]
    dirs = flame.sub_dirs(k_shape, k_expr)  # Vs×3×K
    jdirs = (flame.sub_jreg @ dirs.reshape(dirs.shape[0], -1)).view(-1, 3, dirs.shape[-1])  # J×3×K
    pose = p.full_pose()
    rot = batch_rodrigues(pose.reshape(-1, 3)).view(b, -1, 3, 3)
    shaped = flame.sub_template + blend_shapes(torch.cat([p.shape, p.expression], 1), dirs)
    joints = vertices2joints(flame.sub_jreg, shaped)

    def tau(rot_i: torch.Tensor, joints_i: torch.Tensor) -> torch.Tensor:
        _, a = batch_rigid_transform(rot_i[None], joints_i[None], flame.parents)
        return a[0, :, :3, 3]  # J×3, linear in the joints

    dtau = vmap(jacfwd(tau, argnums=1))(rot, joints)  # B×J×3×J×3
    _, a = batch_rigid_transform(rot, joints, flame.parents)
    w = flame.sub_weights  # Vs×J
    r_v = torch.einsum("vj,bjxy->bvxy", w, a[..., :3, :3])  # blended rotations
    term1 = torch.einsum("bvxy,vyk->bvxk", r_v, dirs)
    dtau_k = torch.einsum("bjxmn,mnk->bjxk", dtau, jdirs)  # B×J×3×K
    term2 = torch.einsum("vj,bjxk->bvxk", w, dtau_k)
    jv = term1 + term2  # B×Vs×3×K
    f, bary = flame.landmark_faces(pose)
    tri = flame.sub_faces[f]  # B×68×3 (subset vertex ids)
    g = torch.gather(jv, 1, tri.reshape(b, -1, 1, 1).expand(-1, -1, 3, jv.shape[-1])).view(b, tri.shape[1], 3, 3, -1)
    return (g * bary[..., None, None]).sum(2)


def _proj_jac(j3: torch.Tensor, camera: torch.Tensor, size: int) -> torch.Tensor:
    """3D landmark Jacobian B×L×3×K → pixel Jacobian B×(2L)×K under the weak-perspective camera."""
    s = camera[:, 0].view(-1, 1, 1) * size / 2
    jx, jy = j3[:, :, 0] * s, -j3[:, :, 1] * s
    return torch.stack([jx, jy], 2).flatten(1, 2)


def _set_pose(p: FlameParams, q: torch.Tensor) -> FlameParams:
    return FlameParams(p.shape, p.expression, q[:, 0:3], p.neck, q[:, 3:6], p.eyes, q[:, 6:9])


def fit_landmarks(flame: Flame, target: torch.Tensor, size: int, cfg: FitConfig = FitConfig()) -> tuple[FlameParams, torch.Tensor]:
    """Fit FLAME to B×68×2 pixel landmarks of ``size``×``size`` images.

    Returns:
        ``(params, rmse)``: fitted parameters (neck and eyes stay 0) and per-face RMSE in px.
    """
    b, dev, dt = target.shape[0], target.device, target.dtype
    p = FlameParams.zeros(b, cfg.n_shape, cfg.n_expr, device=dev, dtype=dt)
    p.camera = init_camera(target, flame, size)
    k = cfg.n_shape + cfg.n_expr
    prior = torch.cat([torch.full((cfg.n_shape,), cfg.w_shape), torch.full((cfg.n_expr,), cfg.w_expr)]).to(dev, dt)
    tgt = target.flatten(1)

    def residual(pp: FlameParams) -> torch.Tensor:
        return tgt - project(flame.landmarks(pp), pp.camera, size).flatten(1)

    mu = torch.full((b, 1, 1), 1e-2, device=dev, dtype=dt)
    with torch.no_grad():
        for _ in range(cfg.rounds):
            # (b) pose and camera: damped Gauss–Newton, finite-difference Jacobian
            for _ in range(cfg.pose_steps):
                q = torch.cat([p.global_pose, p.jaw, p.camera], 1)
                r0 = residual(p)
                eps = 1e-5 * torch.ones(9, device=dev, dtype=dt)
                eps[6] = 1e-5 * float(p.camera[:, 0].mean())
                cols = []
                for i in range(9):
                    dq = torch.zeros_like(q)
                    dq[:, i] = eps[i]
                    cols.append((r0 - residual(_set_pose(p, q + dq))) / eps[i])
                jq = torch.stack(cols, -1)  # B×2L×9 (∂ prediction)
                h = jq.transpose(1, 2) @ jq
                g = jq.transpose(1, 2) @ r0.unsqueeze(-1)
                step = torch.linalg.solve(h + mu * torch.diag_embed(h.diagonal(dim1=1, dim2=2) + 1e-9), g).squeeze(-1)
                cand = _set_pose(p, q + step)
                better = residual(cand).pow(2).sum(1) < r0.pow(2).sum(1)
                p = _set_pose(p, torch.where(better[:, None], q + step, q))
                mu = torch.where(better[:, None, None], mu * 0.3, mu * 10).clamp(1e-8, 1e8)
            # (a) shape and expression: exact ridge solve (landmarks are affine in them)
            a = _proj_jac(_coef_jacobian(flame, p, cfg.n_shape, cfg.n_expr), p.camera, size)  # B×2L×K
            x0 = torch.cat([p.shape, p.expression], 1)
            r0 = residual(p)
            lhs = a.transpose(1, 2) @ a + torch.diag_embed(prior.expand(b, k))
            rhs = a.transpose(1, 2) @ r0.unsqueeze(-1) - (prior * x0).unsqueeze(-1)
            x = x0 + torch.linalg.solve(lhs, rhs).squeeze(-1)
            p = FlameParams(x[:, : cfg.n_shape], x[:, cfg.n_shape:], p.global_pose, p.neck, p.jaw, p.eyes, p.camera)
        rmse = landmark_rmse(flame, p, target, size)
    return p, rmse
