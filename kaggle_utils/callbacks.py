"""The trainer's callbacks: the metrics log every stage reads, and the time budget that fits the training loop into
``time_budget_minutes`` on the machine it runs on (what it chose goes to ``budget.json``).

Both write into the run folder (its files are named in :mod:`kaggle_utils.artifacts`); only the main process writes.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from .artifacts import BUDGET_FILE, METRICS_FILE
from .config import read_json_object

logger = logging.getLogger("kaggle_utils")


# ---------------------------------------------------------------- the metrics log


def metrics_callback(run_dir: Path):
    """A callback that keeps the run's metrics log and each checkpoint's ``metrics.json``."""
    from transformers import TrainerCallback

    class MetricsWriter(TrainerCallback):
        """Append every log line to metrics.jsonl and write {step, metrics} into each checkpoint folder.

        Each line also has the wall-clock ``time`` (seconds since the epoch: s/step and samples/s come from the
        difference of two lines) and, on a GPU, this process's peak memory so far (``gpu_peak_gib``)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:  # data-parallel: the main process writes, once
                import torch

                row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
                       "time": round(time.time(), 3)}
                if torch.cuda.is_available():
                    row["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                with open(run_dir / METRICS_FILE, "a") as fh:
                    fh.write(json.dumps(row) + "\n")

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            ckpt = run_dir / f"checkpoint-{state.global_step}"
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            evals = [h for h in state.log_history if "eval_loss" in h and h.get("step") == state.global_step]
            meta = {"step": state.global_step, "train_loss": losses[-1] if losses else None,
                    "eval_loss": evals[-1]["eval_loss"] if evals else None}
            if ckpt.is_dir():
                (ckpt / "metrics.json").write_text(json.dumps(meta, indent=2) + "\n")

    return MetricsWriter()


# ---------------------------------------------------------------- the time budget

# The time budget decides after timing this many optimizer steps (the first, with its warm-up, not counted), then
# looks again every BUDGET_RECHECK_STEPS with everything timed so far: early steps on a CPU run slower than later
# ones (new shapes), so the first estimate errs long and the rechecks give steps back.
BUDGET_PROBE_STEPS = 3
BUDGET_RECHECK_STEPS = 5
_clock = time.monotonic  # the time budget's clock (tests run it on a fake one)


def time_budget_callback(cfg):
    """A callback that fits the training loop of ``cfg`` (a :class:`kaggle_utils.training.TrainConfig`) into
    ``cfg.time_budget_minutes`` on the machine it runs on.

    It times the optimizer steps after the first and the evaluations, then projects the whole loop: the time spent,
    the remaining steps at the measured pace, and the remaining checkpoints' evaluations. When the recipe does not
    fit, ``max_steps`` becomes the most that does, the checkpoints keep their count (``save_steps`` shrinks with it),
    and the learning-rate schedule is stretched to end at the new last step, as if the recipe had asked for it; later
    checks move that step as the pace estimate firms up, never past the recipe's. Each decision goes to
    ``budget.json`` and the log; a resumed run reads it back instead of measuring again.
    """
    from transformers import TrainerCallback

    path = cfg.run_dir / BUDGET_FILE
    n_checkpoints = max(1, cfg.max_steps // cfg.save_steps)
    budget = cfg.time_budget_minutes * 60

    def apply(state, scheduler, max_steps: int, save_steps: int) -> None:
        state.max_steps = max_steps
        state.save_steps = state.eval_steps = save_steps
        sched = getattr(scheduler, "scheduler", scheduler)  # accelerate may wrap it
        lambdas = getattr(sched, "lr_lambdas", [])
        if lambdas and all(hasattr(f, "keywords") and "num_training_steps" in f.keywords for f in lambdas):
            sched.lr_lambdas = [type(f)(f.func, *f.args, **{**f.keywords, "num_training_steps": max_steps})
                                for f in lambdas]
        elif cfg.lr_scheduler != "constant_with_warmup":
            logger.warning("time budget: the %s schedule could not be stretched to step %d", cfg.lr_scheduler,
                           max_steps)

    class TimeBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            self.start, self.first, self.last, self.evals, self.done = _clock(), None, None, [], False
            self.chosen = cfg.max_steps
            if path.exists():  # a resumed run keeps the steps the first one could afford
                record = read_json_object(path)
                if (record.get("planned_steps"), record.get("budget_minutes")) == (cfg.max_steps,
                                                                                    cfg.time_budget_minutes):
                    apply(state, lr_scheduler, record["max_steps"], record["save_steps"])
                    self.done = True
                    logger.info("time budget: %d steps, as budget.json recorded", record["max_steps"])

        def on_evaluate(self, args, state, control, **kwargs):
            if not self.done and self.last is not None and self.last[0] == state.global_step:
                self.evals.append(_clock() - self.last[1])

        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            if self.done:
                return
            step, now = state.global_step, _clock()
            self.last = (step, now)
            if self.first is None:
                self.first = (step, now)
            timed = step - self.first[0]
            if timed < BUDGET_PROBE_STEPS or (timed - BUDGET_PROBE_STEPS) % BUDGET_RECHECK_STEPS:
                return
            pace = (now - self.first[1] - sum(self.evals)) / timed
            # an evaluation's cost: as timed at the checkpoints so far, else from the one before the first step
            evaluation = float(np.mean(self.evals)) if self.evals else max(0.0, self.first[1] - self.start - pace)
            spent = now - self.start

            def projected(steps: int) -> float:
                return spent + (steps - step) * pace + n_checkpoints * (steps - step) / steps * evaluation

            fit = next((m for m in range(cfg.max_steps, step, -1) if projected(m) <= budget), step + 1)
            if timed > BUDGET_PROBE_STEPS and fit == self.chosen:  # a recheck that changes nothing says nothing
                return
            save_steps = cfg.save_steps if fit == cfg.max_steps else max(1, math.ceil(fit / n_checkpoints))
            if fit != state.max_steps:
                apply(state, lr_scheduler, fit, save_steps)
                # the default flow ran first: it may have stopped the loop at the old last step (fit > step always)
                control.should_training_stop = False
            record = {"budget_minutes": cfg.time_budget_minutes, "planned_steps": cfg.max_steps,
                      "seconds_per_step": round(pace, 3), "timed_steps": [self.first[0] + 1, step],
                      "evaluation_seconds": round(evaluation, 1),
                      "planned_minutes": round(projected(cfg.max_steps) / 60, 1), "max_steps": fit,
                      "save_steps": save_steps}
            if fit == cfg.max_steps:
                logger.info("time budget %.1f min: %.2f s a step over steps %d-%d, so the %d planned steps take about "
                            "%.1f min: kept", cfg.time_budget_minutes, pace, self.first[0] + 1, step, cfg.max_steps,
                            projected(cfg.max_steps) / 60)
            else:
                logger.warning("time budget %.1f min: %.2f s a step over steps %d-%d on this machine, so the %d "
                               "planned steps would take %.1f min: training stops at step %d (a checkpoint every %d "
                               "steps, the %s schedule ending there). Fewer steps usually score lower; "
                               "time_budget_minutes=0 trains them all", cfg.time_budget_minutes, pace,
                               self.first[0] + 1, step, cfg.max_steps, projected(cfg.max_steps) / 60, fit, save_steps,
                               cfg.lr_scheduler)
            self.chosen = fit
            if state.is_world_process_zero:
                path.write_text(json.dumps(record, indent=2) + "\n")

    return TimeBudget()
