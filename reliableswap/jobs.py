"""The resumable-job layer every command runs in.

A :class:`Job` owns what all commands share:

* **settings pin** — the settings that change the outputs are stored in ``OUT/.{command}/settings.json``;
  a folder holding a run made with other settings is refused (resuming it would mix two runs);
* **stale temps** — temp files and folders left by killed processes (``.{name}.{pid}.{rand}.tmp``,
  see :mod:`triplets.jsonl`) are removed at start; temps of live processes (another shard) are kept;
* **per-unit records** — a unit of work (an input file, a chunk of pairs, a batch of faces, a pair)
  writes its outputs atomically, then its record ``.{command}/units/{key}.json``; a re-run skips
  units whose record exists, so a run killed at any point resumes and ends with the same files;
* **stage timers, rich progress**, and **one summary schema** (:class:`reliableswap.contracts.Summary`,
  ``reliableswap.summary/2``)::

      {"schema", "command", "version", "device", "settings",
       "counts": {"in", "written", "written_this_run", "skipped", "rejected", "rejected_by_reason"},
       "timings": {"wall_s", "stages_s": {stage: seconds}},
       "throughput": {"unit", "per_s"},          # written_this_run / wall_s
       "details": {...}}                          # the command's own figures

A command that writes beside another's outputs (``fit`` in a prep folder, ``pairs`` beside its
pairs file) is ``shared``: its files are prefixed (``fit.summary.json``, ``fit.rejects.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from reliableswap import __version__
from triplets.jsonl import atomic_write_json, pid_alive, read_json_file, remove_dead_temps, temp_owner  # noqa: F401 (pid_alive: re-exported)
from triplets.records import RejectRecord
from reliableswap.contracts import Summary
from reliableswap.errors import NothingUsable, UserError  # noqa: F401 (NothingUsable: re-exported)


class SettingsMismatch(UserError):
    """The output folder holds a run made with other settings."""


class FolderBusy(UserError):
    """Another run of the same command is writing into the folder (its lock names it)."""


class OutputError(UserError, OSError):
    """An output could not be written (disk full, no permission…): the run stops with this message,
    and nothing is recorded against the input, so a re-run after the cause is fixed completes."""


def reason_key(reason: str) -> str:
    """Group reject reasons for summaries: drop details in parentheses and after a colon."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


def remove_stale_temps(folder: Path) -> int:
    """Remove temp files/folders in ``folder`` (not below) whose writing process is gone."""
    return remove_dead_temps(folder, ".*.tmp", temp_owner)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failure to write ``path`` (disk full, no permission…) into :class:`OutputError`."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e


def unit_record_path(out: Path, command: str, key: str) -> Path:
    """Where a unit's record lives (workers in other processes write it there)."""
    return Path(out) / f".{command}" / "units" / f"{key}.json"


def take_lock(out: Path, name: str, command: str) -> FileLock:
    """The advisory lock ``out/.{name}.lock``, taken at once, or :class:`FolderBusy` naming its holder.
    (A command that must change a folder before its :class:`Job` starts, such as ``finetune
    --overwrite``, takes it first and releases it to its Job.)"""
    lock = FileLock(out / f".{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            h = read_json_file(out / f".{name}.lock.json")
            who = f"pid {h['pid']} on {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "holder unknown"
        raise FolderBusy(f"{out} is being written by another {command} run ({who}): "
                         "wait for it to end, or use another --out") from None
    return lock


class Job:
    """One run of ``command`` writing into ``out`` (see the module doc).

    Args:
        command: the command's name (``prep``, ``triplets``…).
        out: output folder (created).
        settings: JSON-able settings that change the outputs (pinned when ``resumable``).
        unit: what throughput counts (``faces``, ``triplets``…).
        shared: a prefix for this command's files (``fit`` → ``fit.summary.json``) when it writes into
            another's folder.
        resumable: keep ``.{command}/`` (settings pin, unit records).
        temp_dirs: sub-folders (glob patterns) of ``out`` that atomic writes use, cleaned of stale temps too.
        device: shown in the summary.
        progress: show a rich progress bar on stderr.
        lock: the name of this writer's advisory lock in ``out`` (default: the command); two runs
            holding the same name at once are refused (:class:`FolderBusy`, naming the holder).
            Shards of one run take one name each; ``False``: no lock (a helper process).

    A worker of another engine (a Ray actor) joins the driver's run with :meth:`attach`: it writes
    outputs and unit records, and takes no lock, pins nothing and cleans nothing (on another node,
    pids tell nothing about whose temps are live).
    """

    def __init__(self, command: str, out: str | os.PathLike, settings: dict[str, Any], unit: str, *,
                 shared: str | None = None, resumable: bool = True, temp_dirs: tuple[str, ...] = (),
                 device: str | None = None, progress: bool = False, lock: str | bool = True, _attached: bool = False):
        self.command, self.out, self.settings, self.unit = command, Path(out), settings, unit
        self.shared, self.resumable, self.device, self._attached = shared, resumable, device, _attached
        if not _attached:
            self._refuse_others_summary()
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = self.out / f".{command}"
        self.stages: Counter = Counter()
        self._stage_lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._bar: Progress | None = None
        self._task = None
        self._show = progress
        self.temp_dirs = temp_dirs
        self._lock = self._take_lock(command if lock is True else lock) if lock else None
        if _attached:
            return
        try:
            self.clean_temps()
            if resumable:
                self._pin(settings)
        except BaseException:  # a refused pin (or a failed cleanup) must not leave the folder locked
            self.release()
            raise

    @classmethod
    def attach(cls, command: str, out: str | os.PathLike, unit: str, device: str | None = None) -> "Job":
        """A worker's view of a run that a driver owns (see the class doc)."""
        return cls(command, out, {}, unit, resumable=False, device=device, lock=False, _attached=True)

    def clean_temps(self) -> int:
        """Remove temps of dead writers in ``out``, the ``temp_dirs`` and the unit records' folder
        (at start, and after an engine's killed attempts)."""
        n = 0
        for pattern in ("", *self.temp_dirs):
            for d in ([self.out] if not pattern else self.out.glob(pattern)):
                n += remove_stale_temps(d)
        if self.resumable:
            n += remove_stale_temps(self.state / "units")
        return n

    def _refuse_others_summary(self) -> None:
        """Refuse a folder whose ``summary.json`` another command wrote (``eval swapper --out RUN``
        would overwrite the run's summary, the only copy of its recipe)."""
        path = self.path("summary.json")
        if not path.exists():
            return
        try:
            other = read_json_file(path).get("command")
        except (OSError, ValueError, AttributeError):
            other = None
        if other != self.command:
            held = f"a {other} run" if isinstance(other, str) else "a summary.json that is not a reliableswap summary"
            raise SettingsMismatch(f"{self.out} holds {held} ({path.name}), which this {self.command} run would overwrite: "
                                   "use another --out")

    # -- the folder lock --------------------------------------------------------------------
    def _take_lock(self, name: str) -> FileLock:
        lock = take_lock(self.out, name, self.command)
        atomic_write_json(self.out / f".{name}.lock.json", {"pid": os.getpid(), "host": socket.gethostname(),
                                                            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv})
        return lock

    # -- files ------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """``OUT/name``, or ``OUT/{shared}.name`` in a shared folder."""
        return self.out / (f"{self.shared}.{name}" if self.shared else name)

    def _pin(self, settings: dict[str, Any]) -> None:
        path = self.state / "settings.json"
        settings = json.loads(json.dumps(settings))  # as it reads back (tuples → lists)
        if not path.exists():
            atomic_write_json(path, settings)
            return
        old = read_json_file(path)
        if old == settings:
            return
        scalar = (str, int, float, bool, type(None))
        diff = [f"{k}: {old.get(k)!r} → {v!r}" if isinstance(v, scalar) and isinstance(old.get(k), scalar) else k
                for k, v in settings.items() if old.get(k) != v]
        diff += [k for k in old if k not in settings]
        raise SettingsMismatch(f"{self.out} holds a {self.command} run with other settings ({'; '.join(diff)}); "
                               "use another --out")

    # -- units ------------------------------------------------------------------------------
    def unit_path(self, key: str) -> Path:
        return unit_record_path(self.out, self.command, key)

    def is_done(self, key: str) -> bool:
        return self.unit_path(key).is_file()

    def save_unit(self, key: str, record: dict[str, Any]) -> None:
        """Record a finished unit (after its outputs are in place)."""
        atomic_write_json(self.unit_path(key), record)

    def load_unit(self, key: str) -> dict[str, Any]:
        return read_json_file(self.unit_path(key))

    def done_keys(self) -> list[str]:
        return sorted(p.stem for p in (self.state / "units").glob("*.json"))

    # -- timing and progress ----------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Accumulate the seconds spent in ``name`` (thread-safe: pipelined stages overlap)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            with self._stage_lock:
                self.stages[name] += time.perf_counter() - t

    def take_stages(self) -> dict[str, float]:
        """The stage seconds counted since the last call, cleared (a worker hands them to its driver)."""
        with self._stage_lock:
            out = dict(self.stages)
            self.stages.clear()
        return out

    def add_stages(self, seconds: dict[str, float]) -> None:
        """Add a worker's stage seconds (:meth:`take_stages`) to this job's."""
        with self._stage_lock:
            for k, v in seconds.items():
                self.stages[k] += float(v)

    def progress(self, done: int, total: int | None) -> None:
        if not self._show:
            return
        if self._bar is None:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task(self.command, total=total)
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        """Stop the progress bar (the lock is kept until the job ends: :meth:`release`)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def release(self) -> None:
        self.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self._t0

    # -- the end ----------------------------------------------------------------------------
    def finish(self, *, n_in: int, written: int, written_this_run: int, rejects: list[dict], skipped: int = 0,
               details: dict[str, Any] | None = None, wall: float | None = None) -> dict[str, Any]:
        """Write ``rejects.jsonl`` and ``summary.json`` (one schema); return the summary. Temps of
        dead writers are swept once more: a killed run's worker still exiting when this run started
        was spared then."""
        self.close()
        if not self._attached:
            self.clean_temps()
        wall = self.wall if wall is None else wall
        RejectRecord.write(self.path("rejects.jsonl"), rejects)
        summary = Summary(
            command=self.command, version=__version__, device=self.device, settings=self.settings,
            counts={"in": n_in, "written": written, "written_this_run": written_this_run, "skipped": skipped,
                    "rejected": len(rejects),
                    "rejected_by_reason": dict(Counter(reason_key(r["reason"]) for r in rejects).most_common())},
            timings={"wall_s": round(wall, 3), "stages_s": {k: round(v, 3) for k, v in sorted(self.stages.items())}},
            throughput={"unit": self.unit, "per_s": round(written_this_run / wall, 2) if wall > 0 and written_this_run else None},
            details=details or {},
        ).to_json()
        atomic_write_json(self.path("summary.json"), summary)
        return summary


def reject(input: str, reason: str, **extra: Any) -> dict[str, Any]:
    """A ``rejects.jsonl`` record: the input and a one-line reason."""
    return RejectRecord(input=input, reason=" ".join(str(reason).split()), **extra).to_json()


def bad_records(problems: list) -> list[dict[str, Any]]:
    """Rejects for contract lines refused on reading (``ContractError``: input ``file:line``)."""
    return [reject(e.where, f"bad record: {e.field + ': ' if e.field else ''}{e.problem}") for e in problems]
