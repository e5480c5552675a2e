"""The mean-prompt search and the blend choice: a toy bag-of-words embedder for the logic (fast), the real MiniLM
scorer for the cache and a small real search (slow).

Run: `pytest tests/test_mean_prompt.py` (fast only: add `-m "not slow"`).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from kaggle_utils import blend_choice as bc, blending, config, data, mean_prompt as mp, metric


class ToyScorer:
    """Bag-of-words embedder: each known word is one axis, plus a shared "other" axis so no vector is zero.

    It has no cache, so ``asked`` lists every string the library asked it to embed, and ``calls`` counts batches.
    """

    name = "toy bag-of-words"

    def __init__(self, words):
        self.axes = {w: i for i, w in enumerate(words)}
        self.asked: list[str] = []
        self.calls = 0

    def embed(self, texts, show_progress=False):
        texts = [str(t) for t in texts]
        self.calls += 1
        self.asked += texts
        out = np.zeros((len(texts), len(self.axes) + 1))
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, self.axes.get(word, len(self.axes))] += 1
            out[row, len(self.axes)] += 0.1
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def scs(self, predictions, truths):
        return metric.sharpened_cosine(self.embed(list(predictions)), self.embed(list(truths)))

    def cosine(self, predictions, truths):
        return metric.sharpened_cosine(self.embed(list(predictions)), self.embed(list(truths)), power=1)

    def report(self, system, predictions, truths, split=""):
        return {"system": system, "scorer": self.name, "split": split, "rows": len(list(truths)),
                "scs": float(self.scs(predictions, truths).mean()), "scs_lo": 0.0, "scs_hi": 1.0,
                "cos": float(self.cosine(predictions, truths).mean())}


WORDS = ["rewrite", "poem", "formal", "email", "story", "the", "as", "a"]
TARGETS = ["rewrite as a poem", "rewrite the email", "rewrite formal", "rewrite story as poem"]


# ---------------------------------------------------------------- config and bad input


@pytest.mark.parametrize("field, value, needle", [
    ("vocab_size", 0, "vocab_size"),
    ("max_length", 0, "max_length"),
    ("method", "sampling", "method"),
    ("objective", "best", "objective"),
    ("vocabulary", "letters", "vocabulary"),
    ("shortlist", 1, "shortlist"),
    ("search_fraction", 0.0, "search_fraction"),
    ("n_choices", [-1], "n_choices"),
])
def test_config_rejects_bad_values(field, value, needle):
    kwargs = {field: value}
    if field == "shortlist":
        kwargs["method"], kwargs["beam_width"] = "beam", 4
    with pytest.raises(config.ConfigError, match=needle):
        mp.MeanPromptConfig(**kwargs)


def test_config_takes_comma_separated_lists():
    cfg = mp.MeanPromptConfig(models="a, b", n_choices="2,1,1")
    assert cfg.models == ["a", "b"] and cfg.n_choices == [1, 2]


def test_empty_target_set_is_an_error(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(mp.MeanPromptError, match="target set is empty"):
        mp.target_prompts([str(empty)], [])
    # every target is a validation prompt: nothing is left to aim at
    with pytest.raises(mp.MeanPromptError, match="target set is empty"):
        mp.target_prompts([], ["Rewrite as a poem."], exclude=["rewrite as a poem"])
    with pytest.raises(mp.MeanPromptError, match="target set is empty"):
        mp.AloneObjective(ToyScorer(WORDS), [])


def test_vocabulary_of_size_zero_is_an_error():
    with pytest.raises(mp.MeanPromptError, match="size 0"):
        mp.search(lambda c: np.zeros(len(c)), [], max_length=3)
    with pytest.raises(mp.MeanPromptError, match="size"):
        mp.word_vocabulary(TARGETS, 0)
    with pytest.raises(mp.MeanPromptError, match="vocabulary is empty"):
        mp.word_vocabulary(["123 456"], 10)


def test_max_length_below_one_is_an_error():
    with pytest.raises(mp.MeanPromptError, match="max_length"):
        mp.search(lambda c: np.zeros(len(c)), ["a"], max_length=0)


def test_validation_without_rewrite_prompt_is_an_error(tmp_path):
    path = tmp_path / "val.csv"
    pd.DataFrame({"id": ["1"], "original_text": ["x"], "rewritten_text": ["y"]}).to_csv(path, index=False)
    with pytest.raises(data.DataError, match="rewrite_prompt"):
        mp.read_validation(path)
    cfg = mp.MeanPromptConfig(run_name="r", runs_dir=str(tmp_path / "runs"), validation_file=str(path),
                              train_files=[str(path)])
    with pytest.raises(data.DataError, match="rewrite_prompt"):
        mp.prepare(cfg, ToyScorer(WORDS))


# ---------------------------------------------------------------- inputs


def test_targets_drop_validation_prompts_and_duplicates(tmp_path):
    selected = tmp_path / "selected.json"
    selected.write_text(json.dumps(["Rewrite as a poem.", "rewrite as a poem", "Make it formal"]))
    targets = mp.target_prompts([str(selected)], ["Make it formal!", "Write an email"], exclude=["Write an email."])
    assert targets == ["Rewrite as a poem.", "Make it formal"]
    drawn = mp.target_prompts([str(selected)], ["a b", "c d", "e f"], max_targets=2, seed=1)
    assert len(drawn) == 2 and drawn == mp.target_prompts([str(selected)], ["a b", "c d", "e f"], max_targets=2, seed=1)


def test_word_vocabulary_ranks_by_prompts_containing_the_word():
    vocab = mp.word_vocabulary(["Rewrite this poem.", "rewrite the email", "Rewrite it"], 3)
    assert vocab[0] == "Rewrite"  # in all three prompts, most common spelling
    assert len(vocab) == 3 and "." in mp.word_vocabulary(["Rewrite this poem."], 10)


class _Tokenizer:
    def __init__(self, vocab):
        self.vocab = vocab
        self.all_special_tokens = ["[CLS]", "</s>"]

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.vocab)}


@pytest.mark.parametrize("vocab, expected", [
    (["[CLS]", "rewrite", "##ing", "poem", ".", "123", "email"], {"rewrite", "poem", ".", "email"}),
    (["</s>", "\u2581rewrite", "ing", "\u2581poem", ".", "\u2581email"], {"rewrite", "poem", ".", "email"}),
], ids=["wordpiece", "sentencepiece"])
def test_tokenizer_vocabulary_keeps_whole_words_ranked_by_score(vocab, expected):
    scorer = ToyScorer(WORDS)
    scorer.model = type("Model", (), {"tokenizer": _Tokenizer(vocab)})()
    words = mp.tokenizer_vocabulary(scorer, TARGETS, size=10)
    assert set(words) == expected and words[0] == "rewrite"
    assert mp.tokenizer_vocabulary(scorer, TARGETS, size=2) == words[:2]
    with pytest.raises(mp.MeanPromptError, match="no tokenizer"):
        mp.tokenizer_vocabulary(ToyScorer(WORDS), TARGETS, size=10)


def test_prompt_sets_from_json_and_csv(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["Rewrite it.", " "]))
    pd.DataFrame({"rewrite_prompt": ["Make it a poem", ""]}).to_csv(tmp_path / "p.csv", index=False)
    assert mp.read_prompt_set(tmp_path / "p.json") == ["Rewrite it."]
    assert mp.read_prompt_set(tmp_path / "p.csv") == ["Make it a poem"]
    pd.DataFrame({"prompt": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(mp.MeanPromptError, match="rewrite_prompt"):
        mp.read_prompt_set(tmp_path / "bad.csv")
    with pytest.raises(mp.MeanPromptError, match="does not exist"):
        mp.read_prompt_set(tmp_path / "missing.json")


def test_extend_attaches_punctuation():
    assert mp.extend("", "Rewrite") == "Rewrite"
    assert mp.extend("Rewrite", "it") == "Rewrite it"
    assert mp.extend("Rewrite it", ".") == "Rewrite it."


# ---------------------------------------------------------------- the search


def test_greedy_finds_the_known_best_token():
    scorer = ToyScorer(WORDS)
    # "rewrite" is in every target, so it is the best first word of any length-1 string
    result = mp.search(mp.AloneObjective(scorer, TARGETS), ["poem", "email", "rewrite", "story"], max_length=1,
                       progress=False)
    assert result.string == "rewrite"
    single = mp.AloneObjective(scorer, TARGETS)(["poem", "email", "rewrite", "story"])
    assert result.score == pytest.approx(single.max())


def test_search_improves_and_stops_without_gain():
    scorer = ToyScorer(WORDS)
    result = mp.search(mp.AloneObjective(scorer, TARGETS), WORDS, max_length=10, patience=1, progress=False)
    scores = [h["score"] for h in result.history]
    assert result.string.split()[0] == "rewrite" and len(scores) < 10  # stopped early
    assert result.score == pytest.approx(max(scores), abs=1e-6)
    assert all(b >= a for a, b in zip(scores, scores[1:-1]))  # greedy gains until the last (stale) step


def test_beam_is_at_least_as_good_as_greedy_and_seeded():
    scorer = ToyScorer(WORDS)
    objective = mp.AloneObjective(scorer, TARGETS)
    greedy = mp.search(objective, WORDS, max_length=4, progress=False)
    beam = mp.search(objective, WORDS, max_length=4, width=4, progress=False)
    assert beam.score >= greedy.score - 1e-9
    again = mp.search(objective, WORDS, max_length=4, width=4, seed=0, progress=False)
    assert again.string == beam.string


def test_each_step_embeds_one_batch_and_no_string_twice():
    scorer = ToyScorer(WORDS)
    objective = mp.AloneObjective(scorer, TARGETS)
    calls_before, seen_before = scorer.calls, len(scorer.asked)
    result = mp.search(objective, WORDS, max_length=4, width=3, patience=4, progress=False)
    assert scorer.calls - calls_before == len(result.history)  # one batch per step
    asked = scorer.asked[seen_before:]
    assert len(asked) == len(set(asked))  # no candidate asked for twice
    assert sum(h["candidates"] for h in result.history) == len(asked)


def test_pruning_shrinks_later_steps_and_keeps_the_best_word():
    scorer = ToyScorer(WORDS)
    objective = mp.AloneObjective(scorer, TARGETS)
    full = mp.search(objective, WORDS, max_length=4, patience=4, progress=False)
    pruned = mp.search(objective, WORDS, max_length=4, patience=4, keep=0.5, min_words=2, progress=False)
    counts = [h["candidates"] for h in pruned.history]
    assert counts[0] == len(WORDS) and counts[1] <= len(WORDS) // 2 and counts[-1] <= 2
    assert pruned.history[0]["string"] == full.history[0]["string"] == "rewrite"
    with pytest.raises(mp.MeanPromptError, match="keep"):
        mp.search(objective, WORDS, max_length=2, keep=0)


def test_start_string_is_extended():
    scorer = ToyScorer(WORDS)
    result = mp.search(mp.AloneObjective(scorer, TARGETS), WORDS, max_length=2, start="rewrite", progress=False)
    assert result.string.startswith("rewrite")


def test_blend_objective_scores_prediction_plus_mean_prompt():
    scorer = ToyScorer(WORDS)
    predictions = [[["rewrite as a poem"]], [["rewrite the email"]]]  # row -> model -> predictions
    truths = ["rewrite as a poem formal", "rewrite the email formal"]
    objective = mp.BlendObjective(scorer, predictions, truths, shortlist=8)
    # both predictions lack "formal": it is the word to append
    result = mp.search(objective, WORDS, max_length=1, progress=False)
    assert result.string == "formal"
    exact = scorer.scs(["rewrite as a poem formal", "rewrite the email formal"], truths).mean()
    assert result.score == pytest.approx(exact)


def _toy_inputs(predictions=None):
    truths = ["rewrite as a poem", "rewrite the email formal", "story as a poem", "rewrite formal", "a poem"]
    validation = pd.DataFrame({"id": [f"r{i}" for i in range(5)], "original_text": "x", "rewritten_text": "y",
                               "rewrite_prompt": truths})
    return mp.Inputs(validation=validation, truths=truths, train_prompts=list(TARGETS), targets=list(TARGETS),
                     vocabulary=list(WORDS), predictions=predictions or {})


def test_auto_objective_follows_the_predictions(tmp_path):
    cfg = mp.MeanPromptConfig(run_name="r", runs_dir=str(tmp_path), objective="auto")
    assert mp.resolved_objective(cfg, _toy_inputs()) == "alone"
    assert mp.resolved_objective(cfg, _toy_inputs({"m": [["poem"]] * 5})) == "blend"
    with pytest.raises(mp.MeanPromptError, match="needs prediction files"):
        mp.resolved_objective(mp.MeanPromptConfig(run_name="r", runs_dir=str(tmp_path), objective="blend"),
                              _toy_inputs())


def test_blend_search_keeps_unseen_rows_for_the_choice(tmp_path):
    inputs = _toy_inputs({"m": [["rewrite poem"], ["the email"], ["story"], ["rewrite"], ["poem"]]})
    cfg = mp.MeanPromptConfig(run_name="r", runs_dir=str(tmp_path), objective="blend", max_length=2, shortlist=4,
                              n_choices=[0, 1])
    cfg.run_dir.mkdir(parents=True)
    searched = mp.run_search(cfg, ToyScorer(WORDS), inputs, progress=False)
    saved = json.loads((cfg.run_dir / mp.RESULT_FILE).read_text())
    assert saved["objective"] == "blend" and saved["choice_rows"] and saved["string"] == searched["string"]
    assert len(saved["choice_rows"]) < 5
    table, choice = mp.run_blend_choice(cfg, ToyScorer(WORDS), inputs, searched, progress=False)
    assert choice["rows"] == len(saved["choice_rows"]) and choice["rows_total"] == 5


# ---------------------------------------------------------------- the blend choice


def test_blend_options_cover_counts_orders_and_mean_prompts():
    options = bc.blend_options({"a": 2, "b": 1}, [0, 1, 2], bc.MEAN_PROMPT_KINDS)
    plans = {o.plan for o in options}
    assert (("a", 2), ("b", 1)) in plans and (("b", 1), ("a", 2)) in plans  # both orders
    assert (("a", 1),) in plans and () in plans
    assert all(n <= {"a": 2, "b": 1}[m] for o in options for m, n in o.plan)  # never more than available
    assert bc.BlendOption((), "none") not in options  # a blank string is never an option
    with pytest.raises(blending.BlendError, match="max_options"):
        bc.blend_options({"a": 4, "b": 4, "c": 4}, [0, 1, 2, 4], bc.MEAN_PROMPT_KINDS, max_options=50)


def test_blend_choice_picks_the_best_option_and_saves_it(tmp_path):
    scorer = ToyScorer(WORDS + ["please", "improve", "text"])
    truths = ["rewrite as a poem", "rewrite the email formal", "story as a poem"]
    validation = pd.DataFrame({"id": ["r0", "r1", "r2"], "original_text": "x", "rewritten_text": "y",
                               "rewrite_prompt": truths})
    inputs = mp.Inputs(validation=validation, truths=truths, train_prompts=[], targets=TARGETS, vocabulary=WORDS,
                       predictions={"good": [["rewrite as a poem", "poem"], ["rewrite the email", "email"],
                                             ["story as a poem", "story"]],
                                    "bad": [["please improve"], ["text"], ["improve"]]})
    cfg = mp.MeanPromptConfig(run_name="r", runs_dir=str(tmp_path), n_choices=[0, 1, 2])
    cfg.run_dir.mkdir(parents=True)
    table, choice = mp.run_blend_choice(cfg, scorer, inputs, {"string": "rewrite formal", "choice_rows": [1, 2]},
                                        progress=False)
    assert choice["best_by_mean"] == table["option"].iloc[0] and "one standard error" in choice["rule"]
    assert choice["models"][0] == {"model": "good", "n": 1}
    assert not any(m["model"] == "bad" for m in choice["models"])
    # one prediction of "good" alone beats every blend here, the mean prompts included (table order, best first)
    assert choice["label"] == table["option"].iloc[0] == "good x1 | mean prompt: none"
    saved = blending.Blend.read(cfg.run_dir)
    assert saved.to_dict() == choice  # the file holds what the stage returned, key for key
    assert (saved.mean_prompt_kind, saved.mean_prompt, saved.scorer) == ("none", "", scorer.name)
    assert (cfg.run_dir / bc.OPTIONS_FILE).exists() and (cfg.run_dir / bc.OPTIONS_PLOT).exists()
    assert (table["rows"] == 2).all() and table["scorer"].eq(scorer.name).all()  # chosen on rows 1-2 only
    assert choice["best_with_optimized_mean_prompt"]["mean_prompt"] == "rewrite formal"
    rows = mp.score_rows(scorer, inputs, {"string": "rewrite formal"}, choice)
    assert [r["system"] for r in rows] == [blending.PUBLIC_MEAN_PROMPT_SYSTEM, "mean prompt alone (optimized)",
                                           "predictions + optimized mean prompt", "blend chosen on validation"]
    assert rows[-1]["scs"] == pytest.approx(choice["scs_all_rows"], abs=1e-4)


def test_predictions_are_aligned_to_validation_ids(tmp_path):
    folder = tmp_path / "predictions"
    folder.mkdir()
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "b", "predictions": ["pb"]}, {"id": "a", "predictions": ["pa1", "pa2"]}]) + "\n")
    per_model, covered = bc.align_predictions([folder / "m.jsonl"], ["a", "b", "c"])
    assert per_model["m"] == [["pa1", "pa2"], ["pb"], []] and covered == [0, 1]


def test_search_split_keeps_prompt_groups_whole():
    validation = pd.DataFrame({"rewrite_prompt": ["A", "a.", "B", "C", "C", "D"]})
    searched, unseen = mp.search_split(validation, 0.5, seed=0)
    keys = validation["rewrite_prompt"].map(data.normalize_prompt)
    assert set(keys[searched]).isdisjoint(set(keys[unseen])) and sorted(searched + unseen) == list(range(6))


# ---------------------------------------------------------------- the real scorer (slow)


@pytest.fixture(scope="module")
def minilm():
    return metric.Scorer("")


@pytest.mark.slow
def test_real_scorer_embeds_each_string_once_across_search_and_blend(minilm, tmp_path):
    encoded: list[str] = []
    calls = []
    original = minilm.model.encode

    def spy(texts, *args, **kwargs):
        encoded.extend(texts)
        calls.append(len(texts))
        return original(texts, *args, **kwargs)

    minilm.model.encode = spy
    try:
        objective = mp.AloneObjective(minilm, ["Rewrite this text as a formal letter.", "Make it a poem."])
        before = len(calls)
        result = mp.search(objective, ["letter", "poem", "formal", "rewrite", "text", "."], max_length=3, patience=3,
                           progress=False)
        assert len(calls) - before == len(result.history)  # one encode call per step
        again = mp.AloneObjective(minilm, ["Rewrite this text as a formal letter."])
        again([result.string, "letter"])  # all already embedded: no new encode call
        assert len(calls) - before == len(result.history)
        truths = ["Rewrite this text as a formal letter.", "Make it a poem."]
        options = bc.blend_options({"m": 2}, [0, 1, 2], bc.MEAN_PROMPT_KINDS)
        table = bc.score_blends(minilm, options, {"m": [["a letter", "formal"], ["a poem", "rhymes"]]}, truths,
                                {"public": mp.PUBLIC_MEAN_PROMPT, "optimized": result.string}, progress=False)
        assert len(table) == len(options) and len(calls) - before == len(result.history) + 1  # one batch for all
    finally:
        minilm.model.encode = original
    assert len(encoded) == len(set(encoded))


@pytest.mark.slow
def test_real_search_beats_the_public_mean_prompt_on_its_targets(minilm):
    """On the fixture's made-up prompts: the search's string scores above the public mean prompt on the prompts it
    searched against (held-out prompts of the real data: tests/test_real_data.py)."""
    from conftest import EXTRA_CSV, GEMMA_CSV

    gemma = mp.read_validation(GEMMA_CSV)
    _, validation = data.split_by_prompt(gemma, 24, seed=0, max_per_group=2)
    held_out = validation["rewrite_prompt"].tolist()
    train = mp.training_prompts([EXTRA_CSV, GEMMA_CSV], exclude=held_out)
    targets = mp.target_prompts([], train, exclude=held_out, max_targets=400, seed=0)
    assert not {data.normalize_prompt(p) for p in targets} & {data.normalize_prompt(p) for p in held_out}
    result = mp.search(mp.AloneObjective(minilm, targets), mp.word_vocabulary(train, 150), max_length=16,
                       progress=False)
    optimized = minilm.scs([result.string] * len(targets), targets).mean()
    public = minilm.scs([mp.PUBLIC_MEAN_PROMPT] * len(targets), targets).mean()
    assert optimized > public, (result.string, optimized, public)


def test_report_prompts_are_never_targets_or_words(tmp_path):
    """The run's report rows score the result, so their prompts stay out of the search like validation prompts."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    rows = lambda prompts_: pd.DataFrame({"id": [f"i{k}" for k in range(len(prompts_))],  # noqa: E731
                                          "original_text": "x", "rewritten_text": "y", "rewrite_prompt": prompts_})
    rows(["Rewrite as a poem."]).to_csv(run / "validation.csv", index=False)
    rows(["Turn it into a zebra limerick."]).to_csv(run / "report.csv", index=False)
    train = tmp_path / "train.csv"
    rows(["Turn it into a zebra limerick.", "Make it formal.", "Rewrite as a poem."]).to_csv(train, index=False)
    cfg = mp.MeanPromptConfig(run_name="r", runs_dir=str(tmp_path / "runs"), train_files=[str(train)],
                              target_files=[str(train)])
    inputs = mp.prepare(cfg, ToyScorer(WORDS))
    assert inputs.targets == ["Make it formal."] and inputs.train_prompts == ["Make it formal."]
    assert "zebra" not in inputs.vocabulary and "limerick" not in inputs.vocabulary


def _option_table(rows_by_label: dict) -> pd.DataFrame:
    """A scored blend table as score_blends makes it, from per-row SCS of options named like "m x2 | none"."""
    records = []
    for label, per_row in rows_by_label.items():
        plan, kind = label.split(" | ")
        model, n = plan.split(" x")
        option = bc.BlendOption(((model, int(n)),) if int(n) else (), kind)
        records.append({"option": option.label, "predictions": int(n), "mean_prompt": kind,
                        "scs": float(np.mean(per_row)), "_option": option, "_rows_scs": np.asarray(per_row)})
    return pd.DataFrame(records).sort_values("scs", ascending=False).reset_index(drop=True)


def test_blend_choice_takes_fewer_predictions_unless_more_measurably_help():
    rng = np.random.default_rng(0)
    x1 = rng.uniform(0, 0.4, 65)
    wobble = np.resize([0.06, -0.05], 65)  # x2 ahead by 0.006 on average, give or take 0.055 a row
    noisy = _option_table({"m x1 | none": x1, "m x2 | none": x1 + wobble,
                           "m x0 | public": np.full(65, 0.1)})
    assert noisy.iloc[0]["option"] == "m x2 | mean prompt: none"  # the best mean, by noise
    assert bc.choose_blend(noisy).plan == (("m", 1),)  # within one standard error: the fewer predictions
    clear = _option_table({"m x1 | none": x1, "m x2 | none": x1 + 0.05, "m x0 | public": np.full(65, 0.1)})
    assert bc.choose_blend(clear).plan == (("m", 2),)  # a real gain keeps the extra prediction
    mean_alone = _option_table({"m x1 | none": x1, "m x0 | public": x1 + 0.001})
    assert bc.choose_blend(mean_alone).plan == ()  # another shape is never swapped in by the rule
