"""How many checkpoints to average, and which: windows chosen on the choice rows, scored on the report rows.

Usage: python research/average_windows.py RUN [RUN ...] [--k 5 9 13] [--tail 9 15] [--soup] [--png PATH]

Each RUN folder needs its choice rows scored by step (``make select RUN=...``: ``selection/step-N.json``). For each
window rule, the adapters of its checkpoints are averaged into one (``export.average_adapters``, the exact mean
of their updates) under ``RUN/windows/<rule>/``, and that adapter gets greedy predictions on the run's choice rows
and on its report rows with the select stage's own sampler and scorer (cached in
``selection/[report/]step-win-<rule>.json``, so a rerun only scores what is new). A run without report rows (a
submission run, trained with ``-p report_rows 0``: no ``report.csv``) is scored on its choice rows only, and the
output says which row sets each run was scored on. The rules, each picked from the choice rows' curve only:

- ``best``: the best checkpoint alone;
- ``peakK``: K checkpoints centred on the peak of the K-checkpoint moving average (``checkpoints.choose_window``'s
  rule, here for any K up to the run's number of checkpoints);
- ``lastK``: the run's last K checkpoints (stochastic weight averaging's tail, no curve needed);
- ``pick``: of the rules above, the one with the best choice-row score (what a select stage could do per run).

With ``--soup``, runs of one arm (the same recipe and rows, other training seeds) are also averaged together: the
adapters of each seed's ``best`` (or ``peakK``) window, all of them in one adapter (``soup-best``, ``soup-peakK``: a
"model soup" of the seeds, one model at inference), scored on the first run's rows.

The windows are chosen from the scores ``make select`` cached (its scorer); every window is then scored with
``--scorer_path`` (the MiniLM stand-in by default): give the select stage's scorer to keep them alike.

With ``--png PATH``, each run's choice-row curve is plotted with its widest peak window drawn thick.

Writes ``RUN/average_windows.json`` (and, with ``--soup``, ``average_windows_soups.json`` in the first run); prints
each run's rules (choice and report means, the report's 90% interval over prompt groups), then, over the runs, each
rule's mean and its paired difference with ``best`` and ``peak5``: on the report rows, or on the choice rows where a
run of the arm has none (those rows chose the windows, so they favour the rules that fit them).
Runs named ``<sweep>-<arm>-s<seed>`` (``research/sweep.sh``) are grouped by arm.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils import checkpoints, data, export, metric, training
from kaggle_utils.config import setup_logging


def windows(means: dict[int, float], ks: list[int], tails: list[int]) -> dict[str, list[int]]:
    """Each rule's checkpoint steps, from the choice rows' per-step means (step 0, the base model, excluded).

    ``peakK`` is the select stage's own rule (``checkpoints.choose_window``), asked for any K the run's checkpoints
    hold rather than only from 2K of them."""
    ckpts = sorted(s for s, v in means.items() if s > 0 and math.isfinite(v))
    table = {s: means[s] for s in ckpts}
    out = {"best": [checkpoints.choose_step(table)]}
    for k in ks:
        if k <= len(ckpts):
            out[f"peak{k}"] = checkpoints.choose_window(table, k, min_checkpoints=k)
    for k in tails:
        if k <= len(ckpts):
            out[f"last{k}"] = ckpts[-k:]
    return out


def has_report_rows(run: Path) -> bool:
    """Whether the run held report rows out (``report.csv``); a submission run (``-p report_rows 0``) has none."""
    return (run / training.REPORT_FILE).exists()


def score(run: Path, label: str, adapter: Path, report: bool, scorer, samplers: dict, val_rows: int = 0):
    """Per-row SCS of ``adapter``'s greedy predictions on ``run``'s choice (or report) rows, and those rows; cached
    by the select stage under the name ``win-<label>``."""
    cfg = checkpoints.SelectConfig(run_name=run.name, runs_dir=str(run.parent), rows_per_step=val_rows,
                                   validation_file=str(run / training.REPORT_FILE) if report else "")
    run_cfg = checkpoints.read_run_config(run)
    validation = checkpoints.load_validation(cfg, run_cfg)
    checkpoints._score_one(cfg, run_cfg, validation, scorer, f"win-{label}", adapter, samplers.setdefault(report, []))
    entry = json.loads(checkpoints.step_cache_file(cfg, f"win-{label}").read_text())
    return np.asarray(entry["scs"], dtype=float), validation


def both_sets(run: Path, label: str, adapter: Path, scorer, samplers: dict, val_rows: int = 0) -> dict:
    """``adapter`` scored on ``run``'s choice rows and, where the run has them, its report rows (the report's 90%
    interval over prompt groups; None, and 0 rows, without ``report.csv``); ``samplers`` keeps the loaded models
    from one adapter to the next."""
    choice, _ = score(run, label, adapter, False, scorer, samplers, val_rows)
    out = {"choice": round(float(choice.mean()), 4), "choice_rows": len(choice), "report": None, "report_lo": None,
           "report_hi": None, "report_rows": 0}
    if has_report_rows(run):
        rep, validation = score(run, label, adapter, True, scorer, samplers, val_rows)
        groups = validation[data.PROMPT_COLUMN].map(data.normalize_prompt).to_numpy()
        lo, hi = metric.bootstrap_interval(rep, groups)
        out.update(report=round(float(rep.mean()), 4), report_lo=round(lo, 4), report_hi=round(hi, 4),
                   report_rows=len(rep))
    return out


def row_sets(found: dict) -> str:
    """In words, which row sets one run's windows were scored on."""
    first = next(iter(found.values()))
    if first["report_rows"]:
        return f"choice rows ({first['choice_rows']}) and report rows ({first['report_rows']})"
    return f"choice rows ({first['choice_rows']}) only: no {training.REPORT_FILE} (a run trained with report_rows 0)"


def averaged(folders: list[Path], out: Path) -> Path:
    """One checkpoint as it is, several averaged into one adapter at ``out``."""
    return folders[0] if len(folders) == 1 else export.average_adapters(folders, out)


def choice_curve(run: Path) -> dict[int, float]:
    """The choice rows' mean SCS by step, as ``make select`` cached it (step 0: the base model)."""
    means = {}
    for f in (run / checkpoints.SELECTION_DIR).glob("step-*.json"):
        if f.stem.split("-")[1].isdigit():
            means[int(f.stem.split("-")[1])] = float(np.mean(json.loads(f.read_text())["scs"]))
    if not means:
        raise SystemExit(f"{run / checkpoints.SELECTION_DIR}: no step-N.json (run make select RUN={run.name} first)")
    return dict(sorted(means.items()))


def plot_curves(runs: list[Path], found: dict[str, dict], rule: str, path: Path) -> Path:
    """Each run's choice-row curve by step, one colour per arm, with the steps of its ``rule`` window drawn thick:
    where the curve peaks, and whether it still rises at the end of training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours: dict[str, str] = {}
    for run in runs:
        arm = arm_and_seed(run.name)[0]
        curve = {s: v for s, v in choice_curve(run).items() if s > 0}
        colour = colours.setdefault(arm, f"C{len(colours)}")
        labelled = arm in ax.get_legend_handles_labels()[1]
        ax.plot(list(curve), list(curve.values()), color=colour, alpha=0.5, lw=1, label=None if labelled else arm)
        window = found.get(run.name, {}).get(rule, {}).get("steps", [])
        ax.plot(window, [curve[s] for s in window], color=colour, lw=3)
    ax.set_xlabel("training step")
    ax.set_ylabel("choice rows: mean SCS of the checkpoint")
    ax.set_title(f"one line per run; thick: its {rule} window")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def arm_and_seed(name: str) -> tuple[str, int]:
    """``<arm>-s<seed>`` (research/sweep.sh's run names) split; any other name is its own arm, seed 0."""
    m = re.match(r"^(.*)-s(\d+)$", name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def one_run(run: Path, ks: list[int], tails: list[int], scorer, val_rows: int = 0) -> dict:
    """Every rule's window of ``run``, its adapters averaged and scored on both row sets; ``pick`` added."""
    means = choice_curve(run)
    ckpts, found, samplers = checkpoints.run_checkpoints(run), {}, {}
    for rule, steps in windows(means, ks, tails).items():
        adapter = averaged([ckpts[s] for s in steps], run / "windows" / rule)
        found[rule] = {"steps": steps, **both_sets(run, rule, adapter, scorer, samplers, val_rows)}
    for sampler in samplers.values():
        checkpoints._free(sampler)
    pick = max(found, key=lambda r: (found[r]["choice"], -len(found[r]["steps"])))
    found["pick"] = {**found[pick], "picked": pick}
    (run / "average_windows.json").write_text(json.dumps(found, indent=2) + "\n")
    return found


def soup(runs: list[Path], found: dict[str, dict], rule: str, scorer, val_rows: int = 0) -> dict:
    """The seeds' ``rule`` adapters averaged into one, scored on the first run's choice and report rows."""
    first = runs[0]
    folders = [checkpoints.run_checkpoints(r)[s] for r in runs for s in found[r.name][rule]["steps"]]
    adapter = averaged(folders, first / "windows" / f"soup-{rule}")
    samplers: dict = {}
    out = {"steps": [f"{r.name}:{s}" for r in runs for s in found[r.name][rule]["steps"]],
           **both_sets(first, f"soup-{rule}", adapter, scorer, samplers, val_rows)}
    for sampler in samplers.values():
        checkpoints._free(sampler)
    return out


def paired(table: pd.DataFrame, rule: str, against: str) -> str:
    """Mean paired difference over runs with a 90% t interval, and how many runs are ahead."""
    from scipy import stats

    d = (table[rule] - table[against]).dropna().to_numpy()
    if len(d) < 2:
        return "-"
    half = stats.t.ppf(0.95, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] ({int((d > 0).sum())}/{len(d)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--k", type=int, nargs="*", default=[5, 9, 13], help="odd window sizes around the peak")
    parser.add_argument("--tail", type=int, nargs="*", default=[], help="sizes of the last-K windows (e.g. 9 15)")
    parser.add_argument("--scorer_path", default="", help="sentence-transformers folder; empty: the MiniLM stand-in")
    parser.add_argument("--soup", action="store_true", help="also average each arm's seeds into one adapter")
    parser.add_argument("--val_rows", type=int, default=0, help="rows of each set, as whole prompt groups (0: all)")
    parser.add_argument("--png", default="", help="also plot each run's choice-row curve with its widest peak window")
    args = parser.parse_args()
    if any(k < 1 or k % 2 == 0 for k in args.k):
        parser.error(f"--k: window sizes must be odd (a window is centred on a step), got {args.k}")
    setup_logging()
    scorer = metric.Scorer(args.scorer_path)
    rows, by_arm, found = [], {}, {}
    for name in args.runs:
        run = Path(name)
        found[run.name] = one_run(run, args.k, args.tail, scorer, args.val_rows)
        arm, seed = arm_and_seed(run.name)
        by_arm.setdefault(arm, []).append(run)
        rows += [{"arm": arm, "seed": seed, "rule": r, **v} for r, v in found[run.name].items()]
    soups = []
    for arm, runs in by_arm.items():
        if args.soup and len(runs) > 1:
            for rule in ["best"] + [f"peak{k}" for k in args.k]:
                if all(rule in found[r.name] for r in runs):
                    soups.append({"arm": arm, "rule": f"soup-{rule}", **soup(runs, found, rule, scorer, args.val_rows)})
    if soups:
        (Path(args.runs[0]) / "average_windows_soups.json").write_text(json.dumps(soups, indent=2) + "\n")
    if args.png:
        print(f"plot -> {plot_curves([Path(r) for r in args.runs], found, f'peak{max(args.k)}', Path(args.png))}")
    df = pd.DataFrame(rows)
    print(f"scorer: {scorer.name}")
    for name, sets in found.items():
        print(f"{name}: scored on {row_sets(sets)}")
    print(df.drop(columns=["choice_rows", "report_rows"]).to_string(index=False))
    for arm, part in df.groupby("arm"):
        values = "report" if part["report"].notna().all() else "choice"
        wide = part.pivot(index="seed", columns="rule", values=values)
        what = "report rows" if values == "report" else (
            "choice rows (some run has no report rows; the windows were chosen on these rows, which favours them)")
        print(f"\n{arm}: {what}, mean over {len(wide)} run(s), paired with best and with peak5")
        for rule in wide.columns:
            print(f"  {rule:8s} {wide[rule].mean():.3f}  vs best {paired(wide, rule, 'best')}  "
                  f"vs peak5 {paired(wide, rule, 'peak5') if 'peak5' in wide else '-'}")
        for x in soups:
            if x["arm"] == arm:
                report = (f"report {x['report']:.3f} [{x['report_lo']:.3f}, {x['report_hi']:.3f}]"
                          if x["report"] is not None else "no report rows")
                print(f"  {x['rule']} (one adapter of {len(x['steps'])} checkpoints): choice {x['choice']:.3f}, "
                      f"{report}")


if __name__ == "__main__":
    main()
