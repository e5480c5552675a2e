"""Would joining the greedy predictions of several separately trained runs beat each run alone? A check on saved
predictions of runs that share their choice rows.

Usage: python research/concat_probe.py RUN RUN [RUN ...] [--max-k 3] [--scorer-path /models/sentence-t5-base]

For each run, its first (greedy) prediction per choice row (``inference/predictions/*.jsonl``, rows of
``validation.csv``); for every combination of 2..max-k runs, the SCS of their first predictions joined with a space
(what a plan with several models and n=1 each submits), against the same runs alone (their mean: ``gain``; and the
best of them, which a choice on these rows would also flatter). RESULTS.md has what it printed.
"""
import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils import metric, sampling


def read_greedy_predictions(run: Path) -> dict[str, str]:
    """The run's first prediction per choice row, by id (greedy when the run sampled with ``greedy_first``)."""
    files = sorted(f for f in (run / "inference" / "predictions").glob("*.jsonl")
                   if not f.name.endswith(".stale.jsonl"))
    if not files:
        raise SystemExit(f"{run}: no inference/predictions/*.jsonl (run make demo-blend first)")
    return {i: preds[0] for i, preds in sampling.read_predictions(files[0]).items() if preds}


def probe(runs: list[Path], scorer, max_k: int = 3) -> pd.DataFrame:
    """One row per combination: the runs, the joined SCS, the mean SCS of those runs alone, and the gain."""
    if not (runs[0] / "validation.csv").exists():
        raise SystemExit(f"{runs[0] / 'validation.csv'}: missing (the train stage writes it)")
    truth = pd.read_csv(runs[0] / "validation.csv", dtype={"id": str}).set_index("id")["rewrite_prompt"]
    preds = {run.name: read_greedy_predictions(run) for run in runs}
    ids = [i for i in truth.index if all(i in p for p in preds.values())]
    if not ids:
        raise SystemExit("the runs share no choice row with predictions")
    truths = [truth[i] for i in ids]
    alone = {name: float(np.mean(scorer.scs([p[i] for i in ids], truths))) for name, p in preds.items()}
    rows = []
    for k in range(2, min(max_k, len(runs)) + 1):
        for combo in itertools.combinations(preds, k):
            joined = float(np.mean(scorer.scs([" ".join(preds[n][i] for n in combo) for i in ids], truths)))
            single = float(np.mean([alone[n] for n in combo]))
            rows.append({"runs": "+".join(combo), "k": k, "rows": len(ids), "joined": joined, "alone (mean)": single,
                         "alone (best)": max(alone[n] for n in combo), "gain": joined - single})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders sharing their choice rows")
    parser.add_argument("--max-k", type=int, default=3, help="largest number of runs joined")
    parser.add_argument("--scorer-path", default="", help="sentence-transformers folder; empty = MiniLM stand-in")
    args = parser.parse_args()
    if len(args.runs) < 2:
        raise SystemExit("give at least two runs")
    scorer = metric.Scorer(args.scorer_path, device="cpu")
    table = probe([Path(r) for r in args.runs], scorer, args.max_k)
    print(table.round(4).to_string(index=False))
    print(f"\nscorer: {scorer.name}")
    for k, g in table.groupby("k"):
        print(f"{k} runs joined: gain {g['gain'].mean():+.4f} on average over {len(g)} combination(s), "
              f"positive in {int((g['gain'] > 0).sum())}; above the best run of the combination in "
              f"{int((g['joined'] > g['alone (best)']).sum())}")


if __name__ == "__main__":
    main()
