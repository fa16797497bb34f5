"""Peak memory of `reliableswap prep` on a hostile batch, for the whole process tree.

``/usr/bin/time`` reports one process: prep's workers are children of a forkserver, so this
samples the RSS of the main process and every descendant (psutil, every 50 ms) and reports the
peak of each process and of their sum.

The batch (made here): PNG bombs (17000² and 20000² claimed in a few KB), a JPEG whose header
claims 60000², an 8000² JPEG of a real face, a 7000² PNG (under the 64 MP limit: decoded), a
truncated PNG, an HTML file named .jpg, multi-frame GIF and TIFF, and real faces.

Usage: ``.venv/bin/python scripts/bench_hostile.py [--faces DIR] [--workers 2]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def png_bomb(w: int, h: int) -> bytes:
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (w * 3 + 1) * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def make_batch(faces: Path, d: Path) -> int:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "bomb_17000.png").write_bytes(png_bomb(17000, 17000))
    (d / "bomb_20000.png").write_bytes(png_bomb(20000, 20000))
    ok, small = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    data = bytearray(small.tobytes())
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, 60000, 60000)
    (d / "huge_header.jpg").write_bytes(bytes(data))
    face = cv2.imread(str(faces / "london_set" / "london_030_neutral.jpg"))
    cv2.imwrite(str(d / "huge_8000.jpg"), cv2.resize(face, (8000, 8000)), [cv2.IMWRITE_JPEG_QUALITY, 80])
    cv2.imwrite(str(d / "big_7000.png"), cv2.resize(face, (7000, 7000)), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    (d / "truncated.png").write_bytes((d / "big_7000.png").read_bytes()[:5000])
    (d / "page.jpg").write_text("<html><body>not an image</body></html>")
    frames = [Image.fromarray(cv2.cvtColor(cv2.resize(face, (512, 512)), cv2.COLOR_BGR2RGB)), Image.new("RGB", (512, 512))]
    frames[0].save(d / "two_frames.gif", save_all=True, append_images=frames[1:])
    frames[0].save(d / "two_pages.tif", save_all=True, append_images=frames[1:])
    for n in ("008", "021", "025", "042", "136"):
        shutil.copy(faces / "london_set" / f"london_{n}_neutral.jpg", d)
    return len(list(d.iterdir()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "data" / "faces")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    work = ROOT / "bench_out" / "hostile"
    n = make_batch(a.faces, work / "in")
    shutil.rmtree(work / "out", ignore_errors=True)
    cmd = [sys.executable, "-m", "reliableswap.cli", "prep", str(work / "in"), "--out", str(work / "out"), "--workers", str(a.workers)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak_each: dict[int, tuple[str, int]] = {}
    peak_total = 0
    while proc.poll() is None:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in family:
            try:
                rss = p.memory_info().rss
                name = " ".join(p.cmdline()[:3])[-60:]
            except psutil.Error:
                continue
            total += rss
            if rss > peak_each.get(p.pid, ("", 0))[1]:
                peak_each[p.pid] = (name, rss)
        peak_total = max(peak_total, total)
        time.sleep(0.05)
    wall = time.perf_counter() - t
    s = json.loads((work / "out" / "summary.json").read_text())
    res = {"inputs": n, "workers": a.workers, "wall_s": round(wall, 1), "exit": proc.returncode,
           "faces": s["counts"]["written"], "rejected_by_reason": s["counts"]["rejected_by_reason"],
           "peak_rss_tree_mb": round(peak_total / 2**20), "peak_rss_per_process_mb":
           sorted((round(r / 2**20), name) for name, r in peak_each.values())[::-1]}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
