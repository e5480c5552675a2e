"""The final string per row, and what each of its parts adds to the score.

The winning recipe: each model's n sampled predictions, in plan order, joined, then a "mean prompt" (a string that
sits close to every possible prompt under the scorer). Joining several guesses moves the embedding toward their
centre, which the cubed cosine rewards over one confident wrong guess. The mean prompt is a parameter; the default is
the public 0.63 string.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from .metric import SCORE_COLUMNS

logger = logging.getLogger("kaggle_utils")

DEFAULT_MEAN_PROMPT = ("Please improve this text using the writing style with maintaining the original meaning but "
                       "altering the tone.")
SPLIT_ORDER = ("report", "choice")  # how a scores table is ordered: rows that chose nothing first
PUBLIC_MEAN_PROMPT_SYSTEM = "public mean prompt alone (0.63 on the leaderboard)"  # its name in every scores table


def blend_row(predictions_by_model: Sequence[Sequence[str]], mean_prompt: str = "", separator: str = " ",
              fallback: str = "") -> str:
    """One row's final string: every model's predictions in plan order, then ``mean_prompt`` (if not empty).

    A row with no prediction from any model (past the deadline, or a failed row) uses ``fallback`` in their place,
    so the string is never blank.
    """
    parts = [p.strip() for preds in predictions_by_model for p in preds if p and p.strip()]
    if not parts and fallback.strip():
        parts = [fallback.strip()]
    if mean_prompt.strip():
        parts.append(mean_prompt.strip())
    return separator.join(parts)


def blend(ids: Sequence[str], predictions: Mapping[str, Mapping[str, Sequence[str]]], plan: Sequence[str],
          mean_prompt: str = "", separator: str = " ", fallback: str = "", per_model: int = 0) -> list[str]:
    """Final strings for ``ids``: ``predictions[model][id]`` of each model in ``plan`` order, then the mean prompt.

    ``per_model`` > 0 keeps only each model's first ``per_model`` predictions (to score "1 prediction").
    """
    out = []
    for rid in ids:
        rows = []
        for model in plan:
            preds = list(predictions.get(model, {}).get(rid, []))
            rows.append(preds[:per_model] if per_model else preds)
        out.append(blend_row(rows, mean_prompt, separator, fallback))
    return out


def component_systems(ids: Sequence[str], predictions: Mapping[str, Mapping[str, Sequence[str]]],
                      plan: Sequence[tuple[str, int]], mean_prompt: str, separator: str = " ", fallback: str = "",
                      baselines: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
                      labels: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """The systems whose scores show what each part adds, in the order they build up.

    ``plan`` is (model name, n) in plan order; ``labels`` names models in the table (e.g. "smollm fine-tuned").
    The systems are: each baseline (``baselines`` maps a system name, e.g. "x base, zero-shot, 1 prediction", to its
    predictions; the first of each row is used); each model with 1 prediction and
    with its n; all models' predictions joined (when there are several); that plus the mean prompt (skipped when
    ``mean_prompt`` is empty); the mean prompt alone; and the public mean prompt alone, unless it is the one used.
    The system that is the submission is marked ``(submission)``.
    """
    labels = dict(labels or {})
    names = [m for m, _ in plan]
    systems: dict[str, list[str]] = {}
    mean = mean_prompt.strip()
    for name, preds in (baselines or {}).items():
        systems[name] = blend(ids, {name: preds}, [name], fallback=fallback, per_model=1)
    for model, n in plan:
        label = labels.get(model, model)
        systems[f"{label}, 1 prediction"] = blend(ids, predictions, [model], fallback=fallback, per_model=1)
        if n > 1:
            systems[f"{label}, {n} predictions"] = blend(ids, predictions, [model], separator=separator,
                                                         fallback=fallback)
    total = sum(n for _, n in plan)
    if len(plan) == 1:
        joined = f"{labels.get(plan[0][0], plan[0][0])}, {total} prediction{'s' if total > 1 else ''}"
    elif plan:
        joined = f"all {len(plan)} models, {total} predictions"
        systems[joined] = blend(ids, predictions, names, separator=separator, fallback=fallback)
    if plan and mean:
        systems[f"{joined} + mean prompt"] = blend(ids, predictions, names, mean_prompt, separator, fallback)
    submission = f"{joined} + mean prompt" if plan and mean else joined if plan else "mean prompt alone"
    if mean:
        systems["mean prompt alone"] = [mean] * len(ids)
    if mean != DEFAULT_MEAN_PROMPT:  # the reference every Kaggler knows, also when the blend uses no mean prompt
        systems[PUBLIC_MEAN_PROMPT_SYSTEM] = [DEFAULT_MEAN_PROMPT] * len(ids)
    if submission in systems:
        systems = {(f"{k} (submission)" if k == submission else k): v for k, v in systems.items()}
    return systems


def score_systems(scorer, systems: Mapping[str, Sequence[str]], truths: Sequence[str], split: str = ""
                  ) -> pd.DataFrame:
    """A scores table (:data:`kaggle_utils.metric.SCORE_COLUMNS`), one row per system, with
    ``metric.Scorer.report``; ``split`` names the scored rows (report | choice | ...)."""
    rows = [scorer.report(name, list(preds), list(truths), split=split) for name, preds in systems.items()]
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def write_scores(path: str | os.PathLike, rows) -> pd.DataFrame:
    """Add ``rows`` (dicts or a table) to the scores CSV that several stages share, and return the whole table.

    The new rows replace every old row of the same scorer and split: a stage writes its split whole (the inference
    stage the report rows, the mean-prompt stage the choice rows), so a rerun whose system names changed (which
    system is the submission, say) leaves no stale row behind; other splits and scorers are kept. The table is
    ordered by split (report rows first, then choice rows, then the rest) and keeps each stage's own order within a
    split. A file in an older layout (other columns) is replaced.
    """
    file = Path(path)
    new = pd.DataFrame(rows if isinstance(rows, pd.DataFrame) else list(rows)).reindex(columns=SCORE_COLUMNS)
    old = pd.read_csv(file, keep_default_na=False, na_values=[""]) if file.exists() else None
    if old is not None and list(old.columns) != SCORE_COLUMNS:
        logger.info("%s has other columns (an older layout); it is replaced", file)
        old = None
    if old is not None and len(old):
        old["split"] = old["split"].fillna("")
        keys = set(zip(new["scorer"], new["split"].fillna("")))
        old = old[[k not in keys for k in zip(old["scorer"], old["split"])]]
        table = pd.concat([old, new], ignore_index=True) if len(old) else new
    else:
        table = new
    rank = table["split"].map({s: i for i, s in enumerate(SPLIT_ORDER)}).fillna(len(SPLIT_ORDER))
    table = table.iloc[rank.argsort(kind="stable")].reset_index(drop=True)
    file.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(file, index=False)
    return table
