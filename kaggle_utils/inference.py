"""The submission stage: read the test CSV, sample every model of the plan (resumable, within the deadline), blend,
write and validate ``submission.csv``, and score the parts when the CSV has ``rewrite_prompt``.

Usage (headless): ``make infer TEST=test.csv SUBMISSION=submission.csv``; on Kaggle, ``notebooks/inference.ipynb``
rendered as a kernel. Each step is one call here, so the notebook stays a list of calls.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import adapters, artifacts, blending, budget, card_parallel, data, engines, models, prompts, sampling, serving
from .config import require, resolve_path, save_config
from .plan import ModelEntry

logger = logging.getLogger("kaggle_utils")

DEFAULT_MODELS = [ModelEntry(name="smollm", preset="smollm2-135m", adapter="runs/demo/selected", n=4, temperature=0.7,
                             top_p=0.95, greedy_first=True).to_dict()]  # the demo's adapter, 4 predictions a row
SUBMISSION_COLUMNS = ["id", "rewrite_prompt"]
PREDICTIONS_DIR = "predictions"
BASELINES_DIR = "baselines"  # kept apart from predictions/, which later stages read as the plan's models
SCORES_FILE = "scores.csv"
DEFAULT_PROMPT_TOKENS = prompts.DEFAULT_PROMPT_TOKENS  # when neither the config nor the model's selection.json says
SAMPLING_FILE = "sampling.csv"
# Tokens of vLLM's context (max_model_len) beyond the longest prompt and its answer. Both engines cut every prompt to
# max_prompt_tokens with the forced start counted in (prompts.generation_ids), and vLLM needs only prompt +
# max_new_tokens <= max_model_len (it refuses a prompt that leaves no room for one answer token), so the sum alone
# would fit to the token. The spare tokens are headroom: an off-by-one in either count (a token a tokenizer or a
# template adds past the cut) costs 8 tokens of KV cache per sequence instead of refused rows.
CONTEXT_SLACK_TOKENS = 8


class SubmissionError(ValueError):
    """A written submission is not valid: a missing or repeated id, a blank prompt, wrong columns."""


def check_model_paths(entry: ModelEntry) -> None:
    """Fail before any model loads on a missing folder or an adapter trained on another preset."""
    if entry.use_merged:
        folder = resolve_path(entry.merged_folder)
        if not (folder / "config.json").exists() or not models.has_weights(folder):
            raise models.ModelPathError(f"use_merged: '{folder}' is not a model folder with weights (needs config.json "
                                        "and *.safetensors); export it with checkpoint selection (export_merged)")
    else:
        models.check_base_path(models.get_preset(entry.preset), entry.base_model)
        adapters.selected_adapter(entry.adapter, entry.preset)


def trained_prompt_tokens(entry: ModelEntry) -> int:
    """The prompt-token limit this model's adapter was selected at (``max_prompt_tokens`` of its ``selection.json``,
    beside the adapter, which a merged copy sits in); 0 when no such file records one (a base model, an adapter from
    elsewhere). An unreadable file is logged and counts as none."""
    if not entry.adapter:
        return 0
    try:
        selection = artifacts.Selection.find(entry.adapter)
    except artifacts.ArtifactError as e:
        logger.warning("%s; %s sees prompts cut to %d tokens, maybe not as in training", e, entry.name,
                       DEFAULT_PROMPT_TOKENS)
        return 0
    return selection.max_prompt_tokens if selection is not None and selection.max_prompt_tokens else 0


@dataclass
class InferenceConfig:
    """The submission notebook. Every field is a parameter of ``notebooks/inference.ipynb``."""

    test_file: str = "runs/demo/validation.csv"  # competition CSV: id, original_text, rewritten_text (+ rewrite_prompt: scored)
    submission_path: str = "runs/demo/submission.csv"  # where submission.csv (id, rewrite_prompt) is written
    run_dir: str | Path = "runs/demo/inference"  # predictions/<model>.jsonl (resume), scores.csv, plots, config.json;
    # a Path once the config is built, as in every stage
    models: list = field(default_factory=lambda: [dict(m) for m in DEFAULT_MODELS])  # the plan, in order: entries of
    # kaggle_utils.plan.ModelEntry (name and preset required)
    use_mean_prompt: bool = True  # append the mean prompt after the predictions
    mean_prompt: str = blending.DEFAULT_MEAN_PROMPT  # the string appended to every row
    separator: str = " "  # between joined predictions and the mean prompt
    engine: str = "auto"  # auto | vllm | hf
    dtype: str = engines.EngineOptions.dtype  # auto (fp16 on T4, bf16 on newer GPUs) | float16 (as a T4) | bfloat16
    deadline_hours: float = budget.DEFAULT_DEADLINE_HOURS  # budget from the notebook's start (Kaggle stops at 9 h)
    scorer_path: str = ""  # local sentence-t5-base folder; "" = the MiniLM stand-in
    fallback_prompt: str = prompts.FALLBACK_PROMPT  # for empty generations, failed rows, rows past the deadline
    identical_fallback: str = "Correct grammatical errors in this text."  # when original == rewritten
    max_new_tokens: int = 32  # a recovered prompt is one sentence
    max_prompt_tokens: int = 0  # prompt-token limit (kaggle_utils.artifacts); 0 = each model's, from selection.json
    generation_batch_size: int = 16  # rows per HF generate call (vLLM schedules its own)
    hf_copies: int = 0  # where the HF engine runs a model: 0 = one process (layers split over the cards where the model
    # needs it); N = one copy per card (4-bit on a GPU) in N processes, each sampling part of the rows
    # (kaggle_utils.card_parallel; at most one per visible card; on CPU, N processes). Not measured on 2 GPUs yet
    gpu_memory_utilization: float = engines.EngineOptions.gpu_memory_utilization  # vLLM's share of each GPU
    attention_backend: str = engines.EngineOptions.attention_backend  # vLLM: auto (TRITON_ATTN on a T4) | a name
    enforce_eager: str = engines.EngineOptions.enforce_eager  # vLLM without CUDA graphs: auto (on a T4) | on | off
    merge_adapters: str = "auto"  # vLLM serves adapters merged into a base copy: auto (T4; 1000+ rows) | on | off
    merge_dir: str = ""  # where merged copies go; "" = <temp dir>/kaggle_utils_merged (local disk, not the output)
    seed: int = 0  # sampling seed
    max_rows: int = 0  # only the first rows of the test CSV (0 = all); for quick checks
    score_base_model: bool = False  # when scored, also sample each preset's base model zero-shot (1 prediction)
    scores_file: str = ""  # where the scores table goes; "" = <run_dir>/scores.csv (make demo: runs/demo/scores.csv)
    score_split: str = "test"  # the scored rows' label in the table: report (chose nothing) | choice | test
    blend_file: str = ""  # blend.json chosen on validation by make mean-prompt; "" = the plan as given

    def __post_init__(self):
        if self.blend_file:
            self._apply_blend()
        require(isinstance(self.models, list), "models",
                f"must be a list of model entries, got {type(self.models).__name__}")
        require(len(self.models) > 0 or (self.use_mean_prompt and bool(self.mean_prompt.strip())), "models",
                "give at least one model, or none with use_mean_prompt on (every row is then the mean prompt)")
        if not self.models and not self.blend_file:  # (a blend that chose this has said so already)
            logger.warning("models is empty: no model runs, every row gets the mean prompt")
        entries = [ModelEntry.from_dict(m, f"models[{i}]") for i, m in enumerate(self.models)]
        self.models = [e.to_dict() for e in entries]  # older key names read once, written back as today's
        names = [e.name for e in entries]
        require(len(set(names)) == len(names), "models", f"model names must be unique, got {names}")
        require(self.engine in serving.ENGINES, "engine", f"must be one of {serving.ENGINES}, got '{self.engine}'")
        require(self.merge_adapters in serving.MERGE_CHOICES, "merge_adapters",
                f"must be one of {serving.MERGE_CHOICES}, got '{self.merge_adapters}'")
        self.engine_options()  # dtype and gpu_memory_utilization are checked where the engines read them
        require(self.deadline_hours > 0, "deadline_hours", f"must be > 0, got {self.deadline_hours}")
        require(bool(self.fallback_prompt.strip()), "fallback_prompt", "must not be blank (it fills failed rows)")
        require(bool(self.identical_fallback.strip()), "identical_fallback", "must not be blank")
        require(not self.use_mean_prompt or bool(self.mean_prompt.strip()), "mean_prompt",
                "is blank while use_mean_prompt is on")
        require(self.max_rows >= 0, "max_rows", f"must be >= 0, got {self.max_rows}")
        require(isinstance(self.hf_copies, int) and not isinstance(self.hf_copies, bool) and self.hf_copies >= 0,
                "hf_copies", f"must be a whole number >= 0 (0 = one process), got {self.hf_copies!r}")
        require(self.max_prompt_tokens == 0 or self.max_prompt_tokens >= 64, "max_prompt_tokens",
                f"must be 0 (each model's training length) or >= 64, got {self.max_prompt_tokens}")
        require(bool(self.submission_path), "submission_path", "must not be empty")
        self.run_dir = resolve_path(self.run_dir)
        self.sampling_config(entries[0] if entries else ModelEntry(**DEFAULT_MODELS[0]))  # validates the rest

    def _apply_blend(self) -> None:
        """Take models (order, n), mean prompt and separator from the blend chosen on validation (``blend_file``)."""
        chosen = blending.Blend.read(self.blend_file)
        try:
            plan = chosen.plan_for(self.models)
        except blending.BlendError as e:
            raise blending.BlendError(f"{self.blend_file}: {e}") from None
        if not plan["models"]:
            logger.warning("%s chose the mean prompt alone: no model runs, every row gets the mean prompt",
                           self.blend_file)
        kept = {m["name"] for m in plan["models"]}
        self._left_out = [ModelEntry.from_dict(m, f"models[{i}]").to_dict() for i, m in enumerate(self.models)
                          if isinstance(m, dict) and m.get("name") not in kept]
        self.models, self.use_mean_prompt, self.separator = plan["models"], plan["use_mean_prompt"], plan["separator"]
        if plan["mean_prompt"].strip():
            self.mean_prompt = plan["mean_prompt"]
        logger.info("blend from %s: %s (SCS %s, %s)", self.blend_file, chosen.label or "?",
                    "?" if chosen.scs is None else chosen.scs, chosen.scorer or "?")

    def check_paths(self) -> None:
        """Check every model's folders (base, adapter or merged) and the test file exist; errors name the model."""
        for i, entry in enumerate(self.model_entries):
            try:
                check_model_paths(entry)
            except (adapters.AdapterError, models.ModelPathError) as e:
                raise type(e)(f"models[{i}] ({entry.name}): {e}") from None
        if not resolve_path(self.test_file).exists():
            raise data.DataError(f"test_file: {resolve_path(self.test_file)} does not exist")

    @property
    def model_entries(self) -> list[ModelEntry]:
        """The validated plan, in order."""
        return [ModelEntry.from_dict(m, f"models[{i}]") for i, m in enumerate(self.models)]

    @property
    def left_out_entries(self) -> list[ModelEntry]:
        """The plan's models that the blend (``blend_file``) left out: not sampled for the submission, only scored
        as references when ``score_base_model`` is on."""
        return [ModelEntry(**m) for m in getattr(self, "_left_out", [])]

    def sampling_config(self, entry: ModelEntry, n: int | None = None) -> engines.SamplingConfig:
        """How to sample ``entry`` (``n`` overrides its n, e.g. 1 for a baseline)."""
        return engines.SamplingConfig(n=entry.n if n is None else n, temperature=entry.temperature, top_p=entry.top_p,
                                      max_new_tokens=self.max_new_tokens, seed=self.seed,
                                      forced_start=entry.forced_start,
                                      generation_batch_size=self.generation_batch_size,
                                      greedy_first=entry.greedy_first,
                                      max_prompt_tokens=artifacts.prompt_token_limit(
                                          self.max_prompt_tokens, trained_prompt_tokens(entry)))

    def engine_options(self, scfg: engines.SamplingConfig | None = None) -> engines.EngineOptions:
        """How each model loads: ``dtype``, ``gpu_memory_utilization`` and ``seed`` from this config, and a vLLM
        context that holds ``scfg``'s longest prompt and answer with :data:`CONTEXT_SLACK_TOKENS` to spare (the
        options' default without one)."""
        context = {} if scfg is None else {
            "max_model_len": scfg.max_prompt_tokens + scfg.max_new_tokens + CONTEXT_SLACK_TOKENS}
        return engines.EngineOptions(dtype=self.dtype, gpu_memory_utilization=self.gpu_memory_utilization,
                                     seed=self.seed, attention_backend=self.attention_backend,
                                     enforce_eager=self.enforce_eager, **context)


# ---------------------------------------------------------------- phases


def prepare_run(cfg: InferenceConfig) -> Path:
    """Check the plan's folders, then create the run folder and write the resolved config there before any work."""
    cfg.check_paths()
    run_dir = cfg.run_dir
    save_config(cfg, run_dir)
    return run_dir


def read_test(cfg: InferenceConfig) -> pd.DataFrame:
    """The test rows: ``id``, both texts (+ ``rewrite_prompt`` when present); other columns are ignored.

    A missing column, a duplicated id or a file with no rows is a clear error (:class:`kaggle_utils.data.DataError`)
    before any model loads; invalid UTF-8 is replaced and logged. Adds ``_empty`` (a blank text: it gets the
    fallback, logged) and ``_identical`` (the texts are the same: it gets ``identical_fallback``).
    """
    df = data.read_rewrites(cfg.test_file, require_prompt=False, require_id=True)
    if df.empty:  # a header and nothing else: a wrong file, not a test set (Kaggle's has ~1300 rows)
        raise data.DataError(f"{resolve_path(cfg.test_file)}: a header and no rows: nothing to predict")
    keep = ["id", *data.TEXT_COLUMNS] + ([data.PROMPT_COLUMN] if data.PROMPT_COLUMN in df.columns else [])
    extra = [c for c in df.columns if c not in keep and not c.startswith("_")]
    if extra:
        logger.info("ignoring extra column(s) %s of %s", extra, Path(cfg.test_file).name)
    df = df[keep + ["_row"]].copy()
    if cfg.max_rows:
        df = df.head(cfg.max_rows).copy()
    for c in data.TEXT_COLUMNS:
        df[c] = df[c].fillna("").astype(str)
    df["_empty"] = df["original_text"].str.strip().eq("") | df["rewritten_text"].str.strip().eq("")
    df["_identical"] = ~df["_empty"] & df["original_text"].str.strip().eq(df["rewritten_text"].str.strip())
    if df["_empty"].any():
        rows = df.loc[df["_empty"], "_row"].head(5).tolist()
        logger.warning("%d row(s) with an empty text get the fallback prompt (CSV lines %s)", int(df["_empty"].sum()),
                       rows)
    if df["_identical"].any():
        logger.info("%d row(s) with original == rewritten get '%s'", int(df["_identical"].sum()),
                    cfg.identical_fallback)
    logger.info("test: %d row(s) from %s%s", len(df), cfg.test_file,
                ", scored against rewrite_prompt" if data.PROMPT_COLUMN in df.columns else "")
    return df.reset_index(drop=True)


REPORT_COLUMNS = [f.name for f in dataclasses.fields(sampling.SamplingReport)]  # sampling.csv's header


def _to_sample(test: pd.DataFrame) -> pd.DataFrame:
    return test.loc[~(test["_empty"] | test["_identical"])]


def _store(cfg: InferenceConfig, entry: ModelEntry, name: str, scfg: engines.SamplingConfig,
           folder: str = PREDICTIONS_DIR) -> sampling.PredictionStore:
    weights = entry.merged_folder or entry.adapter
    # The keys are the ones prediction files were first written with, so files written before the renames resume.
    fingerprint = {"preset": entry.preset, "base_model_path": entry.base_model, "adapter_path": entry.adapter,
                   "merged_path": entry.merged_folder,
                   **{k: getattr(entry, k) for k in ("temperature", "top_p", "forced_start", "greedy_first")},
                   "weights": sampling.fingerprint_files(weights) if weights else "",
                   **{k: getattr(scfg, k) for k in ("n", "max_new_tokens", "max_prompt_tokens", "seed")}}
    store = sampling.PredictionStore(cfg.run_dir / folder, name, fingerprint)
    card_parallel.fold_parts(store)  # rows an interrupted hf_copies run left in part files count as done
    return store


def _run_model(cfg: InferenceConfig, entry: ModelEntry, name: str, scfg: engines.SamplingConfig,
               store: sampling.PredictionStore, rows: pd.DataFrame, share, undone: int = 0
               ) -> sampling.SamplingReport | None:
    """Serve one model (:func:`kaggle_utils.serving.serve`: the engine, for vLLM merged first when that pays) and
    sample what is not done yet (``undone`` rows); a failure is logged and its rows fall back. With ``hf_copies``
    and the HF engine chosen, one copy per card samples part of the rows (:mod:`kaggle_utils.card_parallel`)."""
    engine = None
    try:
        if cfg.hf_copies and card_parallel.engine_for(entry, cfg.engine) == "hf":
            return card_parallel.sample_on_cards(entry, scfg, rows["id"].tolist(), rows["original_text"].tolist(),
                                                 rows["rewritten_text"].tolist(), store, cfg.fallback_prompt,
                                                 cfg.hf_copies, share=share, options=cfg.engine_options(scfg),
                                                 model_name=name).report
        engine = serving.serve(entry, undone, engine=cfg.engine, merge_adapters=cfg.merge_adapters,
                               merge_dir=cfg.merge_dir, options=cfg.engine_options(scfg))
        report = sampling.sample_rows(engine, rows["id"].tolist(), rows["original_text"].tolist(),
                                      rows["rewritten_text"].tolist(), scfg, store, cfg.fallback_prompt, budget=share,
                                      model_name=name)
        return dataclasses.replace(report, **dataclasses.asdict(engine.startup))
    except serving.PLAN_ERRORS:
        raise  # a wrong plan is the user's to fix, not to paper over
    except Exception as e:  # e.g. out of GPU memory on Kaggle: keep the other models and write the submission anyway
        logger.error("%s failed, its undone rows get the fallback: %s\n%s", name, e, traceback.format_exc())
        # with hf_copies, what the other cards sampled still makes the model's row of sampling.csv
        return e.result.report if isinstance(e, card_parallel.WorkerError) else None
    finally:
        if engine is not None:
            engine.close()


def sample_models(cfg: InferenceConfig, test: pd.DataFrame, deadline: budget.Deadline
                  ) -> tuple[dict[str, dict[str, list[str]]], pd.DataFrame]:
    """Sample every model of the plan, in order, resuming from ``predictions/<model>.jsonl``.

    Each model gets the share of the remaining time that its planned predictions are of the rest (see
    :mod:`kaggle_utils.budget`); a model whose rows are all done is not loaded. Returns predictions per model
    (``{name: {id: [prompt, ...]}}``, done rows only) and one report row per model.
    """
    entries = cfg.model_entries
    if not entries:
        logger.info("plan: no model (the mean prompt alone)")
        table = pd.DataFrame(columns=REPORT_COLUMNS)
        table.to_csv(cfg.run_dir / SAMPLING_FILE, index=False)
        return {}, table
    rows = _to_sample(test)
    ids, keys = rows["id"].tolist(), [sampling.text_key(o, r) for o, r in zip(rows["original_text"],
                                                                             rows["rewritten_text"])]
    configs = [cfg.sampling_config(s) for s in entries]
    stores = [_store(cfg, s, s.name, c) for s, c in zip(entries, configs)]
    left = [sum(not st.is_done(i, k) for i, k in zip(ids, keys)) * c.n for st, c in zip(stores, configs)]
    logger.info("plan: %s", ", ".join(f"{s.name} ({s.preset}, n={s.n}, {w // max(s.n, 1)} row(s) to sample)"
                                      for s, w in zip(entries, left)))
    reports = []
    for m, (entry, scfg, store) in enumerate(zip(entries, configs, stores)):
        if left[m] == 0:
            logger.info("%s: every row already done", entry.name)
        elif deadline.expired():
            logger.warning("%s: skipped, the deadline has passed; its rows get the fallback", entry.name)
        else:
            share = deadline.for_model(left[m], sum(left[m + 1:]))
            logger.info("%s: %.0f s of the remaining %.0f s", entry.name, share.remaining(), deadline.remaining())
            report = _run_model(cfg, entry, entry.name, scfg, store, rows, share, left[m] // max(scfg.n, 1))
            if report is not None:
                reports.append(dataclasses.asdict(report))
    predictions = {s.name: st.predictions(ids, keys) for s, st in zip(entries, stores)}
    table = pd.DataFrame(reports, columns=REPORT_COLUMNS)  # with its header even when no model reported
    table.to_csv(cfg.run_dir / SAMPLING_FILE, index=False)
    return predictions, table


def sample_baselines(cfg: InferenceConfig, test: pd.DataFrame, deadline: budget.Deadline
                     ) -> dict[str, dict[str, list[str]]]:
    """With ``score_base_model`` and a scored test CSV, the reference systems of the scores table, 1 prediction per
    row each: every preset's base model zero-shot, and every plan model the blend left out (so its own score on these
    rows is still known). Keys are the table's system names. Runs after the submission is written, so it never costs
    the submission; {} otherwise."""
    left_out = cfg.left_out_entries
    if not cfg.score_base_model or data.PROMPT_COLUMN not in test.columns or not (cfg.models or left_out):
        return {}
    rows = _to_sample(test)
    ids, keys = rows["id"].tolist(), [sampling.text_key(o, r) for o, r in zip(rows["original_text"],
                                                                             rows["rewritten_text"])]
    runs = [(f"{s.preset} base, zero-shot, 1 prediction", s,
             dataclasses.replace(s, name=f"{s.preset}-base", adapter="", use_merged=False))
            for s in {s.preset: s for s in cfg.model_entries + left_out}.values()]
    runs += [(f"{s.label} (left out by the blend), 1 prediction", s, dataclasses.replace(s, name=f"{s.name}-left-out"))
             for s in left_out]
    out = {}
    for system, entry, model in runs:
        scfg = cfg.sampling_config(entry, n=1)
        store = _store(cfg, model, model.name, scfg, BASELINES_DIR)
        if deadline.expired():
            logger.warning("%s: skipped, the deadline has passed", model.name)
            continue
        if any(not store.is_done(i, k) for i, k in zip(ids, keys)):
            _run_model(cfg, model, model.name, scfg, store, rows, deadline.for_model(1, 0), len(rows))
        out[system] = store.predictions(ids, keys)
    return out


def fill_special_rows(cfg: InferenceConfig, test: pd.DataFrame, predictions: dict, plan: list | None = None) -> dict:
    """Predictions with the fixed answers of special rows put in: ``identical_fallback`` where the texts are
    identical, ``fallback_prompt`` where a text is empty. With a ``plan`` (model names in order) the answer goes to
    the first model only and the others get nothing for those rows, so it appears once in the blend; without one,
    every entry gets it (baselines, each scored on its own). Rows a model did not finish stay absent."""
    special = {rid: cfg.identical_fallback for rid in test.loc[test["_identical"], "id"]}
    special.update({rid: cfg.fallback_prompt for rid in test.loc[test["_empty"], "id"]})
    filled = {}
    for name, preds in predictions.items():
        keep = {rid: p for rid, p in preds.items() if rid not in special}
        if plan is None or name == plan[0]:
            keep.update({rid: [p] for rid, p in special.items()})
        filled[name] = keep
    return filled


def build_submission(cfg: InferenceConfig, test: pd.DataFrame, predictions: dict) -> pd.DataFrame:
    """``id, rewrite_prompt`` for every test row: the blend of the plan's predictions (+ the mean prompt); rows with
    no prediction get the fallback prompt (counted in the log)."""
    plan = [s.name for s in cfg.model_entries]
    filled = fill_special_rows(cfg, test, predictions, plan)
    ids = test["id"].tolist()
    mean = cfg.mean_prompt if cfg.use_mean_prompt else ""
    if not plan:  # the mean prompt alone (config checks it is set)
        logger.info("no model in the plan: every row gets the mean prompt")
        return pd.DataFrame({"id": ids, "rewrite_prompt": blending.blend(ids, {}, [], mean)})
    prompts_ = blending.blend(ids, filled, plan, mean, cfg.separator, cfg.fallback_prompt)
    none = sum(not any(rid in filled.get(m, {}) for m in plan) for rid in ids)
    if none:
        logger.warning("%d of %d row(s) have no model prediction and use the fallback '%s'", none, len(ids),
                       cfg.fallback_prompt)
    return pd.DataFrame({"id": ids, "rewrite_prompt": prompts_})


def write_submission(cfg: InferenceConfig, submission: pd.DataFrame) -> Path:
    """Write ``submission_path`` atomically (a killed run never leaves half a file)."""
    path = resolve_path(cfg.submission_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    submission[SUBMISSION_COLUMNS].to_csv(tmp, index=False)
    os.replace(tmp, path)
    logger.info("wrote %s (%d rows)", path, len(submission))
    return path


def validate_submission(path: str | os.PathLike, test: pd.DataFrame) -> dict:
    """Read the written file back and check it: columns ``id,rewrite_prompt``, every test id exactly once, no other
    id, no blank prompt. Returns a small summary; raises :class:`SubmissionError` naming the problem."""
    sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(sub.columns) != SUBMISSION_COLUMNS:
        raise SubmissionError(f"{path}: columns {list(sub.columns)}, expected {SUBMISSION_COLUMNS}")
    dup = sub["id"][sub["id"].duplicated()]
    if len(dup):
        raise SubmissionError(f"{path}: id '{dup.iloc[0]}' appears more than once ({len(dup)} repeats)")
    expected, got = set(test["id"]), set(sub["id"])
    if expected - got:
        raise SubmissionError(f"{path}: {len(expected - got)} test id(s) missing, e.g. '{sorted(expected - got)[0]}'")
    if got - expected:
        raise SubmissionError(f"{path}: {len(got - expected)} id(s) not in the test file, e.g. '{sorted(got - expected)[0]}'")
    blank = sub["rewrite_prompt"].str.strip().eq("")
    if blank.any():
        raise SubmissionError(f"{path}: blank rewrite_prompt for id '{sub.loc[blank, 'id'].iloc[0]}' "
                              f"({int(blank.sum())} row(s))")
    lengths = sub["rewrite_prompt"].str.len()
    summary = {"path": str(path), "rows": len(sub), "ids_once": True, "blank_prompts": 0,
               "mean_chars": round(float(lengths.mean()), 1), "max_chars": int(lengths.max())}
    logger.info("submission valid: %s", summary)
    return summary


def score(cfg: InferenceConfig, test: pd.DataFrame, predictions: dict, baselines: dict | None = None
          ) -> pd.DataFrame | None:
    """When the test CSV has ``rewrite_prompt``: SCS of each part (single prediction, n predictions, + mean prompt,
    baselines) with the chosen scorer, written to ``<run_dir>/scores.csv``; None otherwise."""
    if data.PROMPT_COLUMN not in test.columns:
        logger.info("no rewrite_prompt column: nothing to score")
        return None
    scored = test.loc[test[data.PROMPT_COLUMN].str.strip().ne("")]
    if len(scored) < len(test):
        logger.warning("scoring %d of %d row(s): the others have a blank rewrite_prompt", len(scored), len(test))
    entries = cfg.model_entries
    filled = fill_special_rows(cfg, test, predictions, [s.name for s in entries])
    filled_base = fill_special_rows(cfg, test, baselines or {})
    systems = blending.component_systems(scored["id"].tolist(), filled, [(s.name, s.n) for s in entries],
                                         cfg.mean_prompt if cfg.use_mean_prompt else "", cfg.separator,
                                         cfg.fallback_prompt, baselines=filled_base,
                                         labels={s.name: s.label for s in entries})
    table = blending.score_systems(_scorer(cfg.scorer_path), systems, scored[data.PROMPT_COLUMN].tolist(),
                                   split=cfg.score_split)
    path = resolve_path(cfg.scores_file) if cfg.scores_file else cfg.run_dir / SCORES_FILE
    blending.write_scores(path, table)
    logger.info("scores (%s, %s rows) written to %s", table["scorer"].iloc[0] if len(table) else "?",
                cfg.score_split, path)
    return table


@functools.lru_cache(maxsize=2)
def _scorer(path: str):
    """The scorer of ``path``, loaded once for every table of this run (and its embedding cache shared)."""
    from . import metric

    return metric.Scorer(path)


def score_n_curve(cfg: InferenceConfig, test: pd.DataFrame, predictions: dict) -> Path | None:
    """When the test CSV has ``rewrite_prompt``: SCS against the number of predictions joined, for each model and for
    all of them, without and with the mean prompt (``blending.n_curve``), as ``<run_dir>/n_curve.csv`` and ``.png``;
    returns the plot, or None when nothing was scored."""
    if data.PROMPT_COLUMN not in test.columns:
        return None
    scored = test.loc[test[data.PROMPT_COLUMN].str.strip().ne("")]
    entries = cfg.model_entries
    if not entries or scored.empty:
        return None
    filled = fill_special_rows(cfg, test, predictions, [s.name for s in entries])
    ids = scored["id"].tolist()
    per_row = {s.name: [list(filled.get(s.name, {}).get(i, [])) for i in ids] for s in entries}
    table = blending.n_curve(_scorer(cfg.scorer_path), per_row, scored[data.PROMPT_COLUMN].tolist(),
                             cfg.mean_prompt, cfg.separator, cfg.fallback_prompt, {s.name: s.label for s in entries},
                             split=cfg.score_split)
    folder = cfg.run_dir
    table.to_csv(folder / f"{blending.N_CURVE_FILE}.csv", index=False)
    logger.info("SCS against n (%s): %s", table["scorer"].iloc[0] if len(table) else "?", folder / "n_curve.csv")
    return blending.plot_n_curve(table, folder / f"{blending.N_CURVE_FILE}.png",
                                 f"how many predictions to join ({len(ids)} {cfg.score_split or 'test'} rows)")


def plot_scores(cfg: InferenceConfig, scores: pd.DataFrame | None) -> Path | None:
    """A horizontal bar chart of SCS per system, ``<run_dir>/scores.png``; None when nothing was scored."""
    if scores is None or scores.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(scores) + 1.2))
    ax.barh(scores["system"][::-1], scores["scs"][::-1], color="tab:blue")
    for y, v in enumerate(scores["scs"][::-1]):
        ax.text(v, y, f" {v:.3f}", va="center")
    ax.set_xlabel(f"mean SCS ({scores['scorer'].iloc[0]})")
    ax.set_title(f"what each part adds ({int(scores['rows'].iloc[0])} rows)")
    ax.set_xlim(0, max(0.05, float(scores["scs"].max()) * 1.25))
    fig.tight_layout()
    out = cfg.run_dir / "scores.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
