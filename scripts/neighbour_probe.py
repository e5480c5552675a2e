"""How a run's report-row score depends on how close each row's prompt is to a prompt the run trained on.

Usage: python scripts/neighbour_probe.py RUN [RUN ...]   [--scorer-path /models/sentence-t5-base]

For each report row (``RUN/report.csv``): the cosine, under the scorer, of its prompt to the nearest prompt of the
run's training rows (the run's ``train_files`` less its choice and report groups), and the SCS of the run's first
prediction (``RUN/report/predictions/*.jsonl``). The rows are binned by that cosine and the runs' scores averaged per
row. Then, as a what-if, each report row's nearest prompt among *every other* prompt of the same files (all the Gemma
groups but its own, as when nothing is held out): the bins' scores reweighted to those neighbours estimate what
training on every group would buy on rows like these. The runs must share their report rows. RESULTS.md has what it
printed.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils import data, metric

EDGES = [-1.0, 0.6, 0.7, 0.8, 0.9, 1.01]


def first_predictions(run: Path) -> dict[str, str]:
    files = sorted((run / "report" / "predictions").glob("*.jsonl"))
    if not files:
        raise SystemExit(f"{run}: no report/predictions/*.jsonl (run make demo-report first)")
    rows = (json.loads(line) for line in files[0].read_text().splitlines() if line.strip())
    return {row["id"]: row["predictions"][0] for row in rows}


def nearest(scorer, queries: list[str], pool: list[str], exclude_self: bool = False) -> np.ndarray:
    """Each query's highest cosine to the pool; with ``exclude_self`` a query's own (normalized) text is skipped."""
    sims = scorer.embed(queries) @ scorer.embed(pool).T
    if exclude_self:
        own = {data.normalize_prompt(p): k for k, p in enumerate(pool)}
        for i, q in enumerate(queries):
            k = own.get(data.normalize_prompt(q))
            if k is not None:
                sims[i, k] = -1.0
    return sims.max(axis=1)


def probe(runs: list[Path], scorer, data_dir: Path) -> tuple[pd.DataFrame, float, float]:
    """The bins table, the mean score now, and the score reweighted to every-other-group neighbours."""
    report = pd.read_csv(runs[0] / "report.csv")
    config = json.loads((runs[0] / "config.json").read_text())
    files = [Path(f) if Path(f).exists() else data_dir / Path(f).name for f in config["train_files"]]
    every = pd.concat([data.read_rewrites(f) for f in files])
    held = {data.normalize_prompt(p) for f in ("validation.csv", "report.csv")
            for p in pd.read_csv(runs[0] / f)["rewrite_prompt"]}
    prompts = every["rewrite_prompt"].drop_duplicates()
    trained = [p for p in prompts if data.normalize_prompt(p) not in held]
    scores = []
    for run in runs:
        if sorted(pd.read_csv(run / "report.csv")["id"]) != sorted(report["id"]):
            raise SystemExit(f"{run}: its report rows differ from {runs[0]}'s")
        first = first_predictions(run)
        scores.append(scorer.scs([first[i] for i in report["id"]], list(report["rewrite_prompt"])))
    frame = pd.DataFrame({"near": nearest(scorer, list(report["rewrite_prompt"]), trained),
                          "near_all": nearest(scorer, list(report["rewrite_prompt"]), list(prompts), True),
                          "scs": np.mean(scores, axis=0)})
    frame["bin"] = pd.cut(frame["near"], EDGES)
    frame["bin_all"] = pd.cut(frame["near_all"], EDGES)
    table = frame.groupby("bin", observed=False).agg(rows=("scs", "size"), scs=("scs", "mean"))
    table["rows, nearest among every other group"] = frame["bin_all"].value_counts().reindex(table.index)
    per_bin = table["scs"].fillna(frame["scs"].mean())
    return table, float(frame["scs"].mean()), float(per_bin.loc[frame["bin_all"]].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders with report.csv and report/predictions")
    parser.add_argument("--scorer-path", default="", help="sentence-transformers folder; empty = MiniLM stand-in")
    parser.add_argument("--data-dir", default="../shared/data", help="where train_files are looked up by name")
    args = parser.parse_args()
    scorer = metric.Scorer(args.scorer_path, device="cpu")
    table, now, reweighted = probe([Path(r) for r in args.runs], scorer, Path(args.data_dir))
    print(table.round(4).to_string())
    print(f"\nscorer: {scorer.name}; report rows' mean SCS {now:.4f} over {len(args.runs)} run(s); reweighted to each "
          f"row's nearest prompt among every other group: {reweighted:.4f}")


if __name__ == "__main__":
    main()
