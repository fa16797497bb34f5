"""Test and benchmark fixtures — not part of the library's API.

* :mod:`~reliableswap.testing.flame`: a synthetic model written in the exact FLAME file format
  (real FLAME files are licensed and never on this project's machines);
* :mod:`~reliableswap.testing.swappers`: tiny swappers for trying ``--swapper module:Class``.

Nothing under ``reliableswap`` outside this package imports it.
"""
from __future__ import annotations

import contextlib
import sys
import types
from typing import Iterator


@contextlib.contextmanager
def stub_modules(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    """Install ``modules`` in ``sys.modules`` for the duration, then restore what was there."""
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for k, m in saved.items():
            if m is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = m
