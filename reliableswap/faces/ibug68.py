"""The 68-point landmark layout (iBUG 300-W / Multi-PIE), its index groups, defined once.

"Right"/"left" are the subject's: the subject's right eye is on the image left of a frontal face.
Slices index B×68×2 tensors directly; lists are for gathers.
"""

from __future__ import annotations

import torch

JAW = slice(0, 17)
RIGHT_BROW = slice(17, 22)
LEFT_BROW = slice(22, 27)
BROWS = slice(17, 27)
NOSE = slice(27, 36)
RIGHT_EYE = slice(36, 42)
LEFT_EYE = slice(42, 48)
MOUTH = slice(48, 68)
INNER_MOUTH = slice(60, 68)
#: Everything but the jaw line: brows, nose, eyes, mouth.
INNER = slice(17, 68)

NOSE_TIP = 30
CHIN = 8
MOUTH_RIGHT, MOUTH_LEFT = 48, 54

#: Index of each landmark's mirror partner (horizontal flip of the face).
MIRROR68 = (
    list(range(16, -1, -1))
    + list(range(26, 16, -1))
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60, 67, 66, 65]
)

#: Points that move little with expression: eye corners and the nose.
RIGID = [36, 39, 42, 45] + list(range(27, 36))

#: Feature groups that move as units (jaw, each brow, nose, each eye, mouth).
GROUPS = [list(range(s.start, s.stop)) for s in (JAW, RIGHT_BROW, LEFT_BROW, NOSE, RIGHT_EYE, LEFT_EYE, MOUTH)]

#: Rigid points for a head-pose fit: jaw sides, brows, nose, eye corners (not the moving mouth/chin).
POSE_POINTS = list(range(0, 5)) + list(range(12, 17)) + list(range(17, 36)) + list(range(36, 48))


def five_points(landmarks: torch.Tensor) -> torch.Tensor:
    """B×68×2 → B×5×2: right-eye centre, left-eye centre, nose tip, right and left mouth corners."""
    return torch.stack([landmarks[:, RIGHT_EYE].mean(1), landmarks[:, LEFT_EYE].mean(1), landmarks[:, NOSE_TIP],
                        landmarks[:, MOUTH_RIGHT], landmarks[:, MOUTH_LEFT]], 1)
