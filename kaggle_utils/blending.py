"""The final string per row, and what each of its parts adds to the score.

The winning recipe: each model's n sampled predictions, in plan order, joined, then a "mean prompt" (a string that
sits close to every possible prompt under the scorer). Joining several guesses moves the embedding toward their
centre, which the cubed cosine rewards over one confident wrong guess. The mean prompt is a parameter; the default is
the public 0.63 string.

The recipe the mean-prompt stage chooses on validation travels to the inference stage as ``blend.json``; this module
reads and writes it (:class:`Blend`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from .config import read_json_object, resolve_path
from .metric import SCORE_COLUMNS

logger = logging.getLogger("kaggle_utils")

DEFAULT_MEAN_PROMPT = ("Please improve this text using the writing style with maintaining the original meaning but "
                       "altering the tone.")
SPLIT_ORDER = ("report", "choice")  # how a scores table is ordered: rows that chose nothing first
PUBLIC_MEAN_PROMPT_SYSTEM = "public mean prompt alone (0.63 on the leaderboard)"  # its name in every scores table
BLEND_FILE = "blend.json"


class BlendError(ValueError):
    """A ``blend.json`` that cannot be read, or that names a model the plan does not have; the message names the file
    or the models."""


# ---------------------------------------------------------------- the final string


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


# ---------------------------------------------------------------- how many predictions to join


N_CURVE_FILE = "n_curve"  # <folder>/n_curve.csv and .png


def n_curve(scorer, per_row: Mapping[str, Sequence[Sequence[str]]], truths: Sequence[str], mean_prompt: str = "",
            separator: str = " ", fallback: str = "", labels: Mapping[str, str] | None = None, max_n: int = 8,
            split: str = "") -> pd.DataFrame:
    """SCS against the number of predictions joined: how many to combine, with or without the mean prompt.

    ``per_row`` maps each model, in plan order, to its predictions of every row (aligned with ``truths``). For each
    model, and for all of them together when there are several (each model's first k, in plan order), the first k
    predictions are joined for k = 1 .. ``max_n`` (as many as there are), once alone and once followed by
    ``mean_prompt`` (when given). Columns: system, n, mean_prompt (bool), scs, scs_lo, scs_hi, rows, scorer, split.
    """
    labels = dict(labels or {})
    models = list(per_row)
    systems = [(labels.get(m, m), [m]) for m in models]
    if len(models) > 1:
        systems.append((f"all {len(models)} models", models))
    rows = []
    for label, members in systems:
        most = min(max_n, max((len(p) for m in members for p in per_row[m]), default=0))
        for k in range(1, most + 1):
            for mean in ([""] + ([mean_prompt] if mean_prompt.strip() else [])):
                strings = [blend_row([per_row[m][i][:k] for m in members], mean, separator, fallback)
                           for i in range(len(truths))]
                r = scorer.report(label, strings, list(truths), split=split)
                rows.append({"system": label, "n": k, "mean_prompt": bool(mean),
                             **{c: r[c] for c in ("scs", "scs_lo", "scs_hi", "rows", "scorer", "split")}})
    return pd.DataFrame(rows, columns=["system", "n", "mean_prompt", "scs", "scs_lo", "scs_hi", "rows", "scorer",
                                       "split"])


def plot_n_curve(table: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """SCS against n, one colour per system, solid without and dashed with the mean prompt, the 90% interval shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = dict(zip(dict.fromkeys(table["system"]), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for (system, mean), g in table.groupby(["system", "mean_prompt"], sort=False):
        g = g.sort_values("n")
        style = "--" if mean else "-"
        ax.plot(g["n"], g["scs"], style, marker="o", ms=4, color=colours[system],
                label=f"{system}{' + mean prompt' if mean else ''}")
        ax.fill_between(g["n"], g["scs_lo"], g["scs_hi"], color=colours[system], alpha=0.08)
    ax.set_xlabel("predictions per model and row (n)")
    ax.set_ylabel(f"mean SCS ({table['scorer'].iloc[0]})" if len(table) else "mean SCS")
    ax.set_xticks(sorted(table["n"].unique()))
    rows = int(table["rows"].iloc[0]) if len(table) else 0
    ax.set_title(title or f"how many predictions to join ({rows} rows)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- scores tables


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


# ---------------------------------------------------------------- blend.json


@dataclass(kw_only=True)
class Blend:
    """``blend.json``: the final string's recipe chosen on validation by the mean-prompt stage, and the scores that
    chose it. Fields are the file's keys, in the order they are written; only ``models``, ``mean_prompt`` and
    ``separator`` are needed to apply it, so a file that has only those (hand-written, or from before a key existed)
    still reads."""

    models: list  # [{"model": name, "n": predictions taken}] in join order; [] = the mean prompt alone
    mean_prompt_kind: str = ""  # none | public | optimized
    mean_prompt: str  # appended after the predictions; "" = none
    label: str = ""  # the option's name in blend_options.csv
    scs: float | None = None  # mean SCS on the rows that chose (the rows the search never saw)
    cos: float | None = None  # mean cosine on those rows
    scs_all_rows: float | None = None  # mean SCS on every validation row with predictions
    separator: str  # between the joined predictions and the mean prompt
    scorer: str = ""  # the scorer's name: its numbers are not another scorer's
    rows: int = 0  # rows the blend was chosen on
    rows_total: int = 0  # validation rows with predictions from every model
    chosen_from: int = 0  # options scored
    table: str = ""  # the file of every option's score, beside this one
    best_by_mean: str = ""  # the option with the highest mean SCS ("" in files written before the rule below)
    rule: str = ""  # how the option was chosen among the scored ones
    mean_prompt_objective: str = ""  # the mean-prompt search's objective (alone | blend)
    best_with_optimized_mean_prompt: dict | None = None  # the best option that appends the optimized mean prompt
    seconds: float = 0.0  # time the choice took
    extra: dict = field(default_factory=dict)  # keys this version does not know, written back as read

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Blend":
        """The blend in ``path`` (the file, or the folder that holds ``blend.json``). A missing file, a file that is
        not a JSON object, a missing key or a malformed model entry is a :class:`BlendError` naming the file."""
        file = resolve_path(path)
        if file.is_dir():
            file = file / BLEND_FILE
        if not file.exists():
            raise BlendError(f"blend file '{file}' does not exist (run `make mean-prompt RUN=<run>` first)")
        values = read_json_object(file, BlendError)
        for key in ("models", "mean_prompt", "separator"):
            if key not in values:
                raise BlendError(f"{file}: missing key '{key}'")
        models = values["models"]
        if not isinstance(models, list):
            raise BlendError(f"{file}: models must be a list of {{model, n}}, got {models!r}")
        for i, m in enumerate(models):
            if not (isinstance(m, dict) and isinstance(m.get("model"), str) and isinstance(m.get("n"), int)
                    and m["n"] >= 1):
                raise BlendError(f"{file}: models[{i}] must be {{\"model\": name, \"n\": count >= 1}}, got {m!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in values.items() if k in known},
                   extra={k: v for k, v in values.items() if k not in known})

    def to_dict(self) -> dict:
        """The file's content: every field in order, then the keys this version does not know."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    def write(self, path: str | os.PathLike) -> Path:
        """Write the blend to ``path`` (the file, or a folder that gets ``blend.json``); returns the file."""
        file = resolve_path(path)
        if file.is_dir():
            file = file / BLEND_FILE
        file.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return file

    def plan_for(self, models: Sequence[dict]) -> dict:
        """The inference settings this blend implies for a plan of model entries (dicts with ``name`` and ``n``):
        the models in the blend's order with the blend's ``n`` each (models it leaves out are dropped, so they are
        not sampled), and ``use_mean_prompt``, ``mean_prompt``, ``separator``.

        ``models`` comes back empty when the blend is the mean prompt alone: then no model needs to run.
        """
        by_name = {m["name"]: m for m in models}
        missing = [m["model"] for m in self.models if m["model"] not in by_name]
        if missing:
            raise BlendError(f"the blend names model(s) {missing} that the plan does not have ({list(by_name)}); "
                             "choose the blend on predictions of this plan's models")
        mean = str(self.mean_prompt or "")
        return {"models": [{**by_name[m["model"]], "n": int(m["n"])} for m in self.models],
                "use_mean_prompt": bool(mean.strip()), "mean_prompt": mean, "separator": self.separator}
