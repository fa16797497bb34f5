"""FLAME model files, read without chumpy and without running arbitrary pickles.

``generic_model.pkl`` (FLAME 2020, chumpy arrays inside) and ``flame2023.pkl`` (numpy arrays)
hold: v_template (5023, 3), f (9976, 3), shapedirs (5023, 3, 400: 300 shape + 100 expression),
posedirs (5023, 3, 36), J_regressor (5, 5023, scipy sparse), weights (5023, 5), kintree_table
(2, 5). They are Python-2 pickles, read with ``encoding="latin1"``.

:class:`RestrictedUnpickler` admits numpy's array reconstruction, scipy.sparse matrices, a
stand-in for chumpy's ``Ch`` (its array is kept) and a handful of harmless builtins; any other
global (``os.system``, ``subprocess``, ``builtins.eval``…) raises :class:`UnsafePickleError`.

Landmark embeddings:
- DECA-style ``landmark_embedding.npy`` (a pickled dict in an .npy): static 51 points
  (``static_lmk_faces_idx``, ``static_lmk_bary_coords``), a dynamic contour table of 79 yaw bins ×
  17 points (``dynamic_lmk_faces_idx``, ``dynamic_lmk_bary_coords``) and optionally ``full_lmk_*`` (68);
- RingNet-style ``flame_static_embedding.pkl`` (``lmk_face_idx``, ``lmk_b_coords``) +
  ``flame_dynamic_embedding.npy`` (``lmk_face_idx``, ``lmk_b_coords``: 79 × 17).

Yaw convention for the contour table (see :func:`contour_bin`): we follow DECA/EMOCA/SMIRK —
the bin is chosen from the head's y-rotation angle as it comes out of ``rot_mat_to_euler``;
FLAME_PyTorch and smplx negate that angle first. ``LandmarkEmbedding.yaw_sign`` (+1 DECA,
−1 smplx) selects either.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triplets.jsonl import UnreadableFile, read_bounded
from reliableswap.errors import UserError

ENV_VAR = "RELIABLESWAP_FLAME"


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """The file asks for a global this loader does not admit."""


#: Largest FLAME model or embedding file read (FLAME 2020/2023 pickles are 50-100 MB).
MAX_MODEL_BYTES = 1 << 30


class FlameFileError(UserError):
    """The file is not a usable FLAME model or embedding."""


class ChStandIn:
    """Stand-in for ``chumpy.ch.Ch``: keeps the wrapped array (state key ``x``), nothing else."""

    def __init__(self, *args, **kwargs):
        self.x = np.asarray(args[0]) if args else None

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.x = state.get("x", state.get("_x"))
        elif isinstance(state, tuple) and state and isinstance(state[-1], dict):
            self.x = state[-1].get("x")

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self.x)
        return arr.astype(dtype) if dtype is not None else arr


_SAFE_BUILTINS = {"object", "set", "frozenset", "slice", "complex", "list", "dict", "tuple", "int", "float", "bool", "bytearray"}
_SPARSE = {"csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array"}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what FLAME/embedding pickles need (see the module doc)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            from numpy._core import multiarray  # numpy >= 2

            return getattr(multiarray, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            from numpy._core import numeric

            return numeric._frombuffer
        if module.startswith("numpy") and name == "dtype":
            return np.dtype
        if module.startswith("scipy.sparse") and name in _SPARSE:
            import scipy.sparse

            return getattr(scipy.sparse, name)
        if module.startswith("chumpy") and name in ("Ch", "Select", "Reorder"):
            return ChStandIn
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            import copyreg

            return copyreg._reconstructor
        if module == "_codecs" and name == "encode":  # how Python 3 writes bytes at protocol 2
            import codecs

            return codecs.encode
        if module in ("__builtin__", "builtins") and name in _SAFE_BUILTINS:
            import builtins

            return getattr(builtins, name)
        raise UnsafePickleError(f"refusing to load global {module}.{name}: not numpy, scipy.sparse or chumpy data")


def safe_load(data: bytes) -> Any:
    """Unpickle ``data`` (latin1 for Python-2 pickles) with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _arr(x: Any, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "toarray") and not isinstance(x, np.ndarray):
        x = x.toarray()
    return np.asarray(np.asarray(x), dtype=dtype)


def resolve_flame_path(path: str | os.PathLike | None) -> Path:
    """``path`` or ``$RELIABLESWAP_FLAME``; a clear error when neither names a file."""
    p = path or os.environ.get(ENV_VAR)
    if not p:
        raise FlameFileError(
            f"no FLAME model given: pass --flame PATH or set {ENV_VAR} (FLAME is licensed: register at "
            "https://flame.is.tue.mpg.de and run scripts/fetch_flame.sh)"
        )
    path = Path(p)
    if not path.is_file():
        raise FlameFileError(f"FLAME model file not found: {path}")
    return path


@dataclass
class FlameModel:
    """FLAME arrays as float64 numpy (see the module doc for shapes)."""

    v_template: np.ndarray
    faces: np.ndarray
    shapedirs: np.ndarray
    posedirs: np.ndarray
    J_regressor: np.ndarray
    weights: np.ndarray
    parents: np.ndarray

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "FlameModel":
        path = resolve_flame_path(path)
        d = safe_load(_read_model_file(path))
        if not isinstance(d, dict):
            raise FlameFileError(f"{path}: not a FLAME model (a dict was expected, got {type(d).__name__})")
        need = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
        missing = [k for k in need if k not in d]
        if missing:
            raise FlameFileError(f"{path}: not a FLAME model, missing {', '.join(missing)}")
        m = cls(
            v_template=_arr(d["v_template"]), faces=_arr(d["f"], np.int64), shapedirs=_arr(d["shapedirs"]),
            posedirs=_arr(d["posedirs"]), J_regressor=_arr(d["J_regressor"]), weights=_arr(d["weights"]),
            parents=_arr(d["kintree_table"], np.int64)[0].copy(),
        )
        m.parents[0] = -1
        v = m.v_template.shape[0]
        if m.shapedirs.shape[:2] != (v, 3) or m.posedirs.shape[:2] != (v, 3) or m.J_regressor.shape[1] != v:
            raise FlameFileError(f"{path}: inconsistent array shapes")
        return m

    @property
    def n_joints(self) -> int:
        return self.J_regressor.shape[0]


@dataclass
class LandmarkEmbedding:
    """Barycentric landmark embedding: static points, and a yaw-indexed contour table.

    ``static_faces`` (S,), ``static_bary`` (S, 3); ``dynamic_faces`` (79, 17), ``dynamic_bary``
    (79, 17, 3) or None; ``full_faces``/``full_bary`` (68,) when the file has them.
    """

    static_faces: np.ndarray
    static_bary: np.ndarray
    dynamic_faces: np.ndarray | None = None
    dynamic_bary: np.ndarray | None = None
    full_faces: np.ndarray | None = None
    full_bary: np.ndarray | None = None
    yaw_sign: int = 1

    @classmethod
    def load_deca(cls, path: str | os.PathLike, yaw_sign: int = 1) -> "LandmarkEmbedding":
        """DECA's ``landmark_embedding.npy`` (a pickled dict inside an .npy)."""
        d = _load_npy_dict(Path(path))
        try:
            e = cls(
                static_faces=_arr(d["static_lmk_faces_idx"], np.int64), static_bary=_arr(d["static_lmk_bary_coords"]),
                dynamic_faces=_arr(d["dynamic_lmk_faces_idx"], np.int64), dynamic_bary=_arr(d["dynamic_lmk_bary_coords"]),
                yaw_sign=yaw_sign,
            )
        except KeyError as k:
            raise FlameFileError(f"{path}: not a DECA landmark embedding (no {k})") from None
        if "full_lmk_faces_idx" in d:
            e.full_faces = _arr(d["full_lmk_faces_idx"], np.int64).reshape(-1)
            e.full_bary = _arr(d["full_lmk_bary_coords"]).reshape(-1, 3)
        return e

    @classmethod
    def load_ringnet(cls, static_pkl: str | os.PathLike, dynamic_npy: str | os.PathLike | None = None,
                     yaw_sign: int = -1) -> "LandmarkEmbedding":
        """RingNet/FLAME_PyTorch ``flame_static_embedding.pkl`` (+ ``flame_dynamic_embedding.npy``).
        Their own code negates yaw, hence ``yaw_sign=-1`` by default."""
        s = safe_load(_read_model_file(Path(static_pkl)))
        e = cls(static_faces=_arr(s["lmk_face_idx"], np.int64), static_bary=_arr(s["lmk_b_coords"]), yaw_sign=yaw_sign)
        if dynamic_npy is not None:
            d = _load_npy_dict(Path(dynamic_npy))
            e.dynamic_faces = _arr(d["lmk_face_idx"], np.int64)
            e.dynamic_bary = _arr(d["lmk_b_coords"])
        return e


def _read_model_file(path: Path) -> bytes:
    """A FLAME-format file's bytes: a regular file of bounded size, or :class:`FlameFileError`."""
    try:
        return read_bounded(path, MAX_MODEL_BYTES)
    except UnreadableFile as e:
        raise FlameFileError(str(e)) from None


def _load_npy_dict(path: Path) -> dict:
    """Read an .npy holding a pickled dict, through the restricted unpickler."""
    raw = _read_model_file(path)
    if not raw.startswith(b"\x93NUMPY"):
        raise FlameFileError(f"{path}: not an .npy file")
    major = raw[6]
    hlen = int.from_bytes(raw[8:10], "little") if major == 1 else int.from_bytes(raw[8:12], "little")
    start = (10 if major == 1 else 12) + hlen
    obj = safe_load(raw[start:])
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        obj = obj[()]
    if not isinstance(obj, dict):
        raise FlameFileError(f"{path}: expected a pickled dict")
    return obj


def contour_bin(yaw_deg: torch.Tensor, yaw_sign: int = 1) -> torch.Tensor:
    """Row of the 79-row contour table for each head yaw (degrees; B → B long).

    Angle a = round(clamp(yaw_sign · yaw, max=39)); a ≥ 0 → row a; −39 ≤ a < 0 → row 39 − a;
    a < −39 → row 78 (the table's layout in DECA and FLAME_PyTorch).
    """
    a = torch.round(torch.clamp(yaw_sign * yaw_deg, max=39.0)).long()
    return torch.where(a >= 0, a, torch.where(a < -39, torch.full_like(a, 78), 39 - a))


def to_torch(arr: np.ndarray, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(arr), dtype=dtype, device=device)
