"""JSON lines and atomic writes (stdlib only)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from triplets.schema import check_record


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A reader (or a re-run after ``kill -9``) sees either the old file, no file, or the whole new
    file: never a partial one. Leftover temp files start with ``.`` and end with ``.tmp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def read_jsonl(path: str | os.PathLike, schema: str | None = None) -> Iterator[dict]:
    """Yield the records of a JSON-lines file; check each against ``schema`` when given.

    Blank lines are skipped. A malformed line raises ``ValueError`` naming file and line number.
    """
    path = Path(path)
    with path.open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if schema is not None:
                check_record(rec, schema)
            yield rec
