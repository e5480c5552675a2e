"""Reading and validating competition-format CSVs, prompt dedup, the split by prompt group, the length filter.

Columns: ``id`` (optional for training), ``original_text``, ``rewritten_text``, ``rewrite_prompt`` (absent in a test
CSV). Extra columns are kept but ignored.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .config import resolve_path

logger = logging.getLogger("kaggle_utils")

TEXT_COLUMNS = ("original_text", "rewritten_text")
PROMPT_COLUMN = "rewrite_prompt"


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the row and the column."""


def _csv_row(index: int) -> int:
    """The line number a spreadsheet shows for a 0-based data row (line 1 is the header)."""
    return int(index) + 2


def read_rewrites(path: str | os.PathLike, require_prompt: bool = True, require_id: bool = False) -> pd.DataFrame:
    """Read one competition-format CSV and validate its columns and ids.

    Invalid UTF-8 bytes are replaced (and counted in the log), so a stray byte never stops a submission. Rows keep
    their file order; ``_file`` and ``_row`` columns record where each came from, for error messages.
    """
    file = resolve_path(path)
    if not file.exists():
        raise DataError(f"{file}: file does not exist")
    raw = file.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad:
        logger.warning("%s: replaced %d invalid UTF-8 byte sequence(s)", file, bad)
    import io

    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[])
    except pd.errors.EmptyDataError:
        raise DataError(f"{file}: the file is empty (no header)") from None
    except pd.errors.ParserError as e:
        raise DataError(f"{file}: not a readable CSV ({e})") from None
    required = list(TEXT_COLUMNS) + ([PROMPT_COLUMN] if require_prompt else []) + (["id"] if require_id else [])
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{file}: missing column(s) {missing}; found {list(df.columns)}")
    if "id" in df.columns:
        ids = df["id"].str.strip()
        blank = ids.eq("")
        if require_id and blank.any():
            row = _csv_row(np.flatnonzero(blank.to_numpy())[0])
            raise DataError(f"{file}: row {row}, column 'id': empty id")
        dup = ids[~blank].duplicated(keep="first")
        if dup.any():
            first = dup[dup].index[0]
            other = ids.index[(ids == ids[first])][0]
            raise DataError(
                f"{file}: row {_csv_row(first)}, column 'id': duplicated id '{ids[first]}' (first seen on row "
                f"{_csv_row(other)})"
            )
        df["id"] = ids
    df["_file"] = str(file)
    df["_row"] = [_csv_row(i) for i in range(len(df))]
    return df


def drop_incomplete(df: pd.DataFrame, columns=TEXT_COLUMNS + (PROMPT_COLUMN,)) -> pd.DataFrame:
    """Drop rows with an empty value in any of ``columns`` and log how many went, with the first few row numbers."""
    empty = np.zeros(len(df), dtype=bool)
    for c in columns:
        empty |= df[c].fillna("").astype(str).str.strip().eq("").to_numpy()
    if empty.any():
        where = df.loc[empty, ["_file", "_row"]].head(5).apply(lambda r: f"{Path(r._file).name}:{r._row}", axis=1)
        logger.warning("dropped %d row(s) with an empty %s (first: %s)", int(empty.sum()), "/".join(columns),
                       ", ".join(where))
    return df.loc[~empty].reset_index(drop=True)


def normalize_prompt(prompt: str) -> str:
    """The key two prompts share when they only differ in case, spacing or final punctuation."""
    return re.sub(r"\s+", " ", prompt.strip().lower()).rstrip(" .!?")


def keep_sources(df: pd.DataFrame, sources, files=()) -> pd.DataFrame:
    """The rows whose ``source`` is one of ``sources`` (names, or one comma-separated string; e.g. only the Gemma
    rewrites); no name (None, "", [""]) keeps every row. A name that matches no row is an error naming the files and
    the sources they hold."""
    if isinstance(sources, str):
        sources = sources.split(",")
    wanted = [str(s).strip() for s in sources or () if str(s).strip()]
    if not wanted:
        return df
    have = check_sources(df, wanted, "train_sources", files)
    kept = df.loc[have.isin(wanted).to_numpy()].reset_index(drop=True)
    logger.info("train_sources: kept %d of %d row(s) from %s", len(kept), len(df), ", ".join(wanted))
    return kept


def parse_source_weights(weights) -> dict[str, float]:
    """``source_weights`` as {source: factor}: a mapping, or one string like ``"pedromb-gemma7b-eval:3,x:0.5"``
    (``=`` works as well as ``:``). A factor is a number >= 0; anything else is an error naming the entry."""
    if isinstance(weights, str):
        pairs = [(re.split(r"[:=]", part, maxsplit=1) + [None])[:2] for part in weights.split(",") if part.strip()]
    else:
        pairs = list(dict(weights or {}).items())
    parsed = {}
    for name, factor in pairs:
        name = str(name).strip()
        try:
            value = float(str(factor).strip())
        except ValueError:
            value = float("nan")
        if not name or not (value >= 0):
            raise DataError(f"source_weights: '{name}:{factor}' must be <source>:<factor> with a factor >= 0 "
                            "(e.g. pedromb-gemma7b-eval:3)")
        parsed[name] = value
    return parsed


def check_sources(df: pd.DataFrame, names, what: str, files=()) -> pd.Series:
    """Each row's ``source`` as text; a name in ``names`` that no row has is an error naming ``what`` (the parameter),
    the files and the sources they hold."""
    have = df["source"].astype(str) if "source" in df else pd.Series("", index=df.index)
    missing = [s for s in names if not (have == s).any()]
    if missing:
        found = sorted(set(have) - {""}) or ["(no source column)"]
        raise DataError(f"{what} {missing} match no row of {[str(f) for f in files]}; their sources: {found}")
    return have


def weight_sources(df: pd.DataFrame, weights, seed: int = 0, files=()) -> pd.DataFrame:
    """Up- or down-weight whole sources by repeating their rows (``parse_source_weights``): factor 3 gives each row of
    that source three times per epoch, 0.5 a seeded half of them, 0 none; a source not named keeps factor 1. A named
    source that no row has is an error naming the files and the sources they hold."""
    weights = parse_source_weights(weights)
    if not weights:
        return df
    have = check_sources(df, weights, "source_weights", files)
    rng = np.random.default_rng(seed)
    parts, counts = [], []
    for name, rows in df.groupby(have.to_numpy(), sort=False):
        factor = weights.get(name, 1.0)
        whole, frac = int(factor), factor - int(factor)
        picked = [rows] * whole + [rows.iloc[np.sort(rng.permutation(len(rows))[:round(frac * len(rows))])]]
        parts += picked
        if name in weights:
            counts.append(f"{name} x{factor:g}: {len(rows)} -> {sum(len(p) for p in picked)}")
    out = pd.concat(parts).reset_index(drop=True)
    logger.info("source_weights: %s (%d rows in all)", "; ".join(counts), len(out))
    return out


def dedup_prompts(df: pd.DataFrame, max_per_prompt: int = 1) -> pd.DataFrame:
    """Keep at most ``max_per_prompt`` rows per (normalized) prompt, the first ones; log how many were removed."""
    key = df[PROMPT_COLUMN].map(normalize_prompt)
    keep = key.groupby(key).cumcount() < max_per_prompt
    removed = int((~keep).sum())
    if removed:
        logger.info("dedup: removed %d row(s) with a repeated prompt, %d remain", removed, int(keep.sum()))
    return df.loc[keep.to_numpy()].reset_index(drop=True)


def split_by_prompt(df: pd.DataFrame, val_rows: int, seed: int = 0, max_per_group: int = 0
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split into (train, validation) by prompt group, never by row, so no prompt is on both sides.

    Whole groups are drawn in a seeded random order until the validation side has at least ``val_rows`` rows.
    ``max_per_group`` (0 = no cap) keeps at most that many rows of each drawn group, so a few huge groups cannot fill
    the validation set; the rest of a drawn group goes to neither side.
    """
    key = df[PROMPT_COLUMN].map(normalize_prompt)
    groups = key.unique()
    if len(groups) < 2:
        raise DataError(f"split_by_prompt: need at least 2 prompt groups to split, found {len(groups)}")
    if val_rows < 1:
        raise DataError(f"split_by_prompt: val_rows must be >= 1, got {val_rows}")
    order = np.random.default_rng(seed).permutation(len(groups))
    sizes = key.value_counts()
    chosen, total = [], 0
    for i in order[:-1]:  # the last group always stays on the train side
        if total >= val_rows:
            break
        chosen.append(groups[i])
        total += min(int(sizes[groups[i]]), max_per_group or int(sizes[groups[i]]))
    in_val = key.isin(set(chosen)).to_numpy()
    val = df.loc[in_val]
    if max_per_group:
        val = val.loc[key[in_val].groupby(key[in_val]).cumcount().to_numpy() < max_per_group]
    return df.loc[~in_val].reset_index(drop=True), val.reset_index(drop=True)


def filter_by_length(df: pd.DataFrame, lengths, max_length: int, margin: int = 8) -> pd.DataFrame:
    """Drop rows whose token count (``lengths``, one per row) exceeds ``max_length - margin``; log the count.

    The margin leaves room for the special tokens the template adds around the answer.
    """
    lengths = np.asarray(lengths)
    keep = lengths <= max_length - margin
    dropped = int((~keep).sum())
    if dropped:
        logger.info("length filter: dropped %d of %d row(s) longer than %d tokens (max_seq_length %d - margin %d)",
                    dropped, len(df), max_length - margin, max_length, margin)
    return df.loc[keep].reset_index(drop=True)


def load_training_rows(files, dedup: bool = True, max_per_prompt: int = 1, sources=()) -> pd.DataFrame:
    """Read, validate and concatenate training CSVs; drop incomplete rows; with ``sources`` (names, or one
    comma-separated string; empty or None = every row), keep only rows whose ``source`` column is one of them;
    optionally keep at most ``max_per_prompt`` rows per distinct prompt."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise DataError("no training files given")
    frames = [drop_incomplete(read_rewrites(f, require_prompt=True)) for f in files]
    df = keep_sources(pd.concat(frames, ignore_index=True), sources, files)
    if dedup:
        df = dedup_prompts(df, max_per_prompt)
    return df
