"""The mean-prompt stage: the mean-prompt search, then the blend chosen on validation.

A *mean prompt* is a string tuned to sit close, under the scorer, to every rewrite prompt; appended to a model's
predictions it lifts the mean SCS. The search appends one candidate word at a time (greedy, or beam search) and keeps
the extensions that raise the objective most:

- ``alone``: mean SCS of the mean prompt by itself against a target prompt set (``selected_prompts.json`` plus the
  training prompts, with the validation prompts removed so validation stays unseen);
- ``blend``: mean SCS of ``prediction + separator + mean_prompt`` against the true prompts of the validation rows
  that have predictions (3rd place's objective). Those rows are split by prompt group: the search sees one part and
  the blend is chosen on the other, so an over-fitted string cannot win the choice;
- ``auto``: ``blend`` when the run has predictions, else ``alone``.

The default is ``alone``: on 2 CPU cores it costs about a sixth of ``blend`` (whose every step embeds each shortlisted
candidate once per validation row), and it needs no predictions. On a GPU, ``blend`` is the stronger objective.

Every step embeds one batch of new strings through the scorer's cache, so no string is embedded twice. The winning
string depends on the embedder: search against the scorer you will be judged by (sentence-t5-base on Kaggle).

Then the blend is chosen on validation (:mod:`kaggle_utils.blend_choice`): predictions per model, model order, and the
mean prompt (the public one, the optimized one, or none). Every option is scored, the best one is written to
``blend.json`` in the run, and the inference notebook reads it.

Usage (headless): ``make mean-prompt RUN=<run>``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from . import artifacts, blend_choice, blending, data, metric
from .config import require, resolve_path, save_config, saved_config

logger = logging.getLogger("kaggle_utils")

# The public mean prompt the original author appended (LB 0.63 with sentence-t5-base).
PUBLIC_MEAN_PROMPT = blending.DEFAULT_MEAN_PROMPT
DEFAULT_TARGET_FILES = ["data/selected_prompts.json"]
# Used when the run folder has no config.json to name its training files (same default as training.TrainConfig).
FALLBACK_TRAIN_FILES = ["data/extra_rewrites.csv", "data/gemma_rewrites.csv"]
RESULT_FILE = "mean_prompt.json"
SCORES_FILE = "scores.csv"
_PUNCTUATION = set(".,;:!?")


class MeanPromptError(ValueError):
    """The search cannot run on these inputs; the message says which input and why."""


@dataclass
class MeanPromptConfig:
    """The mean-prompt search and the blend choice. Every field is a parameter of ``notebooks/mean_prompt.ipynb``."""

    run_name: str = "demo"  # run folder: reads validation.csv (+ predictions), writes mean_prompt.json and blend.json
    runs_dir: str = "runs"  # parent of all run folders (gitignored)
    validation_file: str = ""  # CSV with rewrite_prompt; empty: <run>/validation.csv
    predictions_dir: str = ""  # folder of <model>.jsonl files; empty: <run>/predictions or <run>/inference/predictions
    models: list = field(default_factory=list)  # models to blend, in plan order; empty: the inference run's plan
    scorer_path: str = ""  # sentence-transformers folder (sentence-t5-base on Kaggle); empty: the MiniLM stand-in
    objective: str = "alone"  # alone (vs targets) | blend (prediction + it vs validation) | auto (blend if predictions)
    target_files: list = field(default_factory=lambda: list(DEFAULT_TARGET_FILES))  # prompt sets (JSON list or CSV)
    train_files: list = field(default_factory=list)  # training CSVs (targets, words); empty: the run's config.json
    vocabulary: str = "words"  # words (of the training prompts) | tokenizer (whole-word tokens of the scorer)
    vocab_size: int = 600  # candidate words kept (most frequent words, or best single tokens)
    vocab_keep: float = 0.8  # share of candidate words kept after each step, the worst dropped (1: never prune)
    method: str = "greedy"  # greedy | beam
    beam_width: int = 4  # strings kept per step by beam search
    max_length: int = 32  # words in the mean prompt at most
    patience: int = 2  # stop after this many steps without a gain
    start: str = ""  # the search extends this string (empty: start from nothing)
    max_targets: int = 1500  # cap on target prompts, drawn with seed (0: all; embedding them is the fixed cost)
    seed: int = 0  # seed of the target draw, the search split and tie-breaks
    separator: str = " "  # between the predictions and the mean prompt; the blend uses the same
    search_fraction: float = 0.5  # blend objective: share of validation prompt groups the search may see
    shortlist: int = 48  # blend objective: candidates per step scored with every prediction
    n_choices: list = field(default_factory=lambda: [0, 1, 2, 4])  # predictions per model tried in the blend choice
    max_options: int = 300  # refuse a blend grid larger than this (shorten n_choices or models)
    embedding_batch_size: int = 512  # strings per encoder pass: on 2 CPU cores 512 short strings cost ~4x less than 64
    scores_file: str = ""  # scores table (system, scorer, rows, scs, cos) to add rows to; empty: <run>/scores.csv

    def __post_init__(self):
        require(bool(self.run_name) and "/" not in self.run_name, "run_name",
                f"must be a folder name, got '{self.run_name}'")
        require(self.objective in ("alone", "blend", "auto"), "objective",
                f"must be alone | blend | auto, got '{self.objective}'")
        require(self.vocabulary in ("words", "tokenizer"), "vocabulary",
                f"must be words | tokenizer, got '{self.vocabulary}'")
        require(self.method in ("greedy", "beam"), "method", f"must be greedy | beam, got '{self.method}'")
        require(self.vocab_size >= 1, "vocab_size", f"must be >= 1 (a vocabulary of size 0 has nothing to append), "
                                                    f"got {self.vocab_size}")
        require(self.max_length >= 1, "max_length", f"must be >= 1, got {self.max_length}")
        require(0 < self.vocab_keep <= 1, "vocab_keep", f"must be in (0, 1], got {self.vocab_keep}")
        require(self.beam_width >= 1, "beam_width", f"must be >= 1, got {self.beam_width}")
        require(self.patience >= 1, "patience", f"must be >= 1, got {self.patience}")
        require(self.max_targets >= 0, "max_targets", f"must be >= 0, got {self.max_targets}")
        require(0 < self.search_fraction <= 1, "search_fraction", f"must be in (0, 1], got {self.search_fraction}")
        require(self.shortlist >= self.beam_width, "shortlist",
                f"must be >= beam_width={self.beam_width}, got {self.shortlist}")
        for name in ("models", "target_files", "train_files", "n_choices"):
            value = getattr(self, name)
            if isinstance(value, str):  # papermill -p gives a comma-separated string
                setattr(self, name, [v.strip() for v in value.split(",") if v.strip()])
        self.n_choices = sorted({int(n) for n in self.n_choices})
        require(bool(self.n_choices) and min(self.n_choices) >= 0, "n_choices",
                f"give counts >= 0, got {self.n_choices}")
        require(self.max_options >= 1, "max_options", f"must be >= 1, got {self.max_options}")
        require(self.embedding_batch_size >= 1, "embedding_batch_size",
                f"must be >= 1, got {self.embedding_batch_size}")

    @property
    def run_dir(self) -> Path:
        return resolve_path(self.runs_dir) / self.run_name

    @property
    def scores_table(self) -> Path:
        """The scores table this stage adds its rows to."""
        return resolve_path(self.scores_file) if self.scores_file else self.run_dir / SCORES_FILE

    @property
    def width(self) -> int:
        """Strings kept per step: 1 for greedy."""
        return 1 if self.method == "greedy" else self.beam_width


# ---------------------------------------------------------------- inputs


def read_prompt_set(path: str | os.PathLike) -> list[str]:
    """Prompts from a JSON list of strings, or from the ``rewrite_prompt`` column of a CSV (other columns ignored)."""
    file = resolve_path(path)
    if not file.exists():
        raise MeanPromptError(f"target file '{file}' does not exist")
    if file.suffix == ".json":
        items = json.loads(file.read_text())
        if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
            raise MeanPromptError(f"{file}: expected a JSON list of prompt strings")
        return [p for p in items if p.strip()]
    frame = pd.read_csv(file, dtype=str, keep_default_na=False)
    if data.PROMPT_COLUMN not in frame.columns:
        raise MeanPromptError(f"{file}: no '{data.PROMPT_COLUMN}' column; found {list(frame.columns)}")
    return [p for p in frame[data.PROMPT_COLUMN] if p.strip()]


def read_validation(path: str | os.PathLike) -> pd.DataFrame:
    """Validation rows; a file without ``rewrite_prompt`` (or with no usable row) is a clear error."""
    frame = data.drop_incomplete(data.read_rewrites(path, require_prompt=True), columns=(data.PROMPT_COLUMN,))
    if frame.empty:
        raise MeanPromptError(f"{resolve_path(path)}: no validation row with a rewrite_prompt")
    return frame


def _unique_prompts(prompts: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """One prompt per normalized key, first spelling kept, minus any whose key is in ``exclude``."""
    banned = {data.normalize_prompt(p) for p in exclude}
    out: dict[str, str] = {}
    for p in prompts:
        key = data.normalize_prompt(p)
        if key and key not in banned and key not in out:
            out[key] = p.strip()
    return list(out.values())


def read_report_prompts(cfg: MeanPromptConfig) -> list[str]:
    """The prompts of the run's report rows (``report.csv``, written by the train stage), which nothing here may see:
    they are removed from the targets and the vocabulary like the validation prompts; [] when the run has none."""
    path = cfg.run_dir / artifacts.REPORT_FILE
    return read_prompt_set(path) if path.exists() else []


def run_train_files(cfg: MeanPromptConfig) -> list[str]:
    """The training CSVs: the config's, else those the run's ``config.json`` names, else the training default."""
    if cfg.train_files:
        return list(cfg.train_files)
    files = (saved_config(cfg.run_dir) or {}).get("train_files")
    if files:
        return list(files)
    return list(FALLBACK_TRAIN_FILES)


def training_prompts(train_files: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The distinct prompts of the training CSVs, minus the validation prompts (``exclude``)."""
    prompts: list[str] = []
    for f in train_files:
        prompts += read_prompt_set(f)
    return _unique_prompts(prompts, exclude)


def target_prompts(target_files: Sequence[str], train_prompts: Sequence[str], exclude: Sequence[str] = (),
                   max_targets: int = 0, seed: int = 0) -> list[str]:
    """The prompts the mean prompt alone is tuned towards: the target files plus the training prompts, one per
    normalized prompt, with every validation prompt (``exclude``) removed so the validation score stays honest."""
    prompts: list[str] = []
    for f in target_files:
        prompts += read_prompt_set(f)
    targets = _unique_prompts(prompts + list(train_prompts), exclude)
    if not targets:
        raise MeanPromptError(f"the target set is empty: {list(target_files)} and {len(train_prompts)} training "
                              "prompt(s) gave no prompt outside the validation groups")
    if max_targets and len(targets) > max_targets:
        pick = np.sort(np.random.default_rng(seed).choice(len(targets), size=max_targets, replace=False))
        targets = [targets[i] for i in pick]
    return targets


_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|[.,;:!?]")


def word_vocabulary(prompts: Sequence[str], size: int) -> list[str]:
    """The ``size`` words found in most prompts (document frequency), each in its most common spelling.

    Punctuation marks count as words: the top teams' strings lean on them.
    """
    if size < 1:
        raise MeanPromptError(f"vocabulary size must be >= 1, got {size}")
    docs: dict[str, int] = {}
    spellings: dict[str, dict[str, int]] = {}
    for p in prompts:
        words = _WORD.findall(p)
        for w in words:
            spellings.setdefault(w.lower(), {}).setdefault(w, 0)
            spellings[w.lower()][w] += 1
        for key in {w.lower() for w in words}:
            docs[key] = docs.get(key, 0) + 1
    ranked = sorted(docs, key=lambda k: (-docs[k], k))[:size]
    vocab = [max(spellings[k], key=lambda s: (spellings[k][s], s)) for k in ranked]
    if not vocab:
        raise MeanPromptError("the vocabulary is empty: the training prompts hold no word")
    return vocab


def tokenizer_vocabulary(scorer, targets: Sequence[str], size: int) -> list[str]:
    """The ``size`` whole-word tokens of the scorer's own tokenizer that score best alone against ``targets``.

    Subword pieces are dropped: WordPiece's "##ing", and in a SentencePiece vocabulary (sentence-t5) every piece
    without the word-start marker; special tokens too. Every kept token is embedded once (one batch, cached), which
    is what ranking them costs: about a minute for MiniLM's 30k-token vocabulary on 2 CPU cores.
    """
    if size < 1:
        raise MeanPromptError(f"vocabulary size must be >= 1, got {size}")
    tokenizer = getattr(getattr(scorer, "model", None), "tokenizer", None)
    if tokenizer is None:
        raise MeanPromptError(f"scorer '{getattr(scorer, 'name', scorer)}' has no tokenizer; use vocabulary='words'")
    special = set(getattr(tokenizer, "all_special_tokens", []))
    vocab = list(tokenizer.get_vocab())
    sentencepiece = any(t.startswith("\u2581") for t in vocab)
    words = []
    for tok in vocab:
        if tok in special or tok.startswith("##") or tok.startswith("<") or tok.startswith("["):
            continue
        if sentencepiece and not tok.startswith("\u2581") and tok not in _PUNCTUATION:
            continue  # a piece from inside a word
        word = tok.replace("\u2581", "").strip()
        if word and (word in _PUNCTUATION or re.fullmatch(r"[A-Za-z][A-Za-z'-]*", word)):
            words.append(word)
    words = sorted(set(words))
    if not words:
        raise MeanPromptError("the scorer's tokenizer gave no whole-word token")
    scores = AloneObjective(scorer, targets)(words)
    order = np.lexsort((np.arange(len(words)), -scores))[:size]
    return [words[i] for i in order]


# ---------------------------------------------------------------- objectives


class AloneObjective:
    """Mean SCS of each candidate string alone against a fixed set of target prompts.

    The targets are embedded once; each call embeds its candidates in one batch (through the scorer's cache).
    """

    def __init__(self, scorer, targets: Sequence[str]):
        if not len(targets):
            raise MeanPromptError("the target set is empty")
        self.scorer = scorer
        self.targets = list(targets)
        self._target_vectors = scorer.embed(self.targets)

    def __call__(self, candidates: Sequence[str]) -> np.ndarray:
        if not len(candidates):
            return np.zeros(0)
        return metric.scs_matrix(self.scorer.embed(list(candidates)), self._target_vectors).mean(axis=1)


class BlendObjective:
    """Mean SCS of each row's blend (its predictions, per model in plan order, then the candidate; joined by
    ``blending.blend_row``, the same join the submission uses) against the row's true prompt.

    Embedding every candidate with every row costs candidates x rows strings per step, so each step first ranks all
    candidates alone against the rows' truths (one batch) and scores only the best ``shortlist`` of them blended
    (a second batch). The rest get their rough score minus 3: below any real SCS (>= -1), so they are never chosen,
    yet still in rough order for the search's vocabulary pruning.
    """

    def __init__(self, scorer, predictions: Sequence[Sequence[Sequence[str]]], truths: Sequence[str],
                 separator: str = " ", shortlist: int = 48):
        if len(predictions) != len(truths):
            raise MeanPromptError(f"{len(predictions)} prediction rows for {len(truths)} truths")
        if not len(truths):
            raise MeanPromptError("the blend objective needs at least one validation row with predictions")
        self.scorer = scorer
        self.predictions = [[list(m) for m in row] for row in predictions]  # row -> model -> predictions
        self.truths = list(truths)
        self.separator = separator
        self.shortlist = shortlist
        self._alone = AloneObjective(scorer, self.truths)
        self._truth_vectors = self._alone._target_vectors

    def blended_scores(self, candidates: Sequence[str]) -> np.ndarray:
        """The exact objective of each candidate (one batch of candidates x rows strings)."""
        strings = [blending.blend_row(p, c, self.separator) for c in candidates for p in self.predictions]
        if not strings:
            return np.zeros(0)
        vectors = self.scorer.embed(strings).reshape(len(candidates), len(self.truths), -1)
        cos = (vectors.astype(np.float64) * self._truth_vectors[None].astype(np.float64)).sum(axis=2)
        cos /= np.maximum(np.linalg.norm(vectors, axis=2) * np.linalg.norm(self._truth_vectors, axis=1)[None], 1e-12)
        return (np.sign(cos) * np.abs(cos) ** 3).mean(axis=1)

    def __call__(self, candidates: Sequence[str]) -> np.ndarray:
        candidates = list(candidates)
        if not candidates:
            return np.zeros(0)
        rough = self._alone(candidates)
        scores = rough - 3.0
        keep = np.argsort(-rough, kind="stable")[:self.shortlist]
        scores[keep] = self.blended_scores([candidates[i] for i in keep])
        return scores


# ---------------------------------------------------------------- search


@dataclass
class SearchResult:
    """The best string found, its objective value, and one history entry per step."""

    string: str
    score: float
    history: list = field(default_factory=list)
    seconds: float = 0.0


def extend(base: str, word: str) -> str:
    """``base`` with ``word`` appended: punctuation sticks to the previous word, a word gets a space."""
    if not base:
        return word
    return base + word if word in _PUNCTUATION else f"{base} {word}"


def search(objective: Callable[[Sequence[str]], np.ndarray], vocabulary: Sequence[str], max_length: int,
           width: int = 1, start: str = "", patience: int = 2, seed: int = 0, keep: float = 1.0,
           min_words: int = 64, min_gain: float = 1e-6, progress: bool = True) -> SearchResult:
    """Greedy (``width`` 1) or beam search that appends one vocabulary word per step.

    Each step builds every extension of the kept strings, drops any already scored, scores the rest with one call of
    ``objective`` (one embedding batch), and keeps the ``width`` best; ties break in a seeded random order. It stops
    after ``max_length`` words, or after ``patience`` steps whose best string is no better than the best so far.

    ``keep`` < 1 prunes the vocabulary after each step to that share of its words (never below ``min_words``),
    ranked by the best score each word reached this step: a word that lifts no string now rarely becomes the best
    next word, and the later steps get several times cheaper.
    """
    from tqdm.auto import tqdm

    vocabulary = list(dict.fromkeys(w.strip() for w in vocabulary if w and w.strip()))
    if not vocabulary:
        raise MeanPromptError("the vocabulary is empty (size 0): nothing to append")
    if max_length < 1:
        raise MeanPromptError(f"max_length must be >= 1, got {max_length}")
    if width < 1:
        raise MeanPromptError(f"width must be >= 1, got {width}")
    if not 0 < keep <= 1:
        raise MeanPromptError(f"keep must be in (0, 1], got {keep}")
    rng = np.random.default_rng(seed)
    began = time.perf_counter()
    start = start.strip()
    seen: set[str] = set()
    best = SearchResult(string=start, score=-math.inf)
    if start:
        best.score = float(objective([start])[0])
        seen.add(start)
    beams = [start]
    stale = 0
    bar = tqdm(range(1, max_length + 1), desc=f"mean-prompt search (width {width})", unit="step", disable=not progress)
    for step in bar:
        word_of: dict[str, str] = {}  # candidate -> the word that made it, for pruning
        for b in beams:
            for w in vocabulary:
                c = extend(b, w)
                if c not in seen and c not in word_of:
                    word_of[c] = w
        candidates = list(word_of)
        if not candidates:
            break
        seen.update(candidates)
        scores = np.asarray(objective(candidates), dtype=np.float64)
        order = np.lexsort((rng.random(len(candidates)), -scores))
        kept = [i for i in order[:width] if np.isfinite(scores[i])]
        if not kept:
            break
        beams = [candidates[i] for i in kept]
        top, top_score = candidates[kept[0]], float(scores[kept[0]])
        improved = top_score > best.score + min_gain
        if improved:
            best.string, best.score = top, top_score
        best.history.append({"step": step, "string": top, "score": round(top_score, 6), "candidates": len(candidates),
                             "seconds": round(time.perf_counter() - began, 2)})
        bar.set_postfix(score=f"{top_score:.4f}")
        if keep < 1 and len(vocabulary) > min_words:
            reached: dict[str, float] = {}
            for i in order:  # best first, so the first score seen for a word is its best
                reached.setdefault(word_of[candidates[i]], scores[i])
            ranked = sorted(vocabulary, key=lambda w: -reached.get(w, -math.inf))
            vocabulary = ranked[:max(min_words, math.ceil(keep * len(vocabulary)))]
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    bar.close()
    best.seconds = round(time.perf_counter() - began, 2)
    if not best.string:
        raise MeanPromptError("the search scored no candidate")
    return best


# ---------------------------------------------------------------- the stage


def load_scorer(cfg: MeanPromptConfig):
    """The scorer the config names (MiniLM stand-in when ``scorer_path`` is empty)."""
    return metric.Scorer(cfg.scorer_path, embedding_batch_size=cfg.embedding_batch_size)


@dataclass
class Inputs:
    """Everything the search and the blend choice read, gathered once."""

    validation: pd.DataFrame
    predictions: dict  # model -> predictions per validation row (rows every model covers)
    truths: list  # the true prompt of each blend row
    train_prompts: list
    targets: list
    vocabulary: list


def prepare(cfg: MeanPromptConfig, scorer) -> Inputs:
    """Write the resolved config, then read validation, predictions, targets and the vocabulary."""
    save_config(cfg, cfg.run_dir, name="mean_prompt_config.json")
    validation_file = cfg.validation_file or cfg.run_dir / artifacts.VALIDATION_FILE
    validation = read_validation(validation_file)
    # Never seen by the search or the vocabulary: the validation rows (the blend is chosen on them) and the run's
    # report rows (they score the result).
    val_prompts = validation[data.PROMPT_COLUMN].tolist() + read_report_prompts(cfg)
    files = blend_choice.find_prediction_files(cfg.run_dir, cfg.predictions_dir, cfg.models)
    predictions: dict[str, list[list[str]]] = {}
    if files:
        if "id" not in validation.columns:
            raise MeanPromptError(f"{validation_file}: an 'id' column is needed to match the prediction files")
        per_model, covered = blend_choice.align_predictions(files, validation["id"].tolist())
        if not covered:
            raise MeanPromptError(f"no validation row of {validation_file} is predicted by every model in "
                                  f"{[f.name for f in files]}")
        if len(covered) < len(validation):
            logger.warning("blend rows: %d of %d validation rows are predicted by every model", len(covered),
                           len(validation))
        validation = validation.iloc[covered].reset_index(drop=True)
        predictions = {m: [p[i] for i in covered] for m, p in per_model.items()}
    train = training_prompts(run_train_files(cfg), exclude=val_prompts)
    targets = target_prompts(cfg.target_files, train, exclude=val_prompts, max_targets=cfg.max_targets, seed=cfg.seed)
    if cfg.vocabulary == "words":
        vocabulary = word_vocabulary(train, cfg.vocab_size)
    else:
        vocabulary = tokenizer_vocabulary(scorer, targets, cfg.vocab_size)
    logger.info("mean prompt: %d validation rows, %d model(s) %s, %d targets, %d %s candidates, scorer %s",
                len(validation), len(predictions), list(predictions), len(targets), len(vocabulary), cfg.vocabulary,
                scorer.name)
    return Inputs(validation=validation, predictions=predictions, truths=validation[data.PROMPT_COLUMN].tolist(),
                  train_prompts=train, targets=targets, vocabulary=vocabulary)


def resolved_objective(cfg: MeanPromptConfig, inputs: Inputs) -> str:
    """``auto`` becomes ``blend`` when the run has predictions, else ``alone``; ``blend`` without them is an error."""
    if cfg.objective == "auto":
        return "blend" if inputs.predictions else "alone"
    if cfg.objective == "blend" and not inputs.predictions:
        raise MeanPromptError(f"objective 'blend' needs prediction files; none found for run '{cfg.run_name}'")
    return cfg.objective


def search_split(validation: pd.DataFrame, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row positions (searched, unseen), split by prompt group so no prompt is on both sides."""
    keys = validation[data.PROMPT_COLUMN].map(data.normalize_prompt)
    groups = sorted(keys.unique())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    take = max(1, round(fraction * len(groups)))
    chosen = {groups[i] for i in order[:take]}
    searched = [k for k, g in enumerate(keys) if g in chosen]
    return searched, [k for k, g in enumerate(keys) if g not in chosen]


def _first_predictions(inputs: Inputs, rows: Sequence[int]) -> list[list[str]]:
    """One prediction per model for each row, in plan order: the blend the search optimizes the mean prompt for."""
    return [[inputs.predictions[m][r][:1] for m in inputs.predictions] for r in rows]


def run_search(cfg: MeanPromptConfig, scorer, inputs: Inputs, progress: bool = True) -> dict:
    """Search the mean prompt and save ``mean_prompt.json`` (string, score, history, settings) in the run."""
    objective_name = resolved_objective(cfg, inputs)
    unseen: list[int] = []
    if objective_name == "blend":
        searched, unseen = search_split(inputs.validation, cfg.search_fraction, cfg.seed)
        objective = BlendObjective(scorer, _first_predictions(inputs, searched),
                                   [inputs.truths[r] for r in searched], cfg.separator, cfg.shortlist)
        aim = f"{len(searched)} validation rows (prediction + mean prompt); {len(unseen)} rows kept unseen"
        if not unseen:
            logger.warning("search_fraction=%s: the search sees every validation row, so the blend is chosen on rows "
                           "it was fitted to (in-sample)", cfg.search_fraction)
    else:
        objective = AloneObjective(scorer, inputs.targets)
        aim = f"{len(inputs.targets)} target prompts (validation prompts removed)"
    logger.info("searching the mean prompt (%s, width %d, up to %d words) against %s with %s", cfg.method, cfg.width,
                cfg.max_length, aim, scorer.name)
    embedded_before = _embedded(scorer)
    result = search(objective, inputs.vocabulary, cfg.max_length, width=cfg.width, start=cfg.start,
                    patience=cfg.patience, seed=cfg.seed, keep=cfg.vocab_keep, progress=progress)
    record = {"string": result.string, "score": round(result.score, 6), "objective": objective_name,
              "aim": aim, "scorer": scorer.name, "method": cfg.method, "width": cfg.width,
              "vocabulary": cfg.vocabulary, "vocab_size": len(inputs.vocabulary), "vocab_keep": cfg.vocab_keep,
              "targets": len(inputs.targets),
              # the blend is chosen on rows the search never saw (None: all validation rows)
              "choice_rows": unseen if objective_name == "blend" and unseen else None, "seconds": result.seconds,
              "strings_embedded": _embedded(scorer) - embedded_before, "history": result.history}
    path = cfg.run_dir / RESULT_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    logger.info("mean prompt (%s %.4f, %.1fs): %r -> %s", objective_name, result.score, result.seconds,
                result.string, path)
    return record


def _embedded(scorer) -> int:
    """Strings the scorer has encoded so far (its cache size when it keeps no count)."""
    return int(getattr(scorer, "encoded", getattr(scorer, "cache_size", 0)))


def compare_alone(scorer, inputs: Inputs, mean_prompts: dict[str, str]) -> pd.DataFrame:
    """Each mean prompt by itself on the validation rows and on the target set: the "alone" comparison."""
    rows = []
    target_objective = AloneObjective(scorer, inputs.targets)
    for kind, text in mean_prompts.items():
        row = scorer.report(f"mean prompt alone ({kind})", [text] * len(inputs.truths), inputs.truths)
        row["targets_scs"] = round(float(target_objective([text])[0]), 4)
        row["string"] = text
        rows.append(row)
    return pd.DataFrame(rows)


def run_blend_choice(cfg: MeanPromptConfig, scorer, inputs: Inputs, searched: dict,
                     progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """The blend chosen on this run's validation rows (:func:`kaggle_utils.blend_choice.choose_and_write`): every
    option scored on the rows the search never saw, the table and ``blend.json`` written to the run."""
    return blend_choice.choose_and_write(scorer, inputs.predictions, inputs.truths, searched, cfg.run_dir,
                                         cfg.separator, cfg.n_choices, cfg.max_options, progress)


def n_curve(cfg: MeanPromptConfig, scorer, inputs: Inputs, searched: dict) -> Path | None:
    """SCS against the number of predictions joined on the choice rows, without and with the searched mean prompt,
    as ``<run>/n_curve.csv`` and ``.png``; None without predictions."""
    if not inputs.predictions:
        return None
    return blend_choice.write_n_curve(scorer, inputs.predictions, inputs.truths, searched["string"], cfg.run_dir,
                                      cfg.separator)


def score_rows(scorer, inputs: Inputs, searched: dict, choice: dict) -> list[dict]:
    """The ``scores.csv`` rows this stage adds (:func:`kaggle_utils.blend_choice.score_rows`)."""
    return blend_choice.score_rows(scorer, inputs.predictions, inputs.truths, searched, choice)
