"""Pairing faces for triplets: random or pose-aware, never one identity with itself.

Two faces are the same identity when both carry the same ``identity`` label, or, when every face
has an embedding, when the identity judge says so: SFace embeddings at a cosine of at least
0.363, dlib descriptors at a distance below 0.6 (dlib's threshold). Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np

from reliableswap.choices import Strategy
from reliableswap.faces.embed import SAME_PERSON_DISTANCE
from reliableswap.judge import SFACE_SAME_COSINE
from reliableswap.recipes import PairsSection
from triplets.records import PairRecord
from reliableswap.contracts import FaceRecord


#: Rows of the pair-eligibility matrix computed at once (memory: a few × BLOCK × N values).
BLOCK = 256


class Eligibility:
    """Who may be paired with whom, a block of rows at a time (never the N×N matrix: 10 000 faces
    would need gigabytes). Two faces are the same identity when both carry the same ``identity``
    label, or, when every face has a dlib embedding, when their descriptor distance is below
    ``threshold``; ``max_yaw`` (degrees, or None) bounds the yaw difference."""

    def __init__(self, faces: list[FaceRecord], threshold: float = SAME_PERSON_DISTANCE, max_yaw: float | None = None,
                 judge: str = "dlib"):
        self.n, self.max_yaw, self.cosine = len(faces), max_yaw, judge == "sface"
        self.threshold = SFACE_SAME_COSINE if self.cosine else threshold
        names: dict[str, int] = {}
        self.codes = np.array([-1 if f.identity is None else names.setdefault(f.identity, len(names)) for f in faces], np.int64)
        self.emb = (np.asarray([f.embedding for f in faces], np.float64)
                    if self.n and all(f.embedding is not None for f in faces) else None)
        self.sq = (self.emb ** 2).sum(1) if self.emb is not None else None
        self.poses = np.stack([pose_vector(f) for f in faces]) if self.n else np.zeros((0, 3))

    def same(self, rows: np.ndarray) -> np.ndarray:
        """len(rows)×N bool: True where two faces are (or may be) the same person (a face itself too)."""
        same = rows[:, None] == np.arange(self.n)[None]
        c = self.codes[rows]
        same |= (c[:, None] >= 0) & (c[:, None] == self.codes[None])
        if self.emb is not None and self.cosine:  # SFace: cosine similarity
            same |= (self.emb[rows] @ self.emb.T) / np.sqrt(self.sq[rows, None] * self.sq[None]).clip(1e-12) >= self.threshold
        elif self.emb is not None:
            d2 = self.sq[rows, None] + self.sq[None] - 2.0 * self.emb[rows] @ self.emb.T
            same |= np.sqrt(np.maximum(d2, 0.0)) < self.threshold
        return same

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(eligible len(rows)×N bool, pose distance len(rows)×N) for the faces ``rows``."""
        diff = self.poses[rows, None] - self.poses[None]
        eligible = ~self.same(rows)
        if self.max_yaw is not None:
            eligible &= np.abs(diff[..., 0]) <= self.max_yaw
        return eligible, np.sqrt((diff ** 2).sum(-1))


def same_identity_matrix(faces: list[FaceRecord], threshold: float = SAME_PERSON_DISTANCE) -> np.ndarray:
    """N×N bool: True where two faces are (or may be) the same person; the diagonal is True
    (for small sets and tests: :class:`Eligibility` gives it a block of rows at a time)."""
    return Eligibility(faces, threshold).same(np.arange(len(faces)))


def pose_vector(f: FaceRecord) -> np.ndarray:
    return np.array([f.pose.yaw, f.pose.pitch, f.pose.roll], np.float64)


def make_pairs(faces: list[FaceRecord], cfg: PairsSection = PairsSection(), k_nearest: int = 5, judge: str = "dlib") -> list[PairRecord]:
    """Pick ``cfg.n`` pairs (default: one per face) of different identities (``judge``: whose
    embeddings the faces' ``embedding`` holds, ``dlib`` or ``sface``).

    ``random``: any partner of another identity. ``pose``: partners within ``cfg.max_yaw_diff``
    degrees of yaw, drawn among the ``k_nearest`` by pose distance (yaw, pitch, roll), so similar
    head poses are preferred. Faces without an eligible partner are skipped. Each unordered pair is
    used once, so at most N(N−1)/2 pairs come out however many are asked for; a round over the
    faces that finds no new pair ends the search. Faces narrower than ``cfg.min_face_px`` in their
    photo (blurry when upsampled to the crop) are left out. Memory grows with N, not N².
    """
    rng = np.random.default_rng(cfg.seed)
    faces = [f for f in faces if f.quality.face_px >= cfg.min_face_px]
    m = len(faces)
    if m < 2:
        return []
    elig = Eligibility(faces, max_yaw=cfg.max_yaw_diff if cfg.strategy == Strategy.pose else None, judge=judge)
    want = min(m if cfg.n is None else cfg.n, m * (m - 1) // 2)
    order = rng.permutation(m)
    used: set[tuple[int, int]] = set()
    pairs: list[PairRecord] = []
    rounds = 0
    while len(pairs) < want and rounds < max(1, (want + m - 1) // m) + 2:
        rounds += 1
        before = len(pairs)
        for start in range(0, m, BLOCK):
            if len(pairs) >= want:
                break
            block = order[start:start + BLOCK]
            eligible, dpose = elig.rows(block)
            for r, a in enumerate(block):
                if len(pairs) >= want:
                    break
                cand = [int(b) for b in np.flatnonzero(eligible[r]) if (min(a, b), max(a, b)) not in used]
                if not cand:
                    continue
                if cfg.strategy == Strategy.pose:
                    cand = sorted(cand, key=lambda b: (dpose[r, b], b))[:k_nearest]
                b = int(rng.choice(cand))
                used.add((min(a, b), max(a, b)))
                pairs.append(PairRecord(
                    a=faces[a].id, b=faces[b].id, seed=cfg.seed,
                    pose_delta={k: round(float(elig.poses[b, i] - elig.poses[a, i]), 2) for i, k in enumerate(("yaw", "pitch", "roll"))}))
        if len(pairs) == before:
            break
    return pairs
