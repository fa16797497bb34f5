"""One photo → its aligned faces: detect → 68 landmarks → align → pose and quality (→ descriptor).

Detection and landmarks run on the numpy image (dlib's API, or FAN on the device); alignment,
pose and sharpness are batched torch over all faces of the image.
"""

from __future__ import annotations

import time
from collections import Counter

import cv2
import numpy as np
import torch
from kornia.filters import laplacian

from reliableswap.choices import Align, Detector, LandmarkBackend
from reliableswap.faces.align import align_transform, warp_faces
from reliableswap.faces.detect import make_detector
from reliableswap.faces.embed import DlibEmbedder
from reliableswap.faces.landmarks import make_landmarker
from reliableswap.faces.hands import MIN_PRESENCE, HandLandmarker
from reliableswap.faces.mesh import load_face_mesh
from reliableswap.faces.pose import head_pose
from reliableswap.geometry.affine import affine_scale, apply_affine, compose_affine, invert_affine, resize_affine, translate_affine
from reliableswap.images import to_tensor, to_uint8


def crop_region(m: torch.Tensor, size: int, width: int, height: int, margin: int = 2) -> tuple[int, int, int, int]:
    """Integer box ``(x0, y0, x1, y1)`` of the image covering every crop of B×2×3 image→crop ``m``."""
    corners = torch.tensor([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=m.dtype, device=m.device)
    pts = apply_affine(corners.expand(m.shape[0], -1, -1), invert_affine(m)).reshape(-1, 2)
    lo = (pts.min(0).values.floor() - margin).clamp_min(0)
    hi = pts.max(0).values.ceil() + margin + 1
    return int(lo[0]), int(lo[1]), int(min(hi[0], width)), int(min(hi[1], height))


class FaceProcessor:
    """Holds the models; call it on one RGB image.

    Args:
        size: crop side; align: alignment recipe; landmarks: 68-point backend (``mesh``: dlib's 68 plus
        the 468-point face mesh measured on the crop); detector: dlib detector;
        min_face: faces narrower than this (original pixels) are left out; largest: keep only the
        largest face; embed: add dlib's 128-D descriptor; device: torch device for alignment and FAN.
    """

    def __init__(self, size: int = 256, align: Align = Align.ffhq, landmarks: LandmarkBackend = LandmarkBackend.dlib,
                 detector: Detector = Detector.hog, min_face: int = 40, largest: bool = False, embed: bool = False,
                 device: str | torch.device = "cpu"):
        self.size, self.align, self.min_face, self.largest = size, Align(align), min_face, largest
        self.device = torch.device(device)
        self.detector = make_detector(Detector(detector).value)
        backend = LandmarkBackend(landmarks)
        # mesh: dlib's 68 points align the crop, then the 468-point mesh is measured on the crop
        self.landmarker = make_landmarker("dlib" if backend == LandmarkBackend.mesh else backend.value, self.device)
        self.mesh = load_face_mesh(str(self.device)) if backend == LandmarkBackend.mesh else None
        # with the mesh (the mesh recipe's prep) the hands on each crop are stored too
        self.hands = HandLandmarker(self.device) if backend == LandmarkBackend.mesh else None
        self.embedder = DlibEmbedder() if embed else None

    def __call__(self, rgb: np.ndarray, scale: float, timings: Counter) -> tuple[list[dict], list[np.ndarray], str | None]:
        """Faces of one H×W×3 uint8 image decoded at 1/``scale`` of its original size.

        Returns ``(records, crops, reason)``: per face a partial ``faces.jsonl`` record (bbox,
        landmarks, pose, inverse, quality[, embedding]) and its crop (S×S×3 uint8); ``reason`` is a
        one-line reason when no face is kept. Per-stage seconds are added to ``timings``.
        """
        t = time.perf_counter()
        boxes, scores = self.detector(rgb)
        timings["detect"] += time.perf_counter() - t
        if len(boxes) == 0:
            return [], [], "no face found"
        widths = (boxes[:, 2] - boxes[:, 0]) * scale
        keep = widths >= self.min_face
        if not keep.any():
            return [], [], f"face too small ({widths.max():.0f} px < --min-face {self.min_face} px)"
        boxes, scores, widths = boxes[keep], scores[keep], widths[keep]
        if self.largest:
            boxes, scores, widths = boxes[:1], scores[:1], widths[:1]

        t = time.perf_counter()
        lm = self.landmarker(rgb, boxes)
        timings["landmarks"] += time.perf_counter() - t

        t = time.perf_counter()
        size = self.size
        lm_t = torch.from_numpy(lm).to(self.device, torch.float64)
        m = align_transform(lm_t, size, self.align.value)
        # Convert only the region the crops cover (big photos, small faces), shifting the matrices.
        x0, y0, x1, y1 = crop_region(m, size, rgb.shape[1], rgb.shape[0])
        roi = rgb[y0:y1, x0:x1]
        pre = translate_affine(x0, y0, m.dtype, m.device)  # roi pixel → image pixel
        f = min(1.0, 1.5 * float(affine_scale(m).max()))
        if f < 0.9:  # shrink once with INTER_AREA here, at the numpy edge (cheaper than in torch)
            roi = cv2.resize(roi, (max(1, round(roi.shape[1] * f)), max(1, round(roi.shape[0] * f))), interpolation=cv2.INTER_AREA)
            pre = compose_affine(pre, resize_affine((x1 - x0) / roi.shape[1], (y1 - y0) / roi.shape[0], m.dtype, m.device))
        img = to_tensor(roi, self.device)
        crops_t = warp_faces(img, compose_affine(m, pre).float(), size)
        lm_crop = apply_affine(lm_t, m)
        pose = head_pose(lm_t)
        sharp = laplacian(crops_t.mean(1, keepdim=True), 3).flatten(1).var(1) * 1e3
        # crop → original-file pixels (the decoded image may be reduced by `scale`)
        inv = invert_affine(m) * scale
        crops = list(to_uint8(crops_t))
        timings["align"] += time.perf_counter() - t

        mesh = None
        if self.mesh is not None:
            t = time.perf_counter()
            mesh = self.mesh.from_landmarks68(crops_t, lm_crop.float())[0].double().cpu().numpy()
            timings["mesh"] += time.perf_counter() - t
        hands: list[list] = [[] for _ in range(len(boxes))]
        if self.hands is not None:
            t = time.perf_counter()
            found = self.hands(crops_t)
            for i, lm_h, p in zip(found.image.tolist(), found.landmarks.cpu().numpy(), found.presence.tolist()):
                if p >= MIN_PRESENCE:
                    hands[i].append(np.round(lm_h.astype(np.float64), 2).tolist())
            timings["hands"] += time.perf_counter() - t

        emb = None
        if self.embedder is not None:
            t = time.perf_counter()
            emb = self.embedder(rgb, lm)
            timings["embed"] += time.perf_counter() - t

        recs = []
        for i in range(len(boxes)):
            r = {
                "bbox": [round(float(v) * scale, 1) for v in boxes[i]],
                "landmarks68": np.round(lm_crop[i].cpu().numpy(), 2).tolist(),
                "landmarks68_origin": np.round(lm[i] * scale, 2).tolist(),
                "pose": dict(zip(("yaw", "pitch", "roll"), (round(float(v), 2) for v in pose[i]))),
                "inverse": np.round(inv[i].cpu().numpy(), 6).tolist(),
                "quality": {"det_score": round(float(scores[i]), 4), "face_px": round(float(widths[i]), 1),
                            "sharpness": round(float(sharp[i]), 4)},
            }
            if emb is not None:
                r["embedding"] = np.round(emb[i], 5).tolist()
            if mesh is not None:
                r["mesh468"] = np.round(mesh[i], 2).tolist()
            if self.hands is not None:
                r["hands"] = hands[i]
            recs.append(r)
        return recs, crops, None
