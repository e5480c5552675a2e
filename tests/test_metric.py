"""The metric: sharpened cosine on known vectors (cos³ with the sign kept), the embedding cache, clear errors for a bad
scorer folder. Loads the MiniLM stand-in (about 5 s of imports). Run: `pytest tests/test_metric.py`.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from kaggle_utils import checkpoints, config, metric


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg)), 0.0]


@pytest.mark.parametrize("a,b,expected", [
    ([1, 0, 0], [1, 0, 0], 1.0),  # same direction
    ([1, 2, 3], [2, 4, 6], 1.0),  # length does not matter
    ([1, 0, 0], [-1, 0, 0], -1.0),  # opposite: the sign is kept
    ([1, 0, 0], [0, 1, 0], 0.0),  # orthogonal
    (_unit(0), _unit(60), 0.125),  # cos 60° = 0.5 -> 0.5³
    (_unit(0), _unit(120), -0.125),  # cos 120° = -0.5 -> -0.125, not +0.125
    ([0, 0, 0], [1, 0, 0], 0.0),  # a zero vector has no direction: 0, not NaN
])
def test_sharpened_cosine_known_vectors(a, b, expected):
    got = metric.sharpened_cosine(np.array([a], dtype=float), np.array([b], dtype=float))
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, abs=1e-12)


def test_sharpened_cosine_is_row_wise_and_power_is_a_parameter():
    a = np.array([_unit(0), _unit(0), _unit(0)])
    b = np.array([_unit(60), _unit(90), _unit(180)])
    np.testing.assert_allclose(metric.sharpened_cosine(a, b), [0.125, 0.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(metric.sharpened_cosine(a, b, power=1), [0.5, 0.0, -1.0], atol=1e-12)
    with pytest.raises(ValueError, match="different shapes"):
        metric.sharpened_cosine(a, b[:2])


def test_scs_matrix_is_the_row_wise_metric_for_every_pair():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    a[1] = 0.0  # a zero row scores 0, as in sharpened_cosine
    full = metric.scs_matrix(a, b)
    assert full.shape == (3, 4)
    for i in range(3):
        np.testing.assert_allclose(full[i], metric.sharpened_cosine(np.repeat(a[i:i + 1], 4, axis=0), b), atol=1e-12)
    assert not full[1].any() and full[0].any()


@pytest.fixture(scope="module")
def scorer():
    return metric.Scorer(device="cpu")


def test_stand_in_names_itself(scorer):
    assert scorer.name == metric.STAND_IN_NAME and "stand-in" in scorer.name
    assert scorer.dimension == 384
    row = scorer.report("echo", ["Rewrite this as a poem."], ["Rewrite this as a poem."])
    assert row["scorer"] == metric.STAND_IN_NAME and row["rows"] == 1
    assert row["scs"] == pytest.approx(1.0, abs=1e-4) and row["cos"] == pytest.approx(1.0, abs=1e-4)


def test_scs_is_the_cube_of_the_embedding_cosine(scorer):
    preds = ["Rewrite this as a poem.", "Make it formal.", "Summarize the text."]
    truths = ["Turn this into a sonnet.", "Rewrite in a formal business tone.", "Write it as a pirate shanty."]
    cos = scorer.cosine(preds, truths)
    np.testing.assert_allclose(scorer.scs(preds, truths), np.sign(cos) * np.abs(cos) ** 3, atol=1e-7)
    assert cos[0] > cos[2]  # poem~sonnet closer than summary~shanty: the embedder is a real one
    with pytest.raises(ValueError, match="2 predictions for 3 truths"):
        scorer.scs(preds[:2], truths)


def test_a_string_is_embedded_once(monkeypatch):
    scorer = metric.Scorer(device="cpu")
    sent: list[str] = []
    real = scorer.model.encode

    def counting(texts, **kw):
        sent.extend(texts)
        return real(texts, **kw)

    monkeypatch.setattr(scorer.model, "encode", counting)
    scorer.embed(["a poem", "a letter", "a poem"])
    scorer.scs(["a poem", "a memo"], ["a letter", "a poem"])
    scorer.report("again", ["a memo"], ["a letter"])
    assert sorted(sent) == ["a letter", "a memo", "a poem"]  # each distinct string went to the model once
    assert scorer.encoded == 3 and scorer.cache_size == 3
    assert scorer.embed([]).shape == (0, 384)


def test_blank_prediction_is_logged(scorer, caplog):
    scorer.scs(["  "], ["Rewrite this."])
    assert "1 of 1 predictions are blank" in caplog.text


def test_missing_scorer_path(tmp_path):
    with pytest.raises(metric.ScorerError, match="does not exist"):
        metric.Scorer(str(tmp_path / "sentence-t5-base"))


def test_plain_model_folder_is_not_a_scorer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(metric.ScorerError, match="not a sentence-transformers model folder"):
        metric.Scorer(str(tmp_path))
    # and the select stage refuses it at config time, before any generation
    with pytest.raises(metric.ScorerError, match="not a sentence-transformers model folder"):
        checkpoints.SelectConfig(scorer_path=str(tmp_path))


def test_broken_sentence_transformers_folder(tmp_path):
    (tmp_path / "modules.json").write_text('[{"idx": 0, "name": "0", "path": "", "type": "no.such.Module"}]')
    with pytest.raises(metric.ScorerError, match="could not be loaded as a sentence-transformers model"):
        metric.Scorer(str(tmp_path))


def test_a_scorer_path_names_the_scores(tmp_path):
    folder = tmp_path / "sentence-t5-base"
    folder.symlink_to(metric.stand_in_path(), target_is_directory=True)  # any sentence-transformers folder will do
    s = metric.Scorer(str(folder), device="cpu")
    assert s.name == "sentence-t5-base" and s.path == str(config.resolve_path(str(folder)))
    assert s.report("x", ["a"], ["b"])["scorer"] == "sentence-t5-base"


def test_precision_choice(monkeypatch):
    assert metric.resolve_precision("float32", "cpu") == "float32"
    assert metric.resolve_precision("auto", "cuda") == "float32"  # T5 overflows in half precision on GPUs
    from kaggle_utils import models

    monkeypatch.setattr(models, "native_cpu_bf16", lambda: False)
    assert metric.resolve_precision("auto", "cpu") == "float32"  # emulated bf16 would be slower, not faster
    monkeypatch.setattr(models, "native_cpu_bf16", lambda: True)
    assert metric.resolve_precision("auto", "cpu") == "bfloat16"
    with pytest.raises(metric.ScorerError, match="precision must be"):
        metric.resolve_precision("fp8", "cpu")


def test_bf16_scores_agree_with_fp32(scorer):
    exact = metric.Scorer(device="cpu", precision="float32")
    fast = metric.Scorer(device="cpu", precision="bfloat16")
    preds = ["Rewrite this as a poem.", "Make it formal.", "Summarize the text.", "Turn it into a tweet."]
    truths = ["Turn this into a sonnet.", "Rewrite in a formal business tone.", "Write it as a pirate shanty.",
              "Convert this into a social media post."]
    assert fast.precision == "bfloat16" and exact.precision == "float32"
    np.testing.assert_allclose(fast.scs(preds, truths), exact.scs(preds, truths), atol=0.01)


def test_bootstrap_interval_resamples_prompt_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 4)  # 30 prompt groups of 4 rows; rows of a group score alike
    values = np.repeat(rng.uniform(0, 0.6, 30), 4) + rng.normal(0, 0.01, 120)
    lo, hi = metric.bootstrap_interval(values, groups)
    row_lo, row_hi = metric.bootstrap_interval(values)
    assert lo < values.mean() < hi
    assert hi - lo > 1.5 * (row_hi - row_lo)  # treating alike rows as independent would overstate the precision
    assert metric.bootstrap_interval(values, groups) == (lo, hi)  # seeded
    assert metric.bootstrap_interval([0.2, 0.4], ["g", "g"]) == pytest.approx((0.3, 0.3))
    assert all(np.isnan(metric.bootstrap_interval([])))


def test_report_row_has_split_and_interval(scorer):
    truths = ["Rewrite as a poem.", "rewrite as a poem", "Make it formal.", "Summarize it."]
    row = scorer.report("sys", ["A poem.", "A poem please.", "Formal.", "A summary."], truths, split="report")
    assert list(row) == metric.SCORE_COLUMNS and row["split"] == "report" and row["rows"] == 4
    assert row["scs_lo"] <= row["scs"] <= row["scs_hi"] and row["scs_lo"] < row["scs_hi"]
