"""The one engine every command runs its units through: :func:`run`, locally or on a Ray cluster.

A command lists its *units* (typed rows: NamedTuples or dataclasses, one per input file, chunk of
pairs or batch), hands them to :func:`run` with its *stages* (:class:`Stage`: a class built once per
worker, then called on each row, ``stage(row) -> row``), and assembles its contracts from the unit
records the last stage wrote. The same stage classes run under both implementations:

* **local** (the default): each stage is built once in this process and runs in a thread of its
  own, joined to the next by a bounded queue, so reading unit k+1, rendering unit k and writing unit
  k-1 overlap, and memory stays bounded whatever the number of units. A stage that has a
  ``stream(rows)`` method is given the whole row iterator instead (a renderer uses it to finish
  unit k-1's writes while unit k renders). A lone stage with ``workers > 1`` runs in that many
  processes instead (forkserver; each builds the stage once and dies with this process).
* **Ray** (``--engine ray``, the optional ``ray`` extra): the stages become a Ray Data pipeline of
  actor pools; each row travels pickled, with the stage seconds its workers spent. The *driver*
  (the process that runs the command) shows progress as units come back.

A unit's outputs are written atomically, then its unit record (:class:`reliableswap.jobs.Job`), so
the output folder is the same file for file whichever implementation ran it. What follows from that:

* **resume**: units already recorded are not sent again. A Ray run resumes a local one, and the
  reverse (the engine is not a setting: it does not change the outputs).
* **retries** (Ray): a worker that dies (killed, out of memory, node lost) is restarted by Ray and its
  unit is run again, up to ``retries`` times (the actors' ``max_restarts`` / ``max_task_retries``).
  The lost attempt wrote only temps, which are removed at the end. A unit that still fails stops
  the run with one line. The units already written stay, and a re-run resumes.
* **errors**: an exception raised by a stage (in its constructor or on a row) stops the run as that
  exception, under both implementations (on Ray it is handed back pickled, not Ray's wrapper).
* **GPUs** (Ray): a stage that renders asks Ray for one GPU per actor when the device allows it
  (``auto``/``cuda``) and the cluster has GPUs. Ray shows each actor only its own GPU, as ``cuda``.
* **shared storage** (Ray): workers read inputs and write outputs by path, so every node must see
  the input and output folders at the same paths (NFS, Lustre, a mounted bucket…).

Which cluster: ``--ray-address`` if given; else ``$RAY_ADDRESS`` (set inside ``ray job submit``);
else a new local cluster on this machine's CPUs (and GPUs), which ends with the command.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import pickle
import secrets
import socket
import queue
import stat
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator, Sequence

from reliableswap.jobs import Job, pid_alive
from reliableswap.errors import UserError

#: Ray Data blocks at most: one unit a block up to this, then several (a retried block redoes its
#: units, which rewrite their outputs atomically), so millions of inputs do not make millions of
#: blocks for the driver and Ray's control store to track.
MAX_BLOCKS = 8192


class WorkerLost(UserError):
    """A Ray worker died more often than ``--ray-retries`` allows (or its node went away): the
    units written so far are kept, and a re-run resumes."""


#: Installed by ``pip install 'reliableswap[ray]'`` (``make install`` does).
RAY_HINT = "--engine ray needs Ray Data: pip install 'reliableswap[ray]' (ray[data])"


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray (the CLI's ``--ray-*`` flags).

    Args:
        address: cluster to join (``ray://host:10001``, ``host:6379``, ``auto``); ``None``:
            ``$RAY_ADDRESS``, else a new local cluster.
        workers: actors per stage; ``None``: as many as the cluster's CPUs (GPUs for a GPU stage) allow.
        retries: restarts of a dead worker, and re-runs of its unit, before the run stops.
        num_cpus: CPUs of a new local cluster (``None``: all of this machine's).
    """

    address: str | None = None
    workers: int | None = None
    retries: int = 3
    num_cpus: int | None = None



LOCAL_ENGINE = {"name": "local"}


def describe(opts: RayOptions | None, info: dict[str, Any] | None) -> dict[str, Any]:
    """The ``engine`` entry of a summary's details: ``local``, or the cluster the run used."""
    if opts is None:
        return LOCAL_ENGINE
    return {"name": "ray", "address": info["address"], "started_here": info["started_here"], "nodes": info["nodes"],
            "cpus": info["cpus"], "gpus": info["gpus"], "retries": opts.retries}


def device_label(info: dict[str, Any]) -> str:
    """A summary's ``device`` for a run on a cluster."""
    return f"ray ({info['nodes']} node(s), {info['cpus']:g} CPUs, {info['gpus']:g} GPUs)"


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline: ``cls(**kwargs)`` once per worker, then ``stage(row) -> row`` for
    each unit (typed rows, picklable; see the module doc for ``stream``). A stage whose instance has
    a ``job`` (:meth:`reliableswap.jobs.Job.attach`) has its stage seconds added to the driver's job.

    Args:
        cls: a class importable on the workers (module level in ``reliableswap``).
        kwargs: its constructor's arguments (picklable for processes and Ray).
        num_cpus / num_gpus: what each Ray actor reserves.
        workers: Ray: actors in the pool (``None``: from the cluster's resources); local: processes
            of a lone stage (``None`` or 1: a thread of this process).
    """

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    workers: int | None = None


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError(RAY_HINT) from None
    return ray


#: Ray's switch for clusters of several machines (off on macOS/Windows). Off, every Ray process
#: binds and advertises 127.0.0.1 instead of the machine's routable address.
_MULTI_NODE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _host_port(address: str) -> tuple[str, str]:
    """``(host, port)`` of ``host:port`` or ``ray://host:port`` (IPv6 brackets dropped; ``""`` when absent)."""
    tail = address.split("://")[-1]
    host, sep, port = tail.rpartition(":")
    return (host.strip("[]"), port) if sep else (tail, "")


def is_loopback(address: str) -> bool:
    """Whether a cluster address (``host:port``, ``ray://host:port``, ``local``) is this machine only."""
    if address == "local":
        return True
    host = _host_port(address)[0]
    return host in ("localhost", "::1") or host.startswith("127.")


@contextlib.contextmanager
def _loopback_only(on: bool) -> Iterator[None]:
    """A cluster that lives on this machine talks over loopback only: no Ray port listens on the
    network, and an address such as ``127.0.0.1:6379`` is not rewritten to the routable one (Ray
    rewrites it when multi-node mode is on). The variable reaches the processes Ray starts, and the
    constant covers a Ray imported earlier."""
    if not on:
        yield
        return
    import ray._private.ray_constants as rc

    old_env, old_const = os.environ.get(_MULTI_NODE_VAR), rc.ENABLE_RAY_CLUSTER
    os.environ[_MULTI_NODE_VAR], rc.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        rc.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(_MULTI_NODE_VAR, None)
        else:
            os.environ[_MULTI_NODE_VAR] = old_env


@contextlib.contextmanager
def joined(opts: RayOptions | None, device: str) -> Iterator[tuple[dict[str, Any] | None, float]]:
    """A command's engine: ``(None, 0)`` for the local engine; for Ray, the cluster joined (or
    started) for the block and the GPUs each rendering actor reserves, ``device`` checked against
    the cluster (:func:`gpu_stage_gpus`) before the command makes its output folder."""
    if opts is None:
        yield None, 0.0
        return
    with cluster(opts) as info:
        yield info, gpu_stage_gpus(device, info)


@contextlib.contextmanager
def cluster(opts: RayOptions) -> Iterator[dict[str, Any]]:
    """Join (or start) the cluster for one command; yields its size. A cluster started here ends
    with the block; one that was already joined in this process (a library caller's) is kept.
    A new local cluster, or one at a loopback address, is reached over loopback only."""
    ray = _ray()
    address = opts.address or os.environ.get("RAY_ADDRESS") or "local"
    with _loopback_only(not ray.is_initialized() and is_loopback(address)):
        with _connected(ray, opts, address) as info:
            yield info


#: The HTTP/2 client connection preface and an empty SETTINGS frame (RFC 9113 §3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _probe(address: str, timeout: float = 5.0) -> None:
    """Refuse at once an address where nothing listens: Ray itself retries a refused GCS
    connection with no end. ``auto`` (Ray's own lookup) is left to Ray."""
    if address == "auto":
        return
    host, port = _host_port(address)
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address}: not host:port (or ray://host:port, auto)")
    try:
        conn = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({e.strerror or e})") from None
    with conn:  # Ray's GCS (and its client server) speak gRPC: an HTTP/2 server answers the preface with SETTINGS
        try:
            conn.sendall(HTTP2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError:
            head = b""
    if len(head) < 9 or head[3] != 0x04:
        raise UserError(f"--ray-address {address}: something listens there but it is not a Ray cluster "
                         f"(no gRPC answer within {timeout:g} s)")


def _token_auth_if_token() -> None:
    """Joining a cluster: token authentication when ``$RAY_AUTH_MODE`` is unset and a token is at
    hand (``$RAY_AUTH_TOKEN``, ``~/.ray/auth_token``), the rule ``ray start`` follows (a ``ray start``
    head with a token on this machine refuses a driver that sends none)."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def token_path() -> Path:
    """Where Ray keeps this user's cluster token: ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def private_token(create: bool) -> None:
    """The cluster token is a key to run code as this user. For a new local cluster (``create``) it
    is made 0600 (in a 0700 folder) before Ray would write one with the umask's mode (0644 on most
    machines); an existing one that other users may read is refused (one line saying what to do)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return
    path = token_path()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not create:
            return
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # Ray's own generator: 256 random bits as hex
        return
    if st.st_mode & 0o077:
        raise UserError(f"{path}: the Ray cluster token is readable by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                         f"`chmod 600 {path}`, and delete it to have a new one made if others may have read it")


@contextlib.contextmanager
def _connected(ray, opts: RayOptions, address: str) -> Iterator[dict[str, Any]]:
    started = False  # this block joined (or started) the cluster, so it also leaves it
    # Ray's Python loggers: the local token notice; Ray Data's execution plan, progress lines (the
    # command's own bar counts units) and its log line for an error that the command then reports
    # itself (one line). Ray's own warnings still show; its logs stay in /tmp/ray/session_*/logs.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    if not ray.is_initialized():  # else a library caller joined one: use it, leave it
        private_token(create=address == "local")
        if address != "local":
            _probe(address)
            _token_auth_if_token()
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
                                  "configure_logging": True}
        if address == "local":
            kwargs["num_cpus"] = opts.num_cpus or os.cpu_count() or 1
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:
            raise UserError(f"--ray-address {address}: no Ray cluster answers there ({' '.join(str(e).split())[:200]})") from None
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the command's own bar counts units
    ctx.print_on_execution_start = False
    res = ray.cluster_resources()
    info = {"address": address, "started_here": started and address == "local",
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "cpus": float(res.get("CPU", 0)),
            "gpus": float(res.get("GPU", 0))}
    try:
        yield info
    finally:
        if started:
            ray.shutdown()


def gpu_stage_gpus(device: str, info: dict[str, Any]) -> float:
    """GPUs each rendering actor reserves: 1 when ``device`` (``auto``/``cuda``/``cpu``) allows and
    the cluster has GPUs. ``cuda:N`` is refused: Ray picks each actor's GPU."""
    device = str(device)
    if device.startswith("cuda:"):
        raise UserError(f"--device {device}: with --engine ray each worker gets a GPU of its own (use --device cuda or auto)")
    if device == "cuda" and not info["gpus"]:
        raise UserError("--device cuda: the Ray cluster has no GPU")
    return 1.0 if device in ("auto", "cuda") and info["gpus"] else 0.0


def run(job: Job, units: Sequence[Any], stages: Sequence[Stage], *, ray: RayOptions | None = None,
        info: dict[str, Any] | None = None, done_before: int = 0, total: int | None = None) -> list[Any]:
    """Stream ``units`` (one typed row per unit) through ``stages``: in this process (``ray`` None)
    or on the cluster ``info`` that :func:`joined` gave. Returns the last stage's rows, one per unit,
    in completion order. Progress counts units as they come back, after ``done_before`` of ``total``;
    the stages' seconds are added to ``job.stages``. An exception a stage raises stops the run as
    itself; a Ray worker lost beyond its retries is :class:`WorkerLost`."""
    total = done_before + len(units) if total is None else total
    job.progress(done_before, total)
    if not units:
        return []
    if ray is None:
        go = _processes if len(stages) == 1 and (stages[0].workers or 1) > 1 else _threads
        return go(job, list(units), list(stages), done_before, total)
    return _on_ray(job, list(units), list(stages), ray, info or {}, done_before, total)


def drain_seconds(stage: Any) -> dict[str, float]:
    """The stage seconds ``stage``'s own job (if any) counted since the last call, cleared."""
    job = getattr(stage, "job", None)
    return {} if job is None else job.take_stages()


# -- local: one thread per stage, bounded queues ------------------------------------------------
#: Rows waiting between two local stages: a renderer's next unit is ready while it works, and no
#: more is held (memory stays bounded whatever the number of units).
QUEUE_ROWS = 1

_END = object()


class _Failed:
    """An exception raised upstream, passed down the queues to the driver."""

    def __init__(self, error: BaseException):
        self.error = error


def _threads(job: Job, units: list[Any], stages: list[Stage], done_before: int, total: int) -> list[Any]:
    stop = threading.Event()
    built: list[Any] = []
    queues = [queue.Queue(maxsize=QUEUE_ROWS) for _ in stages]  # queue i: what stage i hands on

    def put(q: queue.Queue, item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def rows(q: queue.Queue) -> Iterator[Any]:
        while not stop.is_set():
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def work(i: int) -> None:
        try:
            s = stages[i]
            inst = s.cls(**s.kwargs)
            built.append(inst)
            src = iter(units) if i == 0 else rows(queues[i - 1])
            out = inst.stream(src) if hasattr(inst, "stream") else map(inst, src)
            for row in out:
                if not put(queues[i], row):  # the run stopped
                    return
            put(queues[i], _END)
        except BaseException as e:  # noqa: BLE001 — handed to the driver, which raises it
            put(queues[i], _Failed(e))

    workers = [threading.Thread(target=work, args=(i,), name=f"stage-{s.cls.__name__}", daemon=True)
               for i, s in enumerate(stages)]
    for t in workers:
        t.start()
    got: list[Any] = []
    try:
        for row in rows(queues[-1]):
            got.append(row)
            job.progress(done_before + len(got), total)
    finally:
        stop.set()
        for t in workers:
            t.join()
        for inst in built:
            job.add_stages(drain_seconds(inst))
            if hasattr(inst, "close"):
                inst.close()
    return got


# -- local: a lone stage in several processes ---------------------------------------------------
_PROCESS: dict[str, Any] = {}


def _die_with(pid: int) -> None:
    while pid_alive(pid):
        time.sleep(0.5)
    os._exit(1)


def _start_process(stage: Stage, parent: int) -> None:
    """A pool process: exits when the process that started the run is gone (``kill -9`` of the
    command leaves no worker), then builds its stage once."""
    threading.Thread(target=_die_with, args=(parent,), daemon=True).start()
    _PROCESS["stage"] = stage.cls(**stage.kwargs)


def _in_process(row: Any) -> tuple[Any, dict[str, float]]:
    inst = _PROCESS["stage"]
    return inst(row), drain_seconds(inst)


def _processes(job: Job, units: list[Any], stages: list[Stage], done_before: int, total: int) -> list[Any]:
    (stage,) = stages
    # forkserver: children start from a clean process, never from one holding the progress bar's
    # thread or torch's thread pools (fork deadlocks there).
    ctx = get_context("forkserver")
    got: list[Any] = []
    n = min(stage.workers, len(units))
    todo = iter(units)
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_start_process, initargs=(stage, os.getpid())) as ex:
        # a bounded window of units in flight (not one future per unit of a million-file run)
        pending = deque(ex.submit(_in_process, u) for u in itertools.islice(todo, 2 * n))
        while pending:
            row, seconds = pending.popleft().result()
            for u in itertools.islice(todo, 1):
                pending.append(ex.submit(_in_process, u))
            got.append(row)
            job.add_stages(seconds)
            job.progress(done_before + len(got), total)
    return got


# -- Ray: actor pools of a Ray Data pipeline ----------------------------------------------------
def _pack(e: BaseException) -> bytes:
    try:
        return pickle.dumps(e)
    except Exception:  # noqa: BLE001 — an exception that does not pickle: its type and line
        return pickle.dumps(RuntimeError(f"{type(e).__name__}: {' '.join(str(e).split())}"))


#: Ray Data's threads that fetch a run's blocks (``ray.get``) in the driver.
_RAY_DATA_FETCH_THREADS = ("iter_threaded",)


def _stop_rows(rows: Any, before: set[threading.Thread], timeout: float = 30.0) -> None:
    """Close a Ray Data row iterator (its ``finally`` shuts the streaming executor down) and wait,
    at most ``timeout`` seconds, for the fetch threads started since ``before`` to end: a thread still
    inside ``ray.get`` when the caller leaves the cluster makes Ray end the whole process ("the core
    worker has already been shutdown"). A failure to close never hides the run's own outcome."""
    with contextlib.suppress(Exception):
        rows.close()
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t not in before and t.name in _RAY_DATA_FETCH_THREADS:
            t.join(max(0.0, deadline - time.monotonic()))


def _unpickled(data: bytes) -> Any:
    """A row or exception the engine's own workers pickled (never bytes read from a file)."""
    return pickle.loads(data)


def _envelope(row: bytes = b"", seconds: dict[str, float] | None = None, error: bytes = b"") -> dict[str, Any]:
    """A Ray Data row: the typed row pickled, the stage seconds spent on it so far (JSON: one Arrow
    schema for every row), and a pickled exception (empty when none)."""
    return {"row": row, "stages_s": json.dumps(seconds or {}), "error": error}


class _Guarded:
    """Runs a stage's class in an actor on pickled rows, and hands an exception it raises (in its
    constructor or on a unit) to the driver as a row holding the pickled exception: Ray Data would
    wrap it (and its retry layer rebuilds an ``OSError`` with Ray's text as the file name). Later
    stages pass such a row on. A crash of the process is not an exception: Ray restarts the actor."""

    stage_cls: type = object

    def __init__(self, **kwargs: Any):
        self.error: bytes = b""
        try:
            self.inner = self.stage_cls(**kwargs)
        except Exception as e:  # noqa: BLE001 — reported with the first unit
            self.error = _pack(e)

    def __call__(self, env: dict[str, Any]) -> dict[str, Any]:
        if env["error"] or self.error:
            return _envelope(error=env["error"] or self.error)
        seconds = json.loads(env["stages_s"])
        try:
            out = self.inner(_unpickled(env["row"]))
        except Exception as e:  # noqa: BLE001 — re-raised in the driver
            return _envelope(error=_pack(e))
        for k, v in drain_seconds(self.inner).items():
            seconds[k] = seconds.get(k, 0.0) + v
        return _envelope(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL), seconds)


def _guarded(cls: type) -> type:
    """A :class:`_Guarded` subclass named after ``cls`` (Ray names the actors' processes after it)."""
    return type(cls.__name__, (_Guarded,), {"stage_cls": cls})


def pool_size(stage: Stage, opts: RayOptions, info: dict[str, Any], n_items: int) -> int:
    """Ray actors in ``stage``'s pool: its own ``workers``, else ``--ray-workers``, else what the
    cluster's CPUs (GPUs for a GPU stage) allow; at most one per unit."""
    if stage.workers is not None:
        n = stage.workers
    elif opts.workers is not None:
        n = opts.workers
    elif stage.num_gpus:
        n = int(info["gpus"] // stage.num_gpus)
    else:
        n = int(info["cpus"] // max(stage.num_cpus, 1e-3))
    return max(1, min(n, n_items))


def _lost(e: BaseException) -> WorkerLost:
    """What Ray raised once its retries were spent (a worker that died again, a lost node…), as one
    line: its type and first line (Ray's own text is a traceback)."""
    inner = getattr(e, "cause", None)
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    kind = type(inner if isinstance(inner, BaseException) else e).__name__
    return WorkerLost(f"a Ray worker was lost beyond --ray-retries ({kind}: {first[:200]}); "
                      "the units written so far are kept: re-run to resume")


def _on_ray(job: Job, units: list[Any], stages: list[Stage], opts: RayOptions, info: dict[str, Any],
            done_before: int, total: int) -> list[Any]:
    ray = _ray()
    items = [_envelope(pickle.dumps(u, protocol=pickle.HIGHEST_PROTOCOL)) for u in units]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    for s in stages:
        with warnings.catch_warnings():
            # bounded restarts (Ray Data's default is unlimited: a unit that kills its worker every
            # time would never end) are still passed as remote args, deprecated for Ray 2.64 (the
            # extra's upper bound)
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map(_guarded(s.cls), fn_constructor_kwargs=s.kwargs, num_cpus=s.num_cpus, num_gpus=s.num_gpus or None,
                        compute=ray.data.ActorPoolStrategy(size=pool_size(s, opts, info, len(items))),
                        max_restarts=opts.retries, max_task_retries=opts.retries)
    got: list[Any] = []
    before = set(threading.enumerate())
    rows = iter(ds.iter_rows())
    try:
        for env in rows:
            if env["error"]:  # a worker's own exception: the run stops with it, as a local run would
                raise _unpickled(env["error"])
            got.append(_unpickled(env["row"]))
            job.add_stages(json.loads(env["stages_s"]))
            job.progress(done_before + len(got), total)
    except Exception as e:
        if type(e).__module__.split(".")[0] not in ("ray", "pyarrow"):
            raise
        raise _lost(e) from e
    finally:
        # Ray Data's executor and fetch threads stop here, before the caller may leave the cluster:
        # for a run stopped by an error, garbage collection would do it, maybe after ray.shutdown()
        _stop_rows(rows, before)
    job.clean_temps()  # what killed attempts left behind
    return got
