"""A synthetic model written in the exact FLAME file format, for tests and benchmarks.

Real FLAME files are licensed and never available to this project's machines. This writes a
random but plausible stand-in with FLAME's keys, array shapes and dtypes (5023 vertices, 9976
faces, 400 shape+expression directions, 36 pose correctives, a scipy-sparse 5×5023 joint
regressor, 5 joints with FLAME's kinematic tree), either chumpy-style (``generic_model.pkl``,
arrays wrapped in pickled ``chumpy.ch.Ch`` objects) or numpy-only (``flame2023.pkl``), plus a
DECA-style ``landmark_embedding.npy`` and RingNet-style static/dynamic embeddings.

The surface is a face-like height field (a bump with a nose, brows and a chin) in metres, y up,
z toward the camera; the 68 landmarks sit at OpenFace mean-face positions on it.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path

import numpy as np
import scipy.sparse

from reliableswap.faces.pose import MEAN_FACE_68
from reliableswap.testing import stub_modules

N_VERTS, N_FACES = 5023, 9976
ROWS, COLS = 51, 98  # 4998 grid vertices, 2·50·97 = 9700 triangles


def _surface(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Face-like height field over u, v ∈ [−1, 1] → (…, 3) metres."""
    x, y = 0.085 * u, 0.11 * v
    z = 0.055 * np.sqrt(np.clip(1 - 0.75 * u**2 - 0.6 * v**2, 0, None))
    z += 0.02 * np.exp(-((u / 0.18) ** 2 + ((v - 0.05) / 0.35) ** 2))  # nose
    z -= 0.004 * np.exp(-(((np.abs(u) - 0.38) / 0.2) ** 2 + ((v - 0.3) / 0.12) ** 2))  # eye sockets
    return np.stack([x, y, z], -1)


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, v = np.meshgrid(np.linspace(-1, 1, COLS), np.linspace(1, -1, ROWS))
    uv = np.stack([u, v], -1).reshape(-1, 2)
    faces = []
    for r in range(ROWS - 1):
        for c in range(COLS - 1):
            a, b, d, e = r * COLS + c, r * COLS + c + 1, (r + 1) * COLS + c, (r + 1) * COLS + c + 1
            faces += [(a, d, b), (b, d, e)]  # counter-clockwise seen from +z
    return uv, np.asarray(faces, np.int64), _surface(uv[:, 0], uv[:, 1])


def _face_at(uv: np.ndarray, faces: np.ndarray, p: np.ndarray) -> tuple[int, np.ndarray]:
    """Triangle of the grid containing (u, v) ``p`` and its barycentric weights."""
    c = int(np.clip(np.floor((p[0] + 1) / 2 * (COLS - 1)), 0, COLS - 2))
    r = int(np.clip(np.floor((1 - p[1]) / 2 * (ROWS - 1)), 0, ROWS - 2))
    for k in (0, 1):
        fi = 2 * (r * (COLS - 1) + c) + k
        a, b, d = uv[faces[fi]]
        m = np.array([[b[0] - a[0], d[0] - a[0]], [b[1] - a[1], d[1] - a[1]]])
        l1, l2 = np.linalg.solve(m, p - a)
        w = np.array([1 - l1 - l2, l1, l2])
        if (w >= -1e-9).all() or k == 1:
            return fi, np.clip(w, 0, 1) / np.clip(w, 0, 1).sum()
    raise AssertionError


def landmark_uv() -> np.ndarray:
    """68 (u, v) positions: the OpenFace mean face scaled onto the surface."""
    m = MEAN_FACE_68.numpy()[:, :2]
    return np.stack([m[:, 0] / 95.0, -(m[:, 1] - 5.0) / 100.0], -1)


def make_model(seed: int = 0) -> dict:
    """FLAME-format dict with numpy arrays (float64 like the released files)."""
    rng = np.random.default_rng(seed)
    uv, faces, verts = _grid()
    extra = N_VERTS - len(verts)
    eyes = np.array([[-0.032, 0.033, 0.045], [0.032, 0.033, 0.045]])
    eye_pts = np.concatenate([eyes[i] + 0.004 * rng.standard_normal((extra // 2 + (i < extra % 2), 3)) for i in range(2)])
    v_template = np.concatenate([verts, eye_pts])
    faces = np.concatenate([faces, faces[: N_FACES - len(faces)]]).astype(np.uint32)  # pad to 9976 (repeats)
    u, v = np.concatenate([uv, np.zeros((extra, 2))]).T

    def smooth_dirs(n: int, amp: float, weight: np.ndarray) -> np.ndarray:
        basis = np.stack([np.ones_like(u), u, v, u * v, u**2, v**2, u**2 * v, u * v**2, u**3, v**3], -1)
        coef = rng.standard_normal((basis.shape[1], 3, n)) * amp / np.sqrt(basis.shape[1])
        return np.einsum("vb,bcn->vcn", basis, coef) * weight[:, None, None]

    mouth = np.exp(-((u / 0.5) ** 2 + ((v + 0.45) / 0.3) ** 2))
    shapedirs = np.concatenate([smooth_dirs(300, 0.004, np.ones_like(u)) / np.sqrt(1 + np.arange(300) / 10),
                                smooth_dirs(100, 0.003, mouth) / np.sqrt(1 + np.arange(100) / 10)], -1)
    posedirs = rng.standard_normal((N_VERTS, 3, 36)) * 2e-4
    # joints: root (head centre), neck (below), jaw (behind the chin), eyes
    targets = np.array([[0, 0, -0.02], [0, -0.09, -0.03], [0, -0.04, -0.01], eyes[0], eyes[1]])
    rows, cols, vals = [], [], []
    for j, t in enumerate(targets):
        near = np.argsort(np.linalg.norm(v_template - t, axis=1))[:12]
        w = rng.random(12) + 0.5
        rows += [j] * 12
        cols += near.tolist()
        vals += (w / w.sum()).tolist()
    j_reg = scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(5, N_VERTS))
    weights = np.zeros((N_VERTS, 5))
    jaw = 1 / (1 + np.exp((v + 0.25) / 0.08)) * (np.abs(u) < 0.9)
    neck = 1 / (1 + np.exp((v + 0.85) / 0.05))
    weights[:, 2] = jaw * (1 - neck)
    weights[:, 1] = neck
    weights[:, 0] = 1 - weights[:, 1] - weights[:, 2]
    weights[len(verts):] = 0
    weights[len(verts):len(verts) + extra // 2 + extra % 2, 3] = 1
    weights[len(verts) + extra // 2 + extra % 2:, 4] = 1
    kintree = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64)
    return {"v_template": v_template, "f": faces, "shapedirs": shapedirs, "posedirs": posedirs,
            "J_regressor": j_reg, "weights": weights, "kintree_table": kintree, "bs_style": "lbs", "bs_type": "lrotmin"}


def make_embedding() -> dict:
    """DECA-style embedding dict: 51 static points, a 79×17 contour table (the contour slides
    toward the far side of the face as |yaw| grows), and the full 68."""
    uv, faces, _ = _grid()
    lm = landmark_uv()
    st = [_face_at(uv, faces, p) for p in lm[17:]]
    dyn_f, dyn_b = np.zeros((79, 17), np.int64), np.zeros((79, 17, 3))
    for row in range(79):
        a = row if row <= 39 else -(row - 39)
        shift = np.array([np.sign(a) * 0.004 * abs(a) ** 0.5, 0.0])
        for k, p in enumerate(lm[:17]):
            fi, w = _face_at(uv, faces, np.clip(p + shift * (1 - abs(p[0])), -0.999, 0.999))
            dyn_f[row, k], dyn_b[row, k] = fi, w
    full = [_face_at(uv, faces, p) for p in lm]
    return {
        "static_lmk_faces_idx": np.array([f for f, _ in st], np.int64),
        "static_lmk_bary_coords": np.array([w for _, w in st]),
        "dynamic_lmk_faces_idx": dyn_f, "dynamic_lmk_bary_coords": dyn_b,
        "full_lmk_faces_idx": np.array([[f for f, _ in full]], np.int64),
        "full_lmk_bary_coords": np.array([[w for _, w in full]]),
    }


class _Ch:
    """Pickles as ``chumpy.ch.Ch`` with its array in state ``x``, like the 2020 release."""

    def __init__(self, x):
        self.x = x


def _chumpy_module() -> types.ModuleType:
    mod = types.ModuleType("chumpy.ch")
    _Ch.__module__, _Ch.__qualname__ = "chumpy.ch", "Ch"
    mod.Ch = _Ch
    return mod


def write_model(path: str | Path, seed: int = 0, chumpy: bool = True) -> Path:
    """Write the synthetic model (protocol 2, like the released pickles)."""
    d = make_model(seed)
    path = Path(path)
    if chumpy:
        with stub_modules({"chumpy": types.ModuleType("chumpy"), "chumpy.ch": _chumpy_module()}):
            for k in ("v_template", "shapedirs", "posedirs", "weights"):
                d[k] = _Ch(d[k])
            path.write_bytes(pickle.dumps(d, protocol=2))
    else:
        path.write_bytes(pickle.dumps(d, protocol=2))
    return path


def write_embeddings(folder: str | Path) -> dict[str, Path]:
    """DECA ``landmark_embedding.npy`` and RingNet ``flame_static_embedding.pkl`` +
    ``flame_dynamic_embedding.npy`` (same points)."""
    folder = Path(folder)
    e = make_embedding()
    deca = folder / "landmark_embedding.npy"
    np.save(deca, np.array(e, dtype=object), allow_pickle=True)
    stat = folder / "flame_static_embedding.pkl"
    stat.write_bytes(pickle.dumps({"lmk_face_idx": e["static_lmk_faces_idx"].astype(np.uint32),
                                   "lmk_b_coords": e["static_lmk_bary_coords"]}, protocol=2))
    dyn = folder / "flame_dynamic_embedding.npy"
    np.save(dyn, np.array({"lmk_face_idx": list(e["dynamic_lmk_faces_idx"]), "lmk_b_coords": list(e["dynamic_lmk_bary_coords"])}, dtype=object), allow_pickle=True)
    return {"deca": deca, "static": stat, "dynamic": dyn}
