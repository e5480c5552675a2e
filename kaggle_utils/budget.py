"""The run's time budget: a deadline counted from the notebook's start, measured throughput, and how many
predictions per row still fit.

Kaggle stops a submission notebook at 9 hours and then there is no submission at all, so the default deadline is
8 h 45 min from the notebook's start (the kernel process's start, which includes imports and model loading). Each
model of the plan gets a share of the remaining time in proportion to the predictions it was asked for; within its
share the sampling loop (:func:`kaggle_utils.sampling.sample_rows`) measures seconds per prediction on the first
batches, lowers n when the requested n cannot finish, and stops before a batch that would cross the share's end.
Rows still undone get the fallback prompt, so the submission is always complete.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger("kaggle_utils")

DEFAULT_DEADLINE_HOURS = 8.75
_IMPORTED_AT = time.time()


def notebook_start(clock: Callable[[], float] = time.time, proc: str | os.PathLike = "/proc") -> float:
    """When this process (the notebook's kernel) started, as a Unix time; the module's import time where
    ``/proc`` cannot tell (not Linux), or tells a start after ``clock``'s now (tests pass a fake clock and a fake
    ``proc`` folder)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open(os.path.join(proc, "self", "stat")) as fh:
            # field 22 (starttime, in clock ticks since boot); the command name (field 2) may hold spaces
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open(os.path.join(proc, "stat")) as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        started = boot + start_ticks / ticks
        return started if started <= clock() + 1 else _IMPORTED_AT
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


def default_reserve(total_seconds: float) -> float:
    """Seconds kept free at the end for blending, writing and validating the submission: 2% of the budget, between
    5 s and 5 min."""
    return min(300.0, max(5.0, 0.02 * total_seconds))


def predictions_that_fit(seconds: float, rows: int, seconds_per_prediction: float, n_max: int) -> int:
    """How many predictions per row (0..``n_max``) ``rows`` rows can get in ``seconds``, at the measured cost of one
    prediction (cost grows linearly with n: HF expands every row n times, vLLM decodes n sequences)."""
    if rows <= 0 or seconds_per_prediction <= 0:
        return n_max
    if seconds <= 0:
        return 0
    return max(0, min(n_max, int(seconds // (rows * seconds_per_prediction))))


def share_of_time(seconds: float, work_now: float, work_later: float) -> float:
    """This model's part of ``seconds``, in proportion to its planned predictions against those of later models."""
    if seconds <= 0:
        return 0.0
    total = work_now + work_later
    return seconds if total <= 0 else seconds * work_now / total


@dataclass
class ModelBudget:
    """One model's time share: when it ends, and the throughput measured so far."""

    ends_at: float  # Unix time by which this model's sampling must be done
    clock: Callable[[], float] = time.time  # replaceable in tests
    warmup_batches: int = 2  # n is only lowered after this many measured batches
    batches: list = field(default_factory=list)  # (seconds, rows, n) per batch

    def remaining(self) -> float:
        """Seconds left in this model's share."""
        return self.ends_at - self.clock()

    def record(self, seconds: float, rows: int, n: int) -> None:
        """Record one finished batch."""
        self.batches.append((float(seconds), int(rows), int(n)))

    @property
    def seconds_per_prediction(self) -> float:
        """Mean seconds per (row x prediction) over the measured batches; 0 before any."""
        preds = sum(r * n for _, r, n in self.batches)
        return sum(s for s, _, _ in self.batches) / preds if preds else 0.0

    def next_batch_seconds(self, n: int) -> float:
        """A cautious estimate of the next batch: the slowest measured batch per prediction, at ``n`` and the last
        batch's rows (batches go longest rows first, so later ones are usually quicker)."""
        if not self.batches:
            return 0.0
        worst = max(s / (r * k) for s, r, k in self.batches if r and k)
        return worst * self.batches[-1][1] * n

    def should_stop(self, n: int) -> bool:
        """True when the next batch would not finish inside this model's share."""
        return self.remaining() < self.next_batch_seconds(n)

    def fit_n(self, rows_left: int, n_max: int) -> int:
        """Predictions per row (1..``n_max``) that let ``rows_left`` rows finish in the share; ``n_max`` while still
        warming up. When even 1 does not fit, 1: rows past the end get the fallback."""
        if len(self.batches) < self.warmup_batches:
            return n_max
        return max(1, predictions_that_fit(self.remaining(), rows_left, self.seconds_per_prediction, n_max))


@dataclass
class Deadline:
    """The whole run's deadline: ``hours`` after ``start`` (the notebook's start), minus a reserve for writing the
    submission."""

    start: float  # Unix time the budget counts from
    hours: float = DEFAULT_DEADLINE_HOURS  # the budget
    reserve_s: float = -1  # seconds kept for blending and writing; negative: default_reserve()
    clock: Callable[[], float] = time.time  # replaceable in tests

    def __post_init__(self):
        if self.hours <= 0:
            raise ValueError(f"deadline_hours: must be > 0, got {self.hours}")
        if self.reserve_s < 0:
            self.reserve_s = default_reserve(self.hours * 3600)

    @classmethod
    def from_notebook_start(cls, hours: float = DEFAULT_DEADLINE_HOURS, **kwargs) -> "Deadline":
        """The deadline counted from this kernel's start (see :func:`notebook_start`)."""
        deadline = cls(start=notebook_start(kwargs.get("clock", time.time)), hours=hours, **kwargs)
        logger.info("deadline: %.2f h from the notebook's start; %.0f s left for sampling", hours, deadline.remaining())
        return deadline

    @property
    def ends_at(self) -> float:
        """Unix time when sampling must be over (the deadline less the reserve)."""
        return self.start + self.hours * 3600 - self.reserve_s

    def remaining(self) -> float:
        """Seconds left for sampling."""
        return self.ends_at - self.clock()

    def expired(self) -> bool:
        """True when no time is left for sampling."""
        return self.remaining() <= 0

    def for_model(self, work_now: float, work_later: float, warmup_batches: int = 2) -> ModelBudget:
        """The next model's share: the remaining time split by planned predictions (rows x n) of it and the models
        after it. Time a model leaves unused flows to the later ones, since each share is taken when it starts."""
        seconds = share_of_time(self.remaining(), work_now, work_later)
        return ModelBudget(ends_at=self.clock() + seconds, clock=self.clock, warmup_batches=warmup_batches)
