"""The final string per row, and what each of its parts adds to the score.

The winning recipe: each model's n sampled predictions, in plan order, joined, then a "mean prompt" (a string that
sits close to every possible prompt under the scorer). Joining several guesses moves the embedding toward their
centre, which the cubed cosine rewards over one confident wrong guess. The mean prompt is a parameter; the default is
the public 0.63 string.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import pandas as pd

logger = logging.getLogger("kaggle_utils")

DEFAULT_MEAN_PROMPT = ("Please improve this text using the writing style with maintaining the original meaning but "
                       "altering the tone.")
SCORE_COLUMNS = ["system", "scorer", "rows", "scs", "cos"]


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
    The systems are: each baseline (e.g. a base model zero-shot), 1 prediction; each model with 1 prediction and
    with its n; all models' predictions joined (when there are several); that plus the mean prompt (the submission
    when the mean prompt is on; skipped when ``mean_prompt`` is empty); and the mean prompt alone.
    """
    labels = dict(labels or {})
    names = [m for m, _ in plan]
    systems: dict[str, list[str]] = {}
    if not plan:  # no model: the mean prompt alone is the whole submission
        return {"mean prompt alone": [mean_prompt.strip()] * len(ids)} if mean_prompt.strip() else {}
    for name, preds in (baselines or {}).items():
        systems[f"{name}, zero-shot, 1 prediction"] = blend(ids, {name: preds}, [name], fallback=fallback,
                                                           per_model=1)
    for model, n in plan:
        label = labels.get(model, model)
        systems[f"{label}, 1 prediction"] = blend(ids, predictions, [model], fallback=fallback, per_model=1)
        if n > 1:
            systems[f"{label}, {n} predictions"] = blend(ids, predictions, [model], separator=separator,
                                                         fallback=fallback)
    total = sum(n for _, n in plan)
    if len(plan) == 1:
        joined = f"{labels.get(plan[0][0], plan[0][0])}, {total} prediction{'s' if total > 1 else ''}"
    else:
        joined = f"all {len(plan)} models, {total} predictions"
        systems[joined] = blend(ids, predictions, names, separator=separator, fallback=fallback)
    if mean_prompt.strip():
        systems[f"{joined} + mean prompt"] = blend(ids, predictions, names, mean_prompt, separator, fallback)
        systems["mean prompt alone"] = [mean_prompt.strip()] * len(ids)
    return systems


def score_systems(scorer, systems: Mapping[str, Sequence[str]], truths: Sequence[str]) -> pd.DataFrame:
    """A scores table (system, scorer, rows, scs, cos), one row per system, with ``metric.Scorer.report``."""
    rows = [scorer.report(name, list(preds), list(truths)) for name, preds in systems.items()]
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)
