"""How a run's report-row score depends on how close each row's prompt is to a prompt the run trained on.

Usage: python research/neighbour_probe.py RUN [RUN ...]   [--scorer-path /models/sentence-t5-base]

For each report row (``RUN/report.csv``): the cosine, under the scorer, of its prompt to the nearest prompt of the
run's training rows (the run's ``train_files`` less its choice and report groups), and the SCS of the run's first
prediction (``RUN/report/predictions/*.jsonl``). The rows are binned by that cosine and the runs' scores averaged per
row. Then, as a what-if, each report row's nearest prompt among *every other* prompt of the same files (every prompt
group but its own, the held-out ones included, as when nothing is held out): the bins' scores reweighted to those
neighbours estimate what training on every group would buy on rows like these (a point estimate: only the rows that
change bins move it; a bin with no scored row counts at the overall mean). The runs must share their report rows.
RESULTS.md has what it printed.
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils import data, metric, sampling
from kaggle_utils.config import data_dir, resolve_path, saved_config

EDGES = [-1.0, 0.6, 0.7, 0.8, 0.9, 1.01]


def read_csv_of(run: Path, name: str) -> pd.DataFrame:
    path = run / name
    if not path.exists():
        raise SystemExit(f"{path}: missing (the train stage writes it)")
    return pd.read_csv(path, dtype={"id": str})


def read_first_predictions(run: Path, ids: list[str]) -> list[str]:
    """The run's first prediction for each of ``ids`` (``report/predictions/*.jsonl``)."""
    files = sorted(f for f in (run / "report" / "predictions").glob("*.jsonl") if not f.name.endswith(".stale.jsonl"))
    if not files:
        raise SystemExit(f"{run}: no report/predictions/*.jsonl (run make demo-report first)")
    first = {i: preds[0] for i, preds in sampling.read_predictions(files[0]).items() if preds}
    missing = [i for i in ids if i not in first]
    if missing:
        raise SystemExit(f"{files[0]}: no prediction for {len(missing)} report row(s), e.g. id {missing[0]}")
    return [first[i] for i in ids]


def find_nearest(scorer, queries: list[str], pool: list[str], exclude_own: bool = False) -> np.ndarray:
    """Each query's highest cosine to the pool (one entry per normalized prompt); with ``exclude_own`` the query's
    own prompt, however spelled, is skipped."""
    by_key = {data.normalize_prompt(p): p for p in pool}
    keys = list(by_key)
    sims = scorer.embed(queries) @ scorer.embed([by_key[k] for k in keys]).T
    if exclude_own:
        index = {k: j for j, k in enumerate(keys)}
        for i, q in enumerate(queries):
            j = index.get(data.normalize_prompt(q))
            if j is not None:
                sims[i, j] = -1.0
    return sims.max(axis=1)


def probe(runs: list[Path], scorer, data_dir: Path) -> tuple[pd.DataFrame, float, float]:
    """The bins table, the mean score now, and the score reweighted to every-other-group neighbours."""
    report = read_csv_of(runs[0], "report.csv")
    config = saved_config(runs[0]) or {}
    if not config.get("train_files"):
        raise SystemExit(f"{runs[0] / 'config.json'}: missing, or names no train_files")
    files = [resolve_path(f) if resolve_path(f).exists() else data_dir / Path(f).name for f in config["train_files"]]
    every = pd.concat([data.read_rewrites(f) for f in files])
    held = {data.normalize_prompt(p) for f in ("validation.csv", "report.csv")
            for p in read_csv_of(runs[0], f)["rewrite_prompt"]}
    prompts = list(every["rewrite_prompt"])
    trained = [p for p in prompts if data.normalize_prompt(p) not in held]
    ids = list(report["id"])
    scores = []
    for run in runs:
        if sorted(read_csv_of(run, "report.csv")["id"]) != sorted(ids):
            raise SystemExit(f"{run}: its report rows differ from {runs[0]}'s")
        scores.append(scorer.scs(read_first_predictions(run, ids), list(report["rewrite_prompt"])))
    frame = pd.DataFrame({"near": find_nearest(scorer, list(report["rewrite_prompt"]), trained),
                          "near_all": find_nearest(scorer, list(report["rewrite_prompt"]), prompts, True),
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
    parser.add_argument("--data-dir", default=str(data_dir()), help="where train_files are looked up by name")
    args = parser.parse_args()
    scorer = metric.Scorer(args.scorer_path, device="cpu")
    table, now, reweighted = probe([Path(r) for r in args.runs], scorer, Path(args.data_dir))
    print(table.round(4).to_string())
    print(f"\nscorer: {scorer.name}; report rows' mean SCS {now:.4f} over {len(args.runs)} run(s); reweighted to each "
          f"row's nearest prompt among every other group: {reweighted:.4f}")


if __name__ == "__main__":
    main()
