"""The mean-prompt search and the blend chosen on validation.

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

Then the blend is chosen on validation: predictions per model, model order, and the mean prompt (the public one, the
optimized one, or none). Every option is scored, the best one is written to ``blend.json`` in the run, and the
inference notebook reads it.

Usage (headless): ``make mean-prompt RUN=<run>``.
"""
from __future__ import annotations

import itertools
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

from . import artifacts, blending, data, metric, sampling
from .config import require, resolve_path, save_config, saved_config

logger = logging.getLogger("kaggle_utils")

# The public mean prompt the original author appended (LB 0.63 with sentence-t5-base).
PUBLIC_MEAN_PROMPT = blending.DEFAULT_MEAN_PROMPT
DEFAULT_TARGET_FILES = ["data/selected_prompts.json"]
# Used when the run folder has no config.json to name its training files (same default as training.TrainConfig).
FALLBACK_TRAIN_FILES = ["data/extra_rewrites.csv", "data/gemma_rewrites.csv"]
RESULT_FILE = "mean_prompt.json"
OPTIONS_FILE = "blend_options.csv"
OPTIONS_PLOT = "blend_options.png"
SCORES_FILE = "scores.csv"
MEAN_PROMPT_KINDS = ("none", "public", "optimized")
SPLIT = "choice"  # this stage's scores are on the rows it chose the blend on
_PUNCTUATION = set(".,;:!?")


class MeanPromptError(ValueError):
    """The search or the blend choice cannot run on these inputs; the message says which input and why."""


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


# ---------------------------------------------------------------- predictions


def find_prediction_files(cfg: MeanPromptConfig) -> list[Path]:
    """The ``<model>.jsonl`` prediction files the blend uses, in plan order.

    The order is ``cfg.models``; else the plan of the inference run that wrote the folder (its ``config.json``,
    one level up, lists the models); else every ``<model>.jsonl`` by name. Stale files that the prediction store set
    aside (``*.stale.jsonl``) are never read.
    """
    folder = _predictions_dir(cfg)
    if folder is None:
        if cfg.models:
            raise MeanPromptError(f"models {cfg.models} given but no predictions folder found under {cfg.run_dir} "
                                  "(run the inference notebook on its validation.csv first, or set predictions_dir)")
        return []
    names = list(cfg.models) or _planned_models(folder)
    if names:
        files = [folder / f"{m}.jsonl" for m in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise MeanPromptError(f"prediction file(s) missing: {missing}")
        return files
    return sorted(f for f in folder.glob("*.jsonl") if not f.name.endswith(".stale.jsonl"))


def _planned_models(folder: Path) -> list[str]:
    """Model names, in plan order, from the ``config.json`` of the inference run that owns ``folder``."""
    plan = (saved_config(folder.parent) or {}).get("models") or []
    return [m["name"] for m in plan if isinstance(m, dict) and m.get("name")]


def _predictions_dir(cfg: MeanPromptConfig) -> Path | None:
    """``predictions_dir``, else ``<run>/predictions`` or ``<run>/inference/predictions`` (the inference notebook's
    default for the demo) when it holds prediction files; None when the run has none."""
    if cfg.predictions_dir:
        folder = resolve_path(cfg.predictions_dir)
        if not folder.is_dir():
            raise MeanPromptError(f"predictions_dir '{folder}' does not exist")
        return folder
    for folder in (cfg.run_dir / "predictions", cfg.run_dir / "inference" / "predictions"):
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
        raise MeanPromptError(f"{len(options)} blend options exceed max_options={max_options}; shorten n_choices "
                              "or the models list")
    if not options:
        raise MeanPromptError("no blend option: give predictions or a mean prompt")
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
        raise MeanPromptError("no validation row is left to choose the blend on")
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
        raise MeanPromptError("no blend option was scored")
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
    files = find_prediction_files(cfg)
    predictions: dict[str, list[list[str]]] = {}
    if files:
        if "id" not in validation.columns:
            raise MeanPromptError(f"{validation_file}: an 'id' column is needed to match the prediction files")
        per_model, covered = align_predictions(files, validation["id"].tolist())
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
    """Score every blend option on the validation rows the search never saw, save the table (CSV + PNG) and the
    best option as ``blend.json``; also record the best option that appends the optimized mean prompt.

    With the ``alone`` objective the search saw no validation prompt, so all rows are used.
    """
    began = time.perf_counter()
    mean_prompts = {"public": PUBLIC_MEAN_PROMPT, "optimized": searched["string"]}
    available = {m: min((len(p) for p in preds), default=0) for m, preds in inputs.predictions.items()}
    options = blend_options(available, cfg.n_choices, MEAN_PROMPT_KINDS, cfg.max_options)
    choice_rows = searched.get("choice_rows")
    table = score_blends(scorer, options, inputs.predictions, inputs.truths, mean_prompts, cfg.separator,
                         choice_rows=choice_rows, progress=progress)
    best = choose_blend(table)
    with_optimized = choose_blend(table, "optimized", with_predictions=True)
    shown = table.drop(columns=["_option", "_rows_scs"])
    shown.to_csv(cfg.run_dir / OPTIONS_FILE, index=False)
    plot_blend_table(shown, cfg.run_dir / OPTIONS_PLOT, scorer.name)

    def describe(option: BlendOption) -> dict:
        row = table[table["_option"] == option].iloc[0]
        return {"models": [{"model": m, "n": n} for m, n in option.plan], "mean_prompt_kind": option.mean_prompt_kind,
                "mean_prompt": mean_prompts.get(option.mean_prompt_kind, ""), "label": option.label,
                "scs": float(row["scs"]), "cos": float(row["cos"]), "scs_all_rows": float(row["scs_all_rows"])}

    choice = {**describe(best), "separator": cfg.separator, "scorer": scorer.name, "rows": int(table["rows"].iloc[0]),
              "rows_total": len(inputs.truths), "chosen_from": len(table), "table": OPTIONS_FILE,
              "best_by_mean": table.iloc[0]["option"],
              "rule": "the best mean SCS; fewer predictions when within one standard error of it (same models, order "
                      "and mean prompt)",
              "mean_prompt_objective": searched.get("objective", ""),
              "best_with_optimized_mean_prompt": describe(with_optimized) if with_optimized else None,
              "seconds": round(time.perf_counter() - began, 2)}
    path = blending.Blend(**choice).write(cfg.run_dir / blending.BLEND_FILE)
    logger.info("blend chosen from %d option(s) on %d rows with %s: %s (SCS %.4f) -> %s", len(table), choice["rows"],
                scorer.name, best.label, choice["scs"], path)
    return shown, choice


def n_curve(cfg: MeanPromptConfig, scorer, inputs: Inputs, searched: dict) -> Path | None:
    """SCS against the number of predictions joined on the choice rows, without and with the searched mean prompt
    (``blending.n_curve``), as ``<run>/n_curve.csv`` and ``.png``; None without predictions."""
    if not inputs.predictions:
        return None
    table = blending.n_curve(scorer, inputs.predictions, inputs.truths, searched["string"], cfg.separator,
                             split="choice")
    table.to_csv(cfg.run_dir / f"{blending.N_CURVE_FILE}.csv", index=False)
    return blending.plot_n_curve(table, cfg.run_dir / f"{blending.N_CURVE_FILE}.png",
                                 f"how many predictions to join ({len(inputs.truths)} choice rows)")


def score_rows(scorer, inputs: Inputs, searched: dict, choice: dict) -> list[dict]:
    """The ``scores.csv`` rows this stage adds, on all validation rows: the public and the optimized mean prompt
    alone, the best blend that appends the optimized mean prompt (when there are predictions), and the chosen blend.

    System names are fixed (the blend itself is in ``blend.json``), so a re-run replaces its rows. A mean prompt
    searched on validation rows (``blend`` objective) is marked, since part of these rows are then in-sample.
    """
    truths = inputs.truths
    n = len(truths)
    mean_prompts = {"public": PUBLIC_MEAN_PROMPT, "optimized": searched["string"]}
    tag = ", searched on part of these rows" if searched.get("objective") == "blend" else ""
    rows = [scorer.report(blending.PUBLIC_MEAN_PROMPT_SYSTEM, [PUBLIC_MEAN_PROMPT] * n, truths, split=SPLIT),
            scorer.report(f"mean prompt alone (optimized{tag})", [searched["string"]] * n, truths, split=SPLIT)]
    blends = [(f"predictions + optimized mean prompt{tag}", choice.get("best_with_optimized_mean_prompt")),
              ("blend chosen on validation", choice)]
    for system, picked in blends:
        if picked:
            option = BlendOption(tuple((m["model"], m["n"]) for m in picked["models"]), picked["mean_prompt_kind"])
            rows.append(scorer.report(system, blend_strings(option, inputs.predictions, range(n), mean_prompts,
                                                            choice["separator"]), truths, split=SPLIT))
    return rows
