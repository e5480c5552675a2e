"""The blend chosen on validation: which models' predictions, how many of each, in which order, and which mean prompt
(none, the public one, the searched one) make the final string that scores best on the choice rows.

Every option is scored, the best one is written to ``blend.json`` (:class:`kaggle_utils.blending.Blend`) in the run,
and the inference notebook reads it; the mean-prompt stage (:mod:`kaggle_utils.mean_prompt`) runs the choice after
its search.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import blending, data, sampling
from .blending import BlendError
from .config import resolve_path, saved_config

logger = logging.getLogger("kaggle_utils")

OPTIONS_FILE = "blend_options.csv"
OPTIONS_PLOT = "blend_options.png"
MEAN_PROMPT_KINDS = ("none", "public", "optimized")
SPLIT = "choice"  # the rows the blend is chosen on; the scores this module adds say so


# ---------------------------------------------------------------- the predictions it blends


def find_prediction_files(run_dir: Path, predictions_dir: str = "", models: Sequence[str] = ()) -> list[Path]:
    """The ``<model>.jsonl`` prediction files the blend uses, in plan order.

    The folder is ``predictions_dir``, else the run's (:func:`_predictions_dir`). The order is ``models``; else the
    plan of the inference run that wrote the folder (its ``config.json``, one level up, lists the models); else every
    ``<model>.jsonl`` by name. Stale files that the prediction store set aside (``*.stale.jsonl``) are never read.
    """
    folder = _predictions_dir(run_dir, predictions_dir)
    if folder is None:
        if models:
            raise BlendError(f"models {list(models)} given but no predictions folder found under {run_dir} "
                             "(run the inference notebook on its validation.csv first, or set predictions_dir)")
        return []
    names = list(models) or _planned_models(folder)
    if names:
        files = [folder / f"{m}.jsonl" for m in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise BlendError(f"prediction file(s) missing: {missing}")
        return files
    return sorted(f for f in folder.glob("*.jsonl") if not f.name.endswith(".stale.jsonl"))


def _planned_models(folder: Path) -> list[str]:
    """Model names, in plan order, from the ``config.json`` of the inference run that owns ``folder``."""
    plan = (saved_config(folder.parent) or {}).get("models") or []
    return [m["name"] for m in plan if isinstance(m, dict) and m.get("name")]


def _predictions_dir(run_dir: Path, predictions_dir: str = "") -> Path | None:
    """``predictions_dir``, else ``<run>/predictions`` or ``<run>/inference/predictions`` (the inference notebook's
    default for the demo) when it holds prediction files; None when the run has none."""
    if predictions_dir:
        folder = resolve_path(predictions_dir)
        if not folder.is_dir():
            raise BlendError(f"predictions_dir '{folder}' does not exist")
        return folder
    for folder in (run_dir / "predictions", run_dir / "inference" / "predictions"):
        if folder.is_dir() and any(folder.glob("*.jsonl")):
            return folder
    return None


def align_predictions(files: Sequence[Path], ids: Sequence[str]) -> tuple[dict[str, list[list[str]]], list[int]]:
    """Per model, the predictions of each validation row in ``ids`` order; and the row positions every model covers.

    Rows a model did not predict get an empty list and are left out of the blend rows.
    """
    per_model: dict[str, list[list[str]]] = {}
    covered = set(range(len(ids)))
    for f in files:
        preds = sampling.read_predictions(f)
        per_model[f.stem] = [preds.get(str(i), []) for i in ids]
        covered &= {k for k, i in enumerate(ids) if str(i) in preds}
    return per_model, sorted(covered)


# ---------------------------------------------------------------- the blend choice


@dataclass(frozen=True)
class BlendOption:
    """One way to build the final string: ``plan`` is (model, predictions taken) in order; then a mean prompt."""

    plan: tuple  # ((model, n), ...) with n >= 1, in the order they are joined
    mean_prompt_kind: str  # none | public | optimized

    @property
    def label(self) -> str:
        models = " + ".join(f"{m} x{n}" for m, n in self.plan) or "no predictions"
        return f"{models} | mean prompt: {self.mean_prompt_kind}"


def blend_options(available: dict[str, int], n_choices: Sequence[int], mean_prompt_kinds: Sequence[str],
                  max_options: int = 300, all_orders_up_to: int = 3) -> list[BlendOption]:
    """Every blend to try: a count from ``n_choices`` per model (at most what it has), every order of the models
    taken when they are few (``all_orders_up_to``; else the given order), times each mean-prompt kind.

    A blend with neither predictions nor a mean prompt would be blank, so it is left out.
    """
    per_model = [[n for n in n_choices if n <= have] or [0] for have in available.values()]
    options: dict[BlendOption, None] = {}
    for counts in itertools.product(*per_model):
        taken = [(m, n) for m, n in zip(available, counts) if n > 0]
        orders = itertools.permutations(taken) if len(taken) <= all_orders_up_to else [tuple(taken)]
        for order in orders:
            for kind in mean_prompt_kinds:
                if order or kind != "none":
                    options[BlendOption(tuple(order), kind)] = None
    if len(options) > max_options:
        raise BlendError(f"{len(options)} blend options exceed max_options={max_options}; shorten n_choices "
                              "or the models list")
    if not options:
        raise BlendError("no blend option: give predictions or a mean prompt")
    return list(options)


def blend_strings(option: BlendOption, predictions: dict[str, list[list[str]]], rows: Sequence[int],
                  mean_prompts: dict[str, str], separator: str = " ") -> list[str]:
    """The final string of each row in ``rows`` under ``option``."""
    mean = mean_prompts.get(option.mean_prompt_kind, "") if option.mean_prompt_kind != "none" else ""
    return [blending.blend_row([predictions[m][r][:n] for m, n in option.plan], mean, separator) for r in rows]


def score_blends(scorer, options: Sequence[BlendOption], predictions: dict[str, list[list[str]]],
                 truths: Sequence[str], mean_prompts: dict[str, str], separator: str = " ",
                 choice_rows: Sequence[int] | None = None, progress: bool = True) -> pd.DataFrame:
    """Every option's mean SCS and cosine on ``choice_rows`` (default: all rows), best first; ``scs_all_rows`` is
    the SCS on every row, which differs only when the search saw some rows (blend objective).

    All options' strings go to the scorer in one batch (cached), then each option's rows are scored.
    """
    rows = list(range(len(truths)))
    chosen_on = rows if choice_rows is None else list(choice_rows)
    if not chosen_on:
        raise BlendError("no validation row is left to choose the blend on")
    strings = {o: blend_strings(o, predictions, rows, mean_prompts, separator) for o in options}
    scorer.embed([s for ss in strings.values() for s in ss] + list(truths), show_progress=progress)
    records = []
    for o in options:
        cos = np.asarray(scorer.cosine(strings[o], truths), dtype=np.float64)
        scs = np.sign(cos) * np.abs(cos) ** 3
        records.append({"option": o.label, "models": " > ".join(m for m, _ in o.plan),
                        "predictions": sum(n for _, n in o.plan), "mean_prompt": o.mean_prompt_kind,
                        "scorer": scorer.name, "rows": len(chosen_on),
                        "scs": round(float(scs[chosen_on].mean()), 4), "cos": round(float(cos[chosen_on].mean()), 4),
                        "scs_all_rows": round(float(scs.mean()), 4), "_option": o, "_rows_scs": scs[chosen_on]})
    table = pd.DataFrame(records).sort_values(["scs", "predictions"], ascending=[False, True], kind="stable")
    table = table.reset_index(drop=True)
    table.attrs["groups"] = [data.normalize_prompt(truths[r]) for r in chosen_on]  # for choose_blend's standard error
    return table


def _within_one_se(best: np.ndarray, other: np.ndarray, groups=None) -> bool:
    """Whether ``other`` scores within one standard error of ``best`` on the same rows: paired differences,
    averaged per prompt group first when ``groups`` are given (rows of a group move together, so counting them as
    independent would shrink the error)."""
    diff = np.asarray(best, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    if groups is not None and len(groups) == len(diff):
        diff = pd.Series(diff).groupby(list(groups), sort=False).mean().to_numpy()
    se = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return float(diff.mean()) <= se


def choose_blend(table: pd.DataFrame, mean_prompt_kind: str | None = None, with_predictions: bool = False
                 ) -> BlendOption | None:
    """The option with the best mean SCS, with fewer predictions where they do not measurably help; optionally only
    among options with that mean-prompt kind and at least one prediction (None when there is no such option).

    The best option by mean can win by noise on a few dozen rows (on the demo's 65 choice rows x2 beats x1 by 0.005,
    and loses by 0.03 on the report rows). So among the options that differ from it only in how many predictions
    each model gives (same models, order and mean prompt), the one with the fewest predictions is taken when it
    scores within one standard error of the best (paired differences over prompt groups): the one-standard-error rule.
    """
    if table.empty:
        raise BlendError("no blend option was scored")
    pick = table
    if mean_prompt_kind is not None:
        pick = pick[pick["mean_prompt"] == mean_prompt_kind]
    if with_predictions:
        pick = pick[pick["predictions"] > 0]
    if pick.empty:
        return None
    ranked = pick.sort_values(["scs", "predictions"], ascending=[False, True], kind="stable")
    best = ranked.iloc[0]
    option = best["_option"]
    shape = lambda o: (tuple(m for m, _ in o.plan), o.mean_prompt_kind)  # noqa: E731
    groups = table.attrs.get("groups")
    same = ranked[[shape(o) == shape(option) and _within_one_se(best["_rows_scs"], r, groups)
                   for o, r in zip(ranked["_option"], ranked["_rows_scs"])]]
    return same.sort_values(["predictions", "scs"], ascending=[True, False], kind="stable").iloc[0]["_option"]


def plot_blend_table(table: pd.DataFrame, path: str | os.PathLike, scorer_name: str, top: int = 25) -> Path:
    """A horizontal bar chart of each option's mean SCS (best ``top`` options), titled with the scorer's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = table.head(top).iloc[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(shown) + 1.5))
    colors = ["tab:green" if i == len(shown) - 1 else "tab:blue" for i in range(len(shown))]
    ax.barh(shown["option"], shown["scs"], color=colors)
    for y, v in enumerate(shown["scs"]):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlabel(f"mean SCS on validation ({scorer_name})")
    ax.set_title("Blend options (best in green)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- on the choice rows


def choose_and_write(scorer, predictions: dict[str, list[list[str]]], truths: Sequence[str], searched: dict,
                     out_dir: Path, separator: str = " ", n_choices: Sequence[int] = (0, 1, 2, 4),
                     max_options: int = 300, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Score every blend option (``n_choices`` predictions per model, model orders, mean prompt none / public / the
    ``searched`` one) on the validation rows the search never saw (``searched["choice_rows"]``; all rows when it saw
    none), write the table (CSV + PNG) and the best option as ``blend.json`` into ``out_dir``; also record the best
    option that appends the optimized mean prompt. Returns the table and the choice."""
    began = time.perf_counter()
    mean_prompts = {"public": blending.DEFAULT_MEAN_PROMPT, "optimized": searched["string"]}
    available = {m: min((len(p) for p in preds), default=0) for m, preds in predictions.items()}
    options = blend_options(available, n_choices, MEAN_PROMPT_KINDS, max_options)
    choice_rows = searched.get("choice_rows")
    table = score_blends(scorer, options, predictions, truths, mean_prompts, separator, choice_rows=choice_rows,
                         progress=progress)
    best = choose_blend(table)
    with_optimized = choose_blend(table, "optimized", with_predictions=True)
    shown = table.drop(columns=["_option", "_rows_scs"])
    shown.to_csv(out_dir / OPTIONS_FILE, index=False)
    plot_blend_table(shown, out_dir / OPTIONS_PLOT, scorer.name)

    def describe(option: BlendOption) -> dict:
        row = table[table["_option"] == option].iloc[0]
        return {"models": [{"model": m, "n": n} for m, n in option.plan], "mean_prompt_kind": option.mean_prompt_kind,
                "mean_prompt": mean_prompts.get(option.mean_prompt_kind, ""), "label": option.label,
                "scs": float(row["scs"]), "cos": float(row["cos"]), "scs_all_rows": float(row["scs_all_rows"])}

    choice = {**describe(best), "separator": separator, "scorer": scorer.name, "rows": int(table["rows"].iloc[0]),
              "rows_total": len(truths), "chosen_from": len(table), "table": OPTIONS_FILE,
              "best_by_mean": table.iloc[0]["option"],
              "rule": "the best mean SCS; fewer predictions when within one standard error of it (same models, order "
                      "and mean prompt)",
              "mean_prompt_objective": searched.get("objective", ""),
              "best_with_optimized_mean_prompt": describe(with_optimized) if with_optimized else None,
              "seconds": round(time.perf_counter() - began, 2)}
    path = blending.Blend(**choice).write(out_dir / blending.BLEND_FILE)
    logger.info("blend chosen from %d option(s) on %d rows with %s: %s (SCS %.4f) -> %s", len(table), choice["rows"],
                scorer.name, best.label, choice["scs"], path)
    return shown, choice


def write_n_curve(scorer, predictions: dict[str, list[list[str]]], truths: Sequence[str], mean_prompt: str,
                  out_dir: Path, separator: str = " ") -> Path:
    """SCS against the number of predictions joined on the choice rows, without and with ``mean_prompt``
    (``blending.n_curve``), as ``<out_dir>/n_curve.csv`` and ``.png``; returns the plot."""
    table = blending.n_curve(scorer, predictions, truths, mean_prompt, separator, split=SPLIT)
    table.to_csv(out_dir / f"{blending.N_CURVE_FILE}.csv", index=False)
    return blending.plot_n_curve(table, out_dir / f"{blending.N_CURVE_FILE}.png",
                                 f"how many predictions to join ({len(truths)} choice rows)")


def score_rows(scorer, predictions: dict[str, list[list[str]]], truths: Sequence[str], searched: dict,
               choice: dict) -> list[dict]:
    """The ``scores.csv`` rows this stage adds, on all validation rows: the public and the optimized mean prompt
    alone, the best blend that appends the optimized mean prompt (when there are predictions), and the chosen blend.

    System names are fixed (the blend itself is in ``blend.json``), so a re-run replaces its rows. A mean prompt
    searched on validation rows (``blend`` objective) is marked, since part of these rows are then in-sample.
    """
    n = len(truths)
    mean_prompts = {"public": blending.DEFAULT_MEAN_PROMPT, "optimized": searched["string"]}
    tag = ", searched on part of these rows" if searched.get("objective") == "blend" else ""
    rows = [scorer.report(blending.PUBLIC_MEAN_PROMPT_SYSTEM, [blending.DEFAULT_MEAN_PROMPT] * n, truths, split=SPLIT),
            scorer.report(f"mean prompt alone (optimized{tag})", [searched["string"]] * n, truths, split=SPLIT)]
    blends = [(f"predictions + optimized mean prompt{tag}", choice.get("best_with_optimized_mean_prompt")),
              ("blend chosen on validation", choice)]
    for system, picked in blends:
        if picked:
            option = BlendOption(tuple((m["model"], m["n"]) for m in picked["models"]), picked["mean_prompt_kind"])
            rows.append(scorer.report(system, blend_strings(option, predictions, range(n), mean_prompts,
                                                            choice["separator"]), truths, split=SPLIT))
    return rows
