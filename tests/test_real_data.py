"""Checks of the real data folder: the one the Makefile would use (``KAGGLE_UTILS_DATA``, else ``../shared/data``
beside the checkout, else the ``data/`` that `make data` builds). Where there is none, every test here skips and says
why; the rest of the suite never reads it (tests/fixtures/ has its own rows).

    .venv/bin/python -m pytest -q tests/test_real_data.py
"""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from conftest import USER_DATA_ENV
from kaggle_utils import config, data, sources

GEMMA_SOURCE = "pedromb-gemma7b-eval"


@pytest.fixture(scope="module")
def real_data():
    """The folder `make demo` would read, found as the Makefile finds it; skips where there is none."""
    mp = pytest.MonkeyPatch()
    if USER_DATA_ENV:
        mp.setenv("KAGGLE_UTILS_DATA", USER_DATA_ENV)
    else:
        mp.delenv("KAGGLE_UTILS_DATA", raising=False)
    folder = config.data_dir()
    mp.undo()
    if not (folder / "gemma_rewrites.csv").exists():
        pytest.skip(f"no real data folder here ({folder} has no gemma_rewrites.csv; `make data` builds one)")
    return folder


def test_every_file_of_the_folder_reads_and_is_labelled(real_data):
    labels = {f.label for f in sources.UPSTREAM}
    for name in ("gemma_rewrites.csv", "extra_rewrites.csv"):
        df = data.read_rewrites(real_data / name)  # the pipeline's own checks: columns, ids, text
        assert len(df) > 0 and df["id"].is_unique, name
        assert set(df["source"]) <= labels, (name, sorted(set(df["source"]) - labels))
        assert (df["rewrite_prompt"].str.strip() != "").all(), name
    gemma = data.read_rewrites(real_data / "gemma_rewrites.csv")
    assert set(gemma["source"]) == {GEMMA_SOURCE}
    prompts = json.loads((real_data / "selected_prompts.json").read_text())
    assert isinstance(prompts, list) and prompts and all(isinstance(p, str) and p.strip() for p in prompts)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_split_never_shares_a_prompt_on_the_real_rows(real_data, seed):
    df = data.read_rewrites(real_data / "gemma_rewrites.csv")
    train, val = data.split_by_prompt(df, val_rows=100, seed=seed)
    key = lambda d: set(d["rewrite_prompt"].map(data.normalize_prompt))  # noqa: E731
    assert not key(train) & key(val)
    assert len(val) >= 100 and len(train) + len(val) == len(df)


def _readme(folder):
    readme = folder / "README.md"
    if not readme.exists():
        pytest.skip(f"{folder} has no README.md (a folder `make data` built documents nothing)")
    return readme.read_text()


def test_row_counts_are_the_ones_the_folder_documents(real_data):
    """The folder's README table gives each file's rows; the files hold exactly that many."""
    text = _readme(real_data)
    for name in ("gemma_rewrites.csv", "extra_rewrites.csv"):
        documented = re.search(rf"`{re.escape(name)}`\s*\|\s*(\d+)\s*\|", text)
        assert documented, f"{name}: no row count in {real_data / 'README.md'}"
        assert len(pd.read_csv(real_data / name)) == int(documented.group(1)), name


def test_pins_match_the_ones_the_folder_documents(real_data):
    """Each upstream file's commit, path and sha256 in kaggle_utils.sources is the one the folder's README names."""
    text = _readme(real_data)
    for f in sources.UPSTREAM:
        assert f.sha256 in text and f.commit in text and f.path in text, f.label


@pytest.mark.slow
def test_the_search_beats_the_public_mean_prompt_on_held_out_real_prompts(real_data):
    """The mean-prompt search, run on the real training prompts, generalizes: its string scores above the public
    mean prompt on held-out prompt groups it never saw (MiniLM stand-in scorer)."""
    from kaggle_utils import mean_prompt as mp
    from kaggle_utils import metric

    minilm = metric.Scorer("")
    gemma = mp.read_validation(real_data / "gemma_rewrites.csv")
    _, validation = data.split_by_prompt(gemma, 24, seed=0, max_per_group=2)
    held_out = validation["rewrite_prompt"].tolist()
    train = mp.training_prompts([real_data / "extra_rewrites.csv", real_data / "gemma_rewrites.csv"], exclude=held_out)
    targets = mp.target_prompts([], train, exclude=held_out, max_targets=400, seed=0)
    result = mp.search(mp.AloneObjective(minilm, targets), mp.word_vocabulary(train, 150), max_length=6,
                       progress=False)
    optimized = minilm.scs([result.string] * len(held_out), held_out).mean()
    public = minilm.scs([mp.PUBLIC_MEAN_PROMPT] * len(held_out), held_out).mean()
    assert optimized > public, (result.string, optimized, public)
