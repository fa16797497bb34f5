"""Atomic writes (temp name + rename) and compact JSON lines (stdlib only)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A reader (or a re-run after ``kill -9``) sees either the old file, no file, or the whole new
    file: never a partial one. Temp names are ``.{name[:120]}.{pid}.{random}.tmp`` (see :func:`temp_owner`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:120]}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a temp folder beside ``path``, then rename it to ``path`` (replacing a folder a killed
    run left there): a reader never sees a half-filled folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name[:120]}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temp_owner(name: str) -> int | None:
    """The process id in a temp name made by :func:`atomic_write_bytes` / :func:`atomic_dir`."""
    parts = name.split(".")
    if len(parts) >= 4 and name.startswith(".") and parts[-1] == "tmp" and parts[-3].isdigit():
        return int(parts[-3])
    return None


def dumps(record: Any) -> str:
    """One compact JSON line (no trailing newline)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Pretty JSON (``summary.json``, resolved recipes), written atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """Write one JSON record a line, atomically."""
    text = "".join(dumps(r) + "\n" for r in records)
    return atomic_write_bytes(path, text.encode("utf-8"))
