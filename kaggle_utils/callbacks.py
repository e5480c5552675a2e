"""The trainer's callbacks: the metrics log every stage reads, the time budget that fits the training loop into
``time_budget_minutes`` on the machine it runs on (what it chose goes to ``budget.json``), and the step profile that
shows where each process's steps go (``profile_steps``).

They write into the run folder (its files are named in :mod:`kaggle_utils.artifacts`); only the main process writes,
except the step profile, which every process writes for itself.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from .artifacts import BUDGET_FILE, METRICS_FILE, STEP_PROFILE_FILE, write_json
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
# ones (new shapes), so the first estimate errs long and the rechecks give steps back. A recheck moves the last step
# only by more than BUDGET_TOLERANCE of the planned steps (and at least 2): the pace jitters by a step or so between
# rechecks, and following it would flip the last step and the checkpoint interval back and forth (a checkpoint at 74
# and another at 75), each flip one more checkpoint for the select stage to score.
BUDGET_PROBE_STEPS = 3
BUDGET_RECHECK_STEPS = 5
BUDGET_TOLERANCE = 0.02
_clock = time.monotonic  # the time budget's clock (tests run it on a fake one)


def time_budget_callback(cfg):
    """A callback that fits the training loop of ``cfg`` (a :class:`kaggle_utils.training.TrainConfig`) into
    ``cfg.time_budget_minutes`` on the machine it runs on.

    It times the optimizer steps after the first and the evaluations, then projects the whole loop: the time spent,
    the remaining steps at the measured pace, and the remaining checkpoints' evaluations. When the recipe does not
    fit, ``max_steps`` becomes the most that does, the checkpoints keep their count (``save_steps`` shrinks with it),
    and the learning-rate schedule is stretched to end at the new last step, as if the recipe had asked for it; later
    checks move that step as the pace estimate firms up (by more than 2% of the recipe's steps: less is the pace's
    jitter), never past the recipe's. Each decision goes to
    ``budget.json`` and the log; a resumed run reads it back instead of measuring again.
    """
    from transformers import TrainerCallback

    path = cfg.run_dir / BUDGET_FILE
    # the checkpoints at every save_steps, and the last step's (saved at the end whether or not save_steps divides it)
    n_checkpoints = max(1, math.ceil(cfg.max_steps / cfg.save_steps))
    budget = cfg.time_budget_minutes * 60
    tolerance = max(2, math.ceil(BUDGET_TOLERANCE * cfg.max_steps))

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
            if timed > BUDGET_PROBE_STEPS and abs(fit - self.chosen) < tolerance:  # within the pace's jitter
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


# ---------------------------------------------------------------- the step profile

# What each phase of the step profile holds. The phases tile the profiled time: every interval between two of the
# trainer's events goes to exactly one, so their shares add up to 1.
STEP_PHASES = {
    "data": "the next optimizer step's micro batches: data loader, collation and, with several processes, the "
            "all-gather of their answer-token counts (a collective: it waits for the slowest process)",
    "forward_backward": "every micro step's forward and backward (host dispatch and device work), the last one's "
                        "gradient-norm clipping included; DDP's own collectives below taken out",
    "ddp_pre_forward": "several processes: DDP's work before each training forward, chiefly the broadcast of rank 0's "
                       "buffers (the rotary tables), a collective, so it holds the wait for rank 0",
    "grad_allreduce": "several processes: the gradient all-reduce of the last micro step, from its start (after the "
                      "device finished the backward up to it) to its end, so it holds the wait for the other processes",
    "optimizer": "the optimizer step, the learning-rate schedule and zeroing the gradients",
    "log": "a train-loss log line: the loss gathered over the processes (a collective) and written",
    "evaluate": "an evaluation (eval loss on the choice rows), on every process",
    "save": "a checkpoint save (only the main process writes; the others pass through)",
    "other": "the end of training; with several processes its count of FLOPs is gathered (a collective: it waits "
             "for the main process's last save)",
}


def process_threads() -> int | None:
    """The OS threads of this process (torch's pools, the tokenizer's, the launcher's), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def step_profile_callback(cfg, trainer):
    """A callback that times where each of the first ``cfg.profile_steps`` optimizer steps goes in this process and
    writes it to ``step_profile_rank<R>.json`` in the run folder (every process its own), for one run on 1 process and
    one on N to show where the second card waits.

    Host clocks between the trainer's events, each read after ``torch.cuda.synchronize()`` where CUDA is present, so
    a phase holds its device work too (the waits cost the overlap of host and device across the boundaries: profiled
    steps run a little slower). Under DDP a communication hook and two forward pre-hooks time DDP's own collectives
    (:data:`STEP_PHASES`). The profile covers what comes before the first step (the evaluation at step 0), the steps,
    and what follows the last (its log, evaluation and checkpoint); ``trainer`` gives the DDP-wrapped model, which the
    trainer builds only once training begins. When ``profile_steps`` is 0 the trainer gets no such callback.
    """
    import torch
    from transformers import TrainerCallback

    class StepProfile(TrainerCallback):
        def __init__(self):
            self.active, self.hooks, self.forward_start = False, [], None

        def now(self) -> float:
            if self.cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.cuda = torch.cuda.is_available()
            self.rank, self.world = args.process_index, args.world_size
            self.first, self.last_step = state.global_step + 1, state.global_step + cfg.profile_steps
            self.totals = dict.fromkeys(STEP_PHASES, 0.0)
            self.counts = dict.fromkeys(STEP_PHASES, 0)
            self.per_step: dict[int, dict] = {}
            self.pending = {"ddp_pre_forward": [], "grad_allreduce": []}  # timed inside the current micro step
            self.path = cfg.run_dir / STEP_PROFILE_FILE.format(rank=self.rank)
            self.active = True
            self.watch_ddp(getattr(trainer, "model_wrapped", None))
            self.start = self.mark = self.now()

        def watch_ddp(self, ddp) -> None:
            """Time DDP's collectives: a pre-hook on the wrapper and one on the model it wraps bracket its pre-forward
            work; the communication hook is DDP's own all-reduce, waited for while the profile runs."""
            if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
                return
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def before_ddp(module, inputs):
                if self.active and module.training:
                    self.forward_start = self.now()

            def after_ddp(module, inputs):
                if self.active and module.training and self.forward_start is not None:
                    self.pending["ddp_pre_forward"].append(self.now() - self.forward_start)
                    self.forward_start = None

            def allreduce(process_group, bucket):
                if not self.active:
                    return default_hooks.allreduce_hook(process_group, bucket)
                start = self.now()
                future = default_hooks.allreduce_hook(process_group, bucket)
                future.wait()
                self.pending["grad_allreduce"].append(self.now() - start)
                return future

            self.hooks = [ddp.register_forward_pre_hook(before_ddp), ddp.module.register_forward_pre_hook(after_ddp)]
            ddp.register_comm_hook(None, allreduce)  # DDP's default (the mean over processes), timed

        def close(self, phase: str, step: int, count: int = 1) -> None:
            """Give the time since the last event to ``phase`` of ``step`` (``count`` more of it); past the last
            profiled step, write."""
            if not self.active:
                return
            if step > self.last_step:
                self.finish()
                return
            now = self.now()
            seconds, self.mark = now - self.mark, now
            row = self.per_step.setdefault(step, {})
            pending = {k: v for k, v in self.pending.items() if v}
            self.pending = {k: [] for k in self.pending}
            if phase == "forward_backward":  # DDP's collectives, timed inside this micro step, get their own phases
                for name, times in pending.items():
                    self.add(row, name, sum(times), len(times))
                    seconds -= sum(times)
            self.add(row, phase, seconds, count)

        def add(self, row: dict, phase: str, seconds: float, count: int) -> None:
            self.totals[phase] += seconds
            self.counts[phase] += count
            row[phase] = row.get(phase, 0.0) + seconds

        def finish(self) -> None:
            self.active = False
            for hook in self.hooks:
                hook.remove()
            wall = self.mark - self.start
            phases = {p: {"total_s": round(t, 4), "count": self.counts[p],
                          "mean_s": round(t / self.counts[p], 4) if self.counts[p] else 0.0,
                          "share": round(t / wall, 4) if wall > 0 else 0.0} for p, t in self.totals.items()}
            steps = sorted(s for s in self.per_step if s >= self.first)
            write_json(self.path, {
                "rank": self.rank, "world_size": self.world,
                "device": torch.cuda.get_device_name() if self.cuda else "cpu", "cuda_synchronized": self.cuda,
                "torch_threads": torch.get_num_threads(), "process_threads": process_threads(),
                "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
                "steps": [steps[0], steps[-1]] if steps else [], "wall_s": round(wall, 4), "phases": phases,
                "per_step": [{"step": s, **{p: round(v, 4) for p, v in self.per_step[s].items()}}
                             for s in sorted(self.per_step)],
                "includes": STEP_PHASES})
            logger.info("step profile of process %d (%d steps, %.1f s): %s -> %s", self.rank, len(steps), wall,
                        ", ".join(f"{p} {v['share']:.0%}" for p, v in phases.items() if v["total_s"] > 0), self.path)

        def on_step_begin(self, args, state, control, **kwargs):
            self.close("data", state.global_step + 1)

        def on_substep_end(self, args, state, control, **kwargs):
            self.close("forward_backward", state.global_step + 1)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.close("forward_backward", state.global_step + 1)

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.close("optimizer", state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):
            self.close("optimizer", state.global_step, count=0)  # the schedule and zero_grad: the same step's

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # a train-loss line; an evaluation's line is part of the evaluation
                self.close("log", state.global_step)

        def on_evaluate(self, args, state, control, **kwargs):
            self.close("evaluate", state.global_step)

        def on_save(self, args, state, control, **kwargs):
            self.close("save", state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            self.close("other", state.global_step)
            if self.active:
                self.finish()

    return StepProfile()
