"""Reading, validation, dedup, the prompt-group split, the length filter. Run: `pytest tests/test_data.py`."""
from __future__ import annotations

import pandas as pd
import pytest

from kaggle_utils import data
from conftest import EXTRA_CSV, GEMMA_CSV


def test_reads_every_row_of_a_competition_file():
    df = data.read_rewrites(GEMMA_CSV)
    assert len(df) == len(pd.read_csv(GEMMA_CSV)) > 100
    assert {"id", "original_text", "rewritten_text", "rewrite_prompt", "_file", "_row"} <= set(df.columns)
    assert df["_row"].iloc[0] == 2  # line 1 is the header


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(data.DataError, match="nope.csv: file does not exist"):
        data.read_rewrites(tmp_path / "nope.csv")


def test_missing_column_names_file_and_column(rewrites_csv):
    df = pd.read_csv(rewrites_csv).drop(columns=["rewritten_text"])
    df.to_csv(rewrites_csv, index=False)
    with pytest.raises(data.DataError) as err:
        data.read_rewrites(rewrites_csv)
    assert "rewrites.csv" in str(err.value) and "rewritten_text" in str(err.value)


def test_test_csv_needs_no_prompt(rewrites_csv):
    df = pd.read_csv(rewrites_csv).drop(columns=["rewrite_prompt"])
    df.to_csv(rewrites_csv, index=False)
    assert len(data.read_rewrites(rewrites_csv, require_prompt=False)) == 12


def test_duplicated_id_names_both_rows(rewrites_csv):
    df = pd.read_csv(rewrites_csv)
    df.loc[5, "id"] = df.loc[1, "id"]
    df.to_csv(rewrites_csv, index=False)
    with pytest.raises(data.DataError, match=r"row 7, column 'id': duplicated id 'r01' \(first seen on row 3\)"):
        data.read_rewrites(rewrites_csv)


def test_invalid_utf8_is_replaced_and_logged(rewrites_csv, caplog):
    raw = rewrites_csv.read_bytes().replace(b"feline", b"fel\xffine", 1)
    rewrites_csv.write_bytes(raw)
    df = data.read_rewrites(rewrites_csv)
    assert "\ufffd" in df["rewritten_text"].iloc[0]
    assert "replaced 1 invalid UTF-8" in caplog.text


def test_empty_rows_are_dropped_and_counted(rewrites_csv, caplog):
    df = pd.read_csv(rewrites_csv)
    df.loc[3, "rewrite_prompt"] = ""
    df.loc[4, "original_text"] = "   "
    df.to_csv(rewrites_csv, index=False)
    out = data.drop_incomplete(data.read_rewrites(rewrites_csv))
    assert len(out) == 10
    assert "dropped 2 row(s)" in caplog.text and "rewrites.csv:5" in caplog.text


@pytest.mark.parametrize("prompts,kept", [
    (["Make it formal.", "make it formal", "Make  it formal!", "Make it casual."], 2),
    (["A", "B", "C"], 3),
])
def test_dedup_keeps_one_row_per_prompt(prompts, kept):
    df = pd.DataFrame({"original_text": "o", "rewritten_text": "r", "rewrite_prompt": prompts})
    assert len(data.dedup_prompts(df)) == kept


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_never_shares_a_prompt(seed):
    df = data.read_rewrites(GEMMA_CSV)
    train, val = data.split_by_prompt(df, val_rows=60, seed=seed)
    key = lambda d: set(d["rewrite_prompt"].map(data.normalize_prompt))  # noqa: E731
    assert not key(train) & key(val)
    assert len(val) >= 60 and len(train) + len(val) == len(df)


def test_split_caps_rows_per_group():
    df = data.read_rewrites(GEMMA_CSV)
    train, val = data.split_by_prompt(df, val_rows=40, seed=0, max_per_group=2)
    assert val["rewrite_prompt"].value_counts().max() <= 2
    assert val["rewrite_prompt"].nunique() >= 20
    assert not set(train["rewrite_prompt"]) & set(val["rewrite_prompt"])


def test_split_needs_two_groups():
    df = pd.DataFrame({"original_text": ["a", "b"], "rewritten_text": ["c", "d"], "rewrite_prompt": ["p", "p"]})
    with pytest.raises(data.DataError, match="at least 2 prompt groups"):
        data.split_by_prompt(df, val_rows=1)


def test_length_filter_drops_and_logs(caplog):
    df = pd.DataFrame({"x": range(5)})
    out = data.filter_by_length(df, [10, 100, 120, 125, 200], max_length=128, margin=8)
    assert list(out["x"]) == [0, 1, 2]
    assert "dropped 2 of 5" in caplog.text


def test_train_sources_keep_only_the_named_rewriters():
    extra = EXTRA_CSV
    every = data.load_training_rows([GEMMA_CSV, extra], dedup=False)
    gemma = data.load_training_rows([GEMMA_CSV, extra], dedup=False,
                                    sources=["pedromb-gemma7b-eval", " getorca-gemma-filtered"])
    assert set(gemma["source"]) == {"pedromb-gemma7b-eval", "getorca-gemma-filtered"}
    assert len(gemma) == int(every["source"].isin(set(gemma["source"])).sum()) < len(every)
    for none in ([""], None, ""):  # no names = every row
        assert len(data.load_training_rows([GEMMA_CSV], dedup=False, sources=none)) == len(
            data.load_training_rows([GEMMA_CSV], dedup=False))


def test_a_train_source_that_matches_nothing_names_the_files_and_their_sources(rewrites_csv):
    with pytest.raises(data.DataError, match=r"train_sources \['gemma'\] match no row of .*rewrites.csv.*"
                                             r"their sources: \['fixture'\]"):
        data.load_training_rows([rewrites_csv], sources=["gemma"])


def test_train_sources_from_a_yaml_list_and_checked_before_any_model_loads(tmp_path, tiny_model_dir):
    from kaggle_utils import training

    base = tiny_model_dir("mistral")
    cfg = training.TrainConfig(run_name="src", runs_dir=str(tmp_path), preset="mistral-7b", base_model_path=str(base),
                               train_files=[str(GEMMA_CSV)], train_sources=["pedromb-gemma7b-eval"], load_in_4bit=False)
    assert cfg.train_sources == "pedromb-gemma7b-eval"
    training.prepare_run(cfg)  # a source the file holds: accepted
    bad = training.TrainConfig(run_name="bad", runs_dir=str(tmp_path), preset="mistral-7b", base_model_path=str(base),
                               train_files=[str(GEMMA_CSV)], train_sources="gemma", load_in_4bit=False)
    with pytest.raises(data.DataError, match=r"train_sources \['gemma'\] match no row .*pedromb-gemma7b-eval"):
        training.prepare_run(bad)
    assert not (tmp_path / "bad" / "config.json").exists()


def test_source_weights_repeat_and_subsample_whole_sources(caplog):
    extra = EXTRA_CSV
    rows = data.load_training_rows([GEMMA_CSV, extra], dedup=False)
    counts = rows["source"].value_counts()
    out = data.weight_sources(rows, "pedromb-gemma7b-eval:3, getorca-gemini-dolly=0.5,alexsaavedraa-gpt35:0", seed=1)
    got = out["source"].value_counts()
    assert got["pedromb-gemma7b-eval"] == 3 * counts["pedromb-gemma7b-eval"]
    assert got["getorca-gemini-dolly"] == round(0.5 * counts["getorca-gemini-dolly"])
    assert "alexsaavedraa-gpt35" not in got
    assert got["getorca-gemma-filtered"] == counts["getorca-gemma-filtered"]  # not named: once
    # the half is a seeded choice of distinct rows, the same for the same seed
    half = out.loc[out["source"] == "getorca-gemini-dolly", "id"]
    assert half.is_unique and half.isin(rows["id"]).all()
    again = data.weight_sources(rows, {"getorca-gemini-dolly": 0.5}, seed=1)
    assert set(again.loc[again["source"] == "getorca-gemini-dolly", "id"]) == set(half)
    assert "pedromb-gemma7b-eval x3" in caplog.text
    assert data.weight_sources(rows, "") is rows


@pytest.mark.parametrize("weights, message", [
    ("pedromb-gemma7b-eval", r"'pedromb-gemma7b-eval:None' must be <source>:<factor>"),
    ("pedromb-gemma7b-eval:-1", r"'pedromb-gemma7b-eval:-1' must be"),
    ("pedromb-gemma7b-eval=lots", r"'pedromb-gemma7b-eval:lots' must be"),
    (":2", r"':2' must be"),
])
def test_a_malformed_source_weight_is_refused_by_name(weights, message):
    with pytest.raises(data.DataError, match=message):
        data.parse_source_weights(weights)


def test_source_weights_from_yaml_and_a_missing_source_checked_before_any_model_loads(tmp_path, tiny_model_dir):
    from kaggle_utils import training

    base = tiny_model_dir("mistral")
    common = dict(runs_dir=str(tmp_path), preset="mistral-7b", base_model_path=str(base), train_files=[str(GEMMA_CSV)],
                  load_in_4bit=False)
    cfg = training.TrainConfig(run_name="w", source_weights={"pedromb-gemma7b-eval": 2}, **common)
    assert cfg.source_weights == "pedromb-gemma7b-eval:2"
    training.prepare_run(cfg)
    with pytest.raises(data.DataError, match=r"must be <source>:<factor>"):
        training.TrainConfig(run_name="x", source_weights="gemma=x2", **common)
    bad = training.TrainConfig(run_name="bad", source_weights="gemma:2", **common)
    with pytest.raises(data.DataError, match=r"source_weights \['gemma'\] match no row .*pedromb-gemma7b-eval"):
        training.prepare_run(bad)
    assert not (tmp_path / "bad" / "config.json").exists()
