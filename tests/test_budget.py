"""The time budget: deadline arithmetic, shares per model, how many predictions fit, and the sampling loop obeying
it (a fake engine whose batches take measured time). Run: `pytest tests/test_budget.py`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kaggle_utils import budget, engines, sampling


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.mark.parametrize("seconds,rows,spp,n_max,expected", [
    (100, 10, 1.0, 4, 4),   # 10 rows x 4 x 1 s = 40 s: fits
    (100, 10, 3.0, 4, 3),   # 10 x 3 x 3 s = 90 s fits, 4 would be 120 s
    (100, 10, 6.0, 4, 1),   # only n=1 (60 s)
    (100, 10, 20.0, 4, 0),  # not even one prediction per row
    (0, 10, 1.0, 4, 0),     # no time left
    (-5, 10, 1.0, 4, 0),
    (100, 0, 1.0, 4, 4),    # nothing left to do
    (100, 10, 0.0, 4, 4),   # not measured yet
])
def test_predictions_that_fit(seconds, rows, spp, n_max, expected):
    assert budget.predictions_that_fit(seconds, rows, spp, n_max) == expected


@pytest.mark.parametrize("seconds,now,later,expected", [
    (100, 10, 30, 25.0),  # a quarter of the planned predictions get a quarter of the time
    (100, 10, 0, 100.0),  # the last model gets all that is left
    (100, 0, 0, 100.0),
    (-1, 10, 10, 0.0),
])
def test_share_of_time(seconds, now, later, expected):
    assert budget.share_of_time(seconds, now, later) == pytest.approx(expected)


def test_deadline_counts_from_start_and_keeps_a_reserve():
    clock = FakeClock(1000.0)
    d = budget.Deadline(start=1000.0, hours=1.0, clock=clock)
    assert d.reserve_s == pytest.approx(72.0)  # 2% of an hour
    assert d.remaining() == pytest.approx(3600 - 72)
    clock.now += 3600 - 72
    assert d.expired()
    assert budget.Deadline(start=0, hours=8.75).reserve_s == 300.0  # capped at 5 minutes
    assert budget.Deadline(start=0, hours=0.0001).reserve_s == 5.0
    with pytest.raises(ValueError, match="deadline_hours"):
        budget.Deadline(start=0, hours=0)


def test_default_deadline_is_eight_hours_forty_five():
    assert budget.DEFAULT_DEADLINE_HOURS * 60 == 8 * 60 + 45


def fake_proc(folder: Path, boot: int, start_ticks: int, command: str = "python3 -m ipykernel (x)") -> Path:
    """A stand-in ``/proc``: ``stat`` with the boot time, ``self/stat`` with this process's start in clock ticks after
    boot (field 22) and a command name holding spaces and parentheses, as a kernel's may."""
    (folder / "self").mkdir(parents=True)
    (folder / "stat").write_text(f"cpu  1 2 3 4\nbtime {boot}\nprocesses 99\n")
    fields = ["S"] + [str(i) for i in range(4, 22)] + [str(start_ticks)] + [str(i) for i in range(23, 53)]
    (folder / "self" / "stat").write_text(f"4242 ({command}) " + " ".join(fields) + "\n")
    return folder


def test_notebook_start_is_the_process_start_not_the_import_or_the_call(tmp_path):
    """The process started an hour after boot, and is asked half an hour later on a fake clock: the answer is the
    start (imports and model loading count against the deadline), not the module's import or the call."""
    ticks = os.sysconf("SC_CLK_TCK")
    boot = 1_700_000_000
    proc = fake_proc(tmp_path / "proc", boot, start_ticks=3600 * ticks + ticks // 2)  # 3600.5 s after boot
    clock = FakeClock(boot + 3600 + 1800)
    start = budget.notebook_start(clock, proc)
    assert start == pytest.approx(boot + 3600.5, abs=1e-6)
    assert start not in (clock(), budget._IMPORTED_AT)
    clock.now += 600  # asked again later: the same start
    assert budget.notebook_start(clock, proc) == start


def test_notebook_start_falls_back_to_the_import_time(tmp_path):
    ticks = os.sysconf("SC_CLK_TCK")
    proc = fake_proc(tmp_path / "proc", 1_700_000_000, start_ticks=100 * ticks)
    # /proc says the process starts after the clock's now (a clock set back, a stale file): not believed
    assert budget.notebook_start(FakeClock(1_700_000_000 + 50), proc) == budget._IMPORTED_AT
    assert budget.notebook_start(FakeClock(1_700_000_000 + 99.5), proc) == pytest.approx(1_700_000_100, abs=1e-6)
    assert budget.notebook_start(FakeClock(2e9), tmp_path / "no-proc") == budget._IMPORTED_AT  # not Linux
    (proc / "stat").write_text("cpu  1 2 3 4\n")  # no btime line
    assert budget.notebook_start(FakeClock(2e9), proc) == budget._IMPORTED_AT


def test_this_process_started_before_the_module_was_imported():
    """On this machine's own /proc: the start is no later than the module's import (to within the second that
    /proc's whole-second boot time can be off by), and a deadline counts from it on its own clock."""
    start = budget.notebook_start()
    assert start <= budget._IMPORTED_AT + 1
    clock = FakeClock(time.time() + 600)  # ten minutes from now on the deadline's own clock
    d = budget.Deadline.from_notebook_start(2.0, clock=clock)
    assert d.start == pytest.approx(start, abs=1e-6) and d.hours == 2.0
    assert d.remaining() == pytest.approx(start + 2 * 3600 - d.reserve_s - clock.now, abs=1e-6)


def test_model_share_and_fit_n():
    clock = FakeClock(0.0)
    d = budget.Deadline(start=0.0, hours=1.0, reserve_s=0, clock=clock)
    mb = d.for_model(work_now=100, work_later=300)  # a quarter of an hour
    assert mb.remaining() == pytest.approx(900)
    assert mb.fit_n(rows_left=100, n_max=4) == 4  # still warming up: nothing measured
    mb.record(seconds=20, rows=10, n=4)  # 0.5 s per prediction
    assert mb.fit_n(100, 4) == 4  # one batch is not enough to judge
    mb.record(seconds=20, rows=10, n=4)
    clock.now = 40
    # 860 s left for 100 rows at 0.5 s per prediction: 17.2 predictions per row would fit, so 4
    assert mb.fit_n(100, 4) == 4
    assert mb.fit_n(500, 4) == 3  # 860 / (500 x 0.5) = 3.4
    assert mb.fit_n(5000, 4) == 1  # not even one: 1, and the deadline stops it later
    assert mb.next_batch_seconds(4) == pytest.approx(20)
    assert not mb.should_stop(4)
    clock.now = 900 - 10  # 10 s left, a batch takes 20 s
    assert mb.should_stop(4)
    assert not mb.should_stop(1)  # a batch at n=1 takes 5 s


class SleepyEngine(engines.Engine):
    """Each batch of ``generation_batch_size`` rows 'takes' ``seconds`` on a fake clock; predictions are row texts."""

    name = "fake"

    def __init__(self, clock, seconds_per_prediction):
        self.clock = clock
        self.spp = seconds_per_prediction
        self.calls = []

    def generate_batches(self, originals, rewrittens, cfg, skip=frozenset(), progress=True):
        todo = [i for i in range(len(originals)) if i not in skip]
        self.calls.append((cfg.n, len(todo)))
        for k in range(0, len(todo), cfg.generation_batch_size):
            rows = todo[k:k + cfg.generation_batch_size]
            self.clock.now += self.spp * len(rows) * cfg.n
            yield rows, [[f"Rewrite {originals[i]} as {j}." for j in range(cfg.n)] for i in rows]


def _rows(n):
    ids = [f"r{i}" for i in range(n)]
    return ids, [f"text {i}" for i in range(n)], [f"other {i}" for i in range(n)]


def test_sampling_lowers_n_when_the_requested_n_does_not_fit(tmp_path, monkeypatch):
    clock = FakeClock(0.0)
    monkeypatch.setattr(sampling.time, "time", clock)
    ids, orig, rewr = _rows(40)
    engine = SleepyEngine(clock, seconds_per_prediction=1.0)
    store = sampling.PredictionStore(tmp_path, "m", {"v": 1})
    share = budget.ModelBudget(ends_at=100.0, clock=clock)  # 40 rows x 4 x 1 s = 160 s would not fit
    cfg = engines.SamplingConfig(n=4, temperature=0.7, generation_batch_size=4)
    report = sampling.sample_rows(engine, ids, orig, rewr, cfg, store, "Improve this text.", budget=share,
                                  model_name="m", progress=False)
    assert engine.calls[0] == (4, 40) and engine.calls[1][0] < 4  # restarted with a lower n
    assert report.n_requested == 4 and report.n_used < 4
    assert clock.now <= 100.0 + 1e-9  # never crossed the share's end
    done = store.predictions(ids, [sampling.text_key(o, r) for o, r in zip(orig, rewr)])
    assert report.sampled == len(done) and report.undone == 40 - len(done)
    assert all(1 <= len(p) <= 4 for p in done.values())


def test_sampling_stops_before_the_deadline_and_leaves_rows_undone(tmp_path, monkeypatch):
    clock = FakeClock(0.0)
    monkeypatch.setattr(sampling.time, "time", clock)
    ids, orig, rewr = _rows(40)
    engine = SleepyEngine(clock, seconds_per_prediction=1.0)
    store = sampling.PredictionStore(tmp_path, "m", {"v": 1})
    share = budget.ModelBudget(ends_at=10.0, clock=clock)  # time for 2-3 batches of 4 rows at n=1
    cfg = engines.SamplingConfig(n=1, temperature=0.7, generation_batch_size=4)
    report = sampling.sample_rows(engine, ids, orig, rewr, cfg, store, "Improve this text.", budget=share,
                                  progress=False)
    assert 0 < report.sampled < 40 and report.undone == 40 - report.sampled
    assert clock.now <= 10.0 + 1e-9
    assert len(store.done) == report.sampled
