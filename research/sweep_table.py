"""The table of research/sweep.sh: each arm's choice-row and report-row scores over its training seeds.

Usage: python research/sweep_table.py OUT_DIR|RUNS.csv [--baseline x3] [--png FILE] [--save RUNS.csv]

Every run's folder ``OUT_DIR/ARM-sSEED/`` holds the files its select stage wrote: ``selection.json`` (the choice rows
by step, the exported step and, for an average of checkpoints, its own score) and ``report_by_step.json`` (the same
checkpoints on the report rows, and the export's own report score). Per arm: the mean over seeds of the export's
score on the choice rows (what the choice is made on) and on the report rows, and both paired by seed against the
baseline arm with a 90% interval of the mean paired difference (t over seeds). The scorer is whatever the runs used
(MiniLM stand-in unless a scorer_path was given).
"""
import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from kaggle_utils import artifacts, checkpoints
from kaggle_utils.config import read_json_object


def read_run(folder: Path) -> dict:
    """One run: arm, seed, exported step, and the export's SCS on both row sets (and the last step's)."""
    named = re.fullmatch(r"(.+)-s(\d+)", folder.name)
    report_file = folder / f"{checkpoints.REPORT_BY_STEP}.json"
    if named is None or not (folder / artifacts.SELECTION_FILE).exists() or not report_file.exists():
        raise SystemExit(f"{folder}: not a sweep run (ARM-sSEED/ with {artifacts.SELECTION_FILE} and "
                         f"{report_file.name})")
    sel = artifacts.Selection.read(folder)
    report = read_json_object(report_file, SystemExit)
    choice_by = {int(s): v for s, v in sel.scores.items()}
    report_by = {int(s): v for s, v in report.get("scores", {}).items()}
    if sel.step not in choice_by or sel.step not in report_by:
        raise SystemExit(f"{folder}: step {sel.step} is not among the scored steps of both row sets")
    last = max(choice_by)
    exported = report.get("selected") or {}
    return {"arm": named.group(1), "seed": int(named.group(2)), "step": sel.step,
            "choice": sel.selected_scs if sel.selected_scs is not None else choice_by[sel.step],
            "report": exported.get("scs", report_by[sel.step]), "choice_last": choice_by[last],
            "report_last": report_by[last]}


def describe_paired(df: pd.DataFrame, arm: str, baseline: str, column: str) -> str:
    """Mean paired difference (arm - baseline over the seeds both have) with a 90% t interval."""
    if arm == baseline:
        return "(baseline)"
    both = df.pivot(index="seed", columns="arm", values=column)[[arm, baseline]].dropna()
    d = both[arm] - both[baseline]
    if len(d) < 2:
        return ""
    half = stats.t.ppf(0.95, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] ({int((d > 0).sum())}/{len(d)})"


def read_runs(source: Path) -> pd.DataFrame:
    """The runs of a sweep folder (NAME.txt) or of a CSV that ``--save`` wrote."""
    if not source.exists():
        raise SystemExit(f"{source}: no such folder or file")
    if source.suffix == ".csv":
        runs = pd.read_csv(source)
        missing = {"arm", "seed", "step", "choice", "report"} - set(runs.columns)
        if missing:
            raise SystemExit(f"{source}: not a --save CSV of this script (missing columns {sorted(missing)})")
    else:
        runs = pd.DataFrame([read_run(p) for p in sorted(source.iterdir()) if p.is_dir()])
    if runs.empty:
        raise SystemExit(f"{source}: no sweep runs (ARM-sSEED/ folders, or rows) found")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the sweep's folder of ARM-sSEED/ runs, or a CSV --save wrote")
    parser.add_argument("--baseline", default="x3", help="the arm the others are paired against")
    parser.add_argument("--png", default="", help="also plot each arm's seeds (report rows against choice rows)")
    parser.add_argument("--save", default="", help="also write one row per run to this CSV")
    args = parser.parse_args()
    runs = read_runs(Path(args.out_dir))
    if args.baseline not in set(runs["arm"]):
        raise SystemExit(f"--baseline {args.baseline}: no such arm; the arms are {sorted(set(runs['arm']))}")
    if args.save:
        runs.to_csv(args.save, index=False)
    rows = []
    for arm, g in runs.groupby("arm", sort=False):
        rows.append({"arm": arm, "seeds": len(g), "choice rows (selected step)": round(g["choice"].mean(), 4),
                     f"- {args.baseline}, paired": describe_paired(runs, arm, args.baseline, "choice"),
                     "report rows (same step)": round(g["report"].mean(), 4),
                     f"- {args.baseline}, paired ": describe_paired(runs, arm, args.baseline, "report"),
                     "report sd over seeds": round(g["report"].std(ddof=1), 4),
                     "steps selected": ",".join(str(s) for s in sorted(g["step"].unique()))})
    table = pd.DataFrame(rows).sort_values("choice rows (selected step)", ascending=False)
    print(table.to_string(index=False))
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for arm, g in runs.groupby("arm", sort=False):
            ax.scatter(g["choice"], g["report"], label=f"{arm} (mean {g['report'].mean():.3f})", alpha=0.75)
        ax.set_xlabel("choice rows SCS at the selected step (chooses)")
        ax.set_ylabel("report rows SCS, same step (chooses nothing)")
        ax.set_title("one point per training seed")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"plot -> {args.png}")


if __name__ == "__main__":
    main()
