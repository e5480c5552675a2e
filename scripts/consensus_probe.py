"""Would choosing one of a row's predictions by consensus beat its greedy one? A check on saved predictions.

Usage: python scripts/consensus_probe.py runs/demo runs/gpu ...   [--scorer-path /models/sentence-t5-base]

For each run folder with ``inference/predictions/*.jsonl`` (the choice rows' predictions, greedy first) and
``validation.csv``: the mean SCS of the first (greedy) prediction, of the prediction with the highest mean cos^3 to
the row's other predictions under the scorer (minimum Bayes risk), and of the best one (an oracle, for scale). The
scorer is the MiniLM stand-in unless a path is given. RESULTS.md has what it printed.
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils import metric, sampling


def probe(run: Path, scorer) -> dict:
    """One run's three numbers on the rows that have at least two predictions."""
    files = sorted((run / "inference" / "predictions").glob("*.jsonl"))
    if not files:
        raise SystemExit(f"{run}: no inference/predictions/*.jsonl (run make demo-blend first)")
    predictions = sampling.read_predictions(files[0])
    truth = pd.read_csv(run / "validation.csv", dtype={"id": str}).set_index("id")["rewrite_prompt"]
    rows = [(rid, preds) for rid, preds in predictions.items() if rid in truth.index and len(preds) >= 2]
    if not rows:
        raise SystemExit(f"{run}: no choice row has two or more predictions")
    greedy, consensus, oracle = [], [], []
    for rid, preds in rows:
        scs = scorer.scs(preds, [truth[rid]] * len(preds))
        vectors = scorer.embed(preds)
        pairwise = metric.scs_matrix(vectors, vectors)
        agreement = (pairwise.sum(axis=1) - np.diag(pairwise)) / (len(preds) - 1)
        greedy.append(scs[0])
        consensus.append(scs[int(agreement.argmax())])
        oracle.append(scs.max())
    return {"run": str(run), "rows": len(rows), "model": files[0].stem, "greedy": float(np.mean(greedy)),
            "consensus": float(np.mean(consensus)), "gain": float(np.mean(consensus) - np.mean(greedy)),
            "oracle": float(np.mean(oracle))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--scorer-path", default="", help="sentence-transformers folder; empty = MiniLM stand-in")
    args = parser.parse_args()
    scorer = metric.Scorer(args.scorer_path, device="cpu")
    table = pd.DataFrame([probe(Path(r), scorer) for r in args.runs])
    print(table.round(4).to_string(index=False))
    print(f"\nscorer: {scorer.name}; gain = consensus - greedy, mean {table['gain'].mean():+.4f} over {len(table)} "
          f"run(s), positive in {int((table['gain'] > 0).sum())}")


if __name__ == "__main__":
    main()
