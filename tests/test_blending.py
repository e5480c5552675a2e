"""Blending: the final string's order (models in plan order, each model's predictions in order, then the mean
prompt), the separator, the fallback, the component systems the scores table compares, and blend.json (read, write,
files from before a key existed). Run: `pytest tests/test_blending.py`.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from kaggle_utils import blending

MEAN = "Please improve this text."


@pytest.mark.parametrize("preds,mean,sep,fallback,expected", [
    ([["A1", "A2"], ["B1"]], MEAN, " ", "F", f"A1 A2 B1 {MEAN}"),
    ([["A1", "A2"], ["B1"]], "", " ", "F", "A1 A2 B1"),
    ([["A1"], ["B1"]], MEAN, " | ", "F", f"A1 | B1 | {MEAN}"),
    ([[], []], MEAN, " ", "Improve this text.", f"Improve this text. {MEAN}"),  # no model finished the row
    ([["  ", ""], ["B1 "]], MEAN, " ", "F", f"B1 {MEAN}"),  # blanks never make it in
    ([], "", " ", "F", "F"),
])
def test_blend_row(preds, mean, sep, fallback, expected):
    assert blending.blend_row(preds, mean, sep, fallback) == expected


def test_blend_keeps_plan_order_not_dict_order():
    predictions = {"second": {"x": ["S1", "S2"]}, "first": {"x": ["F1", "F2"], "y": ["F3"]}}
    out = blending.blend(["x", "y"], predictions, ["first", "second"], MEAN, " ", "fallback")
    assert out == [f"F1 F2 S1 S2 {MEAN}", f"F3 {MEAN}"]
    assert blending.blend(["x"], predictions, ["second", "first"], per_model=1) == ["S1 F1"]


def test_default_mean_prompt_is_the_public_one():
    assert blending.DEFAULT_MEAN_PROMPT == ("Please improve this text using the writing style with maintaining the "
                                            "original meaning but altering the tone.")


def test_component_systems_build_up_in_order():
    ids = ["a", "b"]
    predictions = {"m": {"a": ["p1", "p2", "p3"], "b": ["q1", "q2", "q3"]}}
    base = {"smol base, zero-shot, 1 prediction": {"a": ["z"], "b": ["y"]}}
    systems = blending.component_systems(ids, predictions, [("m", 3)], MEAN, " ", "F", baselines=base,
                                         labels={"m": "m fine-tuned"})
    assert list(systems) == ["smol base, zero-shot, 1 prediction", "m fine-tuned, 1 prediction",
                             "m fine-tuned, 3 predictions", "m fine-tuned, 3 predictions + mean prompt (submission)",
                             "mean prompt alone", "public mean prompt alone (0.63 on the leaderboard)"]
    assert systems["m fine-tuned, 1 prediction"] == ["p1", "q1"]
    assert systems["m fine-tuned, 3 predictions"] == ["p1 p2 p3", "q1 q2 q3"]
    assert systems["m fine-tuned, 3 predictions + mean prompt (submission)"] == [f"p1 p2 p3 {MEAN}", f"q1 q2 q3 {MEAN}"]
    assert systems["smol base, zero-shot, 1 prediction"] == ["z", "y"]


def test_component_systems_of_several_models():
    predictions = {"a": {"x": ["a1", "a2"]}, "b": {"x": ["b1"]}}
    systems = blending.component_systems(["x"], predictions, [("a", 2), ("b", 1)], MEAN)
    assert systems["all 2 models, 3 predictions"] == ["a1 a2 b1"]
    assert systems["all 2 models, 3 predictions + mean prompt (submission)"] == [f"a1 a2 b1 {MEAN}"]
    assert "b, 1 prediction" in systems and "b, 1 predictions" not in systems
    no_mean = blending.component_systems(["x"], predictions, [("a", 2), ("b", 1)], "")
    assert [s for s in no_mean if "mean prompt" in s] == ["public mean prompt alone (0.63 on the leaderboard)"]
    assert "all 2 models, 3 predictions (submission)" in no_mean


def test_another_mean_prompt_is_compared_with_the_public_one():
    systems = blending.component_systems(["x"], {"a": {"x": ["a1"]}}, [("a", 1)], "Rewrite it.")
    assert systems["mean prompt alone"] == ["Rewrite it."]
    assert systems["public mean prompt alone (0.63 on the leaderboard)"] == [blending.DEFAULT_MEAN_PROMPT]
    alone = blending.component_systems(["x"], {}, [], "Rewrite it.")
    assert list(alone) == ["mean prompt alone (submission)", "public mean prompt alone (0.63 on the leaderboard)"]


def test_write_scores_replaces_a_scorers_split_whole_report_first(tmp_path):
    path = tmp_path / "scores.csv"
    row = dict(scorer="s", rows=4, scs_lo=0.0, scs_hi=0.5, cos=0.5)
    blending.write_scores(path, [{**row, "system": "blend", "split": "choice", "scs": 0.2},
                                 {**row, "system": "other", "split": "choice", "scs": 0.1}])
    table = blending.write_scores(path, [{**row, "system": "blend", "split": "report", "scs": 0.3}])
    assert list(zip(table["system"], table["split"], table["scs"])) == [
        ("blend", "report", 0.3), ("blend", "choice", 0.2), ("other", "choice", 0.1)]  # report rows first
    # a rerun of the stage that writes the choice rows replaces them all, renamed systems included
    table = blending.write_scores(path, [{**row, "system": "blend (submission)", "split": "choice", "scs": 0.25}])
    assert list(zip(table["system"], table["split"])) == [("blend", "report"), ("blend (submission)", "choice")]
    assert pd.read_csv(path)["system"].tolist() == ["blend", "blend (submission)"]
    other_scorer = blending.write_scores(path, [{**row, "scorer": "t5", "system": "x", "split": "choice", "scs": 0.5}])
    assert len(other_scorer) == 3  # another scorer's rows live beside them
    pd.DataFrame([{"system": "old", "scorer": "s", "rows": 1, "scs": 0.1, "cos": 0.1}]).to_csv(path, index=False)
    table = blending.write_scores(path, [{**row, "system": "new", "split": "report", "scs": 0.3}])
    assert table["system"].tolist() == ["new"]  # an older layout is replaced, not mixed


class FakeScorer:
    name = "fake scorer"

    def report(self, system, predictions, truths, split=""):
        hits = sum(t in p for p, t in zip(predictions, truths))
        return {"system": system, "scorer": self.name, "split": split, "rows": len(truths),
                "scs": hits / len(truths), "scs_lo": 0.0, "scs_hi": 1.0, "cos": 0.0}


def test_score_systems_table_columns():
    table = blending.score_systems(FakeScorer(), {"one": ["a b", "c"], "two": ["x", "y"]}, ["a", "c"], split="report")
    assert list(table.columns) == ["system", "scorer", "split", "rows", "scs", "scs_lo", "scs_hi", "cos"]
    assert (table["split"] == "report").all()
    assert table.set_index("system")["scs"].to_dict() == {"one": 1.0, "two": 0.0}
    assert isinstance(table, pd.DataFrame)


class WordRecallScorer:
    """Scores a row by the share of its truth's words found among the joined string's words: every word that the
    mean prompt or a later prediction adds can move the score, unlike :class:`FakeScorer`'s one-substring hit."""

    name = "word recall"

    def report(self, system, predictions, truths, split=""):
        scs = [len(set(t.split()) & set(p.split())) / len(set(t.split())) for p, t in zip(predictions, truths)]
        return {"system": system, "scorer": self.name, "split": split, "rows": len(truths),
                "scs": sum(scs) / len(scs), "scs_lo": min(scs), "scs_hi": max(scs), "cos": 0.0}


def test_n_curve_joins_the_first_n_of_each_model_with_and_without_the_mean_prompt(tmp_path):
    """Each truth has three words: one that model a's first prediction holds, one that model b's second holds, and
    the mean prompt. So the mean prompt adds a third at every n, model b counts only from n=2, and the joined curve
    reaches 1.0 only when both models' first two predictions and the mean prompt are in."""
    per_row = {"a": [["x0", "q", "r"], ["x1", "q", "r"]], "b": [["q", "y0"], ["q", "y1"]]}
    truths = ["x0 y0 m", "x1 y1 m"]
    table = blending.n_curve(WordRecallScorer(), per_row, truths, mean_prompt="m", labels={"a": "model a"},
                             split="report")
    assert list(table.columns) == ["system", "n", "mean_prompt", "scs", "scs_lo", "scs_hi", "rows", "scorer", "split"]
    got = {(r.system, r.n, r.mean_prompt): r.scs for r in table.itertuples()}
    third = pytest.approx(1 / 3)
    two_thirds = pytest.approx(2 / 3)
    assert got == {
        # model a: its first prediction's word from n=1 on; q and r add nothing
        ("model a", 1, False): third, ("model a", 1, True): two_thirds,
        ("model a", 2, False): third, ("model a", 2, True): two_thirds,
        ("model a", 3, False): third, ("model a", 3, True): two_thirds,
        # model b: nothing at n=1 but the mean prompt; its second prediction's word at n=2
        ("b", 1, False): 0.0, ("b", 1, True): third,
        ("b", 2, False): third, ("b", 2, True): two_thirds,
        # both: a's first k and b's first k; b's word joins at n=2
        ("all 2 models", 1, False): third, ("all 2 models", 1, True): two_thirds,
        ("all 2 models", 2, False): two_thirds, ("all 2 models", 2, True): 1.0,
        ("all 2 models", 3, False): two_thirds, ("all 2 models", 3, True): 1.0,
    }
    assert (table["split"] == "report").all() and (table["rows"] == 2).all()
    assert (table["scorer"] == "word recall").all()
    plot = blending.plot_n_curve(table, tmp_path / "n_curve.png")
    assert plot.stat().st_size > 5000
    # no mean prompt given: one curve per system, the same scores as the rows above without it
    plain = blending.n_curve(WordRecallScorer(), per_row, truths, labels={"a": "model a"})
    assert not plain["mean_prompt"].any()
    assert {(r.system, r.n): r.scs for r in plain.itertuples()} == {(s, n): v for (s, n, m), v in got.items() if not m}


# ---------------------------------------------------------------- blend.json

# blend.json as the mean-prompt stage wrote it before best_by_mean and rule existed (every other key as now)
OLD_BLEND = {"models": [{"model": "smollm", "n": 2}], "mean_prompt_kind": "public",
             "mean_prompt": "Please improve this text using the writing style.",
             "label": "smollm x2 | mean prompt: public",
             "scs": 0.41, "cos": 0.74, "scs_all_rows": 0.4, "separator": " ", "scorer": "all-MiniLM-L6-v2 (stand-in)",
             "rows": 30, "rows_total": 65, "chosen_from": 12, "table": "blend_options.csv",
             "mean_prompt_objective": "alone", "best_with_optimized_mean_prompt": None, "seconds": 1.5}


def test_an_old_blend_file_reads_and_writes_back_unchanged(tmp_path):
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(OLD_BLEND, indent=2) + "\n")
    blend = blending.Blend.read(path)
    assert (blend.models, blend.mean_prompt, blend.separator) == (OLD_BLEND["models"], OLD_BLEND["mean_prompt"], " ")
    assert (blend.best_by_mean, blend.rule, blend.scs) == ("", "", 0.41)  # the keys it lacks take their defaults
    assert blending.Blend.read(tmp_path) == blend  # the folder that holds it reads the same
    again = blend.write(tmp_path / "again.json")
    assert json.loads(again.read_text()) == {**OLD_BLEND, "best_by_mean": "", "rule": ""}


def test_a_blend_file_with_keys_this_version_lacks_keeps_them(tmp_path):
    path = tmp_path / "blend.json"
    path.write_text(json.dumps({"models": [], "mean_prompt": "x", "separator": " ", "note": "by hand"}))
    blend = blending.Blend.read(path)
    assert blend.extra == {"note": "by hand"}
    assert json.loads(blend.write(tmp_path / "out.json").read_text())["note"] == "by hand"


@pytest.mark.parametrize("content, message", [
    (None, r"^blend file '.*missing\.json' does not exist"),
    ("not json", r"^.*blend\.json: not readable as JSON"),
    ([1, 2], r"^.*blend\.json: expected a JSON object, got list"),
    ({"models": [], "separator": " "}, r"^.*blend\.json: missing key 'mean_prompt'$"),
    ({"models": {"a": 1}, "mean_prompt": "", "separator": " "}, r"^.*blend\.json: models must be a list"),
    ({"models": [{"model": "a", "n": 0}], "mean_prompt": "", "separator": " "}, r"^.*blend\.json: models\[0\] must be"),
])
def test_a_bad_blend_file_is_an_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "blend.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(blending.BlendError, match=message):
        blending.Blend.read(path if content is not None else tmp_path / "missing.json")


def test_a_blend_reorders_the_plan_sets_n_and_drops_unused_models():
    plan = [{"name": "a", "preset": "p", "n": 4}, {"name": "b", "preset": "p", "n": 1}, {"name": "c", "n": 2}]
    chosen = blending.Blend(models=[{"model": "b", "n": 2}, {"model": "a", "n": 1}], mean_prompt="essay message",
                            separator=" ")
    settings = chosen.plan_for(plan)
    assert settings["models"] == [{"name": "b", "preset": "p", "n": 2}, {"name": "a", "preset": "p", "n": 1}]
    assert settings["use_mean_prompt"] and settings["mean_prompt"] == "essay message"
    alone = blending.Blend(models=[], mean_prompt="essay", separator=" ").plan_for(plan)
    assert alone["models"] == [] and alone["use_mean_prompt"]
    no_mean = blending.Blend(models=[{"model": "a", "n": 4}], mean_prompt="", separator=" ").plan_for(plan)
    assert not no_mean["use_mean_prompt"]
    with pytest.raises(blending.BlendError, match=r"^the blend names model\(s\) \['z'\]"):
        blending.Blend(models=[{"model": "z", "n": 1}], mean_prompt="", separator=" ").plan_for(plan)
