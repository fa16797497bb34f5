"""Pairing faces for triplets: random or pose-aware, never one identity with itself.

Two faces are the same identity when both carry the same ``identity`` label, or, when both have
dlib embeddings, when their descriptor distance is below 0.6 (dlib's threshold). Deterministic
for a seed.
"""

from __future__ import annotations

import numpy as np

from reliableswap.choices import Strategy
from reliableswap.faces.embed import SAME_PERSON_DISTANCE
from reliableswap.recipes import PairsSection
from triplets.records import FaceRecord, PairRecord


def same_identity_matrix(faces: list[FaceRecord], threshold: float = SAME_PERSON_DISTANCE) -> np.ndarray:
    """N×N bool: True where two faces are (or may be) the same person; the diagonal is True."""
    n = len(faces)
    same = np.eye(n, dtype=bool)
    labels = [f.identity for f in faces]
    for i in range(n):
        if labels[i] is not None:
            same[i] |= np.array([labels[i] == l for l in labels])
    if n and all(f.embedding is not None for f in faces):
        e = np.asarray([f.embedding for f in faces], np.float32)
        d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
        same |= d < threshold
    return same


def pose_vector(f: FaceRecord) -> np.ndarray:
    return np.array([f.pose.yaw, f.pose.pitch, f.pose.roll], np.float64)


def make_pairs(faces: list[FaceRecord], cfg: PairsSection = PairsSection(), k_nearest: int = 5) -> list[PairRecord]:
    """Pick ``cfg.n`` pairs (default: one per face) of different identities.

    ``random``: any partner of another identity. ``pose``: partners within ``cfg.max_yaw_diff``
    degrees of yaw, drawn among the ``k_nearest`` by pose distance (yaw, pitch, roll), so similar
    head poses are preferred. Faces without an eligible partner are skipped. Each unordered pair is
    used once. Faces narrower than ``cfg.min_face_px`` in their photo (blurry when upsampled to the
    crop) are left out.
    """
    rng = np.random.default_rng(cfg.seed)
    faces = [f for f in faces if f.quality.face_px >= cfg.min_face_px]
    m = len(faces)
    if m < 2:
        return []
    same = same_identity_matrix(faces)
    poses = np.stack([pose_vector(f) for f in faces])
    dpose = np.sqrt(((poses[:, None] - poses[None]) ** 2).sum(-1))
    yawd = np.abs(poses[:, None, 0] - poses[None, :, 0])
    eligible = ~same
    if cfg.strategy == Strategy.pose:
        eligible &= yawd <= cfg.max_yaw_diff
    want = m if cfg.n is None else cfg.n
    order = rng.permutation(m)
    used: set[tuple[int, int]] = set()
    pairs: list[PairRecord] = []
    rounds = 0
    while len(pairs) < want and rounds < max(1, (want + m - 1) // m) + 2:
        rounds += 1
        for a in order:
            if len(pairs) >= want:
                break
            cand = [int(b) for b in np.flatnonzero(eligible[a]) if (min(a, b), max(a, b)) not in used]
            if not cand:
                continue
            if cfg.strategy == Strategy.pose:
                cand = sorted(cand, key=lambda b: (dpose[a, b], b))[:k_nearest]
            b = int(rng.choice(cand))
            used.add((min(a, b), max(a, b)))
            pairs.append(PairRecord(
                a=faces[a].id, b=faces[b].id, seed=cfg.seed,
                pose_delta={k: round(float(poses[b, i] - poses[a, i]), 2) for i, k in enumerate(("yaw", "pitch", "roll"))}))
    return pairs

