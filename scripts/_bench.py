"""Helpers the benchmark scripts share (this folder is on ``sys.path`` when a script runs)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch


def sync() -> None:
    """Wait for queued CUDA work (a no-op without a GPU), so a timer measures the work itself."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best(fn: Callable[[], object], reps: int = 3, warmup: bool = False) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` in seconds (after one untimed call when
    ``warmup``), CUDA synchronized around each."""
    if warmup:
        fn()
    fastest = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        fastest = min(fastest, time.perf_counter() - t)
    return fastest


def dump_file(folder: Path, row: str) -> Path:
    """Where ``leak_ablation.py --dump folder`` keeps a row's per-fake figures (and
    ``fid_bootstrap.py`` finds them): the row's name, spaces and slashes as underscores, ``.npz``."""
    return Path(folder) / f"{row.replace(' ', '_').replace('/', '_')}.npz"
