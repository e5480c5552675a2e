"""The table of research/sweep.sh: each arm's choice-row and report-row scores over its training seeds.

Usage: python research/sweep_table.py OUT_DIR|RUNS.csv [--baseline x3] [--png FILE] [--save RUNS.csv]

Every run's ``NAME.txt`` (``ARM-sSEED``) holds its per-step SCS on the choice rows, the step they selected, and the
same checkpoints on the report rows; where the export is an average of checkpoints, its own score on both row sets
stands for the selected step's. Per arm: the mean over seeds of the choice rows at the selected step (what the
choice is made on) and of the report rows at that same step, and both paired by seed against the baseline arm with a
90% interval of the mean paired difference (t over seeds). The scorer is whatever the runs used (MiniLM stand-in
unless a scorer_path was given).
"""
import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

STEP = re.compile(r"step (\d+): mean SCS ([0-9.]+) \(cos [0-9.]+\) on (\d+) rows")
EXPORT = re.compile(r"selected adapter \([^)]*\): mean SCS ([0-9.]+)")


def read_run(path: Path) -> dict:
    """One run's summary: arm, seed, selected step and the two splits' SCS at it and at the last step."""
    named = re.fullmatch(r"(.+)-s(\d+)", path.stem)
    text = path.read_text()
    selected = re.search(r"selected step (\d+)", text)
    if named is None or selected is None:
        raise SystemExit(f"{path}: not a sweep summary (ARM-sSEED.txt with a 'selected step N' line)")
    parts = text.split("report rows:")  # the line sweep.sh writes between the two splits
    splits = [{int(step): float(scs) for step, scs, _ in STEP.findall(part)} for part in parts]
    if len(splits) != 2 or not all(splits) or int(selected.group(1)) not in splits[0]:
        raise SystemExit(f"{path}: needs the choice rows' and the report rows' scores by step, the selected step "
                         "among them")
    choice, report = splits
    step, last = int(selected.group(1)), max(choice)
    # the exported adapter's own scores, where the select stage recorded them (an average of checkpoints)
    export = [float(v) for v in EXPORT.findall(text)]
    return {"arm": named.group(1), "seed": int(named.group(2)), "step": step,
            "choice": export[0] if len(export) == 2 else choice[step],
            "report": export[1] if len(export) == 2 else report[step], "choice_last": choice[last],
            "report_last": report[last]}


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
        runs = pd.DataFrame([read_run(p) for p in sorted(source.glob("*.txt"))])
    if runs.empty:
        raise SystemExit(f"{source}: no run summaries (NAME.txt, or rows) found")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the sweep's folder of NAME.txt, or a CSV --save wrote")
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
