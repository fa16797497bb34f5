"""dlib's 128-D face descriptor (ResNet, face_recognition_models weights).

Two faces of one person are usually closer than 0.6 (dlib's documented threshold).
"""

from __future__ import annotations

import dlib
import numpy as np

from reliableswap.faces.models import dlib_model, model_pool

SAME_PERSON_DISTANCE = 0.6


class DlibEmbedder:
    """Call with an H×W×3 uint8 RGB image and N×68×2 landmarks in its pixels → N×128 float32."""

    def __init__(self) -> None:
        path = str(dlib_model("recognition"))
        self._pool = model_pool(path, lambda: dlib.face_recognition_model_v1(path))

    def __call__(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        if len(landmarks) == 0:
            return np.zeros((0, 128), np.float32)
        shapes = dlib.full_object_detections()
        for lm in np.asarray(landmarks):
            x0, y0 = lm.min(0)
            x1, y1 = lm.max(0)
            rect = dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
            pts = [dlib.point(int(round(x)), int(round(y))) for x, y in lm]
            shapes.append(dlib.full_object_detection(rect, pts))
        with self._pool.borrow() as net:
            desc = net.compute_face_descriptor(np.ascontiguousarray(rgb), shapes)
        return np.asarray([np.asarray(d) for d in desc], np.float32)


def embedding_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between N×128 and M×128 descriptors → N×M."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
