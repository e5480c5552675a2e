"""The sampling loop: post-processing, resumable prediction files (and reading them back), the loop's resume and its
retry of rows that got no answer, on stand-in engines. Run: `pytest tests/test_sampling.py`.
"""
from __future__ import annotations

import json
import re

import pytest

from kaggle_utils import engines, sampling


# ---------------------------------------------------------------- post-processing


@pytest.mark.parametrize("raw,expected", [
    ("Rewrite this as a poem.", "Rewrite this as a poem."),
    ('Prompt: "Make it formal."', "Make it formal."),
    ("<|im_start|>assistant\nConvert to a haiku.<|im_end|>", "Convert to a haiku."),
    ("\n\n  Summarize for a child.\nMore text", "Summarize for a child."),
    ("", ""), ("   \n ", ""), ('""', ""),
])
def test_postprocess_extracts_the_prompt(raw, expected):
    preds, empty = sampling.postprocess([raw], "<|im_start|>assistant\n", fallback="FALLBACK")
    assert preds == [expected or "FALLBACK"]
    assert empty == (0 if expected else 1)


def test_postprocess_counts_every_empty():
    preds, empty = sampling.postprocess(["ok then.", "", "  ", "Fine."], fallback="Improve this text.")
    assert preds == ["ok then.", "Improve this text.", "Improve this text.", "Fine."] and empty == 2


# ---------------------------------------------------------------- resumable prediction files


def _rec(i, key="k", n=2):
    return {"id": f"r{i}", "key": key, "predictions": [f"p{i}.{j}" for j in range(n)], "raw": []}


def test_store_round_trip_and_text_keys(tmp_path):
    store = sampling.PredictionStore(tmp_path, "m", {"a": 1})
    store.append([_rec(0), _rec(1)])
    store.append([_rec(2)])
    again = sampling.PredictionStore(tmp_path, "m", {"a": 1})
    assert set(again.done) == {"r0", "r1", "r2"}
    assert again.is_done("r1", "k") and not again.is_done("r1", "other texts")  # same id, other texts: redo
    assert again.predictions(["r0", "r9"], ["k", "k"]) == {"r0": ["p0.0", "p0.1"]}


def test_store_drops_a_torn_last_line(tmp_path, caplog):
    store = sampling.PredictionStore(tmp_path, "m", {"a": 1})
    store.append([_rec(0), _rec(1)])
    with open(store.path, "a") as fh:  # what a kill -9 in the middle of a write leaves
        fh.write('{"id": "r2", "key": "k", "predic')
    again = sampling.PredictionStore(tmp_path, "m", {"a": 1})
    assert set(again.done) == {"r0", "r1"}
    assert "torn last line" in caplog.text
    again.append([_rec(2)])
    lines = again.path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["r0", "r1", "r2"]


def test_store_never_returns_duplicates(tmp_path):
    store = sampling.PredictionStore(tmp_path, "m", {"a": 1})
    store.append([_rec(0, n=1)])
    store.append([_rec(0, n=3)])  # e.g. a row redone after its texts changed back
    again = sampling.PredictionStore(tmp_path, "m", {"a": 1})
    assert len(again.done) == 1 and len(again.done["r0"]["predictions"]) == 3


def test_store_starts_afresh_when_the_model_changed(tmp_path, caplog):
    sampling.PredictionStore(tmp_path, "m", {"adapter": "aaa", "n": 4}).append([_rec(0)])
    changed = sampling.PredictionStore(tmp_path, "m", {"adapter": "bbb", "n": 4})
    assert changed.done == {}
    assert list(tmp_path.glob("m.*.stale.jsonl")) and "adapter" in caplog.text


def test_prediction_files_read_back_as_written_and_a_bad_line_is_named(tmp_path):
    store = sampling.PredictionStore(tmp_path, "m", {"a": 1})
    store.append([_rec(0), {"id": 7, "key": "k", "predictions": "one string"}])
    assert sampling.read_predictions(store.path) == {"r0": ["p0.0", "p0.1"], "7": ["one string"]}
    (tmp_path / "broken.jsonl").write_text(json.dumps(_rec(0)) + "\n\n{not json\n")
    broken = re.escape(str(tmp_path / "broken.jsonl"))
    with pytest.raises(sampling.PredictionFileError, match=rf"^{broken}: line 3 is not a prediction row"):
        sampling.read_predictions(tmp_path / "broken.jsonl")
    (tmp_path / "no-id.jsonl").write_text(json.dumps({"predictions": ["x"]}) + "\n")
    with pytest.raises(sampling.PredictionFileError, match=r"no-id\.jsonl: line 1 is not a prediction row \('id'\)"):
        sampling.read_predictions(tmp_path / "no-id.jsonl")


class ListEngine(engines.Engine):
    """Answers each row with its index; records which rows it was asked for."""

    name = "list"

    def __init__(self):
        self.asked = []

    def generate_batches(self, originals, rewrittens, cfg, skip=frozenset(), progress=True):
        todo = [i for i in range(len(originals)) if i not in skip]
        self.asked.append(todo)
        for k in range(0, len(todo), cfg.generation_batch_size):
            rows = todo[k:k + cfg.generation_batch_size]
            yield rows, [[f"Prompt: Do row {i}." if j else "" for j in range(cfg.n)] for i in rows]


def test_sample_rows_skips_done_rows_and_logs_empties(tmp_path, caplog):
    ids = [f"r{i}" for i in range(5)]
    orig = [f"o{i}" for i in range(5)]
    rewr = [f"w{i}" for i in range(5)]
    cfg = engines.SamplingConfig(n=2, temperature=0.5, generation_batch_size=2)
    store = sampling.PredictionStore(tmp_path, "m", {})
    store.append([{"id": "r1", "key": sampling.text_key("o1", "w1"), "predictions": ["kept"]}])
    engine = ListEngine()
    report = sampling.sample_rows(engine, ids, orig, rewr, cfg, store, "Improve this text.", progress=False,
                                  model_name="m")
    assert engine.asked == [[0, 2, 3, 4]]
    assert report.resumed == 1 and report.sampled == 4 and report.empty == 4
    assert store.done["r1"]["predictions"] == ["kept"]
    assert store.done["r3"]["predictions"] == ["Improve this text.", "Do row 3."]
    assert "4 empty generation(s) replaced" in caplog.text
    assert report.retried == 0  # every row had one real answer: nothing to ask again


class SilentOnLongPrompts(engines.Engine):
    """Answers nothing at all for row 1 unless the prompt was cut below 100 tokens (as a model can on a huge text)."""

    name = "silent"

    def __init__(self):
        self.configs = []

    def generate_batches(self, originals, rewrittens, cfg, skip=frozenset(), progress=True):
        self.configs.append(cfg)
        todo = [i for i in range(len(originals)) if i not in skip]
        silent = lambda i: originals[i] == "huge" and cfg.max_prompt_tokens >= 100  # noqa: E731
        yield todo, [["" if silent(i) else f"Do {originals[i]}." for _ in range(cfg.n)] for i in todo]


def test_a_row_with_only_empty_generations_is_asked_again_on_a_shorter_prompt(tmp_path, caplog):
    engine = SilentOnLongPrompts()
    cfg = engines.SamplingConfig(n=3, temperature=0.5, max_prompt_tokens=192)
    store = sampling.PredictionStore(tmp_path, "m", {})
    report = sampling.sample_rows(engine, ["a", "b"], ["small", "huge"], ["x", "y"], cfg, store, "Improve this text.",
                                  progress=False)
    assert report.retried == 1 and report.empty == 3
    assert store.done["b"]["predictions"] == ["Do huge."] * 3  # a real answer, not the fallback
    assert store.done["a"]["predictions"] == ["Do small."] * 3
    retry = engine.configs[-1]
    assert (retry.n, retry.temperature, retry.max_prompt_tokens) == (1, 0.0, 96)
    assert "row b: all 3 generation(s) were empty; a greedy retry on a prompt cut to 96 tokens" in caplog.text

