"""The demo's default faces, taken from registry packages (no image is committed here).

- scikit-image's ``data.astronaut()`` (NASA portrait of Eileen Collins, public domain);
- ``insightface/data/images/t1.jpg`` (a group of six people) from the insightface 2.1 wheel,
  fetched with ``pip download --no-deps`` into the cache and read from the wheel (a zip).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from reliableswap.io import save_image

INSIGHTFACE_WHEEL = "insightface==2.1"
INSIGHTFACE_MEMBER = "insightface/data/images/t1.jpg"


class DemoFacesError(RuntimeError):
    pass


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    if cache:
        return Path(cache)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reliableswap"


def default_faces(cache: str | os.PathLike | None = None) -> Path:
    """Folder holding ``astronaut.png`` and ``insightface_t1.jpg`` (fetched once)."""
    root = cache_dir(cache)
    faces = root / "demo_faces"
    faces.mkdir(parents=True, exist_ok=True)
    astro = faces / "astronaut.png"
    if not astro.exists():
        from skimage import data

        save_image(astro, data.astronaut())
    t1 = faces / "insightface_t1.jpg"
    if not t1.exists():
        wheels = root / "wheels"
        found = sorted(wheels.glob("insightface-2.1-*.whl"))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), INSIGHTFACE_WHEEL]
            r = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(wheels.glob("insightface-2.1-*.whl"))
            if r.returncode != 0 or not found:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                raise DemoFacesError(f"could not fetch {INSIGHTFACE_WHEEL} with pip ({tail[0]})")
        with zipfile.ZipFile(found[0]) as z:
            data_bytes = z.read(INSIGHTFACE_MEMBER)
        from triplets.jsonl import atomic_write_bytes

        atomic_write_bytes(t1, data_bytes)
    return faces
