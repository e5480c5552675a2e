"""The submission stage: the plan's validation, bad test CSVs, a complete and valid submission in every case (rows
past the deadline, failed models, empty or identical texts), scoring of the parts, and resume after a real SIGKILL
of `make infer`. Run: `pytest tests/test_inference.py` (fast part: `-m "not slow"`).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from kaggle_utils import adapters, budget, data, engines, inference, models, serving
from kaggle_utils import config as kconfig
from kaggle_utils.config import ConfigError
from kaggle_utils.plan import ModelEntry
from conftest import GEMMA_CSV

ROOT = Path(__file__).resolve().parents[1]


def model_entry(**kw):
    entry = {"name": "tiny", "preset": "mistral-7b", "base_model": "", "adapter": "", "use_merged": False,
             "n": 2, "temperature": 0.8, "top_p": 0.95, "forced_start": ""}
    entry.update(kw)
    return entry


def write_test_csv(path, rows, with_prompt=False, extra=False):
    df = pd.DataFrame(rows, columns=["id", "original_text", "rewritten_text", "rewrite_prompt"][:3 + with_prompt])
    if extra:
        df["source"] = "x"
    df.to_csv(path, index=False)
    return path


def small_test(tmp_path, n=6, with_prompt=False):
    gemma = data.read_rewrites(GEMMA_CSV).head(n)
    cols = ["id", "original_text", "rewritten_text"] + (["rewrite_prompt"] if with_prompt else [])
    return write_test_csv(tmp_path / "test.csv", gemma[cols].values.tolist(), with_prompt)


def make_cfg(tmp_path, test_file, models_=None, **kw):
    values = dict(test_file=str(test_file), submission_path=str(tmp_path / "submission.csv"),
                  run_dir=str(tmp_path / "run"), models=models_ or [model_entry()], engine="hf")
    values.update(kw)
    return inference.InferenceConfig(**values)


# ---------------------------------------------------------------- the plan


def test_defaults_are_the_demo_plan():
    cfg = inference.InferenceConfig()
    assert cfg.models == inference.DEFAULT_MODELS and cfg.deadline_hours == 8.75
    assert cfg.model_entries[0].label == "smollm fine-tuned"
    assert cfg.mean_prompt.startswith("Please improve this text")


@pytest.mark.parametrize("entry,message", [
    ({k: v for k, v in model_entry().items() if k != "preset"}, r"models\[0\]: missing key\(s\) \['preset'\]"),
    ({**model_entry(), "lora": "x"}, r"models\[0\]: unknown key\(s\) \['lora'\]"),
    (model_entry(preset="gpt-9"), r"models\[0\] \(tiny\): preset: unknown preset 'gpt-9'"),
    (model_entry(n=3, temperature=0), r"models\[0\] \(tiny\): n: n=3 with temperature 0"),
    (model_entry(name="a b/c"), r"models\[0\] \(a b/c\): name"),
    ("smollm", r"models\[0\]: must be a dict"),
])
def test_bad_model_entries_name_the_entry_and_key(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        inference.InferenceConfig(models=[entry])


def test_second_entry_is_named_and_names_are_unique():
    with pytest.raises(ConfigError, match=r"models\[1\]: missing key"):
        inference.InferenceConfig(models=[model_entry(), {"name": "x"}])


def test_dtype_is_one_of_the_engines_dtypes():
    assert inference.InferenceConfig(dtype="float16").dtype == "float16"
    with pytest.raises(ConfigError, match=r"^dtype: must be one of \('auto', 'float16', 'bfloat16'\), got 'fp8'"):
        inference.InferenceConfig(dtype="fp8")
    with pytest.raises(ConfigError, match=r"^gpu_memory_utilization: must be in \(0, 1\]"):
        inference.InferenceConfig(gpu_memory_utilization=1.2)


def test_engine_options_carry_the_config_to_the_engine(tmp_path, monkeypatch, tiny_model_dir):
    """dtype, vLLM's GPU share and seed from the config, and a context that holds the longest prompt plus the answer,
    reach load_engine as one EngineOptions."""
    seen = []

    def no_model(*args, options=None, **kwargs):
        seen.append(options)
        raise RuntimeError("no model in this test")

    monkeypatch.setattr(serving, "load_engine", no_model)
    cfg = make_cfg(tmp_path, small_test(tmp_path), [model_entry(base_model=str(tiny_model_dir("mistral")))],
                   dtype="float16", gpu_memory_utilization=0.8,
                   seed=5, max_prompt_tokens=300, max_new_tokens=20)
    inference.prepare_run(cfg)
    inference.sample_models(cfg, inference.read_test(cfg), budget.Deadline(start=time.time(), hours=1))
    assert seen == [engines.EngineOptions(dtype="float16", gpu_memory_utilization=0.8,
                                          max_model_len=300 + 20 + inference.CONTEXT_SLACK_TOKENS, seed=5)]
    assert inference.InferenceConfig().engine_options() == engines.EngineOptions()  # the defaults are the engines'


def test_the_vllm_context_holds_the_longest_prompt_and_answer_with_the_slack_to_spare(tiny_model_dir):
    """The prompt the engines build for a row far over the limit, forced start included, is cut to at most
    max_prompt_tokens; vLLM refuses a prompt of max_model_len tokens or more and stops an answer where the context
    ends, so max_model_len must exceed the longest prompt by max_new_tokens: it does, by CONTEXT_SLACK_TOKENS more."""
    from kaggle_utils import prompts

    assert inference.CONTEXT_SLACK_TOKENS > 0
    tokenizer = models.load_tokenizer(tiny_model_dir("mistral"))
    prompts.ensure_chat_template(tokenizer, models.get_preset("mistral-7b").family)
    cfg = inference.InferenceConfig(models=[model_entry(forced_start="Rewrite")], max_prompt_tokens=300,
                                    max_new_tokens=20)
    scfg = cfg.sampling_config(cfg.model_entries[0])
    long_text = " ".join(f"word{i}" for i in range(2000))
    ids, cut = engines.encode_rows(tokenizer, [long_text, "Short."], [long_text, "Brief."], scfg)
    longest = max(len(i) for i in ids)
    assert cut == [0] and scfg.max_prompt_tokens - 8 <= longest <= scfg.max_prompt_tokens == 300
    context = cfg.engine_options(scfg).max_model_len
    assert context - scfg.max_prompt_tokens - scfg.max_new_tokens == inference.CONTEXT_SLACK_TOKENS
    assert context - longest - scfg.max_new_tokens >= inference.CONTEXT_SLACK_TOKENS  # the answer fits, with spare


def test_optional_model_keys_take_defaults(tmp_path):
    """A hand-written entry needs only name and preset; an unknown key is still an error."""
    cfg = inference.InferenceConfig(models=[{"name": "m", "preset": "smollm2-135m", "top_p": 0.9}])
    spec = cfg.model_entries[0]
    assert (spec.n, spec.temperature, spec.top_p, spec.forced_start, spec.greedy_first) == (1, 0.0, 0.9, "", False)
    assert cfg.sampling_config(spec).max_prompt_tokens == inference.DEFAULT_PROMPT_TOKENS  # no adapter to read
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['top-p'\]"):
        inference.InferenceConfig(models=[{"name": "m", "preset": "smollm2-135m", "top-p": 0.9}])


def test_the_plan_and_the_notebook_share_one_model_entry_and_its_defaults():
    """The inference notebook's entries are plan.ModelEntry's, with the same defaults as a plan's."""
    cfg = inference.InferenceConfig(models=[{"name": "m", "preset": "smollm2-135m"}])
    assert cfg.model_entries == [ModelEntry(name="m", preset="smollm2-135m")]
    assert cfg.models == [ModelEntry(name="m", preset="smollm2-135m").to_dict()]
    assert (cfg.model_entries[0].temperature, cfg.model_entries[0].top_p) == (0.0, 1.0)


def test_older_entries_and_parameters_still_load_with_a_note(caplog):
    """adapter_path, base_model_path and merged_path (the notebook's old keys) read as adapter, base_model and
    use_merged; an old parameter name injected into the notebook (batch_size, scores_path) wins over the new name's
    default; each says what it is called now."""
    old = {"name": "m", "preset": "smollm2-135m", "base_model_path": "", "adapter_path": "runs/x/selected",
           "merged_path": "runs/x/selected/merged"}
    defaults = inference.InferenceConfig()  # the parameters cell: every field under its new name
    namespace = {**{f: getattr(defaults, f) for f in kconfig.config_fields(inference.InferenceConfig)},
                 "models": [old], "batch_size": 3, "scores_path": "elsewhere.csv"}
    with caplog.at_level("WARNING", logger="kaggle_utils"):
        cfg = kconfig.from_params(inference.InferenceConfig, namespace)
    assert cfg.model_entries == [ModelEntry(name="m", preset="smollm2-135m", adapter="runs/x/selected",
                                            use_merged=True)]
    assert (cfg.generation_batch_size, cfg.scores_file) == (3, "elsewhere.csv")
    for old_name, new_name in [("adapter_path", "adapter"), ("base_model_path", "base_model"),
                               ("merged_path", "use_merged"), ("batch_size", "generation_batch_size"),
                               ("scores_path", "scores_file")]:
        assert f"'{old_name}' is now called '{new_name}'" in caplog.text
    with pytest.raises(ConfigError, match=r"^models\[0\]: both 'adapter_path' and its new name 'adapter' are set"):
        inference.InferenceConfig(models=[{**old, "adapter": "runs/x/selected"}])


def test_prompt_length_follows_the_adapters_training(tmp_path):
    """max_prompt_tokens 0: each model is shown prompts cut as in its training (selection.json), or 1024."""
    adapter = tmp_path / "selected"
    adapter.mkdir()
    (adapter / "selection.json").write_text(json.dumps({"max_prompt_tokens": 192}))
    entry = {"name": "m", "preset": "smollm2-135m", "adapter": str(adapter)}
    cfg = inference.InferenceConfig(models=[entry])
    assert cfg.sampling_config(cfg.model_entries[0]).max_prompt_tokens == 192
    cfg = inference.InferenceConfig(models=[entry], max_prompt_tokens=300)
    assert cfg.sampling_config(cfg.model_entries[0]).max_prompt_tokens == 300
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        inference.InferenceConfig(models=[entry], max_prompt_tokens=10)
    with pytest.raises(ConfigError, match="unique"):
        inference.InferenceConfig(models=[model_entry(), model_entry()])


def test_a_selected_folder_written_before_the_selection_dataclass_still_drives_inference(tmp_path):
    """runs/<run>/selected/ of an older run: its selection.json gives the prompt limit and guards the preset."""
    from test_artifacts import OLD_SELECTION

    selected = tmp_path / "selected"
    selected.mkdir()
    (selected / "selection.json").write_text(json.dumps(OLD_SELECTION, indent=1) + "\n")
    (selected / "adapter_config.json").write_text("{}")
    (selected / "adapter_model.safetensors").write_bytes(b"weights")
    entry = {"name": "m", "preset": "smollm2-135m", "adapter": str(selected)}
    cfg = inference.InferenceConfig(models=[entry])
    assert cfg.sampling_config(cfg.model_entries[0]).max_prompt_tokens == OLD_SELECTION["max_prompt_tokens"] == 384
    assert adapters.selected_adapter(str(selected), "smollm2-135m") == str(selected)
    with pytest.raises(adapters.AdapterError, match=r"trained on preset 'smollm2-135m' \(selection\.json\), but the "
                                                   r"model entry uses preset 'mistral-7b'$"):
        adapters.selected_adapter(str(selected), "mistral-7b")


def test_prompt_length_of_an_adapter_whose_selection_predates_the_field(tmp_path, caplog):
    """An older selection.json without max_prompt_tokens, or one that does not read: the default limit (logged)."""
    adapter = tmp_path / "selected"
    adapter.mkdir()
    (adapter / "selection.json").write_text(json.dumps({"run": "old", "preset": "smollm2-135m", "step": 8}))
    cfg = inference.InferenceConfig(models=[{"name": "m", "preset": "smollm2-135m", "adapter": str(adapter)}])
    assert cfg.sampling_config(cfg.model_entries[0]).max_prompt_tokens == inference.DEFAULT_PROMPT_TOKENS
    (adapter / "selection.json").write_text("{torn")
    assert cfg.sampling_config(cfg.model_entries[0]).max_prompt_tokens == inference.DEFAULT_PROMPT_TOKENS
    assert f"{adapter / 'selection.json'}: not readable as JSON" in caplog.text


@pytest.mark.parametrize("kw,field", [(dict(engine="fast"), "engine"), (dict(deadline_hours=0), "deadline_hours"),
                                      (dict(fallback_prompt=" "), "fallback_prompt"),
                                      (dict(models=[], use_mean_prompt=False), "models"),
                                      (dict(mean_prompt=""), "mean_prompt"),
                                      (dict(generation_batch_size=0), "generation_batch_size")])
def test_bad_settings(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        inference.InferenceConfig(**kw)


def test_missing_paths_fail_before_any_model_loads(tmp_path, tiny_model_dir):
    test = small_test(tmp_path)
    cfg = make_cfg(tmp_path, test, [model_entry(base_model=str(tiny_model_dir("mistral")),
                                                adapter=str(tmp_path / "no-adapter"))])
    with pytest.raises(adapters.AdapterError, match=r"models\[0\] \(tiny\): adapter path .* does not exist"):
        inference.prepare_run(cfg)
    cfg = make_cfg(tmp_path, test, [model_entry(base_model=str(tmp_path / "no-base"))])
    with pytest.raises(models.ModelPathError, match=r"models\[0\] \(tiny\): preset 'mistral-7b'"):
        inference.prepare_run(cfg)
    cfg = make_cfg(tmp_path, test, [model_entry(adapter=str(tmp_path / "no-merged"), use_merged=True)])
    with pytest.raises(models.ModelPathError, match=r"use_merged: '.*no-merged/merged' is not a model folder"):
        inference.prepare_run(cfg)
    cfg = make_cfg(tmp_path, tmp_path / "nope.csv", [model_entry(base_model=str(tiny_model_dir("mistral")))])
    with pytest.raises(data.DataError, match="test_file"):
        inference.prepare_run(cfg)


# ---------------------------------------------------------------- the test CSV


def test_missing_column_and_duplicated_id_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["a"], "original_text": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(data.DataError, match=r"missing column\(s\) \['rewritten_text'\]"):
        inference.read_test(make_cfg(tmp_path, bad))
    write_test_csv(bad, [["a", "x", "y"], ["b", "x", "z"], ["a", "u", "v"]])
    with pytest.raises(data.DataError, match="row 4, column 'id': duplicated id 'a'"):
        inference.read_test(make_cfg(tmp_path, bad))


def test_a_test_file_with_a_header_and_no_rows_is_a_clear_error(tmp_path):
    empty = tmp_path / "test.csv"
    empty.write_text("id,original_text,rewritten_text\n")
    cfg = make_cfg(tmp_path, empty, [model_entry()])
    with pytest.raises(data.DataError, match=f"^{re.escape(str(empty))}: a header and no rows: nothing to predict$"):
        inference.read_test(cfg)
    assert not (tmp_path / "submission.csv").exists()


def test_read_test_flags_empty_identical_and_ignores_extra_columns(tmp_path, caplog):
    path = write_test_csv(tmp_path / "t.csv", [["a", "Some text.", "Other text."], ["b", "", "Only rewritten."],
                                               ["c", "Same text.", " Same text. "], ["d", "x", None]], extra=True)
    test = inference.read_test(make_cfg(tmp_path, path))
    assert list(test["id"]) == ["a", "b", "c", "d"] and "source" not in test.columns
    assert test["_empty"].tolist() == [False, True, False, True]
    assert test["_identical"].tolist() == [False, False, True, False]
    assert "ignoring extra column(s) ['source']" in caplog.text
    assert "2 row(s) with an empty text get the fallback" in caplog.text


def test_invalid_utf8_is_replaced_and_logged(tmp_path, caplog):
    path = tmp_path / "bytes.csv"
    path.write_bytes(b"id,original_text,rewritten_text\na,caf\xe9 au lait,coffee with milk\n")
    test = inference.read_test(make_cfg(tmp_path, path))
    assert "\ufffd" in test["original_text"].iloc[0]
    assert "invalid UTF-8" in caplog.text


# ---------------------------------------------------------------- the submission


def _table(tmp_path):
    path = write_test_csv(tmp_path / "t.csv", [["a", "one", "uno"], ["b", "two", "dos"], ["c", "same", "same"],
                                               ["d", "", "vacío"], ["e", "five", "cinco"]])
    cfg = make_cfg(tmp_path, path, [model_entry(), model_entry(name="second", n=1)])
    return cfg, inference.read_test(cfg)


def test_submission_blends_in_plan_order_and_is_always_complete(tmp_path):
    cfg, test = _table(tmp_path)
    predictions = {"second": {"a": ["S a"]}, "tiny": {"a": ["T a1", "T a2"], "b": ["T b1", "T b2"]}}
    sub = inference.build_submission(cfg, test, predictions)
    got = dict(zip(sub["id"], sub["rewrite_prompt"]))
    mean = cfg.mean_prompt
    assert got["a"] == f"T a1 T a2 S a {mean}"
    assert got["b"] == f"T b1 T b2 {mean}"
    assert got["c"] == f"{cfg.identical_fallback} {mean}"  # texts identical: once, not once per model
    assert got["d"] == f"{cfg.fallback_prompt} {mean}"  # empty text
    assert got["e"] == f"{cfg.fallback_prompt} {mean}"  # undone (deadline): the fallback once
    path = inference.write_submission(cfg, sub)
    summary = inference.validate_submission(path, test)
    assert summary["rows"] == 5 and summary["ids_once"]
    assert list(pd.read_csv(path).columns) == ["id", "rewrite_prompt"]


def test_submission_without_mean_prompt(tmp_path):
    cfg, test = _table(tmp_path)
    cfg.use_mean_prompt = False
    sub = inference.build_submission(cfg, test, {"tiny": {"a": ["T a1", "T a2"]}, "second": {}})
    assert sub.set_index("id").loc["a", "rewrite_prompt"] == "T a1 T a2"
    assert sub.set_index("id").loc["e", "rewrite_prompt"] == cfg.fallback_prompt


@pytest.mark.parametrize("rows,message", [
    ([["a", "p"], ["a", "p"], ["b", "p"], ["c", "p"], ["d", "p"], ["e", "p"]], "id 'a' appears more than once"),
    ([["a", "p"], ["b", "p"], ["c", "p"], ["d", "p"]], "1 test id.* missing, e.g. 'e'"),
    ([["a", "p"], ["b", "p"], ["c", "p"], ["d", "p"], ["e", "p"], ["z", "p"]], "not in the test file, e.g. 'z'"),
    ([["a", "p"], ["b", " "], ["c", "p"], ["d", "p"], ["e", "p"]], "blank rewrite_prompt for id 'b'"),
])
def test_validate_submission_catches_bad_files(tmp_path, rows, message):
    _, test = _table(tmp_path)
    path = tmp_path / "bad.csv"
    pd.DataFrame(rows, columns=["id", "rewrite_prompt"]).to_csv(path, index=False)
    with pytest.raises(inference.SubmissionError, match=message):
        inference.validate_submission(path, test)


# ---------------------------------------------------------------- sampling the plan (fake and tiny engines)


class SlowEngine(engines.Engine):
    """Takes ``seconds`` of real time per batch."""

    name = "slow"

    def __init__(self, seconds):
        self.seconds = seconds

    def generate_batches(self, originals, rewrittens, cfg, skip=frozenset(), progress=True):
        todo = [i for i in range(len(originals)) if i not in skip]
        for k in range(0, len(todo), cfg.generation_batch_size):
            time.sleep(self.seconds)
            rows = todo[k:k + cfg.generation_batch_size]
            yield rows, [[f"Rewrite row {i}."] * cfg.n for i in rows]


def test_deadline_too_short_still_gives_a_complete_valid_submission(tmp_path, monkeypatch, tiny_model_dir):
    test_csv = small_test(tmp_path, n=12)
    base = str(tiny_model_dir("mistral"))
    cfg = make_cfg(tmp_path, test_csv, [model_entry(base_model=base), model_entry(name="two", base_model=base)],
                   generation_batch_size=2)
    monkeypatch.setattr(serving, "load_engine", lambda *a, **k: SlowEngine(0.3))
    inference.prepare_run(cfg)
    test = inference.read_test(cfg)
    # 1.2 s in all: the first model's share (half) covers a few 0.3 s batches of its 6; the second gets the rest.
    deadline = budget.Deadline(start=time.time(), hours=1.2 / 3600, reserve_s=0)
    predictions, report = inference.sample_models(cfg, test, deadline)
    assert report["undone"].sum() > 0 and report["sampled"].sum() > 0
    sub = inference.build_submission(cfg, test, predictions)
    inference.validate_submission(inference.write_submission(cfg, sub), test)
    assert sub["rewrite_prompt"].str.startswith(cfg.fallback_prompt).any()
    # the deadline already passed: no model is even loaded, and every row gets the fallback
    monkeypatch.setattr(serving, "load_engine", lambda *a, **k: pytest.fail("a model was loaded after the deadline"))
    cfg2 = make_cfg(tmp_path, test_csv, [model_entry(base_model=base)], run_dir=str(tmp_path / "run2"))
    late = budget.Deadline(start=time.time() - 10, hours=1 / 3600, reserve_s=0)
    predictions, _ = inference.sample_models(cfg2, test, late)
    sub = inference.build_submission(cfg2, test, predictions)
    inference.validate_submission(inference.write_submission(cfg2, sub), test)
    assert (sub["rewrite_prompt"] == f"{cfg2.fallback_prompt} {cfg2.mean_prompt}").all()


class FixedEngine(engines.Engine):
    """Answers every row at once with one fixed prompt per prediction."""

    name = "fixed"

    def generate_batches(self, originals, rewrittens, cfg, skip=frozenset(), progress=True):
        rows = [i for i in range(len(originals)) if i not in skip]
        yield rows, [["Rewrite this text."] * cfg.n for _ in rows]


def test_the_engine_is_chosen_for_the_folder_that_is_served(tmp_path, monkeypatch):
    """pick_engine weighs the folder a model will load: a plan model's merged copy rather than its base, and in the
    references the base (zero-shot) or the left-out model's own merged copy; load_engine then gets that choice and
    that folder."""
    folders = {}
    for name in ("m-base", "m-adapter/merged", "left-base", "left-adapter/merged"):
        folders[name] = tmp_path / name
        folders[name].mkdir(parents=True)
        (folders[name] / "config.json").write_text("{}")
        (folders[name] / "model.safetensors").write_bytes(name.encode())
    picked, loaded = [], []

    def pick(requested, preset="", path=""):
        picked.append((preset, path))
        return "vllm" if path.endswith("merged") else "hf"

    def load(kind, preset, weights="", adapter="", options=None, load_in_4bit=None, merged=False):
        loaded.append((kind, preset, weights, merged))
        return FixedEngine()

    monkeypatch.setattr(serving, "pick_engine", pick)
    monkeypatch.setattr(serving, "load_engine", load)
    blend = tmp_path / "blend.json"  # the blend keeps m and leaves the other model out
    blend.write_text(json.dumps({"models": [{"model": "m", "n": 1}], "mean_prompt": "", "separator": " "}))
    plan = [model_entry(name="m", n=1, temperature=0.0, base_model=str(folders["m-base"]),
                        adapter=str(tmp_path / "m-adapter"), use_merged=True),
            model_entry(name="left", preset="llama2-13b", n=1, temperature=0.0,
                        base_model=str(folders["left-base"]), adapter=str(tmp_path / "left-adapter"), use_merged=True)]
    cfg = make_cfg(tmp_path, small_test(tmp_path, n=3, with_prompt=True), plan, blend_file=str(blend),
                   score_base_model=True)
    test = inference.read_test(cfg)
    deadline = budget.Deadline(start=time.time(), hours=1)
    predictions, _ = inference.sample_models(cfg, test, deadline)
    assert picked == [("mistral-7b", str(folders["m-adapter/merged"]))]
    assert loaded == [("vllm", "mistral-7b", str(folders["m-adapter/merged"]), True)]
    assert len(predictions["m"]) == 3
    picked.clear(), loaded.clear()
    baselines = inference.sample_baselines(cfg, test, deadline)
    assert picked == [("mistral-7b", str(folders["m-base"])),  # zero-shot: the base, never the merged copy
                      ("llama2-13b", str(folders["left-base"])),
                      ("llama2-13b", str(folders["left-adapter/merged"]))]  # the left-out model as the plan had it
    assert loaded == [("hf", "mistral-7b", str(folders["m-base"]), False),
                      ("hf", "llama2-13b", str(folders["left-base"]), False),
                      ("vllm", "llama2-13b", str(folders["left-adapter/merged"]), True)]
    assert list(baselines) == ["mistral-7b base, zero-shot, 1 prediction", "llama2-13b base, zero-shot, 1 prediction",
                               "left fine-tuned (left out by the blend), 1 prediction"]


def test_a_failing_model_leaves_a_complete_submission(tmp_path, monkeypatch, tiny_model_dir, caplog):
    cfg = make_cfg(tmp_path, small_test(tmp_path), [model_entry(base_model=str(tiny_model_dir("mistral")))])

    def out_of_memory(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(serving, "load_engine", out_of_memory)
    test = inference.read_test(cfg)
    predictions, report = inference.sample_models(cfg, test, budget.Deadline(start=time.time(), hours=1))
    assert list(pd.read_csv(tmp_path / "run" / inference.SAMPLING_FILE).columns)[:2] == ["model", "engine"]
    assert "tiny failed" in caplog.text and predictions == {"tiny": {}}
    sub = inference.build_submission(cfg, test, predictions)
    inference.validate_submission(inference.write_submission(cfg, sub), test)


def test_tiny_model_end_to_end_with_adapter_resume_and_scores(tmp_path, tiny_model_dir, caplog):
    """The real HF engine on a tiny Mistral + adapter (with selection.json): sample, resume, blend, score."""
    from conftest import save_adapter

    base = tiny_model_dir("mistral")
    adapter = save_adapter(base, tmp_path / "selected")
    (adapter / "selection.json").write_text(json.dumps({"run": "t", "preset": "mistral-7b", "step": 2}))
    test_csv = small_test(tmp_path, n=5, with_prompt=True)
    cfg = make_cfg(tmp_path, test_csv, [model_entry(base_model=str(base), adapter=str(adapter),
                                                    forced_start="Rewrite")],
                   max_new_tokens=6, generation_batch_size=2, score_base_model=True)
    inference.prepare_run(cfg)
    assert (tmp_path / "run" / "config.json").exists()
    test = inference.read_test(cfg)
    deadline = budget.Deadline.from_notebook_start(1.0)
    predictions, report = inference.sample_models(cfg, test, deadline)
    assert report["sampled"].tolist() == [5] and len(predictions["tiny"]) == 5
    assert all(len(p) == 2 for p in predictions["tiny"].values())
    lines = (tmp_path / "run" / "predictions" / "tiny.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == sorted(test["id"])
    again, report2 = inference.sample_models(cfg, test, deadline)  # everything done: nothing loads
    assert again == predictions and report2.empty and "every row already done" in caplog.text
    sub = inference.build_submission(cfg, test, predictions)
    inference.validate_submission(inference.write_submission(cfg, sub), test)
    baselines = inference.sample_baselines(cfg, test, deadline)
    assert list(baselines) == ["mistral-7b base, zero-shot, 1 prediction"]
    assert len(baselines["mistral-7b base, zero-shot, 1 prediction"]) == 5
    assert (tmp_path / "run" / "baselines" / "mistral-7b-base.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "predictions").glob("*.jsonl")) == ["tiny.jsonl"]
    scores = inference.score(cfg, test, predictions, baselines)
    assert list(scores.columns) == ["system", "scorer", "split", "rows", "scs", "scs_lo", "scs_hi", "cos"]
    assert scores["system"].tolist() == ["mistral-7b base, zero-shot, 1 prediction", "tiny fine-tuned, 1 prediction",
                                         "tiny fine-tuned, 2 predictions",
                                         "tiny fine-tuned, 2 predictions + mean prompt (submission)",
                                         "mean prompt alone"]
    assert scores["scorer"].iloc[0] == "all-MiniLM-L6-v2 (stand-in)" and (scores["rows"] == 5).all()
    assert (scores["split"] == "test").all()
    assert ((scores["scs_lo"] <= scores["scs"]) & (scores["scs"] <= scores["scs_hi"])).all()
    assert pd.read_csv(tmp_path / "run" / "scores.csv", keep_default_na=False).equals(scores)
    assert inference.plot_scores(cfg, scores).exists()
    # SCS against n: 1 and 2 predictions, without and with the mean prompt, the same 1-prediction score as above
    assert inference.score_n_curve(cfg, test, predictions).exists()
    curve = pd.read_csv(tmp_path / "run" / "n_curve.csv")
    assert curve[["n", "mean_prompt"]].values.tolist() == [[1, False], [1, True], [2, False], [2, True]]
    one = scores.set_index("system").loc["tiny fine-tuned, 1 prediction", "scs"]
    assert curve.loc[(curve["n"] == 1) & ~curve["mean_prompt"], "scs"].item() == pytest.approx(one, abs=1e-4)


def test_no_rewrite_prompt_means_no_scores(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, small_test(tmp_path), [model_entry(base_model=str(tiny_model_dir("mistral")))],
                   score_base_model=True)
    test = inference.read_test(cfg)
    assert inference.score(cfg, test, {"tiny": {}}) is None
    assert inference.sample_baselines(cfg, test, budget.Deadline(start=time.time(), hours=1)) == {}


# ---------------------------------------------------------------- resume after SIGKILL, through make infer


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_make_infer_killed_mid_run_then_rerun_has_every_id_once(tmp_path, tiny_model_dir):
    """kill -9 the whole `make infer` process group while it samples; the same command again finishes the job."""
    gemma = data.read_rewrites(GEMMA_CSV).head(80)
    test_csv = tmp_path / "test.csv"  # only the three columns a Kaggle test CSV has
    gemma[["id", "original_text", "rewritten_text"]].to_csv(test_csv, index=False)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"engine": "hf", "generation_batch_size": 1, "max_new_tokens": 16, "models": [
        model_entry(base_model=str(tiny_model_dir("mistral")))]}))
    run_dir, submission = tmp_path / "run", tmp_path / "out.csv"
    command = ["make", "--no-print-directory", "infer", f"TEST={test_csv}", f"SUBMISSION={submission}",
               f"INFER_DIR={run_dir}", f"INFER_ARGS=-f {params}"]
    jsonl = run_dir / "predictions" / "tiny.jsonl"
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while len(_lines(jsonl)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # make, papermill and the kernel at once, as an OOM kill or a preemption does
    proc.wait()
    log1.close()
    done_at_kill = len(_lines(jsonl))
    print(f"killed with {done_at_kill} of 80 rows in the prediction file")
    assert 3 <= done_at_kill < 80, f"not killed mid-run ({done_at_kill} rows done); log: {(tmp_path / 'first.log').read_text()[-2000:]}"
    assert not submission.exists()

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already done (resume)" in second.stdout + second.stderr
    ids = [json.loads(x)["id"] for x in _lines(jsonl)]
    assert len(ids) == len(set(ids)) == 80  # no row lost, none duplicated
    sub = pd.read_csv(submission, dtype=str, keep_default_na=False)
    assert sorted(sub["id"]) == sorted(gemma["id"]) and sub["id"].is_unique
    assert sub["rewrite_prompt"].str.strip().ne("").all()
    assert (run_dir / "inference.ipynb").exists()


def test_blend_file_sets_order_n_and_mean_prompt(tmp_path):
    import json

    from kaggle_utils import blending
    from kaggle_utils import inference as inf

    two = [dict(inf.DEFAULT_MODELS[0], name="a", n=4), dict(inf.DEFAULT_MODELS[0], name="b", n=4)]
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"models": [{"model": "b", "n": 2}, {"model": "a", "n": 1}],
                                 "mean_prompt": "optimized words", "separator": " | ", "label": "b x2, a x1"}))
    cfg = inf.InferenceConfig(models=two, blend_file=str(blend))
    assert [(m["name"], m["n"]) for m in cfg.models] == [("b", 2), ("a", 1)]
    assert cfg.use_mean_prompt and cfg.mean_prompt == "optimized words" and cfg.separator == " | "
    blend.write_text(json.dumps({"models": [{"model": "zzz", "n": 2}], "mean_prompt": "", "separator": " "}))
    with pytest.raises(blending.BlendError, match=rf"^{re.escape(str(blend))}: the blend names model\(s\) \['zzz'\]"):
        inf.InferenceConfig(models=two, blend_file=str(blend))
    blend.write_text(json.dumps({"models": [], "mean_prompt": "only this", "separator": " "}))
    cfg = inf.InferenceConfig(models=two, blend_file=str(blend))  # the mean prompt alone won: no model runs
    assert cfg.models == [] and cfg.use_mean_prompt and cfg.mean_prompt == "only this"
    blend.write_text(json.dumps({"models": [], "mean_prompt": "", "separator": " "}))
    with pytest.raises(kconfig.ConfigError, match="^models:"):
        inf.InferenceConfig(models=two, blend_file=str(blend))


def test_a_blend_file_written_before_the_rule_existed_still_applies(tmp_path):
    """blend.json of an older run (no best_by_mean, no rule) sets the plan as a new one does."""
    from test_blending import OLD_BLEND

    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps(OLD_BLEND))
    cfg = inference.InferenceConfig(models=[dict(inference.DEFAULT_MODELS[0], n=4)], blend_file=str(blend))
    assert [(m["name"], m["n"]) for m in cfg.models] == [("smollm", 2)]
    assert cfg.use_mean_prompt and cfg.mean_prompt == OLD_BLEND["mean_prompt"]


def test_mean_prompt_alone_plan_writes_a_complete_submission_without_any_model(tmp_path, monkeypatch):
    from kaggle_utils import budget

    def no_engine(*a, **k):
        raise AssertionError("no model may load for a mean-prompt-only plan")

    monkeypatch.setattr(serving, "load_engine", no_engine)
    path = write_test_csv(tmp_path / "t.csv", [["a", "one", "uno", "Translate into Spanish."],
                                               ["b", "same", "same", "Fix the grammar."],
                                               ["c", "", "vacío", "Make it shorter."]], with_prompt=True)
    # models=[]: what a blend that chose the mean prompt alone leaves
    cfg = make_cfg(tmp_path, path, models=[], mean_prompt="Rewrite this text in a new style.")
    inference.prepare_run(cfg)
    test = inference.read_test(cfg)
    predictions, report = inference.sample_models(cfg, test, budget.Deadline(start=time.time(), hours=1))
    assert list(pd.read_csv(tmp_path / "run" / inference.SAMPLING_FILE).columns)[:2] == ["model", "engine"]
    assert predictions == {} and report.empty
    sub = inference.build_submission(cfg, test, predictions)
    assert sub["rewrite_prompt"].tolist() == ["Rewrite this text in a new style."] * 3
    inference.validate_submission(inference.write_submission(cfg, sub), test)
    deadline = budget.Deadline(start=time.time(), hours=1)
    scores = inference.score(cfg, test, predictions, inference.sample_baselines(cfg, test, deadline))
    assert scores["system"].tolist() == ["mean prompt alone (submission)",
                                         "public mean prompt alone (0.63 on the leaderboard)"]
    assert scores["rows"].iloc[0] == 3 and 0 < scores["scs"].iloc[0] < 1


def test_a_model_the_blend_left_out_is_still_scored_as_a_reference(tmp_path, tiny_model_dir):
    """The report rows must show the fine-tuned model even when the blend chose the mean prompt alone."""
    from kaggle_utils import budget

    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"models": [], "mean_prompt": "Rewrite this text.", "separator": " "}))
    cfg = make_cfg(tmp_path, small_test(tmp_path, n=4, with_prompt=True),
                   [model_entry(base_model=str(tiny_model_dir("mistral")))], blend_file=str(blend),
                   score_base_model=True, max_new_tokens=4, score_split="report")
    assert cfg.models == [] and [s.name for s in cfg.left_out_entries] == ["tiny"]
    inference.prepare_run(cfg)
    test = inference.read_test(cfg)
    deadline = budget.Deadline(start=time.time(), hours=1)
    predictions, _ = inference.sample_models(cfg, test, deadline)
    assert predictions == {}  # the submission needs no model
    baselines = inference.sample_baselines(cfg, test, deadline)
    assert list(baselines) == ["mistral-7b base, zero-shot, 1 prediction",
                               "tiny base (left out by the blend), 1 prediction"]
    assert all(len(p) == 4 for p in baselines.values())
    scores = inference.score(cfg, test, predictions, baselines)
    assert scores["system"].tolist()[:3] == ["mistral-7b base, zero-shot, 1 prediction",
                                             "tiny base (left out by the blend), 1 prediction",
                                             "mean prompt alone (submission)"]
    assert (scores["split"] == "report").all()
