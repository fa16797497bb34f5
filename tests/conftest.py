"""Shared fixtures: the real faces in ../shared/data/faces (skip with a reason when absent)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

# `make test` runs the suite on two pytest-xdist workers: one torch thread each (two cores in all),
# set before any test imports torch; child processes (prep workers) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
FACES = Path(os.environ.get("RELIABLESWAP_FACES", ROOT.parent / "shared" / "data" / "faces"))


#: The longest test files (minutes of the suite, measured with ``--durations=0``) go first: `make
#: test` hands whole files to its two workers in collection order, and a long file handed out
#: last would leave one core idle while it runs.
LONGEST_FIRST = ("test_ray.py", "test_hostile.py", "test_nets.py", "test_triplets.py", "test_eval.py", "test_train.py",
                 "test_prep.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def pytest_sessionstart(session) -> None:
    """In CI (``CI=true``) the shared faces must be there: a run that skipped every real-face test
    would pass green while testing nothing."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and not (FACES / "MANIFEST.tsv").is_file():
        pytest.exit(f"CI=true but the shared face fixtures are missing: {FACES} (set RELIABLESWAP_FACES)", returncode=4)


def need_faces() -> Path:
    if not (FACES / "MANIFEST.tsv").is_file():
        pytest.skip(f"shared face fixtures not found at {FACES} (set RELIABLESWAP_FACES); outside CI the real-face tests skip")
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

    inputs = [p for p in sorted(faces_dir.iterdir()) if p.is_dir() and p.name not in ("video",)]
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp("prepped")
        return out, run_prep(inputs, out, PrepConfig(embed=True, landmarks=LandmarkBackend.mesh), workers=2)
    # under pytest-xdist the first worker to get here preps, the others wait and read its folder
    import json

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "prepped"
    with FileLock(str(shared) + ".lock"):
        done = shared / "prepped.summary.json"
        if not done.is_file():
            summary = run_prep(inputs, shared, PrepConfig(embed=True, landmarks=LandmarkBackend.mesh), workers=2)
            done.write_text(json.dumps(summary))
    return shared, json.loads(done.read_text())


@pytest.fixture(scope="session")
def dlib_models():
    from reliableswap.faces.detect import DlibDetector
    from reliableswap.faces.landmarks import DlibLandmarks

    return DlibDetector(), DlibLandmarks()
