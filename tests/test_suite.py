"""The suite's own machinery: `make test` runs on pytest-xdist workers (``--dist loadfile``), and a
worker that dies must cost one failed test, never a run that waits for ever."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
QUICK = "def test_1():\n    pass\n\n\ndef test_2():\n    pass\n"


@pytest.mark.timeout(120)
def test_a_crashed_worker_is_one_failure_and_the_run_ends(tmp_path):
    """A worker killed in the last file, after it finished others: with xdist's own loadfile
    scheduler the run never ends (its finished files come back as empty units); with the
    suite's scheduler (tests/xdist_scheduling.py) it reports the crash and ends."""
    for name in "abcdefgh":
        (tmp_path / f"test_{name}.py").write_text(QUICK)
    (tmp_path / "test_z.py").write_text(
        "import os\nfrom pathlib import Path\n\n\ndef test_dies_once():\n"
        "    marker = Path(__file__).with_name('died')\n"
        "    if not marker.exists():\n        marker.touch()\n        os._exit(1)\n")
    (tmp_path / "conftest.py").write_text("from xdist_scheduling import pytest_xdist_make_scheduler  # noqa: F401\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                        "--no-loadscope-reorder", "--rootdir", str(tmp_path), str(tmp_path)],
                       capture_output=True, text=True, timeout=100, env=env, cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-2000:]
    assert "crashed while running 'test_z.py::test_dies_once'" in r.stdout and "1 failed" in r.stdout, r.stdout[-2000:]
