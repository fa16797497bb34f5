"""Synthetic aligned faces for tests and benchmarks that must run without the shared face photos
(e.g. on a lent GPU machine): cartoon faces drawn at the 68 landmarks of OpenFace's mean face,
each with its own similarity jitter, skin tone and background, and a prep folder made of them.
Not faces a detector would find — crops and landmarks in the exact ``prep`` contract."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from reliableswap.faces.ibug68 import JAW, LEFT_EYE, MOUTH, RIGHT_EYE
from reliableswap.faces.pose import MEAN_FACE_68, head_pose
from reliableswap.images import save_image
from reliableswap.contracts import FaceRecord


def synthetic_faces(n: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images N×S×S×3 uint8, landmarks N×68×2 float32 crop pixels)``."""
    rng = np.random.default_rng(seed)
    base = MEAN_FACE_68[:, :2].numpy().astype(np.float64)
    imgs = np.zeros((n, size, size, 3), np.uint8)
    lms = np.zeros((n, 68, 2), np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        ang = rng.normal(0, 0.08)
        s = size / 256 * rng.uniform(0.95, 1.15) * np.array([rng.uniform(0.9, 1.1), 1.0])
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        lm = (base * s) @ rot.T + size / 2 + rng.normal(0, size / 64, 2) + np.array([0, size * 0.06])
        lm += rng.normal(0, size / 400, lm.shape)  # a little expression noise
        bg = rng.uniform(40, 220, 3)
        img = np.clip(bg + 40 * np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1), 0, 255)
        img = np.ascontiguousarray(img.astype(np.uint8))
        skin = rng.uniform([150, 100, 80], [240, 190, 160])
        hull = cv2.convexHull(np.round(np.concatenate([lm[JAW], lm[17:27] - [0, size * 0.12]])).astype(np.int32))
        cv2.fillConvexPoly(img, hull, skin.tolist(), cv2.LINE_AA)
        for part, col in ((RIGHT_EYE, (40, 30, 30)), (LEFT_EYE, (40, 30, 30)), (MOUTH, (150, 40, 50))):
            cv2.fillPoly(img, [np.round(lm[part]).astype(np.int32)], col, cv2.LINE_AA)
        cv2.polylines(img, [np.round(lm[17:22]).astype(np.int32), np.round(lm[22:27]).astype(np.int32)], False,
                      (60, 40, 30), max(1, size // 128), cv2.LINE_AA)
        imgs[i], lms[i] = img, lm
    return imgs, lms


def write_synthetic_prep(folder: str | Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """A ``prep``-like folder: ``faces/*.png`` + ``faces.jsonl`` of ``n`` synthetic faces, each its
    own identity."""
    folder = Path(folder)
    imgs, lms = synthetic_faces(n, size, seed)
    pose = head_pose(torch.from_numpy(lms).double()).numpy()
    recs = []
    for i, (img, lm) in enumerate(zip(imgs, lms)):
        rel = f"faces/synthetic_{seed}_{i:05d}.png"
        save_image(folder / rel, img)
        recs.append(FaceRecord(
            id=f"synthetic_{seed}_{i:05d}", image=rel, origin={"path": f"synthetic/{i}", "size": [size, size]}, align="ffhq",
            size=size, bbox=[0.0, 0.0, float(size), float(size)], landmarks68=lm.round(2).tolist(),
            pose=dict(zip(("yaw", "pitch", "roll"), pose[i].round(2).tolist())), inverse=[[1, 0, 0], [0, 1, 0]],
            quality={"det_score": 1.0, "face_px": float(size), "sharpness": 1.0}, identity=f"person_{i}"))
    FaceRecord.write(folder / "faces.jsonl", recs)
    return folder
