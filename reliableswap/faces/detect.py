"""Face detection with dlib (HOG by default, CNN/MMOD as an option).

Large images are detected on a downscaled copy and the boxes mapped back; when nothing is
found there, a second pass with dlib's 2× upsampling looks for smaller faces.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import dlib
import numpy as np

from reliableswap.faces.models import dlib_model


@dataclass(frozen=True)
class DetectPass:
    """One detection attempt: image long side (px, downscale only) and dlib upsample count."""

    max_side: int
    upsample: int


#: Fast pass first; the second finds faces down to ~40 px in images up to ~1000 px.
DEFAULT_PASSES = (DetectPass(512, 0), DetectPass(1024, 1))


class DlibDetector:
    """dlib face detector over a cascade of :class:`DetectPass`.

    Call with an H×W×3 uint8 RGB image; returns ``(boxes, scores)``: ``boxes`` N×4 float64
    ``(x0, y0, x1, y1)`` in the input image's pixels, ``scores`` N (HOG: SVM margin, CNN: confidence).
    Faces are sorted by area, largest first.
    """

    def __init__(self, kind: str = "hog", passes: tuple[DetectPass, ...] = DEFAULT_PASSES):
        if kind not in ("hog", "cnn"):
            raise ValueError(f"unknown detector {kind!r} (hog or cnn)")
        self.kind = kind
        self.passes = passes
        if kind == "hog":
            self._det = dlib.get_frontal_face_detector()
        else:
            self._det = dlib.cnn_face_detection_model_v1(str(dlib_model("cnn_detector")))

    def _run(self, img: np.ndarray, upsample: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "hog":
            rects, scores, _ = self._det.run(img, upsample, 0.0)
            boxes = [(r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r in rects]
            return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64)
        dets = self._det(img, upsample)
        boxes = [(d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1) for d in dets]
        return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray([d.confidence for d in dets])

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = rgb.shape[:2]
        boxes, scores = np.zeros((0, 4)), np.zeros((0,))
        for p in self.passes:
            s = min(1.0, p.max_side / max(h, w))
            small = rgb if s >= 1.0 else cv2.resize(
                rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
            boxes, scores = self._run(small, p.upsample)
            if len(boxes):
                boxes = boxes / s
                break
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
        return boxes[order], scores[order]
