"""Choosing a run's checkpoint step by the competition metric: the select stage's config, the run folder, the
validation rows, each step's predictions with their cache, and the choice.

For every candidate step (step 0 = the base model without an adapter, then every k-th checkpoint and always the last)
greedy predictions are sampled on held-out validation rows and scored with SCS; the highest mean wins, the earlier
step on ties, unless a step is forced; runs with enough checkpoints export the mean of a window around the smoothed
peak, shorter ones the latest checkpoint within one standard error of the best (:func:`choose_window`).
:mod:`kaggle_utils.export` writes the choice to ``runs/<run>/selected/`` with ``selection.json``
(:class:`kaggle_utils.artifacts.Selection`), which the inference stage reads instead of re-declaring the step.

Usage (headless): ``make select RUN=smollm`` (or ``papermill notebooks/select_checkpoint.ipynb out.ipynb -p run_name
smollm``).

Files the select stage writes::

    runs/<run>/selection/config.json     the resolved SelectConfig, before any work
    runs/<run>/selection/step-N.json     per-step predictions + scores (the resume cache; delete to recompute)
    runs/<run>/selected/                 adapter_config.json, adapter_model.safetensors, selection.json,
                                         loss.png, scores.png (+ merged/ with export_merged): kaggle_utils.export
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from . import artifacts, data, engines, metric, models, prompts, serving, sources
from .config import read_json_object, require, resolve_path, save_config, saved_config
from .plan import ModelEntry

logger = logging.getLogger("kaggle_utils")

SELECTION_DIR = "selection"  # per-step cache, inside the run folder
SELECTED_DIR = artifacts.SELECTED_DIR  # the export the next stage reads
REPORT_BY_STEP = "report_by_step"  # <run>/report_by_step.json and .png: the report rows scored by step, chose nothing
ADAPTER_FILES = artifacts.ADAPTER_FILES
# What an empty extraction is scored as: the competition rejects blank prompts, and a generic instruction is what a
# submission would fall back to, so the score stays honest about what would be submitted.
FALLBACK_PROMPT = prompts.FALLBACK_PROMPT  # the submission's default fallback too
# Mean scores closer than this count as a tie (then the earlier step wins): differences below it are float noise
# from batching, not a better checkpoint.
TIE_TOLERANCE = 1e-6


class SelectionError(ValueError):
    """A run folder or selection request that cannot work; the message says what to do."""


@dataclass
class SelectConfig:
    """Checkpoint-step selection of one run. Every field is a parameter of ``notebooks/select_checkpoint.ipynb``."""

    run_name: str = "smollm"  # the training run: <runs_dir>/<run_name>/ with its checkpoint-N folders
    runs_dir: str = "runs"  # parent of all run folders (gitignored)
    base_model_path: str = ""  # base weights; "" = the path the run was trained with (its config.json)
    validation_file: str = ""  # CSV to score on; "" = the run's own validation.csv (prompt groups never trained on);
    # the run's report.csv: its rows scored by step into report_by_step.json, selected/ left as the choice rows chose
    rows_per_step: int = 0  # rows scored per candidate step, drawn as whole prompt groups (0 = all the choice rows)
    every_k: int = 1  # score every k-th checkpoint counted back from the last (1 = all); the last always counts
    force_step: int = 0  # choose this checkpoint step whatever the scores (0 or -1 = no override)
    scorer_path: str = ""  # local sentence-transformers folder (sentence-t5-base = the real metric); "" = MiniLM
    max_new_tokens: int = 24  # greedy tokens per prediction; fewer than inference's 32: every candidate step pays
    # for them (21 passes in a 7B recipe), and the step caches key on it, so a change regenerates every step
    max_prompt_tokens: int = 0  # prompt-token limit (kaggle_utils.artifacts); 0 = the run's, from its config.json
    generation_batch_size: int = 24  # rows per generate call
    average_checkpoints: int = 9  # export the mean of this many (odd) checkpoints around the smoothed peak of the
    # scores; 1 = the best step alone; a run with fewer than twice as many checkpoints (a rising curve: no plateau)
    # exports its latest checkpoint within one standard error of the best (latest_within_se).
    # 9 rather than 5: on the GPU recipe's 30 checkpoints, +0.011 on the report rows in 3 of 3 training seeds, and a
    # tie on 20 (RESULTS.md, "The GPU recipe")
    export_merged: bool = False  # also write fp16 base+adapter merged weights to selected/merged/ (vLLM on T4)
    seed: int = 0  # seed of the validation subset draw

    def __post_init__(self):
        require(bool(self.run_name) and "/" not in self.run_name, "run_name",
                f"must be a run folder name, got '{self.run_name}'")
        require(self.rows_per_step >= 0, "rows_per_step", f"must be >= 0 (0 = all rows), got {self.rows_per_step}")
        require(self.every_k >= 1, "every_k", f"must be >= 1, got {self.every_k}")
        require(self.force_step >= -1, "force_step", f"must be a checkpoint step, or 0 / -1 for none, got "
                f"{self.force_step}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.max_prompt_tokens == 0 or self.max_prompt_tokens >= 64, "max_prompt_tokens",
                f"must be 0 (the run's) or >= 64, got {self.max_prompt_tokens}")
        require(self.generation_batch_size >= 1, "generation_batch_size",
                f"must be >= 1, got {self.generation_batch_size}")
        require(self.average_checkpoints >= 1 and self.average_checkpoints % 2 == 1, "average_checkpoints",
                f"must be odd (the window is centred on a step; 1 = the best step alone), got "
                f"{self.average_checkpoints}")
        if self.scorer_path:  # fail before minutes of generation, not after
            metric.check_scorer_path(self.scorer_path)

    @property
    def run_dir(self) -> Path:
        """The training run's folder."""
        return resolve_path(self.runs_dir) / self.run_name

    @property
    def forced(self) -> int | None:
        """The forced step, or None."""
        return self.force_step if self.force_step > 0 else None


# ---------------------------------------------------------------- the run folder


def run_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """Step -> folder of the run's complete checkpoints (:func:`kaggle_utils.artifacts.find_checkpoints`).

    A run folder that does not exist, or holds no complete checkpoint, is a :class:`SelectionError` saying how to
    make one.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SelectionError(f"run folder '{run_dir}' does not exist; train first (make train RUN={run_dir.name}) "
                             "or set run_name / runs_dir")
    found = artifacts.find_checkpoints(run_dir)
    if not found:
        raise SelectionError(f"run folder '{run_dir}' has no checkpoints (no checkpoint-N/ with {ADAPTER_FILES[1]}); "
                             f"train first (make train RUN={run_dir.name})")
    return found


def read_run_config(run_dir: str | Path) -> dict:
    """The training run's resolved config (``config.json``, written by the train stage)."""
    values = saved_config(run_dir)
    if values is None:
        raise SelectionError(f"{Path(run_dir) / 'config.json'} is missing: the run folder was not written by the "
                             "train stage")
    return values


def checkpoint_metrics(run_dir: str | Path) -> pd.DataFrame:
    """One row per step: step 0 (the base model's eval loss, when logged) and each checkpoint's train and eval loss.

    Read from each ``checkpoint-N/metrics.json``; the run's metrics log fills in what a checkpoint lacks.
    """
    run_dir = Path(run_dir)
    rows = {}
    for step, folder in run_checkpoints(run_dir).items():
        meta_file = folder / "metrics.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        rows[step] = {"step": step, "train_loss": meta.get("train_loss"), "eval_loss": meta.get("eval_loss")}
    try:
        logged = dict(artifacts.eval_losses(run_dir))
    except FileNotFoundError:
        logged = {}
    if 0 in logged:
        rows[0] = {"step": 0, "train_loss": None, "eval_loss": logged[0]}
    for step, row in rows.items():
        if row["eval_loss"] is None and step in logged:
            row["eval_loss"] = logged[step]
    return pd.DataFrame([rows[s] for s in sorted(rows)], columns=["step", "train_loss", "eval_loss"])


def candidate_steps(steps, every_k: int = 1, force_step: int = 0) -> list[int]:
    """Steps to score: 0 (the base model), every k-th checkpoint counted back from the last, and a forced step.

    Counting back from the last keeps the spacing regular and always includes the last checkpoint.
    """
    steps = sorted(int(s) for s in steps)
    if not steps:
        raise SelectionError("no checkpoint steps to choose from")
    picked = set(steps[::-1][::max(1, every_k)]) | {0}
    if force_step and force_step > 0:
        if force_step not in steps:
            raise SelectionError(f"force_step={force_step} is not a checkpoint of this run; its steps are {steps}")
        picked.add(force_step)
    return sorted(picked)


def prepare_selection(cfg: SelectConfig) -> dict:
    """Check the run (checkpoints, forced step, base model) and write the resolved config; return the run's config.

    Everything that can fail cheaply fails here, before any model is loaded.
    """
    ckpts = run_checkpoints(cfg.run_dir)
    run_cfg = read_run_config(cfg.run_dir)
    candidate_steps(ckpts, cfg.every_k, cfg.force_step)  # raises on a forced step that does not exist
    preset = models.get_preset(run_cfg.get("preset", models.DEFAULT_PRESET))
    models.check_base_path(preset, base_model_path(cfg, run_cfg))
    save_config(cfg, cfg.run_dir / SELECTION_DIR)
    logger.info("%s: %d checkpoint(s) at steps %s; scoring steps %s", cfg.run_name, len(ckpts), list(ckpts),
                candidate_steps(ckpts, cfg.every_k, cfg.force_step))
    return run_cfg


def scores_report_rows(cfg: SelectConfig) -> bool:
    """Whether ``validation_file`` is the run's own ``report.csv``: those rows choose nothing, so their scores by step
    are written beside the run (``report_by_step.json``, ``.png``) and ``selected/`` keeps the choice rows' step."""
    return bool(cfg.validation_file) and resolve_path(cfg.validation_file).resolve() == (
        cfg.run_dir / artifacts.REPORT_FILE).resolve()


def base_model_path(cfg: SelectConfig, run_cfg: dict) -> str:
    """The base weights the selection runs on: ``base_model_path``, else the run's."""
    return cfg.base_model_path or run_cfg.get("base_model_path", "")


def prompt_token_limit(cfg: SelectConfig, run_cfg: dict) -> int:
    """Prompt tokens kept per validation row: ``max_prompt_tokens``, else the run's limit
    (:func:`kaggle_utils.artifacts.run_prompt_token_limit`).

    The model never trained on longer prompts, and prefill of long prompts is what a CPU selection spends its time on
    (SmolLM2's validation rows average about 580 tokens, its training limit is 384).
    """
    return artifacts.run_prompt_token_limit(run_cfg, cfg.max_prompt_tokens)


def plot_losses(cfg: SelectConfig) -> Path:
    """The run's train and eval loss curves, as ``selected/loss.png``."""
    out = cfg.run_dir / SELECTED_DIR
    out.mkdir(parents=True, exist_ok=True)
    return artifacts.plot_losses(cfg.run_dir, out / "loss.png")


# ---------------------------------------------------------------- validation rows


def group_keys(df: pd.DataFrame) -> pd.Series:
    """Each row's prompt group: its normalized ``rewrite_prompt``."""
    return df[data.PROMPT_COLUMN].map(data.normalize_prompt)


def _trained_prompts(cfg: SelectConfig, run_cfg: dict) -> set[str]:
    """Normalized prompts the run may have trained on: its train files, less its own held-out groups (the choice rows
    of ``validation.csv`` and the report rows of ``report.csv``: neither reached training)."""
    trained: set[str] = set()
    for f in run_cfg.get("train_files", []):
        try:
            trained |= set(group_keys(data.read_rewrites(f)))
        except data.DataError as e:
            logger.warning("cannot read training file %s to guard against leaks: %s", f, e)
    for name in (artifacts.VALIDATION_FILE, artifacts.REPORT_FILE):
        held = cfg.run_dir / name
        if held.exists():
            trained -= set(group_keys(data.read_rewrites(held)))
    return trained


def load_validation(cfg: SelectConfig, run_cfg: dict | None = None) -> pd.DataFrame:
    """The validation rows to score: ``rows_per_step`` rows drawn as whole prompt groups (seeded).

    By default the run's own ``validation.csv``, whose prompt groups training never saw. Another file is filtered
    first: rows whose prompt is in the run's training files are dropped, since scoring them would reward memorizing.
    Whole groups are drawn (``data.split_by_prompt``) rather than the file's head, because files are often ordered by
    prompt or source and the head would be a few similar prompts; the draw is then trimmed to exactly ``rows_per_step``.
    Fewer than 2 prompt groups is a :class:`data.DataError`: one prompt says nothing about a checkpoint.
    """
    own = cfg.run_dir / artifacts.VALIDATION_FILE
    path = resolve_path(cfg.validation_file) if cfg.validation_file else own
    if not path.exists():
        if not cfg.validation_file:
            raise SelectionError(f"{own} is missing (the train stage writes it); set validation_file to a "
                                 "competition-format CSV of prompts the run never trained on")
        raise data.DataError(f"{path}: file does not exist")
    df = data.drop_incomplete(data.read_rewrites(path))
    if path != own:
        trained = _trained_prompts(cfg, run_cfg if run_cfg is not None else read_run_config(cfg.run_dir))
        leak = group_keys(df).isin(trained).to_numpy()
        if leak.any():
            logger.info("%s: dropped %d row(s) whose prompt the run trained on; %d left", path.name, int(leak.sum()),
                        int((~leak).sum()))
        df = df.loc[~leak].reset_index(drop=True)
    groups = group_keys(df).nunique()
    if groups < 2:
        raise data.DataError(f"{path}: the validation set has {groups} prompt group(s) ({len(df)} rows) after "
                             "dropping incomplete and trained-on rows; selection needs at least 2 distinct "
                             "rewrite_prompt values")
    if "id" not in df.columns:
        df["id"] = [f"row-{r}" for r in df["_row"]]
    if cfg.rows_per_step and cfg.rows_per_step < len(df):
        _, df = data.split_by_prompt(df, cfg.rows_per_step, seed=cfg.seed)
        df = df.head(cfg.rows_per_step)
    df = df.reset_index(drop=True)
    logger.info("validation: %d row(s), %d prompt group(s), from %s", len(df), group_keys(df).nunique(), path)
    return df


# ---------------------------------------------------------------- sampling and scoring


def _sampling_key(cfg: SelectConfig, run_cfg: dict, validation: pd.DataFrame, ckpt: Path | None) -> dict:
    """What a step's predictions depend on; a cached step is reused only when all of it matches."""
    rows = hashlib.sha256("\n".join(f"{i}\t{p}" for i, p in zip(validation["id"], validation[data.PROMPT_COLUMN]))
                          .encode()).hexdigest()[:16]
    return {"rows": rows, "n_rows": len(validation), "max_new_tokens": cfg.max_new_tokens,
            "max_prompt_tokens": prompt_token_limit(cfg, run_cfg), "preset": run_cfg.get("preset"),
            "base_model_path": base_model_path(cfg, run_cfg),
            "adapter": sources.sha256_of(ckpt / ADAPTER_FILES[1])[:16] if ckpt is not None else None,
            "fallback": FALLBACK_PROMPT}


def step_cache_file(cfg: SelectConfig, step: int | str) -> Path:
    """Where one step's predictions and scores are cached (``step`` "selected": the exported adapter). The report
    rows' scores live in a folder of their own, so scoring them never replaces the choice rows' cache."""
    folder = cfg.run_dir / SELECTION_DIR / ("report" if scores_report_rows(cfg) else "")
    return folder / f"step-{step}.json"


def _step_engine(cfg: SelectConfig, run_cfg: dict) -> engines.Engine:
    """The run's base model, served once for every step (:func:`kaggle_utils.serving.serve`; adapters are swapped in
    unmerged, :meth:`kaggle_utils.engines.HFEngine.use_adapter`), as inference loads it: bf16 on CPU, the card's dtype
    on GPU, 4-bit when the run trained 4-bit."""
    base = ModelEntry(name="base", preset=run_cfg.get("preset", models.DEFAULT_PRESET),
                      base_model=base_model_path(cfg, run_cfg))
    return serving.serve(base, engine="hf", load_in_4bit=bool(run_cfg.get("load_in_4bit", False)))


def _step_completions(engine: engines.Engine, step: int | str, adapter: Path | None, validation: pd.DataFrame,
                      scfg: engines.SamplingConfig) -> list[str]:
    """Raw greedy completions for every validation row at ``step``, with its ``adapter`` (None: the base model)."""
    logger.info("step %s: sampling %d row(s) with %s", step, len(validation), adapter or "the base model alone")
    engine.use_adapter(adapter)
    return [c[0] for c in engine.generate(list(validation["original_text"]), list(validation["rewritten_text"]), scfg)]


def _step_sampling(cfg: SelectConfig, run_cfg: dict) -> engines.SamplingConfig:
    """One greedy prediction per row, cut as the run was trained."""
    return engines.SamplingConfig(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens,
                                  generation_batch_size=cfg.generation_batch_size,
                                  max_prompt_tokens=prompt_token_limit(cfg, run_cfg), seed=cfg.seed)


def extract_predictions(raw, marker: str = "") -> tuple[list[str], int]:
    """The recovered prompt of each raw completion, and how many were empty and got :data:`FALLBACK_PROMPT`."""
    out, empty = [], 0
    for text in raw:
        p = prompts.extract_prompt(text, marker)
        if not p.strip():
            p, empty = FALLBACK_PROMPT, empty + 1
        out.append(p)
    return out, empty


def score_steps(cfg: SelectConfig, validation: pd.DataFrame, scorer: metric.Scorer,
                run_cfg: dict | None = None) -> pd.DataFrame:
    """Sample greedy predictions at every candidate step, score them, and return one row per step.

    Columns: step, scs (mean), cos (mean), rows, fallbacks (empty predictions scored as the fallback prompt), seconds
    (generation time; 0 when cached), scorer, precision, and paired_se: the standard error of the step's mean minus
    the best checkpoint's, paired over prompt groups (:func:`paired_standard_errors`). Each finished step is cached in
    ``selection/step-N.json``, so an interrupted selection resumes where it stopped; a step whose inputs changed
    (rows, adapter file, tokens) is recomputed, and a cached step scored by another scorer is only rescored. The model
    loads only if some step needs generating.
    """
    from tqdm.auto import tqdm

    run_cfg = run_cfg if run_cfg is not None else read_run_config(cfg.run_dir)
    ckpts = run_checkpoints(cfg.run_dir)
    steps = candidate_steps(ckpts, cfg.every_k, cfg.force_step)
    sampler = _held_sampler(cfg)  # the model, loaded by the first step that needs generating
    try:
        rows = [_score_one(cfg, run_cfg, validation, scorer, step, ckpts.get(step), sampler)
                for step in tqdm(steps, desc="candidate steps", unit="step")]
    except BaseException:
        _free(sampler)
        raise
    per_row = {int(r["step"]): r.pop("per_row") for r in rows}
    table = pd.DataFrame(rows)
    se = paired_standard_errors(per_row, group_keys(validation))
    table["paired_se"] = [round(se[int(s)], 6) for s in table["step"]]
    return table


# The model score_steps loaded stays for score_selected (an averaged adapter is scored on the same base: a 7B model
# loads in minutes); a merged export, and the end of score_selected, free it.
_HELD: dict = {}


def _held_sampler(cfg: SelectConfig) -> list:
    """The holder of the loaded model for this selection (the same config); another config's model is freed."""
    key = repr(cfg)
    for other in [k for k in _HELD if k != key]:
        _free(_HELD.pop(other))
    return _HELD.setdefault(key, [])


def _score_one(cfg: SelectConfig, run_cfg: dict, validation: pd.DataFrame, scorer: metric.Scorer, step: int | str,
               adapter: Path | None, sampler: list) -> dict:
    """One step's (or the exported adapter's) greedy predictions, generated unless cached, scored unless scored by
    this scorer: its row of the scores table, and each row's SCS under ``per_row``. ``sampler`` holds the loaded
    model, loaded here on first need."""
    truths = list(validation[data.PROMPT_COLUMN])
    key = _sampling_key(cfg, run_cfg, validation, adapter)
    cache = step_cache_file(cfg, step)
    cache.parent.mkdir(parents=True, exist_ok=True)
    entry = json.loads(cache.read_text()) if cache.exists() else {}
    seconds = 0.0
    if entry.get("key") != key:
        if not sampler:
            sampler.append(_step_engine(cfg, run_cfg))
        start = time.time()
        raw = _step_completions(sampler[0], step, adapter, validation, _step_sampling(cfg, run_cfg))
        seconds = time.time() - start
        predictions, empty = extract_predictions(raw, sampler[0].marker)
        entry = {"step": step, "key": key, "ids": list(map(str, validation["id"])), "raw": raw,
                 "predictions": predictions, "fallbacks": empty, "seconds": round(seconds, 2)}
        artifacts.write_json(cache, entry)  # predictions are the expensive part: keep them even if scoring fails
    precision = getattr(scorer, "precision", None)
    if (entry.get("scorer_path"), entry.get("scorer_precision")) != (scorer.path, precision):
        scs = scorer.scs(entry["predictions"], truths)
        entry.update(scorer=scorer.name, scorer_path=scorer.path, scorer_precision=precision,
                     scs=[round(float(s), 6) for s in scs],
                     cos=[round(float(c), 6) for c in scorer.cosine(entry["predictions"], truths)])
        artifacts.write_json(cache, entry)
    if entry["fallbacks"]:
        logger.warning("step %s: %d of %d prediction(s) were empty and were scored as %r", step,
                       entry["fallbacks"], len(truths), FALLBACK_PROMPT)
    row = {"step": step, "scs": float(np.mean(entry["scs"])), "cos": float(np.mean(entry["cos"])),
           "rows": len(entry["scs"]), "fallbacks": entry["fallbacks"], "seconds": round(seconds, 1),
           "scorer": entry["scorer"], "precision": precision, "per_row": entry["scs"]}
    logger.info("step %s: mean SCS %.4f (cos %.4f) on %d rows, %s%s", step, row["scs"], row["cos"], row["rows"],
                entry["scorer"], f", generated in {seconds:.0f} s" if seconds else ", cached")
    return row


def _free(sampler: list) -> None:
    """Drop a loaded model, so a merged export that follows can load another copy."""
    if sampler:
        sampler.pop().close()


def free_held_model(cfg: SelectConfig) -> None:
    """Free the model this selection loaded for scoring (a merged export loads another copy of the base)."""
    _free(_held_sampler(cfg))


def step_predictions(cfg: SelectConfig, step: int, validation: pd.DataFrame) -> pd.DataFrame:
    """The cached predictions of one scored step beside the truths, worst rows first (for reading failures)."""
    entry = json.loads(step_cache_file(cfg, step).read_text())
    out = pd.DataFrame({"id": entry["ids"], "truth": list(validation[data.PROMPT_COLUMN]),
                        "prediction": entry["predictions"], "scs": entry["scs"]})
    return out.sort_values("scs").reset_index(drop=True)


def selected_predictions(cfg: SelectConfig, validation: pd.DataFrame) -> pd.DataFrame:
    """:func:`step_predictions` of what was exported: the averaged adapter's own (after :func:`score_selected`), or
    the chosen step's."""
    sel = artifacts.Selection.read(cfg.run_dir / SELECTED_DIR)
    averaged = sel.averaged_steps and step_cache_file(cfg, "selected").exists()
    return step_predictions(cfg, "selected" if averaged else sel.step, validation)


# ---------------------------------------------------------------- choosing


def as_scores(scores) -> dict[int, float]:
    """Step -> mean SCS, from :func:`score_steps`' table or a mapping."""
    if isinstance(scores, pd.DataFrame):
        return {int(s): float(v) for s, v in zip(scores["step"], scores["scs"])}
    return {int(s): float(v) for s, v in dict(scores).items()}


def choose_step(scores: Mapping[int, float] | pd.DataFrame, force_step: int = 0) -> int:
    """The step with the highest mean SCS, the earlier step on ties; ``force_step`` > 0 overrides the scores.

    ``scores`` maps step -> mean SCS (or is :func:`score_steps`' table). A forced step must be among the scored
    steps; a NaN score never wins.
    """
    table = as_scores(scores)
    if not table:
        raise SelectionError("no scored steps to choose from")
    if force_step and force_step > 0:
        if force_step not in table:
            raise SelectionError(f"force_step={force_step} is not a scored step; scored: {sorted(table)}")
        return force_step
    finite = {s: v for s, v in table.items() if math.isfinite(v)}
    if not finite:
        raise SelectionError("every step's score is NaN; nothing to choose")
    best = max(finite.values())
    return min(s for s, v in finite.items() if v >= best - TIE_TOLERANCE)


def paired_standard_errors(per_row: Mapping[int, list[float]], groups) -> dict[int, float]:
    """Each step's standard error of its mean SCS minus the best checkpoint's (steps > 0), paired by prompt group.

    ``per_row`` maps step -> SCS of the same rows in the same order, ``groups`` is each row's prompt group: the rows of
    one group are averaged first (a group's rewrites share a prompt, so they are not independent), then the SE is that
    of the per-group differences. 0 for the best checkpoint itself, and for every step with fewer than two groups."""
    means = {int(s): float(np.mean(v)) for s, v in per_row.items()}
    ckpts = {s: m for s, m in means.items() if s > 0 and math.isfinite(m)}
    if not ckpts:
        return {s: 0.0 for s in means}
    best = choose_step(ckpts)
    by_group = pd.DataFrame({s: np.asarray(per_row[s], dtype=float) for s in means}).groupby(np.asarray(groups)).mean()
    if len(by_group) < 2:
        return {s: 0.0 for s in means}
    diff = by_group.sub(by_group[best], axis=0)
    return {s: float(diff[s].std(ddof=1) / math.sqrt(len(diff))) for s in means}


def short_run_rule(scores) -> bool:
    """Whether ``scores`` carry what :func:`latest_within_se` needs (:func:`score_steps`' table); a plain mapping of
    means gets the best step instead."""
    return isinstance(scores, pd.DataFrame) and "paired_se" in scores


def latest_within_se(scores: pd.DataFrame) -> int:
    """The latest checkpoint whose mean SCS is within one paired standard error (``paired_se``) of the best one's.

    The rule for a run too short to average (:func:`choose_window`): its curve is still rising, so the last step is the
    better one unless an earlier step beats it by more than the rows can tell apart. In make demo's CPU runs (two
    checkpoints, 65 choice rows) the best mean picked the halfway checkpoint in 2 of 13 runs, each time 0.05-0.08
    below the last one on the report rows (RESULTS.md, "The CPU recipe"). A checkpoint that scores no better than the
    base model (step 0) is never the one exported."""
    if not short_run_rule(scores):
        raise SelectionError("latest_within_se needs score_steps' table, with its paired_se column")
    means = as_scores(scores)
    floor = means.get(0, -math.inf)
    table = {s: v for s, v in means.items() if s > 0 and math.isfinite(v)}
    if not table:
        raise SelectionError("no scored checkpoints to choose from")
    se = {int(s): float(v) if math.isfinite(v) else 0.0 for s, v in zip(scores["step"], scores["paired_se"])}
    best = choose_step(table)
    within = [s for s, v in table.items() if v >= table[best] - se.get(s, 0.0) - TIE_TOLERANCE and v > floor]
    return max(within, default=best)


def smoothed(scores: Mapping[int, float] | pd.DataFrame, width: int) -> dict[int, float]:
    """Each checkpoint's mean SCS averaged with its ``width`` scored neighbours on either side (fewer at the ends).
    Step 0, the base model, is neither smoothed nor a neighbour."""
    table = {s: v for s, v in as_scores(scores).items() if s > 0 and math.isfinite(v)}
    steps = sorted(table)
    return {s: float(np.mean([table[t] for t in steps[max(0, i - width):i + width + 1]])) for i, s in enumerate(steps)}


def choose_window(scores: Mapping[int, float] | pd.DataFrame, k: int = 5, force_step: int = 0,
                  min_checkpoints: int | None = None) -> list[int]:
    """The checkpoint steps whose adapters are exported, averaged into one when there are several.

    ``k`` checkpoints centred on the peak of the ``k``-checkpoint moving average of the mean SCS (shifted inward at
    the ends): a single checkpoint's score on a few dozen rows swings by more than the curve moves on its plateau, so
    the peak of the smoothed curve, and the mean of the adapters around it, are what the rows can tell apart. One step
    only: the best (the highest mean, the earlier on ties) when ``k`` is 1; the forced step; [0] when the base model
    scores best of all; and when the run has fewer than ``min_checkpoints`` scored checkpoints (``2 * k`` by default;
    research/average_windows.py asks for any window that fits, ``k``), a curve still rising, the latest checkpoint
    within one paired standard error of the best (:func:`latest_within_se`, from :func:`score_steps`' table; the best
    step where ``scores`` is a plain mapping of means).
    """
    require(k >= 1 and k % 2 == 1, "average_checkpoints", f"must be odd (the window is centred on a step), got {k}")
    best = choose_step(scores, force_step)
    ckpts = sorted(s for s, v in as_scores(scores).items() if s > 0 and math.isfinite(v))
    fewest = 2 * k if min_checkpoints is None else max(k, min_checkpoints)
    if best == 0 or k <= 1 or (force_step and force_step > 0):
        return [best]
    if len(ckpts) < fewest:
        return [latest_within_se(scores) if short_run_rule(scores) else best]
    center = choose_step(smoothed(scores, k // 2))
    i = ckpts.index(center)
    lo = min(max(0, i - k // 2), len(ckpts) - k)
    return ckpts[lo:lo + k]


def score_selected(cfg: SelectConfig, validation: pd.DataFrame, scorer: metric.Scorer,
                   run_cfg: dict | None = None) -> float | None:
    """The exported adapter's mean SCS on ``validation``, recorded beside the per-step scores; None when no adapter
    was exported (the base model won).

    An average of checkpoints is a model no step held, so it gets greedy predictions of its own (cached in
    ``selection/step-selected.json``); a single step's export is that step's cached score. On the choice rows the
    score goes into ``selection.json`` (``selected_scs``); on the run's report rows into ``report_by_step.json``
    (``selected``), which is what the export scores on rows that chose nothing.
    """
    out = cfg.run_dir / SELECTED_DIR
    sel = artifacts.Selection.find(out)
    if sel is None or sel.base_model_won or not artifacts.has_adapter(out):
        return None
    run_cfg = run_cfg if run_cfg is not None else read_run_config(cfg.run_dir)
    if sel.averaged_steps:
        label, adapter = "selected", out
    else:
        label, adapter = sel.step, run_checkpoints(cfg.run_dir)[sel.step]
    sampler = _held_sampler(cfg)
    try:
        row = _score_one(cfg, run_cfg, validation, scorer, label, adapter, sampler)
    finally:
        _free(sampler)
    what = sel.chosen() + (" averaged" if sel.averaged_steps else "")
    logger.info("selected adapter (%s): mean SCS %.4f on %d rows", what, row["scs"], row["rows"])
    if scores_report_rows(cfg):
        path = cfg.run_dir / f"{REPORT_BY_STEP}.json"
        record = read_json_object(path, SelectionError) if path.exists() else {}
        record["selected"] = {"steps": sel.averaged_steps or [sel.step], "scs": round(row["scs"], 4),
                              "rows": row["rows"]}
        artifacts.write_json(path, record)
    else:
        sel.selected_scs = round(row["scs"], 4)
        sel.write(out)
    return row["scs"]
