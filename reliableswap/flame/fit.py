"""Batched FLAME fitting to 2D landmarks: shape β, expression ψ, global and jaw pose, and a
weak-perspective camera, with Gaussian priors, on CPU or GPU.

Joint Levenberg–Marquardt over all unknowns of every face at once (each face independent, its own
damping). The Jacobian is analytic:

* coefficients (β, ψ): for fixed pose the landmarks are affine in them — blend shapes are linear,
  the rest joints are linear in the coefficients (``J = J̄ + Σ k·J_k``), and skinning with fixed
  rotations is linear in both — so the columns are the landmark vertices' directions turned by
  their blended rotations plus the joints' translation term, propagated down the kinematic chain;
* global and jaw pose: forward-mode derivatives (``torch.func.jvp``, 6 tangents, batched);
* camera (s, tx, ty): closed form.

Neck pose is not fitted (it is nearly interchangeable with global pose for 2D landmarks) and
eyes do not move landmarks; both stay 0. The contour landmarks follow the head yaw through the
embedding's contour table, chosen anew each iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import jvp, vmap

from reliableswap.flame.layer import Flame, FlameParams, project
from reliableswap.flame.lbs import batch_rigid_transform, batch_rodrigues, vertices2landmarks
from reliableswap.contracts import FaceRecord, FaceSet, FlameRecord


@dataclass
class FitConfig:
    n_shape: int = 100
    n_expr: int = 50
    w_shape: float = 0.1  # prior weights, px² per unit coefficient² (≈ landmark noise variance; FLAME coefficients are in std units)
    w_expr: float = 0.1
    w_jaw: float = 1e-2  # px² per rad², keeps the jaw from twisting when landmarks are noisy
    iterations: int = 5


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


def _pose15(q6: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(q6[:, :3])
    return torch.cat([q6[:, :3], z, q6[:, 3:6], z, z], 1)


class _Problem:
    """The landmark function and its Jacobian at fixed contour rows (B faces)."""

    def __init__(self, flame: Flame, n_shape: int):
        self.flame, self.n_shape = flame, n_shape

    def landmarks(self, x: torch.Tensor, q6: torch.Tensor, faces: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
        """B×68×3 from coefficients B×K and global+jaw pose B×6 at fixed landmark ``faces`` (B×68)."""
        v, _, _ = self.flame.skin_subset(x, _pose15(q6), self.n_shape)
        return vertices2landmarks(v, self.flame.sub_faces, faces, bary)

    def _landmark_dirs(self, faces: torch.Tensor, bary: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For landmark triangles ``faces`` (N) with weights N×3: per joint, the skinning-weighted
        directions ``E = Σ_c bary_c w_cj dirs_c`` (N×J×3×K) and weights ``Σ_c bary_c w_cj`` (N×J)."""
        fl = self.flame
        tri = fl.sub_faces[faces]  # N×3
        wb = fl.sub_weights[tri] * bary.unsqueeze(-1)  # N×3×J
        dirs = fl.sub_dirs(self.n_shape, k - self.n_shape)[tri]  # N×3(c)×3×K
        return torch.einsum("ncj,ncxk->njxk", wb, dirs), wb.sum(1)

    def _cache(self, k: int):
        if getattr(self, "_cached_k", None) != k:
            fl = self.flame
            self._static = self._landmark_dirs(fl.static_faces, fl.static_bary, k)
            if hasattr(fl, "dyn_faces"):
                rows, n = fl.dyn_faces.shape
                e, w = self._landmark_dirs(fl.dyn_faces.reshape(-1), fl.dyn_bary.reshape(-1, 3), k)
                self._dynamic = e.view(rows, n, *e.shape[1:]), w.view(rows, n, -1)
            self._cached_k = k
        return self._static, getattr(self, "_dynamic", None)

    def coef_jacobian(self, x: torch.Tensor, q6: torch.Tensor, rows: torch.Tensor | None, out: torch.Tensor) -> None:
        """∂(68 landmarks, 3D)/∂coefficients at fixed pose, written into ``out`` B×68×3×K (exact).

        Landmark l is ``Σ_c bary_c (R_c v_c + t_c)`` with blended rotations ``R_c = Σ_j w_cj G_j.R``,
        so its Jacobian is ``Σ_j G_j.R E_lj + Σ_j W_lj ∂τ_j/∂x`` — the ``E`` are fixed per landmark
        triangle and cached; ``rows`` (B) picks each face's contour row.
        """
        fl, b, k = self.flame, x.shape[0], x.shape[1]
        (es, ws), dyn = self._cache(k)
        rot = batch_rodrigues(_pose15(q6).reshape(-1, 3)).view(b, -1, 3, 3)
        jdirs = fl.joint_dirs(self.n_shape, k - self.n_shape)  # J×3×K
        joints = fl.j_template + (x @ jdirs.reshape(-1, k).T).view(b, -1, 3)
        _, a = batch_rigid_transform(rot, joints, fl.parents)
        # joints' translation terms τ_j = G_j.t − G_j.R·j_j are linear in the rest joints:
        # G_j.t = G_p.t + G_p.R (j_j − j_p)  ⇒  ∂G_j.t/∂x = ∂G_p.t/∂x + G_p.R (J_j − J_p)
        g_rot = a[..., :3, :3]  # the relative transform keeps G_j's rotation
        d_t = [jdirs[0].expand(b, -1, -1)]
        for j in range(1, jdirs.shape[0]):
            par = int(fl.parents[j])
            d_t.append(d_t[par] + g_rot[:, par] @ (jdirs[j] - jdirs[par]))
        dtau = (torch.stack(d_t, 1) - g_rot @ jdirs).flatten(2)  # B×J×3K
        nj = g_rot.shape[1]
        gr = g_rot.permute(0, 2, 1, 3).reshape(b, 3, nj * 3)  # [G_0.R | G_1.R | …]
        n = 0 if dyn is None else dyn[1].shape[1]
        static = (gr @ es.permute(1, 2, 0, 3).reshape(nj * 3, -1)).view(b, 3, es.shape[0], k).transpose(1, 2)
        torch.add(static, (ws @ dtau).view(b, -1, 3, k), out=out[:, n:])
        if dyn is not None:
            ed, wd = dyn[0][rows], dyn[1][rows]  # B×17×J×3×K, B×17×J
            contour = (gr.unsqueeze(1) @ ed.reshape(b, n, nj * 3, k)).view(b, n, 3, k)
            torch.add(contour, (wd @ dtau).view(b, n, 3, k), out=out[:, :n])

    def pose_jacobian(self, x, q6, faces, bary, out: torch.Tensor) -> torch.Tensor:
        """Landmarks B×68×3; ∂/∂(global, jaw) written into ``out`` B×68×3×6.

        Global rotation turns the whole skinned head about the root joint j0 (skinning weights sum
        to 1 and pose correctives ignore it): ``∂l/∂ω = −[l − j0]× J_l(ω)`` with SO(3)'s left
        Jacobian. The jaw goes through forward mode (3 tangents at once).
        """
        f = lambda jaw: self.landmarks(x, torch.cat([q6[:, :3], jaw], 1), faces, bary)  # noqa: E731
        eye = torch.eye(3, dtype=q6.dtype, device=q6.device)
        lm, cols = vmap(lambda t: jvp(f, (q6[:, 3:],), (t.expand_as(q6[:, 3:]),)), out_dims=(None, 0))(eye)
        k = x.shape[1]
        jd = self.flame.joint_dirs(self.n_shape, k - self.n_shape)[0]  # 3×K
        j0 = self.flame.j_template[0] + x @ jd.T  # B×3
        d = lm - j0.unsqueeze(1)
        torch.matmul(-_skew(d), _left_jacobian(q6[:, :3]).unsqueeze(1), out=out[..., :3])
        out[..., 3:] = cols.permute(1, 2, 3, 0)
        return lm


def _skew(v: torch.Tensor) -> torch.Tensor:
    """…×3 → …×3×3 cross-product matrices."""
    z = torch.zeros_like(v[..., 0])
    x, y, w = v.unbind(-1)
    return torch.stack([z, -w, y, w, z, -x, -y, x, z], -1).view(*v.shape, 3)


def _left_jacobian(w: torch.Tensor) -> torch.Tensor:
    """SO(3) left Jacobian of axis-angle vectors B×3 → B×3×3 (``∂R/∂ω_i Rᵀ = [J e_i]×``)."""
    th = w.norm(dim=-1).clamp_min(1e-8)[:, None, None]
    k = _skew(w)
    small = th < 1e-4
    a = torch.where(small, 0.5 - th**2 / 24, (1 - torch.cos(th)) / th**2)
    b = torch.where(small, 1 / 6 - th**2 / 120, (th - torch.sin(th)) / th**3)
    return torch.eye(3, dtype=w.dtype, device=w.device) + a * k + b * (k @ k)


def _pixels(lm3: torch.Tensor, cam: torch.Tensor, size: int, j3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project B×L×3 landmarks and their Jacobian B×L×3×P; append the camera's 3 columns.

    Returns pixel residual order ``(u0, v0, u1, …)`` B×2L and Jacobian B×2L×(P+3).
    """
    h = size / 2
    s, tx, ty = cam[:, 0, None], cam[:, 1, None], cam[:, 2, None]
    uv = project(lm3, cam, size).flatten(1)
    b, n, _, p = j3.shape
    jac = lm3.new_zeros(b, n, 2, p + 3)
    torch.mul(j3[:, :, 0], (h * s)[..., None], out=jac[:, :, 0, :p])
    torch.mul(j3[:, :, 1], (-h * s)[..., None], out=jac[:, :, 1, :p])
    jac[:, :, 0, p] = h * (lm3[..., 0] + tx)
    jac[:, :, 0, p + 1] = h * s
    jac[:, :, 1, p] = -h * (lm3[..., 1] + ty)
    jac[:, :, 1, p + 2] = -h * s
    return uv, jac.flatten(1, 2)


def fit_landmarks(flame: Flame, target: torch.Tensor, size: int, cfg: FitConfig = FitConfig()) -> tuple[FlameParams, torch.Tensor]:
    """Fit FLAME to B×68×2 pixel landmarks of ``size``×``size`` images.

    Returns:
        ``(params, rmse)``: fitted parameters (neck and eyes stay 0) and per-face RMSE in px.
    """
    b, dev, dt = target.shape[0], target.device, target.dtype
    ns, ne = cfg.n_shape, cfg.n_expr
    k = ns + ne
    prob = _Problem(flame, ns)
    x = torch.zeros(b, k, device=dev, dtype=dt)
    q = torch.zeros(b, 6, device=dev, dtype=dt)
    cam = init_camera(target, flame, size)
    prior = torch.cat([torch.full((ns,), cfg.w_shape), torch.full((ne,), cfg.w_expr),
                       torch.zeros(3), torch.full((3,), cfg.w_jaw), torch.zeros(3)]).to(dev, dt)
    tgt = target.flatten(1)

    def rows(pose6: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        row = flame.contour_rows(_pose15(pose6))
        return (*flame.landmark_faces_at(row, b), row)

    def cost(x_, q_, cam_, faces, bary) -> torch.Tensor:
        uv = project(prob.landmarks(x_, q_, faces, bary), cam_, size).flatten(1)
        theta = torch.cat([x_, q_], 1)
        return (tgt - uv).pow(2).sum(1) + (prior[:-3] * theta.pow(2)).sum(1)

    mu = torch.full((b, 1), 1e-3, device=dev, dtype=dt)
    with torch.no_grad():
        for _ in range(cfg.iterations):
            faces, bary, row = rows(q)
            j3 = target.new_empty(b, target.shape[1], 3, k + 6)
            lm3 = prob.pose_jacobian(x, q, faces, bary, j3[..., k:])
            prob.coef_jacobian(x, q, row, j3[..., :k])
            uv, jac = _pixels(lm3, cam, size, j3)  # B×2L×(K+9)
            r = tgt - uv
            theta = torch.cat([x, q, cam], 1)
            h = jac.transpose(1, 2) @ jac + torch.diag_embed(prior.expand(b, -1))
            g = (jac.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1) - prior * theta
            c0 = r.pow(2).sum(1) + (prior * theta.pow(2)).sum(1)
            diag = h.diagonal(dim1=1, dim2=2)
            step = torch.linalg.solve(h + torch.diag_embed(mu * diag + 1e-9), g.unsqueeze(-1)).squeeze(-1)
            cand = theta + step
            xc, qc, cc = cand[:, :k], cand[:, k:k + 6], cand[:, k + 6:]
            faces_c, bary_c, _ = rows(qc)
            better = cost(xc, qc, cc, faces_c, bary_c) < c0
            theta = torch.where(better[:, None], cand, theta)
            x, q, cam = theta[:, :k], theta[:, k:k + 6], theta[:, k + 6:]
            mu = torch.where(better[:, None], mu * 0.2, mu * 10).clamp(1e-9, 1e9)
        z = torch.zeros_like(q[:, :3])
        p = FlameParams(x[:, :ns], x[:, ns:], q[:, :3], z, q[:, 3:], torch.zeros(b, 6, device=dev, dtype=dt), cam)
        rmse = landmark_rmse(flame, p, target, size)
    return p, rmse


def fit_faces(flame: Flame, faces: list[FaceRecord], cfg: FitConfig = FitConfig(), batch: int = 128,
              progress: Callable[[int, int], None] | None = None) -> list[FlameRecord]:
    """Fit every face's ``landmarks68`` (aligned-crop pixels) in batches (faces of one crop size
    together); one ``flame.jsonl`` record per face, in order."""
    dev, dt = flame.v_template.device, flame.v_template.dtype
    out: list[FlameRecord] = []
    for i in range(0, len(faces), batch):
        chunk = faces[i:i + batch]
        by_size: dict[int, list[int]] = {}
        for j, f in enumerate(chunk):
            by_size.setdefault(f.size, []).append(j)
        recs: list[FlameRecord | None] = [None] * len(chunk)
        for size, idx in by_size.items():
            lm = torch.tensor([chunk[j].landmarks68 for j in idx], device=dev, dtype=dt)
            p, rmse = fit_landmarks(flame, lm, size, cfg)
            for j, r in zip(idx, p.to_records([chunk[j].id for j in idx], rmse, size)):
                recs[j] = r
        out.extend(recs)  # type: ignore[arg-type]
        if progress:
            progress(min(i + batch, len(faces)), len(faces))
    return out


def params_for_faces(flame: Flame, faces: FaceSet, ids: list[str], cfg: FitConfig = FitConfig(),
                     batch: int = 128) -> tuple[FlameParams, int]:
    """Parameters of ``ids`` from ``flame.jsonl`` (``faces.flame``); faces without one are fitted
    now and kept in memory. Returns the parameters and how many were fitted on the fly."""
    missing = [i for i in dict.fromkeys(ids) if i not in faces.flame]
    for r in fit_faces(flame, [faces[i] for i in missing], cfg, batch):
        faces.flame[r.id] = r
    dev, dt = flame.v_template.device, flame.v_template.dtype
    return FlameParams.from_records([faces.flame[i] for i in ids], dev, dt), len(missing)
