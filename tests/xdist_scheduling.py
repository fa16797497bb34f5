"""The suite's pytest-xdist scheduler (``pytest_xdist_make_scheduler``, taken up by conftest.py),
in a module of its own so that a test can run it in a nested pytest without the suite's fixtures."""

from __future__ import annotations

import pytest


@pytest.hookimpl(optionalhook=True)  # a run without xdist (-p no:xdist) does not know the hook
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` as pytest-xdist 3.8 does it, but for the files a crashed worker had
    finished: xdist puts every file of the crashed worker back in its queue, finished ones
    included, and hands those out later as empty units that never report back, so the run waits
    for ever at its end (pytest-xdist issues 1323 and 1378). Here only the unfinished files go back:
    a crashed worker is one failed test, and the run ends."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FinishedFilesStayFinished(LoadFileScheduling):
        def remove_node(self, node):
            workload = self.assigned_work.pop(node)
            if not self._pending_of(workload):
                return None
            unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
            crashitem = next(nodeid for unit in unfinished.values() for nodeid, done in unit.items() if not done)
            self.workqueue.update(unfinished)
            for other in self.assigned_work:
                self._reschedule(other)
            return crashitem

    return FinishedFilesStayFinished(config, log)
