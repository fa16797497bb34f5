"""The local engine (:func:`reliableswap.engine.run` without Ray): typed rows through stages in
threads joined by bounded queues; a stage's exception stops the run as itself; a ``stream`` stage
sees the row iterator; stage seconds reach the driver's job. The Ray implementation runs the same
stage classes (tests/test_ray.py: the same folders as the local engine, byte for byte)."""

from __future__ import annotations

import threading
import time
from typing import Iterator, NamedTuple

import pytest

from reliableswap import engine
from reliableswap.jobs import Job


class Item(NamedTuple):
    n: int


class Produced:
    """Counts the rows it has handed on (the pipeline's memory bound is what it may run ahead)."""

    made: list[int] = []

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at

    def __call__(self, row: Item) -> Item:
        if row.n == self.fail_at:
            raise ValueError(f"unit {row.n} is bad")
        Produced.made.append(row.n)
        return Item(row.n * 10)


class Slow:
    """A consumer slower than its producer, timing itself in its own job."""

    ahead: list[int] = []

    def __init__(self, out: str):
        self.job = Job.attach("t", out, "items")

    def __call__(self, row: Item) -> Item:
        with self.job.stage("slow"):
            Slow.ahead.append(len(Produced.made) - len(Slow.ahead) - 1)
            time.sleep(0.01)
        return Item(row.n + 1)


class Pending:
    """A stream stage that hands row k−1 on once row k has arrived (a renderer finishing writes)."""

    def stream(self, rows: Iterator[Item]) -> Iterator[Item]:
        last = None
        for row in rows:
            if last is not None:
                yield last
            last = row
        if last is not None:
            yield last

    def __call__(self, row: Item) -> Item:  # pragma: no cover - Ray's per-row call
        return row


class Broken:
    def __init__(self):
        raise OSError("model file missing")

    def __call__(self, row: Item) -> Item:  # pragma: no cover
        return row


def _job(tmp_path) -> Job:
    return Job("t", tmp_path / "out", {}, "items", resumable=False, lock=False)


def test_rows_pass_in_order_through_bounded_queues_with_their_stage_seconds(tmp_path):
    Produced.made, Slow.ahead = [], []
    job = _job(tmp_path)
    rows = engine.run(job, [Item(i) for i in range(40)],
                      [engine.Stage(Produced), engine.Stage(Slow, {"out": str(job.out)}), engine.Stage(Pending)])
    assert rows == [Item(i * 10 + 1) for i in range(40)]
    # the producer never runs far ahead of the slow stage: what a bounded queue holds, plus the
    # row each of the two threads has in hand
    assert max(Slow.ahead) <= engine.QUEUE_ROWS + 2, max(Slow.ahead)
    assert job.stages["slow"] >= 40 * 0.01
    assert not [t for t in threading.enumerate() if t.name.startswith("stage-")]


@pytest.mark.parametrize("where", ["row", "constructor"])
def test_a_stage_s_exception_stops_the_run_as_itself_and_no_thread_is_left(tmp_path, where):
    Produced.made, Slow.ahead = [], []
    job = _job(tmp_path)
    first = engine.Stage(Produced, {"fail_at": 7}) if where == "row" else engine.Stage(Broken)
    with pytest.raises(ValueError if where == "row" else OSError) as e:
        engine.run(job, [Item(i) for i in range(1000)], [first, engine.Stage(Slow, {"out": str(job.out)}), engine.Stage(Pending)])
    assert str(e.value) in ("unit 7 is bad", "model file missing")
    assert len(Produced.made) <= 7  # the stages stopped there, not after every unit
    assert not [t for t in threading.enumerate() if t.name.startswith("stage-")]


def test_no_units_start_nothing(tmp_path):
    assert engine.run(_job(tmp_path), [], [engine.Stage(Broken)]) == []
