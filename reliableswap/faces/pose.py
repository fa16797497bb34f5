"""Head pose (yaw, pitch, roll in degrees) from 68 landmarks, batched.

A scaled-orthographic camera is fitted by least squares to a generic 3D face (OpenFace's
68-point mean shape); its rotation's rows give the angles.

Conventions (image y points down):
- yaw > 0: the nose points toward image right (the subject turns to their left);
- pitch > 0: the nose points up (chin raised);
- roll > 0: the eye line turns clockwise on screen (subject's left eye lower than the right).
Mirroring the image negates yaw and roll and keeps pitch.
"""

from __future__ import annotations

import torch

from reliableswap.faces.ibug68 import POSE_POINTS, RIGID
from reliableswap.geometry.affine import apply_affine, similarity_lstsq

#: The 68 points that move with expression: brows, nose, eyes, mouth.
EXPRESSION = list(range(17, 68))

#: OpenFace 68-point mean 3D face: x to image right, y down, z toward the camera.
MEAN_FACE_68 = torch.tensor([
    [-73.393523, -29.801432, -47.667532], [-72.775014, -10.949766, -45.909403], [-70.533638, 7.929818, -44.84258],
    [-66.850058, 26.07428, -43.141114], [-59.790187, 42.56439, -38.635298], [-48.368973, 56.48108, -30.750622],
    [-34.121101, 67.246992, -18.456453], [-17.875411, 75.056892, -3.609035], [0.098749, 77.061286, 0.881698],
    [17.477031, 74.758448, -5.181201], [32.648966, 66.929021, -19.176563], [46.372358, 56.311389, -30.77057],
    [57.34348, 42.419126, -37.628629], [64.388482, 25.45588, -40.886309], [68.212038, 6.990805, -42.281449],
    [70.486405, -11.666193, -44.142567], [71.375822, -30.365191, -47.140426], [-61.119406, -49.361602, -14.254422],
    [-51.287588, -58.769795, -7.268147], [-37.8048, -61.996155, -0.442051], [-24.022754, -61.033399, 6.606501],
    [-11.635713, -56.686759, 11.967398], [12.056636, -57.391033, 12.051204], [25.106256, -61.902186, 7.315098],
    [38.338588, -62.777713, 1.022953], [51.191007, -59.302347, -5.349435], [60.053851, -50.190255, -11.615746],
    [0.65394, -42.19379, 13.380835], [0.804809, -30.993721, 21.150853], [0.992204, -19.944596, 29.284036],
    [1.226783, -8.414541, 36.94806], [-14.772472, 2.598255, 20.132003], [-7.180239, 4.751589, 23.536684],
    [0.55592, 6.5629, 25.944448], [8.272499, 4.661005, 23.695741], [15.214351, 2.643046, 20.858157],
    [-46.04729, -37.471411, -7.037989], [-37.674688, -42.73051, -3.021217], [-27.883856, -42.711517, -1.353629],
    [-19.648268, -36.754742, 0.111088], [-28.272965, -35.134493, 0.147273], [-38.082418, -34.919043, -1.476612],
    [19.265868, -37.032306, 0.665746], [27.894191, -43.342445, -0.24766], [37.437529, -43.110822, -1.696435],
    [45.170805, -38.086515, -4.894163], [38.196454, -35.532024, -0.282961], [28.764989, -35.484289, 1.172675],
    [-28.916267, 28.612716, 2.24031], [-17.533194, 22.172187, 15.934335], [-6.68459, 19.029051, 22.611355],
    [0.381001, 20.721118, 23.748437], [8.375443, 19.03546, 22.721995], [18.876618, 22.394109, 15.610679],
    [28.794412, 28.079924, 3.217393], [19.057574, 36.298248, 14.987997], [8.956375, 39.634575, 22.554245],
    [0.381549, 40.395647, 23.591626], [-7.428895, 39.836405, 22.406106], [-18.160634, 36.677899, 15.121907],
    [-24.37749, 28.677771, 4.785684], [-6.897633, 25.475976, 20.893742], [0.340663, 26.014269, 22.220479],
    [8.444722, 25.326198, 21.02552], [24.474473, 28.323008, 5.712776], [8.449166, 30.596216, 20.671489],
    [0.205322, 31.408738, 21.90367], [-7.198266, 30.844876, 20.328022],
])  # fmt: skip

def fit_orthographic(landmarks: torch.Tensor, points: list[int] = POSE_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a scaled-orthographic camera to landmarks.

    Args:
        landmarks: B×68×2 pixels.
    Returns:
        ``(R, s)``: B×3×3 rotations (rows: image x, image y, toward camera, in model coordinates)
        and B scales (pixels per model unit).
    """
    x = landmarks[:, points].to(torch.float64)
    X = MEAN_FACE_68[points].to(x)
    xc = x - x.mean(1, keepdim=True)
    Xc = X - X.mean(0, keepdim=True)
    # P (B×2×3) minimises |xc − Xc Pᵀ|²
    P = torch.linalg.solve(Xc.T @ Xc, Xc.T @ xc).transpose(1, 2)
    u, sv, vh = torch.linalg.svd(P, full_matrices=False)
    r12 = u @ vh
    r3 = torch.linalg.cross(r12[:, 0], r12[:, 1])
    R = torch.cat([r12, r3.unsqueeze(1)], 1)
    return R, sv.mean(-1)


def head_pose(landmarks: torch.Tensor) -> torch.Tensor:
    """B×68×2 landmarks → B×3 ``(yaw, pitch, roll)`` degrees (conventions in the module doc)."""
    R, _ = fit_orthographic(landmarks)
    roll = torch.atan2(R[:, 1, 0], R[:, 0, 0])
    c, s = torch.cos(roll), torch.sin(roll)
    # undo the in-plane rotation: rows of Rz(−roll) · R[:2]
    nx = c * R[:, 0, 2] + s * R[:, 1, 2]
    ny = -s * R[:, 0, 2] + c * R[:, 1, 2]
    yaw = torch.asin(nx.clamp(-1, 1))
    pitch = -torch.asin(ny.clamp(-1, 1))
    return torch.rad2deg(torch.stack([yaw, pitch, roll], -1)).to(landmarks.dtype)


def expression_error(lm: torch.Tensor, lm_ref: torch.Tensor) -> torch.Tensor:
    """Mean distance of the expression landmarks (B×68×2) after a similarity on the rigid points, in
    interocular units, B (0 for the same expression at any pose, scale and position in the image plane)."""
    m = similarity_lstsq(lm[:, RIGID].double(), lm_ref[:, RIGID].double())
    moved = apply_affine(lm.double(), m)
    iod = (lm_ref[:, 36:42].mean(1) - lm_ref[:, 42:48].mean(1)).norm(dim=-1).double()
    return ((moved[:, EXPRESSION] - lm_ref[:, EXPRESSION].double()).norm(dim=-1).mean(1) / iod).float()


def eye_aspect_ratio(lm: torch.Tensor) -> torch.Tensor:
    """Each eye's opening (B×68×2 → B×2, the subject's right then left): the mean of the two
    lid-to-lid distances over the corner-to-corner one (Soukupová and Čech 2016); about 0.3 for an
    open eye, below 0.15 for a squint or a closed one."""
    out = []
    for e in (36, 42):
        p = lm[:, e:e + 6].double()
        lids = (p[:, 1] - p[:, 5]).norm(dim=-1) + (p[:, 2] - p[:, 4]).norm(dim=-1)
        out.append(lids / (2 * (p[:, 0] - p[:, 3]).norm(dim=-1).clamp_min(1e-9)))
    return torch.stack(out, 1).float()


def eye_openness_error(lm: torch.Tensor, lm_ref: torch.Tensor) -> torch.Tensor:
    """B: the larger of the two eyes' |eye aspect ratio − the reference's| (B×68×2 each): how far
    a fake's eyes are from being as open as its attribute donor's."""
    return (eye_aspect_ratio(lm) - eye_aspect_ratio(lm_ref)).abs().amax(1)
