"""WebDataset-style tar shards: samples grouped by key (``000123.source.jpg``, ``000123.json``).

Written with the standard library's tarfile (no webdataset dependency); the ``webdataset``
package reads these shards as they are.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Iterator

from triplets.jsonl import atomic_write_bytes


def write_shard(path: str | Path, samples: list[dict[str, bytes]]) -> Path:
    """Write one shard atomically. Each sample maps ``"__key__"`` to its key and extensions
    (``"source.jpg"``, ``"json"``…) to bytes."""
    buf = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            key = s["__key__"].decode() if isinstance(s["__key__"], bytes) else s["__key__"]
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), now, 0o644
                tar.addfile(info, io.BytesIO(data))
    return atomic_write_bytes(path, buf.getvalue())


def iter_shard(path: str | Path) -> Iterator[dict[str, bytes]]:
    """Yield samples of one shard as ``{"__key__": key, ext: bytes, ...}``, in order."""
    cur: dict[str, bytes] | None = None
    with tarfile.open(path, "r") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if cur is None or cur["__key__"] != key:
                if cur is not None:
                    yield cur
                cur = {"__key__": key}
            cur[ext] = tar.extractfile(m).read()
    if cur is not None:
        yield cur


def sample_meta(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"]) if "json" in sample else {}
