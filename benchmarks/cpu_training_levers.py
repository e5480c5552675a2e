"""Training speed of the CPU recipe's levers, paired: examples per second of each arm against the recipe as it is.

Usage (writes results.json and results.md to --out; about a minute a run on 2 cores):
    .venv/bin/python benchmarks/cpu_training_levers.py --out runs/bench/levers \\
        --arm "upper15:lora_layers=15" --arm "prompt128:max_prompt_tokens=128,max_seq_length=224" --reps 2

Each run trains ``--steps`` optimizer steps of ``--config`` (with the arm's overrides) in a fresh process through
the library's own training loop (``training.run``: the real rows, LoRA, TRL's trainer), logging every step. Its pace
is the median seconds between the logged steps after the first two (warm-up left out; the evaluation after the last
step left out), and its examples/s the effective batch over that. The arms run in turn, rep after rep (baseline,
arm 1, arm 2, baseline, ...), so a machine that slows down slows every arm alike; each arm's ratio is taken against
the baseline run of the same rep, then the median over reps. Speed only: what an arm scores at equal steps comes
from research/sweep.sh over training seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common as common  # noqa: E402  (benchmarks/ is not a package; _common puts the repo on sys.path)


def parse_arm(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, overrides); values read as YAML scalars (15 -> int, true -> bool)."""
    import yaml

    name, _, rest = text.partition(":")
    overrides = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name.strip(), overrides


def one_run(config: str, overrides: dict, run_dir: Path, steps: int) -> dict:
    """Train one arm for ``steps`` steps in this process; its pace from metrics.jsonl."""
    from kaggle_utils import config as cfgmod
    from kaggle_utils import training

    cfg = cfgmod.load_yaml(training.TrainConfig, config, **{
        # few held-out rows: the evaluations (at the start and after the last step) are not what is timed
        "val_rows": 8, "report_rows": 8, **overrides, "run_name": run_dir.name, "runs_dir": str(run_dir.parent),
        "max_steps": steps, "save_steps": steps, "logging_steps": 1, "time_budget_minutes": 0})
    training.prepare_run(cfg)
    t0 = time.perf_counter()
    model, tokenizer = training.load_model_and_tokenizer(cfg)
    train_ds, eval_ds = training.build_datasets(cfg, tokenizer)
    trainer = training.build_trainer(cfg, model, tokenizer, train_ds, eval_ds)
    load_s = time.perf_counter() - t0
    trainer.train()
    rows = [json.loads(line) for line in (cfg.run_dir / training.METRICS_FILE).read_text().splitlines()]
    times = {r["step"]: r["time"] for r in rows if "loss" in r}
    steps_logged = sorted(times)
    gaps = [times[b] - times[a] for a, b in zip(steps_logged, steps_logged[1:]) if a >= 2]
    pace = statistics.median(gaps)
    lengths = [len(x) for x in train_ds["input_ids"]]
    return {"seconds_per_step": pace, "examples_per_s": cfg.batch_size / pace, "steps_timed": len(gaps),
            "load_s": round(load_s, 1), "mean_tokens": round(statistics.mean(lengths), 1),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _cpu() -> str:
    """The CPU's model name and the cores this process may use."""
    import os

    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/levers")
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--arm", action="append", default=[], help="name:key=value,... (repeatable)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps a run (the first two not timed)")
    parser.add_argument("--reps", type=int, default=2, help="rounds of every arm")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one run, as JSON
    args = parser.parse_args(argv)
    if args.one:
        job = json.loads(args.one)
        print("RESULT " + json.dumps(one_run(job["config"], job["overrides"], Path(job["run_dir"]), job["steps"])))
        return 0
    out = common.REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    arms = [("baseline", {})] + [parse_arm(a) for a in args.arm]
    results: list[dict] = []
    for rep in range(args.reps):
        for name, overrides in arms:
            run_dir = out / "runs" / f"{name}-r{rep}"
            job = {"config": args.config, "overrides": overrides, "run_dir": str(run_dir), "steps": args.steps}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True,
                                  cwd=common.REPO)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or not line:
                raise SystemExit(f"{name} rep {rep} failed:\n{proc.stderr[-3000:]}")
            results.append({"arm": name, "rep": rep, "overrides": overrides, **json.loads(line[7:])})
            print(f"{name} rep {rep}: {results[-1]['seconds_per_step']:.2f} s/step", flush=True)
    summary = []
    for name, overrides in arms:
        ratios = []
        for rep in range(args.reps):
            mine = next(r for r in results if r["arm"] == name and r["rep"] == rep)
            base = next(r for r in results if r["arm"] == "baseline" and r["rep"] == rep)
            ratios.append(mine["examples_per_s"] / base["examples_per_s"])
        runs = [r for r in results if r["arm"] == name]
        summary.append({"arm": name, "overrides": overrides,
                        "examples_per_s": statistics.median(r["examples_per_s"] for r in runs),
                        "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),
                        "mean_tokens": runs[0]["mean_tokens"], "trainable": runs[0]["trainable"],
                        "ratio_per_rep": [round(x, 3) for x in ratios], "ratio": statistics.median(ratios)})
    record = {"cpu": _cpu(), "config": args.config,
              "steps": args.steps, "reps": args.reps, "runs": results, "summary": summary}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"{record['cpu']}; `{args.config}`, {args.steps} steps a run, {args.reps} reps, arms in turn; ratio = examples/s against "
             "the baseline run of the same rep, median over reps.", "",
             "| arm | overrides | s/step | examples/s | x baseline (per rep) | mean tokens | trainable |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['arm']} | {s['overrides'] or '-'} | {s['seconds_per_step']:.2f} | {s['examples_per_s']:.2f} "
                     f"| {s['ratio']:.2f}x ({', '.join(f'{x:.2f}' for x in s['ratio_per_rep'])}) | "
                     f"{s['mean_tokens']} | {s['trainable']:,} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
