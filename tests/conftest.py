"""Shared fixtures: the real faces in ../shared/data/faces (skip with a reason when absent)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACES = Path(os.environ.get("RELIABLESWAP_FACES", ROOT.parent / "shared" / "data" / "faces"))


def need_faces() -> Path:
    if not (FACES / "MANIFEST.tsv").is_file():
        pytest.skip(f"shared face fixtures not found at {FACES} (set RELIABLESWAP_FACES)")
    return FACES


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    return need_faces()


@pytest.fixture(scope="session")
def manifest(faces_dir) -> list[dict]:
    with open(faces_dir / "MANIFEST.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="session")
def prepped(faces_dir, tmp_path_factory):
    """``prep`` over every still image of the shared faces (videos excluded), 256 px FFHQ, with
    embeddings, identity labels from folders and the 468-point mesh. Returns ``(out_dir, summary)``."""
    from reliableswap.choices import LandmarkBackend
    from reliableswap.commands.prep import PrepConfig, run_prep

    out = tmp_path_factory.mktemp("prepped")
    inputs = [p for p in sorted(faces_dir.iterdir()) if p.is_dir() and p.name not in ("video",)]
    summary = run_prep(inputs, out, PrepConfig(embed=True, landmarks=LandmarkBackend.mesh), workers=2)
    return out, summary


@pytest.fixture(scope="session")
def dlib_models():
    from reliableswap.faces.detect import DlibDetector
    from reliableswap.faces.landmarks import DlibLandmarks

    return DlibDetector(), DlibLandmarks()
