"""Shared fixtures: the real faces in ../shared/data/faces (skip with a reason when absent)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
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

from xdist_scheduling import pytest_xdist_make_scheduler  # noqa: E402,F401 — a hook: pytest finds it here


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


CLI = [sys.executable, "-m", "reliableswap.cli"]


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    """The CLI's entry point (``reliableswap.cli.main``, the one error boundary) run in this process
    with its stdout and stderr captured: the same code a user's process runs, without a second
    start-up of torch per call (seconds each). With ``timeout`` or ``env`` it runs in a child
    process instead (the tests that kill a run start their own)."""
    argv = [str(a) for a in args]
    if kw:
        return subprocess.run([*CLI, *argv], capture_output=True, text=True, **kw)
    from reliableswap import cli

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)  # SystemExit (typer's usage errors) is already its exit code
            except Exception:  # what `--debug` lets through: the interpreter prints it and exits 1
                traceback.print_exc()
                code = 1
    finally:
        cli.DEBUG["on"] = False
    return subprocess.CompletedProcess([*CLI, *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def cli():
    """``run_cli``: ``cli("pairs", folder, "--out", path)`` gives a CompletedProcess."""
    return run_cli


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


def _once(tmp_path_factory, name: str, make) -> Path:
    """The folder ``name`` made by ``make(folder)`` once per test session: under pytest-xdist the
    first worker to get here makes it, the others wait and read it (``name.done`` marks it whole)."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp()
    else:
        root = tmp_path_factory.getbasetemp().parent
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if not (root / f"{name}.done").is_file():
            make(folder)
            (root / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def prepped(faces_dir, tmp_path_factory):
    """``prep`` over every still image of the shared faces (videos excluded), 256 px FFHQ, with
    embeddings, identity labels from folders and the 468-point mesh. Returns ``(out_dir, summary)``."""
    from reliableswap.choices import LandmarkBackend
    from reliableswap.commands.prep import PrepConfig, run_prep

    inputs = [p for p in sorted(faces_dir.iterdir()) if p.is_dir() and p.name not in ("video",)]
    out = _once(tmp_path_factory, "prepped",
                lambda d: run_prep(inputs, d, PrepConfig(embed=True, landmarks=LandmarkBackend.mesh), workers=2))
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="session")
def sface_cache(prepped, tmp_path_factory):
    """``embeddings.jsonl``: the SFace descriptors of every prepped face, the cache that ``pairs``
    keeps beside its output, made once. ``copy_to(folder)`` puts it where a test writes its pairs
    file, so that ``pairs`` reads the descriptors instead of running SFace on every face again
    (tests/test_judge.py checks the computing path and the cache)."""
    from reliableswap.commands.pairs import run_pairs
    from reliableswap.recipes import PairsSection

    folder = _once(tmp_path_factory, "sface_cache", lambda d: run_pairs(prepped[0], d / "pairs.jsonl", PairsSection(n=1)))
    cache = folder / "embeddings.jsonl"

    def copy_to(dst: Path) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(cache, Path(dst) / cache.name))

    return copy_to


@pytest.fixture
def flush_denormals():
    """Random weights drive a deep network's activations into float32's subnormal range (below
    1.2e-38), where a CPU's arithmetic is several times slower; trained weights seldom go there.
    The tests of such networks flush subnormals to zero (LivePortrait's forward pass: 18.5 s →
    15.5 s on one thread): nothing they measure lies in that range."""
    import torch

    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def dlib_models():
    from reliableswap.faces.detect import DlibDetector
    from reliableswap.faces.landmarks import DlibLandmarks

    return DlibDetector(), DlibLandmarks()
