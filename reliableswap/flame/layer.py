"""``Flame``: the FLAME model as an nn.Module that only holds buffers, plus the parameter record.

``Flame(model, embedding)`` → ``vertices(params)`` (full mesh) or ``landmarks(params)`` (68
points via the landmark-only fast path, which never builds the full mesh: blend shapes and
skinning run on the ~hundreds of vertices the landmarks and joints need). ``project`` applies a
weak-perspective camera into a S×S image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from reliableswap.flame.lbs import (batch_rigid_transform, batch_rodrigues, blend_shapes, lbs, rot_mat_to_euler_y,
                                    vertices2landmarks)
from reliableswap.flame.model import FlameFileError, FlameModel, LandmarkEmbedding, contour_bin, resolve_flame_path, to_torch
from reliableswap.contracts import FlameRecord


@dataclass
class FlameParams:
    """Batched FLAME parameters (B first). Missing coefficients are zero."""

    shape: torch.Tensor  # B×n_shape (≤ 300)
    expression: torch.Tensor  # B×n_expr (≤ 100)
    global_pose: torch.Tensor  # B×3 axis-angle
    neck: torch.Tensor  # B×3
    jaw: torch.Tensor  # B×3
    eyes: torch.Tensor  # B×6
    camera: torch.Tensor  # B×3 weak perspective: scale, tx, ty

    @classmethod
    def zeros(cls, b: int, n_shape: int = 100, n_expr: int = 50, device=None, dtype=torch.float32) -> "FlameParams":
        z = lambda n: torch.zeros(b, n, device=device, dtype=dtype)  # noqa: E731
        cam = z(3)
        cam[:, 0] = 8.0
        return cls(z(n_shape), z(n_expr), z(3), z(3), z(3), z(6), cam)

    def full_pose(self) -> torch.Tensor:
        return torch.cat([self.global_pose, self.neck, self.jaw, self.eyes], 1)

    def __getitem__(self, idx) -> "FlameParams":
        """Rows ``idx`` (slice, index tensor) of every field."""
        return FlameParams(*[t[idx] for t in vars(self).values()])

    @staticmethod
    def cat(items: list["FlameParams"]) -> "FlameParams":
        return FlameParams(*[torch.cat(ts) for ts in zip(*[vars(p).values() for p in items])])

    @classmethod
    def from_records(cls, recs: list[FlameRecord], device=None, dtype=torch.float32) -> "FlameParams":
        """Stack ``flame.jsonl`` records (same coefficient counts) into batched parameters."""
        return cls(*[torch.tensor([getattr(r, k) for r in recs], device=device, dtype=dtype) for k in FlameRecord.PARAMS])

    def to_records(self, ids: list[str], rmse: torch.Tensor, size: int) -> list[FlameRecord]:
        """One ``flame.jsonl`` record per row (values rounded to 6 decimals)."""
        cols = {k: getattr(self, k).detach().cpu().double().numpy().round(6) for k in FlameRecord.PARAMS}
        return [FlameRecord(id=fid, size=size, rmse_px=round(float(rmse[i]), 4), **{k: cols[k][i].tolist() for k in cols})
                for i, fid in enumerate(ids)]


class Flame(nn.Module):
    """FLAME buffers on a device; all methods batched."""

    NECK_CHAIN = (1, 0)

    def __init__(self, model: FlameModel, embedding: LandmarkEmbedding | None = None, dtype=torch.float32):
        super().__init__()
        self.register_buffer("v_template", to_torch(model.v_template, dtype=dtype))
        self.register_buffer("shapedirs", to_torch(model.shapedirs, dtype=dtype))
        p = model.posedirs.shape[-1]
        self.register_buffer("posedirs", to_torch(model.posedirs.reshape(-1, p).T, dtype=dtype))
        self.register_buffer("j_regressor", to_torch(model.J_regressor, dtype=dtype))
        self.register_buffer("weights", to_torch(model.weights, dtype=dtype))
        self.register_buffer("faces", torch.as_tensor(model.faces, dtype=torch.long))
        self.register_buffer("parents", torch.as_tensor(model.parents, dtype=torch.long))
        self.embedding = embedding
        self.n_shape_max = min(300, model.shapedirs.shape[-1])
        if embedding is not None:
            self.register_buffer("static_faces", torch.as_tensor(embedding.static_faces, dtype=torch.long))
            self.register_buffer("static_bary", to_torch(embedding.static_bary, dtype=dtype))
            if embedding.dynamic_faces is not None:
                self.register_buffer("dyn_faces", torch.as_tensor(embedding.dynamic_faces, dtype=torch.long))
                self.register_buffer("dyn_bary", to_torch(embedding.dynamic_bary, dtype=dtype))
            self._build_subset()

    # -- full mesh ------------------------------------------------------------------------
    def betas(self, p: FlameParams) -> torch.Tensor:
        b = p.shape.shape[0]
        dev, dt = p.shape.device, p.shape.dtype
        shape = torch.zeros(b, self.n_shape_max, device=dev, dtype=dt)
        shape[:, : p.shape.shape[1]] = p.shape
        n_expr = self.shapedirs.shape[-1] - self.n_shape_max
        expr = torch.zeros(b, n_expr, device=dev, dtype=dt)
        expr[:, : p.expression.shape[1]] = p.expression
        return torch.cat([shape, expr], 1)

    def vertices(self, p: FlameParams) -> torch.Tensor:
        """B×V×3 posed vertices (FLAME units, metres; y up, z toward the camera)."""
        v, _ = lbs(self.betas(p), p.full_pose(), self.v_template, self.shapedirs, self.posedirs,
                   self.j_regressor, self.parents, self.weights)
        return v

    # -- landmarks ------------------------------------------------------------------------
    def neck_yaw_deg(self, pose: torch.Tensor) -> torch.Tensor:
        """Head yaw (degrees) from the global and neck rotations, for the contour table."""
        b = pose.shape[0]
        rots = batch_rodrigues(pose.view(b, -1, 3)[:, list(self.NECK_CHAIN)].reshape(-1, 3)).view(b, -1, 3, 3)
        rel = torch.eye(3, dtype=pose.dtype, device=pose.device).expand(b, 3, 3)
        for i in range(rots.shape[1]):
            rel = rots[:, i] @ rel
        return torch.rad2deg(rot_mat_to_euler_y(rel))

    def contour_rows(self, pose: torch.Tensor) -> torch.Tensor | None:
        """Row of the contour table for each pose (B long), or None without a contour table."""
        if not hasattr(self, "dyn_faces"):
            return None
        return contour_bin(self.neck_yaw_deg(pose), self.embedding.yaw_sign)

    def landmark_faces_at(self, rows: torch.Tensor | None, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """B×68 face indices and B×68×3 barycentric weights for contour ``rows`` (17 contour points, then 51)."""
        sf = self.static_faces.expand(b, -1)
        sb = self.static_bary.expand(b, -1, -1)
        if rows is None:
            return sf, sb
        return torch.cat([self.dyn_faces[rows], sf], 1), torch.cat([self.dyn_bary[rows], sb], 1)

    def landmark_faces(self, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B×68 face indices and B×68×3 barycentric weights, the contour chosen by the head yaw."""
        return self.landmark_faces_at(self.contour_rows(pose), pose.shape[0])

    def landmarks_full(self, p: FlameParams) -> torch.Tensor:
        """68×3 landmarks from the full mesh (reference path)."""
        f, w = self.landmark_faces(p.full_pose())
        return vertices2landmarks(self.vertices(p), self.faces, f, w)

    def _build_subset(self) -> None:
        """Buffers for the landmark-only path: the landmark triangles' vertices, and the joints as
        an affine function of the coefficients (``J = J̄ + Σ k·J_k``), so the subset never needs the
        joint regressor's support."""
        tri = [self.faces[self.static_faces].reshape(-1)]
        if hasattr(self, "dyn_faces"):
            tri.append(self.faces[self.dyn_faces].reshape(-1))
        sub = torch.unique(torch.cat(tri))
        remap = torch.full((self.v_template.shape[0],), -1, dtype=torch.long)
        remap[sub] = torch.arange(sub.numel())
        self.register_buffer("sub_idx", sub)
        self.register_buffer("sub_faces", remap[self.faces.clamp_min(0)])  # valid for landmark faces
        p = self.posedirs.shape[0]
        self.register_buffer("sub_template", self.v_template[sub])
        self.register_buffer("sub_shapedirs", self.shapedirs[sub])
        self.register_buffer("sub_posedirs", self.posedirs.view(p, -1, 3)[:, sub].reshape(p, -1))
        self.register_buffer("sub_weights", self.weights[sub])
        v, c, k = self.shapedirs.shape
        self.register_buffer("j_template", self.j_regressor @ self.v_template)
        self.register_buffer("j_dirs", (self.j_regressor @ self.shapedirs.reshape(v, c * k)).view(-1, c, k))

    def _select(self, dirs: torch.Tensor, n_shape: int, n_expr: int) -> torch.Tensor:
        m = self.n_shape_max
        return torch.cat([dirs[..., :n_shape], dirs[..., m:m + n_expr]], -1)

    def sub_dirs(self, n_shape: int, n_expr: int) -> torch.Tensor:
        """Vs×3×(n_shape+n_expr): the subset's first shape and expression directions."""
        return self._select(self.sub_shapedirs, n_shape, n_expr)

    def joint_dirs(self, n_shape: int, n_expr: int) -> torch.Tensor:
        """J×3×(n_shape+n_expr): how the rest joints move with each coefficient."""
        return self._select(self.j_dirs, n_shape, n_expr)

    def skin_subset(self, coeffs: torch.Tensor, pose: torch.Tensor, n_shape: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LBS of the landmark subset only.

        Args:
            coeffs: B×K (first ``n_shape`` shape, then expression); pose: B×15 axis-angle.
        Returns:
            vertices B×Vs×3, joints' relative transforms B×J×4×4, rest joints B×J×3.
        """
        b, n_expr = coeffs.shape[0], coeffs.shape[1] - n_shape
        shaped = self.sub_template + blend_shapes(coeffs, self.sub_dirs(n_shape, n_expr))
        joints = self.j_template + blend_shapes(coeffs, self.joint_dirs(n_shape, n_expr))
        rot = batch_rodrigues(pose.reshape(-1, 3)).view(b, -1, 3, 3)
        eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
        posed = shaped + ((rot[:, 1:] - eye).reshape(b, -1) @ self.sub_posedirs).view(b, -1, 3)
        _, a = batch_rigid_transform(rot, joints, self.parents)
        t = (self.sub_weights @ a.reshape(b, a.shape[1], 16)).view(b, -1, 4, 4)
        verts = (t[..., :3, :3] @ posed.unsqueeze(-1))[..., 0] + t[..., :3, 3]
        return verts, a, joints

    def landmarks(self, p: FlameParams) -> torch.Tensor:
        """68×3 landmarks (B×68×3) without building the full mesh (same values as the full path)."""
        v, _, _ = self.skin_subset(torch.cat([p.shape, p.expression], 1), p.full_pose(), p.shape.shape[1])
        f, w = self.landmark_faces(p.full_pose())
        return vertices2landmarks(v, self.sub_faces, f, w)


def project(points: torch.Tensor, camera: torch.Tensor, size: int) -> torch.Tensor:
    """Weak-perspective projection into a ``size``×``size`` image (DECA's convention).

    ``u = size/2 · (1 + s (x + tx)) − 0.5``, ``v = size/2 · (1 − s (y + ty)) − 0.5``: FLAME's y
    points up, image y down; pixel centres at integers.

    Args:
        points: B×N×3; camera: B×3 ``(s, tx, ty)``.
    Returns:
        B×N×2 pixels.
    """
    s = camera[:, None, 0:1]
    xy = s * (points[..., :2] + camera[:, None, 1:3])
    return torch.stack([(1 + xy[..., 0]) * size / 2 - 0.5, (1 - xy[..., 1]) * size / 2 - 0.5], -1)


# -- loading --------------------------------------------------------------------------------------

def load_embedding(path: str | os.PathLike) -> LandmarkEmbedding:
    """DECA's ``landmark_embedding.npy``, or RingNet's ``flame_static_embedding.pkl`` (with
    ``flame_dynamic_embedding.npy`` when it lies beside it)."""
    path = Path(path)
    if not path.is_file():
        raise FlameFileError(f"landmark embedding not found: {path}")
    if path.suffix == ".npy":
        return LandmarkEmbedding.load_deca(path)
    dyn = path.with_name("flame_dynamic_embedding.npy")
    return LandmarkEmbedding.load_ringnet(path, dyn if dyn.is_file() else None)


def find_embedding(model_path: Path) -> LandmarkEmbedding:
    """The landmark embedding beside the model (DECA's first, then RingNet's)."""
    for name in ("landmark_embedding.npy", "flame_static_embedding.pkl"):
        if (model_path.parent / name).is_file():
            return load_embedding(model_path.parent / name)
    raise FlameFileError(
        f"no landmark embedding beside {model_path}: put DECA's landmark_embedding.npy (or RingNet's "
        "flame_static_embedding.pkl + flame_dynamic_embedding.npy) there, or pass --embedding PATH")


def load_flame(model: str | os.PathLike | None, embedding: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", dtype=torch.float32) -> Flame:
    """FLAME model + landmark embedding on ``device`` (``model`` None → ``$RELIABLESWAP_FLAME``)."""
    path = resolve_flame_path(model)
    emb = find_embedding(path) if embedding is None else load_embedding(embedding)
    return Flame(FlameModel.load(path), emb, dtype=dtype).to(device)
