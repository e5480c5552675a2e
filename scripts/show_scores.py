"""Print a scores table (scores.csv) the way `make demo` ends: report rows first, each SCS with its interval.

Usage: python scripts/show_scores.py runs/demo/scores.csv
"""
import sys
from pathlib import Path

import pandas as pd

from kaggle_utils import artifacts, metric
from kaggle_utils.config import read_json_object


def main(path: str) -> None:
    table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 70)
    print(table.to_string(index=False))
    print(f"\nscs: mean sharpened cosine (cos^3); scs_lo..scs_hi: {metric.INTERVAL_LEVEL:.0%} bootstrap interval over "
          "prompt groups.\nsplit 'report': rows that chose nothing (not the step, the blend or the mean prompt); "
          "'choice': the rows that chose them.\nThe scorer column names the embedder: the MiniLM stand-in and the "
          "135M demo model make these practice numbers, not leaderboard numbers.")
    budget = Path(path).parent / artifacts.BUDGET_FILE  # what the training run's time budget chose, if it had one
    if budget.exists():
        b = read_json_object(budget)
        kept = b["max_steps"] >= b["planned_steps"]
        print(f"\ntraining: {b['max_steps']} of the {b['planned_steps']} planned steps in the "
              f"{b['budget_minutes']:g}-minute budget ({b['seconds_per_step']:.1f} s a step on this machine)"
              + ("" if kept else "; fewer steps than the recipe's usually score lower: a faster machine trains "
                                 "them all"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/scores.csv")
