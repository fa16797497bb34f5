"""Atomic writes (temp name + rename) and compact JSON lines (stdlib only)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from triplets.errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)

#: Largest small JSON file read whole (summary.json, latest.json, settings pins).
MAX_SUMMARY_BYTES = 16 << 20
#: Deepest nesting of arrays/objects a JSON record or a recipe may have.
MAX_DEPTH = 64


class UnreadableFile(UserError):
    """A file a command reads that is not what it should be; ``str(err)`` is one line naming it."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks (settings pins, pinned model files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_regular(path: str | os.PathLike, max_bytes: int | None = None):
    """``path`` opened for reading as a binary file object, refused (:class:`UnreadableFile`) unless
    it is a regular file (no FIFO, device or socket: nothing that blocks or never ends) of at most
    ``max_bytes``. Opened without blocking, then checked on the descriptor, so the check and the
    read are of one file. A missing file raises :class:`FileNotFoundError`."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UnreadableFile(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe" if stat.S_ISFIFO(st.st_mode) else "a device or special file"
            raise UnreadableFile(f"{path}: is {kind}, not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnreadableFile(f"{path}: {st.st_size} bytes is more than the {max_bytes} this file may have")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (see :func:`open_regular`)."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while read
        raise UnreadableFile(f"{os.fspath(path)}: more than {max_bytes} bytes")
    return data


def nesting_depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Depth of nested lists/dicts in ``obj`` (iterative; stops counting past ``limit + 1``)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = list(o.values())
        if isinstance(o, (list, tuple)):
            deepest = max(deepest, d)
            if d > limit:
                return d
            stack.extend((x, d + 1) for x in o if isinstance(x, (list, tuple, dict)))
    return deepest


#: A JSON string token, escapes included (only applied to text ``json.loads`` accepted).
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
#: Each byte's step in nesting depth: +1 for ``[`` and ``{``, −1 for ``]`` and ``}``, 0 otherwise.
_DEPTH_STEP = [0] * 256
_DEPTH_STEP[ord("[")] = _DEPTH_STEP[ord("{")] = 1
_DEPTH_STEP[ord("]")] = _DEPTH_STEP[ord("}")] = -1
_NOT_BRACKETS = bytes(b for b in range(256) if not _DEPTH_STEP[b])


def text_depth(text: str | bytes) -> int:
    """Depth of nested arrays/objects of valid JSON ``text`` (as :func:`nesting_depth` of its
    value), from its brackets outside strings: one pass in C over the bytes instead of a walk over
    every parsed value (a face record's mesh holds thousands)."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    if b'"' in data:
        data = _JSON_STRING.sub(b"", data)
    brackets = data.translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def loads_bounded(text: str | bytes, limit: int = MAX_DEPTH) -> Any:
    """``json.loads`` that refuses (:class:`ValueError`) nesting deeper than ``limit`` instead of
    overflowing the interpreter's stack."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {limit} levels") from None
    if text_depth(text) > limit:
        raise ValueError(f"nested deeper than {limit} levels")
    return obj


def read_json_file(path: str | os.PathLike, max_bytes: int = MAX_SUMMARY_BYTES) -> Any:
    """A small JSON file (a summary, a checkpoint pointer): bounded size and nesting, regular
    files only; :class:`UnreadableFile` naming the file otherwise (missing: FileNotFoundError)."""
    data = read_bounded(path, max_bytes)
    try:
        return loads_bounded(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UnreadableFile(f"{os.fspath(path)}: not valid JSON ({getattr(e, 'msg', e)})") from None


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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs. A zombie does not: a killed worker whose
    parent died stays one until something reaps it (for ever under a container init that does
    not), and it writes nothing more."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS): signal 0 is all there is
        return True
    return status[status.rindex(")") + 2:][:1] not in ("Z", "X")


def remove_dead_temps(folder: Path, pattern: str, owner: Callable[[str], int | None], keep_unowned: bool = False) -> int:
    """Remove the temp files/folders of ``folder`` (not below) matching ``pattern`` whose writing
    process (``owner`` of the name) is gone; a name without an owner is removed too unless
    ``keep_unowned``. Returns how many."""
    n = 0
    if not folder.is_dir():
        return 0
    for p in folder.glob(pattern):
        pid = owner(p.name)
        if (pid is None and keep_unowned) or (pid is not None and pid_alive(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


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
