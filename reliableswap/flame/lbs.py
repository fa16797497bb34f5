"""Linear blend skinning for FLAME as pure batched functions (after smplx's ``lbs.py``).

Pose layout (15 values): global (3), neck (3), jaw (3), left eye (3), right eye (3), axis-angle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_rodrigues(rvec: torch.Tensor) -> torch.Tensor:
    """N×3 axis-angle → N×3×3 rotation matrices."""
    angle = torch.norm(rvec + 1e-8, dim=1, keepdim=True)
    axis = rvec / angle
    cos, sin = torch.cos(angle).unsqueeze(1), torch.sin(angle).unsqueeze(1)
    rx, ry, rz = axis.split(1, dim=1)
    zeros = torch.zeros_like(rx)
    k = torch.cat([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], 1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=rvec.dtype, device=rvec.device).unsqueeze(0)
    return eye + sin * k + (1 - cos) * torch.bmm(k, k)


def blend_shapes(coeffs: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """B×K coefficients, V×3×K directions → B×V×3 offsets."""
    v, c, k = dirs.shape
    return (coeffs @ dirs.reshape(v * c, k).T).view(-1, v, c)


def vertices2joints(j_regressor: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """J×V regressor, B×V×3 vertices → B×J×3."""
    return j_regressor @ vertices


def batch_rigid_transform(rot_mats: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kinematics.

    Args:
        rot_mats: B×J×3×3 local rotations; joints: B×J×3 rest joints; parents: J (parents[0] = −1).
    Returns:
        posed joints B×J×3 and B×J×4×4 transforms relative to the rest pose.
    """
    b, j = joints.shape[:2]
    rel = joints.clone()
    rel[:, 1:] = rel[:, 1:] - joints[:, parents[1:]]
    tm = torch.cat([F.pad(rot_mats, (0, 0, 0, 1)), F.pad(rel.unsqueeze(-1), (0, 0, 0, 1), value=1)], -1)
    chain = [tm[:, 0]]
    for i in range(1, j):
        chain.append(chain[int(parents[i])] @ tm[:, i])
    transforms = torch.stack(chain, 1)
    posed = transforms[:, :, :3, 3]
    jh = F.pad(joints, (0, 1)).unsqueeze(-1)
    rel_t = transforms - F.pad(transforms @ jh, (3, 0, 0, 0))
    return posed, rel_t


def lbs(
    betas: torch.Tensor, pose: torch.Tensor, v_template: torch.Tensor, shapedirs: torch.Tensor,
    posedirs: torch.Tensor, j_regressor: torch.Tensor, parents: torch.Tensor, weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape and expression blend shapes, pose correctives, skinning.

    Args:
        betas: B×K (shape then expression coefficients, K ≤ shapedirs' last dim).
        pose: B×(3J) axis-angle.
        v_template: V×3; shapedirs: V×3×K; posedirs: P×(3V) with P = 9(J−1);
        j_regressor: J×V; parents: J; weights: V×J.
    Returns:
        vertices B×V×3 and posed joints B×J×3.
    """
    b = betas.shape[0]
    v_shaped = v_template.unsqueeze(0) + blend_shapes(betas, shapedirs[..., : betas.shape[1]])
    joints = vertices2joints(j_regressor, v_shaped)
    rot = batch_rodrigues(pose.reshape(-1, 3)).view(b, -1, 3, 3)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    pose_feature = (rot[:, 1:] - eye).reshape(b, -1)
    v_posed = v_shaped + (pose_feature @ posedirs).view(b, -1, 3)
    posed_joints, a = batch_rigid_transform(rot, joints, parents)
    t = (weights @ a.reshape(b, a.shape[1], 16)).view(b, -1, 4, 4)
    vh = F.pad(v_posed, (0, 1), value=1.0).unsqueeze(-1)
    verts = (t @ vh)[:, :, :3, 0]
    return verts, posed_joints


def vertices2landmarks(vertices: torch.Tensor, faces: torch.Tensor, lmk_faces: torch.Tensor, lmk_bary: torch.Tensor) -> torch.Tensor:
    """Barycentric landmarks: B×V×3 vertices, F×3 faces, B×L face indices, B×L×3 weights → B×L×3."""
    b, n = lmk_faces.shape
    tri = faces[lmk_faces]  # B×L×3 vertex ids
    v = torch.gather(vertices, 1, tri.reshape(b, -1, 1).expand(-1, -1, 3)).view(b, n, 3, 3)
    return (v * lmk_bary.unsqueeze(-1)).sum(2)


def rot_mat_to_euler_y(rot: torch.Tensor) -> torch.Tensor:
    """y-rotation angle (radians) of B×3×3 matrices, as smplx/DECA compute it for contour bins."""
    return torch.atan2(-rot[:, 2, 0], torch.sqrt(rot[:, 0, 0] ** 2 + rot[:, 1, 0] ** 2))
