"""What a command pays before its first face: reading a prep's ``faces.jsonl`` (every record
checked, its nesting depth included) and building dlib's detector and 68-point predictor, the
first time in a process and again (a command run twice in one process, a library caller).

    python scripts/bench_records.py PREP/faces.jsonl [--copies 20]

Compare two versions of the code by putting each one's checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import best  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("faces", type=Path, help="a prep's faces.jsonl (--landmarks mesh: records with 468 points)")
    ap.add_argument("--copies", type=int, default=20, help="the records repeated this many times, ids made unique")
    args = ap.parse_args()

    import reliableswap
    from reliableswap.contracts import FaceRecord
    from reliableswap.faces.detect import DlibDetector
    from reliableswap.faces.landmarks import DlibLandmarks

    lines = args.faces.read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "faces.jsonl"
        with big.open("w") as f:
            for k in range(args.copies):
                for line in lines:
                    rec = json.loads(line)
                    rec["id"] = f"c{k}_{rec['id']}"
                    f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        n = len(FaceRecord.read(big))
        read_s = best(lambda: FaceRecord.read(big))
    t = time.perf_counter()
    DlibDetector(), DlibLandmarks()
    first = time.perf_counter() - t
    again = best(lambda: (DlibDetector(), DlibLandmarks()))
    print(f"code: {Path(reliableswap.__file__).parent.parent}")
    print(f"faces.jsonl, {n} records: read in {read_s:.2f} s (best of 3), {n / read_s:.0f} records/s")
    print(f"dlib detector + 68-point predictor: {first:.2f} s the first time, {again:.2f} s again")


if __name__ == "__main__":
    main()
