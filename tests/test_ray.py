"""``--engine ray``: prep, triplets and flows on a Ray cluster write what the local engine writes,
resume each other's runs, and survive a worker killed mid-run.

One Ray cluster for the module, started as a user would start one (``ray start --head``) on
loopback with 2 CPUs; the runs join it with ``--ray-address``. Nothing here listens on the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'reliableswap[ray]')")
psutil = pytest.importorskip("psutil")

from reliableswap.commands.flows import FlowsConfig, run_flows  # noqa: E402
from reliableswap.commands.prep import PrepConfig, run_prep  # noqa: E402
from reliableswap.commands.triplets import run_triplets  # noqa: E402
from reliableswap.engine import _RAY_DATA_FETCH_THREADS, RayOptions, WorkerLost, cluster  # noqa: E402
from reliableswap.pairs import make_pairs  # noqa: E402
from reliableswap.recipes import PairsSection, TripletRecipe, load_recipe  # noqa: E402
from reliableswap.testing.faces import write_synthetic_prep  # noqa: E402
from reliableswap.testing.flame import write_embeddings, write_model  # noqa: E402
from triplets.records import PairRecord  # noqa: E402
from reliableswap.contracts import FaceRecord  # noqa: E402
from conftest import run_cli  # noqa: E402

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # every Ray port on 127.0.0.1
#: The default recipe with its QC measured and no pair dropped: these tests compare engines.
QC_ALL = TripletRecipe().with_overrides({"qc.enabled": True, "qc.min_id_margin": -2.0})
TPS = load_recipe(Path(__file__).parents[1] / "recipes" / "tps.toml", TripletRecipe)
#: Pairs of the triplet runs, two a chunk: a kill after the first chunk leaves the re-run two or
#: more chunks, one to write before its own kill and one to retry.
RAY_PAIRS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def private_token():
    """The user's Ray token, made by `ray get-auth-token --generate` if missing, private (0600): the
    toolkit refuses one that other users can read, as ssh refuses a readable key."""
    env = {**os.environ, **LOOPBACK}
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token.is_file() and "RAY_AUTH_TOKEN" not in env:
        subprocess.run([str(RAY), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    if token.is_file():
        os.chmod(token, 0o600)


@pytest.fixture(scope="module")
def ray_address():
    """A 2-CPU head on loopback, with a token (Ray's default for local clusters); gone at the end."""
    env = {**os.environ, **LOOPBACK}
    port = _free_port()
    # the head's one fixed default port (its dashboard agent's) made a free one too: a head left by
    # a test process that died must not keep this one from coming up
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
                             "--dashboard-agent-listen-port", str(_free_port())],
                            env={**env, "RAY_AUTH_MODE": "token"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    # …and none is left behind: should this process die before the fixture ends, a watchdog ends the head
    subprocess.Popen(["sh", "-c", f"while kill -0 {os.getpid()} && kill -0 -{head.pid}; do sleep 1; done 2>/dev/null; "
                      f"kill -9 -{head.pid} 2>/dev/null"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with cluster(RayOptions(address=address)) as info:
                    assert info["cpus"] == 2
                break
            except ValueError:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError(f"ray start did not come up: {head.stderr.read().decode()[-2000:] if head.poll() is not None else 'timeout'}")
                time.sleep(1)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)  # --block: ray start ends the processes it started…
        try:
            head.wait(2)
        except subprocess.TimeoutExpired:  # …taking its time (30 s): the rest of its group goes at once
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)


def _files(folder: Path, pattern: str) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob(pattern)) if not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


@contextlib.contextmanager
def one_thread():
    """Torch's CPU arithmetic on one thread, as in a Ray actor that reserved one CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_pairs(prepped, tmp_path_factory):
    out, _ = prepped
    path = tmp_path_factory.mktemp("raypairs") / "pairs.jsonl"
    PairRecord.write(path, make_pairs(FaceRecord.read(out / "faces.jsonl"), PairsSection(n=RAY_PAIRS, max_yaw_diff=20, seed=11)))
    return path


@pytest.fixture(scope="module")
def local_triplets(prepped, ray_pairs, tmp_path_factory):
    """The local engine's folder for the same faces, pairs, recipe (the default: mesh) and batch,
    its CPU arithmetic on one thread as in a 1-CPU Ray actor: float sums split over another number
    of threads round differently, as between two machines with other core counts (how far:
    scripts/bench_ray.py, BENCHMARKS.md "Ray engine")."""
    dst = tmp_path_factory.mktemp("raylocal") / "t"
    with one_thread():
        summary = run_triplets(prepped[0], ray_pairs, dst, QC_ALL, device="cpu", batch=2)
    assert summary["counts"]["written"] >= RAY_PAIRS - 2
    return dst, summary


def _render_workers() -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if "TripletRenderWorker" in " ".join(p.info["cmdline"] or [])]


def _kill_render_worker_mid_run(run, out: Path, after: int = 0) -> tuple[list, int, dict]:
    """Start ``run()`` in a thread; once it has recorded more than ``after`` chunks, kill -9 every
    render worker. Returns (the killed processes, chunks recorded at the kill, {"summary" or "error"})."""
    res: dict = {}

    def go():
        try:
            res["summary"] = run()
        except BaseException as e:  # noqa: BLE001 — checked in the test's thread
            res["error"] = e

    th = threading.Thread(target=go)
    th.start()
    units = out / ".triplets" / "units"
    while th.is_alive() and not (units.is_dir() and len(list(units.glob("*.json"))) > after):
        time.sleep(0.05)
    victims = _render_workers()
    n_at_kill = len(list(units.glob("*.json")))
    for v in victims:
        v.kill()
    th.join(300)
    assert not th.is_alive()
    return victims, n_at_kill, res


def test_ray_a_worker_lost_stops_in_one_line_and_one_killed_in_the_rerun_is_retried(prepped, ray_pairs, local_triplets,
                                                                                   ray_address, tmp_path):
    """Same seed, same inputs, one render worker. First run, no retries: kill -9 of the worker once
    a chunk is written stops the run in one line, keeping the chunks recorded. The re-run, with
    retries: kill -9 of its worker once it has written a chunk of its own; Ray restarts it and
    re-runs its chunk. Every JPEG, the manifest (QC figures included) and the rejects are then
    byte-identical to the local engine's, the summary counts the same and says where it ran, no
    temp is left, and a third run finds nothing to do."""
    local, ls = local_triplets
    chunks = ls["details"]["chunks"]
    out = tmp_path / "t"
    victims, _, res = _kill_render_worker_mid_run(
        lambda: run_triplets(prepped[0], ray_pairs, out, QC_ALL, device="cpu", batch=2,
                             ray=RayOptions(address=ray_address, workers=1, retries=0)), out)
    err = res.get("error")
    assert len(victims) == 1
    assert isinstance(err, WorkerLost) and "\n" not in str(err) and "re-run to resume" in str(err), repr(err)[:2000]
    kept = len(list((out / ".triplets" / "units").glob("*.json")))
    assert 1 <= kept <= chunks - 2, "the first kill must leave two chunks or more to the re-run"

    ray = RayOptions(address=ray_address, workers=1, retries=2)
    victims, n_at_kill, res = _kill_render_worker_mid_run(
        lambda: run_triplets(prepped[0], ray_pairs, out, QC_ALL, device="cpu", batch=2, ray=ray), out, after=kept)
    if "error" in res:
        raise res["error"]
    assert len(victims) == 1 and kept < n_at_kill < chunks, "the kill came after the re-run or hit no worker"
    assert not victims[0].is_running()
    s = res["summary"]
    assert s["counts"]["skipped"] == kept and s["counts"]["written"] == ls["counts"]["written"]
    assert s["counts"]["rejected"] == ls["counts"]["rejected"]
    assert _files(out, "*.jpg") == _files(local, "*.jpg") and len(_files(local, "*.jpg")) == 4 * ls["counts"]["written"]
    for name in ("manifest.jsonl", "rejects.jsonl", "recipe.resolved.toml"):
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
    eng = s["details"]["engine"]
    assert eng["name"] == "ray" and eng["address"] == ray_address and not eng["started_here"] and eng["cpus"] == 2
    assert ls["details"]["engine"] == {"name": "local"} and s["device"].startswith("ray (1 node")
    assert s["timings"]["stages_s"]["synth"] > 0 and s["throughput"]["per_s"] > 0
    assert _temps(out) == []
    again = run_triplets(prepped[0], ray_pairs, out, QC_ALL, device="cpu", batch=2, ray=ray)
    assert again["counts"]["written_this_run"] == 0 and again["counts"]["skipped"] == chunks


def test_ray_an_error_in_a_worker_is_its_own_one_line(prepped, ray_pairs, ray_address, tmp_path):
    """An output that cannot be written (a file where pair 1's folder goes, in the first chunk)
    stops the run with the worker's own exception, as the local engine would, not Ray's wrapper
    and traceback. (The 2D recipe: its workers load no face mesh, hand or judge model.)"""
    out = tmp_path / "t"
    out.mkdir()
    (out / "00000001").write_text("in the way")
    with pytest.raises(OSError) as e:
        run_triplets(prepped[0], ray_pairs, out, TPS, device="cpu", batch=2, ray=RayOptions(address=ray_address, workers=1))
    assert type(e.value).__module__.split(".")[0] not in ("ray", "pyarrow") and "\n" not in str(e.value)
    assert "00000001" in str(e.value)
    # the run's fetch threads ended before it left the cluster (one still in ray.get then makes
    # Ray end this whole process)
    assert not [t for t in threading.enumerate() if t.name in _RAY_DATA_FETCH_THREADS]


def test_ray_prep_matches_local_and_the_engines_resume_each_other(faces_dir, ray_address, tmp_path):
    inputs = [faces_dir / "london_set", faces_dir / "ffhq"]
    local = run_prep(inputs, tmp_path / "local", PrepConfig(), workers=1)  # in this process: no worker start-ups
    s = run_prep(inputs, tmp_path / "ray", PrepConfig(), ray=RayOptions(address=ray_address))
    assert s["counts"] == local["counts"] and s["counts"]["written"] >= 18
    assert (tmp_path / "ray" / "faces.jsonl").read_bytes() == (tmp_path / "local" / "faces.jsonl").read_bytes()
    assert _files(tmp_path / "ray", "*.png") == _files(tmp_path / "local", "*.png")
    assert s["details"]["engine"]["name"] == "ray" and local["details"]["engine"] == {"name": "local"}
    # two units lost (their records and crops): the local engine redoes those two only, and the
    # Ray engine then has nothing left to do
    lost = sorted((tmp_path / "ray" / ".prep" / "units").glob("*.json"))[:2]
    n_lost = 0
    for rec in lost:
        for f in json.loads(rec.read_text())["faces"]:
            (tmp_path / "ray" / f["image"]).unlink()
            n_lost += 1
        rec.unlink()
    again = run_prep(inputs, tmp_path / "ray", PrepConfig(), workers=1)
    assert again["counts"]["written_this_run"] == n_lost and again["counts"]["skipped"] == again["counts"]["in"] - 2
    assert (tmp_path / "ray" / "faces.jsonl").read_bytes() == (tmp_path / "local" / "faces.jsonl").read_bytes()
    third = run_prep(inputs, tmp_path / "ray", PrepConfig(), ray=RayOptions(address=ray_address, workers=1))
    assert third["counts"]["written_this_run"] == 0 and _files(tmp_path / "ray", "*.png") == _files(tmp_path / "local", "*.png")


def test_ray_flows_match_local(ray_address, tmp_path):
    """FLAME shape flows (synthetic model in the FLAME file format; faces fitted on the fly in the
    workers): the same .npz fields, previews and manifest."""
    prep = write_synthetic_prep(tmp_path / "prep", 8)
    (tmp_path / "flame").mkdir()
    model = write_model(tmp_path / "flame" / "generic_model.pkl")
    write_embeddings(tmp_path / "flame")
    PairRecord.write(tmp_path / "pairs.jsonl", [PairRecord(a=f"synthetic_0_{i:05d}", b=f"synthetic_0_{i + 4:05d}") for i in range(4)])
    cfg = FlowsConfig(batch=2, max_rmse=50.0)
    with one_thread():  # the fit's float sums, as in the 1-CPU workers
        local = run_flows(prep, tmp_path / "pairs.jsonl", tmp_path / "local", str(model), cfg)
    # one actor (the prep test above runs two): each actor's start-up is seconds of the suite
    s = run_flows(prep, tmp_path / "pairs.jsonl", tmp_path / "ray", str(model), cfg, ray=RayOptions(address=ray_address, workers=1))
    assert s["counts"] == local["counts"] and s["counts"]["written"] == 4
    assert s["details"]["faces_fitted_on_the_fly"] == local["details"]["faces_fitted_on_the_fly"] == 8
    assert _files(tmp_path / "ray", "*.npz") == _files(tmp_path / "local", "*.npz")
    assert _files(tmp_path / "ray", "*.png") == _files(tmp_path / "local", "*.png")
    assert (tmp_path / "ray" / "manifest.jsonl").read_bytes() == (tmp_path / "local" / "manifest.jsonl").read_bytes()


def test_ray_cli_joins_a_cluster_and_refuses_bad_flags_in_one_line(prepped, ray_pairs, ray_address, tmp_path, monkeypatch):
    """The CLI's own entry point, in this process (a subprocess each is seconds of start-up), on
    two of the pairs: the flags reach the engine, and wrong combinations are refused in one line."""
    folder = str(prepped[0])
    two = tmp_path / "two.jsonl"
    two.write_text("".join(ray_pairs.read_text().splitlines(keepends=True)[:2]))
    for k, v in LOOPBACK.items():
        monkeypatch.setenv(k, v)
    r = run_cli("triplets", folder, "--pairs", two, "--out", tmp_path / "t", "--recipe", "recipes/tps.toml",
                "--device", "cpu", "--engine", "ray", "--ray-address", ray_address)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert s["details"]["engine"]["address"] == ray_address and s["counts"]["written"] == 2
    bad = [
        (["--ray-workers", "2"], "--ray-address/--ray-workers go with --engine ray"),
        (["--engine", "ray", "--ray-address", ray_address, "--num-shards", "2"], "drop --shard-index/--num-shards"),
        (["--engine", "ray", "--ray-address", ray_address, "--device", "cuda:1"], "each worker gets a GPU of its own"),
        (["--engine", "ray", "--ray-address", ray_address, "--device", "cuda"], "the Ray cluster has no GPU"),
    ]
    for extra, words in bad:
        r = run_cli("triplets", folder, "--pairs", ray_pairs, "--out", tmp_path / "x", "--recipe", "recipes/tps.toml", *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], (extra, r.stderr[-1500:])
        assert not (tmp_path / "x").exists(), extra  # refused before the output folder is made


def test_ray_cli_an_unanswered_address_is_one_line(faces_dir, tmp_path):
    """(A new local cluster, the default without --ray-address, is started end to end by
    tests/test_hostile.py::test_a_local_ray_cluster_leaves_a_private_token.)"""
    dead = f"127.0.0.1:{_free_port()}"
    r = run_cli("prep", faces_dir / "public_domain", "--out", tmp_path / "q", "--engine", "ray", "--ray-address", dead,
                timeout=300, env={**os.environ, **LOOPBACK})  # a child: Ray's failed connection leaves no state here
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]  # Ray logs its retries too
    assert r.returncode == 2 and len(lines) == 1 and f"--ray-address {dead}: no Ray cluster answers there" in lines[0]
    assert not (tmp_path / "q").exists()  # nothing made before the cluster answered
