"""Checkpoint-selection rules compared on the rows that chose nothing: which step would each rule pick from a run's
choice-row curve, and what does that step score on the run's report rows?

Usage: python research/selection_rules.py RUN [RUN ...]

Each RUN folder needs its choice rows and its report rows scored by step: ``make select RUN=...`` (the choice rows'
cache: ``selection/step-N.json``), then ``make select RUN=... SELECT_ARGS="-r validation_file runs/RUN/report.csv"``
(``selection/report/step-N.json`` and ``report_by_step.json``, with the exported adapter's own report score). The rules:

- ``best``: the highest mean on the choice rows (the earlier step on ties);
- ``smooth3`` / ``smooth5``: the highest mean of each checkpoint with its neighbours (3 or 5 scored checkpoints);
- ``latest_1se``: the latest step whose mean is within one standard error (paired, over prompt groups) of the best
  (``kaggle_utils.checkpoints.latest_within_se``, the select stage's rule for a run too short to average);
- ``export``: what ``make select`` exported (``kaggle_utils.checkpoints.choose_window``: the mean of the 9 adapters
  around the smoothed peak, or in a run too short to average the ``latest_1se`` step), scored on the report rows by
  the select stage itself.

Writes ``RUN/selection_rules.json`` and prints one row per run and rule, each with its 90% interval over prompt groups.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils import checkpoints, data, metric
from kaggle_utils.config import read_json_object


def read_split(run: Path, folder: str, csv: str) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Per-step per-row SCS of one row set (the step caches in ``folder``), and each row's prompt group."""
    cache = run / checkpoints.SELECTION_DIR / folder
    files = [f for f in cache.glob("step-*.json") if f.stem.split("-")[1].isdigit()]
    if not files:
        raise SystemExit(f"{cache}: no step-N.json (run make select RUN={run.name} for both row sets first)")
    rows = pd.read_csv(run / csv, dtype={"id": str}).set_index("id")
    per_step, ids = {}, None
    for f in sorted(files, key=lambda p: int(p.stem.split("-")[1])):
        entry = json.loads(f.read_text())
        if ids is not None and entry["ids"] != ids:
            raise SystemExit(f"{f}: scored other rows than the other steps")
        ids = entry["ids"]
        per_step[int(entry["step"])] = np.asarray(entry["scs"], dtype=float)
    groups = rows.loc[ids, data.PROMPT_COLUMN].map(data.normalize_prompt).to_numpy()
    return per_step, groups


def choose(per_step: dict[int, np.ndarray], groups: np.ndarray) -> dict[str, int]:
    """Every step rule's pick from the choice rows."""
    means = {s: float(v.mean()) for s, v in per_step.items()}
    se = checkpoints.paired_standard_errors(per_step, groups)
    table = pd.DataFrame({"step": list(means), "scs": list(means.values()), "paired_se": [se[s] for s in means]})
    return {"best": checkpoints.choose_step(means), "smooth3": checkpoints.choose_step(checkpoints.smoothed(means, 1)),
            "smooth5": checkpoints.choose_step(checkpoints.smoothed(means, 2)),
            "latest_1se": checkpoints.latest_within_se(table)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders")
    args = parser.parse_args()
    rows = []
    for name in args.runs:
        run = Path(name)
        choice, choice_groups = read_split(run, "", "validation.csv")
        report, report_groups = read_split(run, "report", "report.csv")
        found = {}
        for rule, step in choose(choice, choice_groups).items():
            lo, hi = metric.bootstrap_interval(report[step], report_groups)
            found[rule] = {"steps": [step], "choice": round(float(choice[step].mean()), 4),
                           "report": round(float(report[step].mean()), 4), "report_lo": round(lo, 4),
                           "report_hi": round(hi, 4)}
        exported = run / checkpoints.SELECTION_DIR / "report" / "step-selected.json"
        summary = read_json_object(run / f"{checkpoints.REPORT_BY_STEP}.json", SystemExit).get("selected")
        if summary:
            scs = np.asarray(json.loads(exported.read_text())["scs"]) if exported.exists() else report.get(
                summary["steps"][0])
            lo, hi = metric.bootstrap_interval(scs, report_groups) if scs is not None else (None, None)
            found["export"] = {"steps": summary["steps"], "report": summary["scs"], "report_lo": lo, "report_hi": hi}
        (run / "selection_rules.json").write_text(json.dumps(found, indent=2) + "\n")
        rows += [{"run": run.name, "rule": r, **v} for r, v in found.items()]
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
