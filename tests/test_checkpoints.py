"""Checkpoint selection: the rule (ties, override, NaN), candidate steps, run-folder errors, the validation draw, the
per-step cache (resume), the export; and, marked slow, a real selection on a tiny Llama trained for 2 steps (adapter
switching, step 0 = no adapter, merged export). Run: `pytest tests/test_checkpoints.py` (`-m "not slow"` for the fast
part, which loads no model).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_utils import artifacts, checkpoints, config, data, engines, export, training
from conftest import GEMMA_CSV

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the selection rule


@pytest.mark.parametrize("scores,force,expected", [
    ({0: 0.02, 8: 0.07, 16: 0.09, 24: 0.08}, 0, 16),  # the highest mean
    ({0: 0.02, 8: 0.09, 16: 0.09, 24: 0.08}, 0, 8),  # tie: the earlier step
    ({0: 0.09, 8: 0.09}, 0, 0),  # tie with the base model: no adapter beats no training
    ({0: 0.02, 8: 0.09, 16: 0.09 + 1e-9}, 0, 8),  # closer than the tolerance is a tie
    ({0: 0.02, 8: 0.09, 16: 0.0901}, 0, 16),  # a real (if small) gain is not a tie
    ({0: 0.30, 8: 0.09, 16: 0.10}, 0, 0),  # the base model can win
    ({0: 0.02, 8: 0.09, 16: 0.10}, 8, 8),  # forced: the scores do not matter
    ({0: 0.02, 8: 0.09, 16: 0.10}, -1, 16),  # -1 = no override
    ({0: float("nan"), 8: 0.01}, 0, 8),  # NaN never wins
])
def test_choose_step(scores, force, expected):
    assert checkpoints.choose_step(scores, force) == expected


def test_choose_step_takes_the_score_table_and_refuses_unknown_forced_steps():
    table = pd.DataFrame({"step": [0, 8, 16], "scs": [0.1, 0.3, 0.2]})
    assert checkpoints.choose_step(table) == 8
    with pytest.raises(checkpoints.SelectionError, match="force_step=12 is not a scored step"):
        checkpoints.choose_step(table, force_step=12)
    with pytest.raises(checkpoints.SelectionError, match="no scored steps"):
        checkpoints.choose_step({})


@pytest.mark.parametrize("steps,k,force,expected", [
    ([8, 16, 24], 1, 0, [0, 8, 16, 24]),
    ([8, 16, 24], 2, 0, [0, 8, 24]),  # counted back from the last
    ([8, 16, 24], 5, 0, [0, 24]),  # the last always counts
    ([8, 16, 24], 5, 8, [0, 8, 24]),  # a forced step is always scored
    (list(range(25, 501, 25)), 4, 0, [0, 100, 200, 300, 400, 500]),
])
def test_candidate_steps(steps, k, force, expected):
    assert checkpoints.candidate_steps(steps, k, force) == expected


def test_forced_step_that_does_not_exist():
    with pytest.raises(checkpoints.SelectionError, match=r"force_step=12 is not a checkpoint.*\[8, 16, 24\]"):
        checkpoints.candidate_steps([8, 16, 24], 1, 12)


@pytest.mark.parametrize("field,value,match", [
    ("every_k", 0, "every_k: must be >= 1"),
    ("rows_per_step", -1, "rows_per_step: must be >= 0"),
    ("force_step", -2, "force_step: must be a checkpoint step"),
    ("max_prompt_tokens", 10, "max_prompt_tokens: must be 0"),
    ("run_name", "a/b", "run_name: must be a run folder name"),
])
def test_bad_select_config(field, value, match):
    with pytest.raises(config.ConfigError, match=match):
        checkpoints.SelectConfig(**{field: value})


# ---------------------------------------------------------------- a fake run folder (no model)


def make_run(tmp_path, rewrites_csv, steps=(8, 16, 24), held_out_groups=(4, 5), name="r"):
    """A run folder as the train stage leaves it, with stand-in adapter files (selection never loads them here)."""
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    for s in steps:
        ck = run / f"checkpoint-{s}"
        ck.mkdir()
        (ck / "adapter_config.json").write_text(json.dumps({"r": 1, "step": s}))
        (ck / "adapter_model.safetensors").write_bytes(f"weights of step {s}".encode())
        (ck / "metrics.json").write_text(json.dumps({"step": s, "train_loss": 2.0, "eval_loss": 3.0 - s / 100}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [{"step": 0, "eval_loss": 3.5}] + [
        {"step": s, "loss": 2.5 - s / 100} for s in steps] + [{"step": s, "eval_loss": 3.0 - s / 100} for s in steps]))
    rows = pd.read_csv(rewrites_csv)
    held = rows["rewrite_prompt"].isin([f"Rewrite this in style {g}." for g in held_out_groups])
    rows[held].to_csv(run / "validation.csv", index=False)
    (run / "config.json").write_text(json.dumps({
        "run_name": name, "preset": "smollm2-135m", "base_model_path": "", "train_files": [str(rewrites_csv)],
        "max_seq_length": 384, "load_in_4bit": False}))
    return run


def select_cfg(tmp_path, **kw):
    values = dict(run_name="r", runs_dir=str(tmp_path / "runs"), rows_per_step=0)
    values.update(kw)
    return checkpoints.SelectConfig(**values)


def test_checkpoints_in_numeric_order_and_incomplete_ones_skipped(tmp_path, rewrites_csv, caplog):
    run = make_run(tmp_path, rewrites_csv, steps=(100, 25, 50))
    (run / "checkpoint-125").mkdir()  # interrupted while saving: no adapter yet
    (run / "checkpoint-best").mkdir()  # not a step
    assert list(artifacts.find_checkpoints(run)) == [25, 50, 100]
    assert "checkpoint-125" in caplog.text
    table = checkpoints.checkpoint_metrics(run)
    assert list(table["step"]) == [0, 25, 50, 100]  # step 0 = the base model's eval loss from the log
    assert table["eval_loss"].iloc[0] == 3.5 and table["eval_loss"].iloc[-1] == pytest.approx(2.0)


def test_run_folder_without_checkpoints(tmp_path):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    with pytest.raises(checkpoints.SelectionError, match="has no checkpoints.*make train RUN=r"):
        checkpoints.prepare_selection(select_cfg(tmp_path))
    with pytest.raises(checkpoints.SelectionError, match="does not exist"):
        checkpoints.prepare_selection(select_cfg(tmp_path, run_name="nope"))


def test_forced_step_is_checked_before_any_work(tmp_path, rewrites_csv):
    make_run(tmp_path, rewrites_csv)
    with pytest.raises(checkpoints.SelectionError, match="force_step=20 is not a checkpoint"):
        checkpoints.prepare_selection(select_cfg(tmp_path, force_step=20))
    run_cfg = checkpoints.prepare_selection(select_cfg(tmp_path, force_step=16))
    assert run_cfg["preset"] == "smollm2-135m"
    written = json.loads((tmp_path / "runs" / "r" / "selection" / "config.json").read_text())
    assert written["force_step"] == 16  # the resolved config is written before any work


# ---------------------------------------------------------------- validation rows


def test_validation_draw_is_whole_groups_of_the_run_file(tmp_path, rewrites_csv):
    make_run(tmp_path, rewrites_csv, held_out_groups=(0, 1, 2, 3, 4))
    full = checkpoints.load_validation(select_cfg(tmp_path))
    assert len(full) == 10 and full["rewrite_prompt"].nunique() == 5
    sub = checkpoints.load_validation(select_cfg(tmp_path, rows_per_step=4))
    assert len(sub) == 4
    assert sub["rewrite_prompt"].value_counts().tolist() == [2, 2]  # two whole groups, not four scattered rows
    again = checkpoints.load_validation(select_cfg(tmp_path, rows_per_step=4))
    assert list(again["id"]) == list(sub["id"])  # seeded
    draws = {frozenset(checkpoints.load_validation(select_cfg(tmp_path, rows_per_step=4, seed=s))["id"])
             for s in range(6)}
    assert len(draws) > 1  # the seed picks the groups


def test_validation_with_one_prompt_group(tmp_path, rewrites_csv):
    make_run(tmp_path, rewrites_csv, held_out_groups=(2,))
    with pytest.raises(data.DataError, match="1 prompt group.*at least 2"):
        checkpoints.load_validation(select_cfg(tmp_path))


def test_other_validation_file_drops_trained_prompts(tmp_path, rewrites_csv):
    # the run trained on rewrites_csv except its held-out groups 4 and 5; scoring the whole file must keep only those
    make_run(tmp_path, rewrites_csv, held_out_groups=(4, 5))
    rows = checkpoints.load_validation(select_cfg(tmp_path, validation_file=str(rewrites_csv)))
    assert sorted(rows["rewrite_prompt"].unique()) == ["Rewrite this in style 4.", "Rewrite this in style 5."]
    make_run(tmp_path, rewrites_csv, held_out_groups=(5,), name="r1")
    with pytest.raises(data.DataError, match="1 prompt group"):
        checkpoints.load_validation(select_cfg(tmp_path, run_name="r1", validation_file=str(rewrites_csv)))


def test_report_rows_can_be_scored_by_step(tmp_path, rewrites_csv):
    # the report rows (report.csv) left training like the choice rows: scoring the checkpoints on them keeps them all
    run = make_run(tmp_path, rewrites_csv, held_out_groups=(4,))
    rows = pd.read_csv(rewrites_csv)
    report = rows[rows["rewrite_prompt"].isin(["Rewrite this in style 2.", "Rewrite this in style 3."])]
    report.to_csv(run / "report.csv", index=False)
    scored = checkpoints.load_validation(select_cfg(tmp_path, validation_file=str(run / "report.csv")))
    assert sorted(scored["id"]) == sorted(report["id"])
    whole = checkpoints.load_validation(select_cfg(tmp_path, validation_file=str(rewrites_csv)))
    assert sorted(whole["rewrite_prompt"].unique()) == ["Rewrite this in style 2.", "Rewrite this in style 3.",
                                                        "Rewrite this in style 4."]


def test_missing_run_validation_file(tmp_path, rewrites_csv):
    run = make_run(tmp_path, rewrites_csv)
    (run / "validation.csv").unlink()
    with pytest.raises(checkpoints.SelectionError, match="validation.csv is missing"):
        checkpoints.load_validation(select_cfg(tmp_path))


# ---------------------------------------------------------------- scoring, cache and resume (fake model and scorer)


class FakeScorer:
    """Exact-match "metric": 1 when the prediction is the truth, else 0.1; refuses blanks like the real one warns."""

    name = "fake scorer"

    def __init__(self, path="fake"):
        self.path = path
        self.calls = 0

    def scs(self, predictions, truths):
        self.calls += 1
        assert all(p.strip() for p in predictions), "a blank prediction reached the scorer"
        return np.array([1.0 if p == t else 0.1 for p, t in zip(predictions, truths)])

    cosine = scs


class FakeSampler(engines.Engine):
    """The run's served base model, standing in (checkpoints._step_engine), and its completions at each step
    (checkpoints._step_completions): step N gets the first N // 8 rows right (the exported adapter: one); the last
    row is always an empty generation."""

    generated: list[int] = []

    def __init__(self, cfg, run_cfg):
        pass

    @staticmethod
    def completions(engine, step, ckpt, validation, scfg):
        FakeSampler.generated.append(step)
        truths = list(validation["rewrite_prompt"])
        right = step // 8 if isinstance(step, int) else 1  # "selected": the exported adapter gets one row right
        out = [t if i < right else "Something else." for i, t in enumerate(truths)]
        out[-1] = "   "
        return out


@pytest.fixture()
def fake_model(monkeypatch):
    FakeSampler.generated = []
    monkeypatch.setattr(checkpoints, "_step_engine", FakeSampler)
    monkeypatch.setattr(checkpoints, "_step_completions", FakeSampler.completions)
    return FakeSampler


def test_score_steps_caches_and_resumes(tmp_path, rewrites_csv, fake_model, caplog):
    run = make_run(tmp_path, rewrites_csv, held_out_groups=(0, 1, 2, 3, 4))
    cfg = select_cfg(tmp_path)
    val = checkpoints.load_validation(cfg)
    scorer = FakeScorer()
    scores = checkpoints.score_steps(cfg, val, scorer)
    assert fake_model.generated == [0, 8, 16, 24]
    assert list(scores["step"]) == [0, 8, 16, 24] and set(scores["scorer"]) == {"fake scorer"}
    # the empty generation was scored as the fallback prompt, and counted
    assert list(scores["fallbacks"]) == [1, 1, 1, 1]
    cached = json.loads((run / "selection" / "step-8.json").read_text())
    assert cached["predictions"][-1] == checkpoints.FALLBACK_PROMPT and cached["fallbacks"] == 1
    assert "scored as 'Improve this text.'" in caplog.text
    assert np.allclose(scores["scs"], [0.1, 0.19, 0.28, 0.37])
    assert checkpoints.choose_step(scores) == 24
    # each step against the best checkpoint, paired by prompt group: 0 for the best itself, more for the others
    se = dict(zip(scores["step"], scores["paired_se"]))
    assert se[24] == 0.0 and all(se[s] > 0 for s in (0, 8, 16))

    # interrupted after step 8: only the missing steps are generated again
    fake_model.generated = []
    (run / "selection" / "step-16.json").unlink()
    (run / "selection" / "step-24.json").unlink()
    again = checkpoints.score_steps(cfg, val, scorer)
    assert fake_model.generated == [16, 24]
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), scores.drop(columns="seconds"))

    # a retrained checkpoint (other adapter bytes) is generated again; another scorer only rescores
    fake_model.generated = []
    (run / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"retrained")
    other = FakeScorer(path="other")
    checkpoints.score_steps(cfg, val, other)
    assert fake_model.generated == [8] and other.calls == 2 * 4  # scs + cos for every step

    # other rows: everything is generated again
    fake_model.generated = []
    checkpoints.score_steps(cfg, val.head(6), other)
    assert fake_model.generated == [0, 8, 16, 24]


def test_every_k_and_forced_step_in_scoring(tmp_path, rewrites_csv, fake_model):
    make_run(tmp_path, rewrites_csv, steps=(8, 16, 24, 32))
    cfg = select_cfg(tmp_path, every_k=2, force_step=8)
    scores = checkpoints.score_steps(cfg, checkpoints.load_validation(cfg), FakeScorer())
    assert list(scores["step"]) == [0, 8, 16, 32]
    assert checkpoints.choose_step(scores, cfg.force_step) == 8


# ---------------------------------------------------------------- export


def _scores(table: dict[int, float]) -> pd.DataFrame:
    return pd.DataFrame({"step": list(table), "scs": list(table.values()), "cos": 0.5, "rows": 10, "fallbacks": 0,
                         "seconds": 1.0, "scorer": "fake scorer"})


def test_export_copies_the_chosen_adapter(tmp_path, rewrites_csv):
    run = make_run(tmp_path, rewrites_csv)
    cfg = select_cfg(tmp_path)
    stale = run / "selected" / "merged"
    stale.mkdir(parents=True)  # from an earlier selection with export_merged
    val = checkpoints.load_validation(cfg)
    out = export.export_selection(cfg, _scores({0: 0.02, 8: 0.09, 16: 0.08}), 8, val)
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights of step 8"
    assert json.loads((out / "adapter_config.json").read_text())["step"] == 8
    assert not stale.exists()
    sel = json.loads((out / "selection.json").read_text())
    for key in ("run", "preset", "base_model_path", "step", "scores", "scorer", "validation_file", "val_rows",
                "rows_scored"):
        assert key in sel, key
    assert sel["step"] == 8 and sel["adapter"] == "adapter_model.safetensors" and not sel["base_model_won"]
    assert sel["scores"] == {"0": 0.02, "8": 0.09, "16": 0.08} and sel["scorer"] == "fake scorer"
    assert sel["preset"] == "smollm2-135m" and sel["validation_file"].endswith("runs/r/validation.csv")
    assert sel["rows_scored"] == 10 and sel["prompt_groups"] == 2 and sel["max_prompt_tokens"] == 384
    assert [r["eval_loss"] for r in sel["per_step"]] == [3.5, pytest.approx(2.92), pytest.approx(2.84)]


def test_max_prompt_tokens_travels_from_training_through_selection_to_inference(tmp_path, rewrites_csv,
                                                                                tiny_model_dir, fake_model):
    """The prompt-token limit's trip (kaggle_utils.artifacts): set in training, recorded in config.json, used to
    score every step and written to selection.json, then the limit the inference stage shows that adapter's model."""
    from kaggle_utils import inference

    run = make_run(tmp_path, rewrites_csv, held_out_groups=(0, 1, 2, 3))
    trained = training.TrainConfig(run_name="r", runs_dir=str(tmp_path / "runs"), preset="smollm2-135m",
                                   base_model_path=str(tiny_model_dir("llama")), train_files=[str(rewrites_csv)],
                                   max_seq_length=384, max_prompt_tokens=192)
    config.save_config(trained, run)  # the config.json training.prepare_run writes
    cfg = select_cfg(tmp_path)
    run_cfg = checkpoints.prepare_selection(cfg)
    val = checkpoints.load_validation(cfg, run_cfg)
    scores = checkpoints.score_steps(cfg, val, FakeScorer(), run_cfg)
    assert {json.loads(f.read_text())["key"]["max_prompt_tokens"] for f in (run / "selection").glob("step-*.json")} \
        == {192}  # every step was sampled with the training cut
    out = export.export_selection(cfg, scores, checkpoints.choose_step(scores), val, run_cfg)
    assert artifacts.Selection.read(out).max_prompt_tokens == 192
    infer = inference.InferenceConfig(models=[{"name": "m", "preset": "smollm2-135m", "adapter": str(out)}])
    assert infer.sampling_config(infer.model_entries[0]).max_prompt_tokens == 192
    # the selection stage's own setting wins over the run's, and travels on the same way
    cfg = select_cfg(tmp_path, max_prompt_tokens=256)
    assert checkpoints.prompt_token_limit(cfg, run_cfg) == 256
    out = export.export_selection(cfg, scores, checkpoints.choose_step(scores), val, run_cfg)
    assert artifacts.Selection.read(out).max_prompt_tokens == 256


def test_report_rows_scored_by_step_never_replace_the_choice(tmp_path, rewrites_csv):
    # selected/ holds step 8, chosen on the choice rows; scoring the report rows by step, where step 16 is higher,
    # writes their scores beside the run and leaves selected/ (adapter, selection.json, plot) as it was
    run = make_run(tmp_path, rewrites_csv, held_out_groups=(4,))
    export.export_selection(select_cfg(tmp_path), _scores({0: 0.02, 8: 0.09, 16: 0.08}), 8)
    chosen = {p.name: p.read_bytes() for p in (run / "selected").iterdir()}
    rows = pd.read_csv(rewrites_csv)
    rows[rows["rewrite_prompt"].isin(["Rewrite this in style 2.", "Rewrite this in style 3."])].to_csv(
        run / "report.csv", index=False)
    cfg = select_cfg(tmp_path, validation_file=str(run / "report.csv"))
    assert checkpoints.scores_report_rows(cfg) and not checkpoints.scores_report_rows(select_cfg(tmp_path))
    report = _scores({0: 0.01, 8: 0.10, 16: 0.12})
    export.export_selection(cfg, report, checkpoints.choose_step(report))
    assert {p.name: p.read_bytes() for p in (run / "selected").iterdir()} == chosen
    assert json.loads((run / "report_by_step.json").read_text())["scores"] == {"0": 0.01, "8": 0.1, "16": 0.12}
    assert export.plot_scores(cfg, report, 16) == run / "report_by_step.png"
    assert {p.name: p.read_bytes() for p in (run / "selected").iterdir()} == chosen


def test_export_when_the_base_model_wins(tmp_path, rewrites_csv, caplog):
    run = make_run(tmp_path, rewrites_csv)
    cfg = select_cfg(tmp_path)
    export.export_selection(cfg, _scores({0: 0.02, 8: 0.09}), 8)
    assert (run / "selected" / "adapter_model.safetensors").exists()
    with caplog.at_level(logging.WARNING, logger="kaggle_utils"):
        out = export.export_selection(cfg, _scores({0: 0.12, 8: 0.09, 16: 0.10}), 0)
    assert not (out / "adapter_model.safetensors").exists()  # the earlier selection's adapter is gone
    assert not (out / "adapter_config.json").exists()
    sel = json.loads((out / "selection.json").read_text())
    assert sel["step"] == 0 and sel["adapter"] is None and sel["base_model_won"] and sel["best_checkpoint_step"] == 16
    assert "step 0 (the base model, no adapter) scored best" in caplog.text and "force_step=16" in caplog.text


def test_forced_export_is_flagged(tmp_path, rewrites_csv):
    make_run(tmp_path, rewrites_csv)
    cfg = select_cfg(tmp_path, force_step=16)
    out = export.export_selection(cfg, _scores({0: 0.02, 8: 0.09, 16: 0.05}), 16)
    sel = json.loads((out / "selection.json").read_text())
    assert sel["step"] == 16 and sel["forced"] and "forced" in sel["rule"] and sel["best_checkpoint_step"] == 8


def test_plots(tmp_path, rewrites_csv):
    make_run(tmp_path, rewrites_csv)
    cfg = select_cfg(tmp_path)
    assert checkpoints.plot_losses(cfg).stat().st_size > 1000
    png = export.plot_scores(cfg, _scores({0: 0.02, 8: 0.09, 16: 0.08}))
    assert png.name == "scores.png" and png.parent.name == "selected" and png.stat().st_size > 1000


# ---------------------------------------------------------------- a real selection on a tiny trained model


def train_tiny_run(runs_dir, base, name="tiny", **kw):
    """Two LoRA steps on a random tiny Llama (SmolLM2's preset and tokenizer), a checkpoint after each."""
    cfg = training.TrainConfig(run_name=name, runs_dir=str(runs_dir), preset="smollm2-135m",
                               base_model_path=str(base), train_files=[str(GEMMA_CSV)],
                               validation_file=str(GEMMA_CSV), val_rows=4, max_train_rows=8, max_steps=2,
                               batch_size=2, micro_batch_size=2, save_steps=1, max_seq_length=512,
                               learning_rate=1e-2, warmup_steps=0, **kw)
    training.prepare_run(cfg)
    training.train(cfg, training.load_for_training(cfg)[2])
    return cfg.run_dir


@pytest.mark.slow
def test_tiny_model_selection_switches_adapters_and_exports_merged(tmp_path, tiny_model_dir, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from kaggle_utils import metric

    base = tiny_model_dir("llama")
    run = train_tiny_run(tmp_path / "runs", base)
    cfg = checkpoints.SelectConfig(run_name="tiny", runs_dir=str(tmp_path / "runs"), rows_per_step=4,
                                   max_new_tokens=6, generation_batch_size=4, export_merged=True)
    run_cfg = checkpoints.prepare_selection(cfg)
    ckpts = artifacts.find_checkpoints(run)
    assert list(ckpts) == [1, 2]

    # the adapter really changes the model, step 0 really is the base, one adapter is held at a time
    engine = checkpoints._step_engine(cfg, run_cfg)
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    logits = lambda: engine.model(input_ids=ids).logits.float()  # noqa: E731
    with torch.inference_mode():
        at0 = logits()
        engine.use_adapter(ckpts[1])
        at1 = logits()
        with engine.model.disable_adapter():
            assert torch.equal(logits(), at0)
        engine.use_adapter(ckpts[2])
        at2 = logits()
    assert not torch.equal(at1, at0) and not torch.equal(at2, at1)
    assert list(engine.model.peft_config) == [engine.model.active_adapter]  # step 2's, step 1's dropped
    engine.close()

    val = checkpoints.load_validation(cfg, run_cfg)
    scorer = metric.Scorer(device="cpu")
    scores = checkpoints.score_steps(cfg, val, scorer, run_cfg)
    assert list(scores["step"]) == [0, 1, 2] and (scores["rows"] == len(val)).all()
    assert set(scores["scorer"]) == {metric.STAND_IN_NAME}
    for step in (0, 1, 2):
        entry = json.loads((run / "selection" / f"step-{step}.json").read_text())
        assert len(entry["raw"]) == len(val) and all(p.strip() for p in entry["predictions"])

    # resumed: every step is cached, so no model is loaded at all
    def no_model(*a, **k):
        raise AssertionError("a cached step was generated again")

    monkeypatch.setattr(checkpoints, "_step_engine", no_model)
    pd.testing.assert_frame_equal(checkpoints.score_steps(cfg, val, scorer, run_cfg).drop(columns="seconds"),
                                  scores.drop(columns="seconds"))

    out = export.export_selection(cfg, scores, 2, val, run_cfg)  # forced through the API: step 2 has an adapter
    merged = out / "merged"
    assert (merged / "config.json").exists() and (merged / "tokenizer.json").exists()
    weights = load_file(str(next(merged.glob("*.safetensors"))))
    original = load_file(str(base / "model.safetensors"))
    q = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert weights[q].dtype == torch.float16
    assert not torch.allclose(weights[q].float(), original[q].float(), atol=1e-4)  # the LoRA delta is in
    k = next(k for k in weights if k.endswith("layers.0.mlp.up_proj.weight"))
    assert torch.allclose(weights[k].float(), original[k].float(), atol=1e-2)  # untouched modules stay
    assert json.loads((out / "selection.json").read_text())["merged"] == "merged"


def test_an_adapter_in_the_last_layers_only_merges_there_and_samples(tmp_path, tiny_model_dir):
    """lora_layers=1 on a 2-layer model: the merged folder changes layer 1 only, and the HF engine samples with the
    adapter folder itself."""
    import torch
    from safetensors.torch import load_file

    base = tiny_model_dir("llama")
    run = train_tiny_run(tmp_path / "runs", base, lora_layers=1)
    cfg = checkpoints.SelectConfig(run_name="tiny", runs_dir=str(tmp_path / "runs"))
    run_cfg = checkpoints.prepare_selection(cfg)
    ckpt = artifacts.find_checkpoints(run)[2]
    merged = export.export_merged(cfg, run_cfg, ckpt, tmp_path / "merged")
    weights = load_file(str(next(merged.glob("*.safetensors"))))
    original = load_file(str(base / "model.safetensors"))
    name = "layers.{}.self_attn.q_proj.weight"
    for layer, moved in ((0, False), (1, True)):
        key = next(k for k in weights if k.endswith(name.format(layer)))
        same = torch.allclose(weights[key].float(), original[key].float(), atol=1e-3)
        assert same != moved, f"layer {layer}: merged {'equal to' if same else 'unlike'} the base"
    engine = engines.HFEngine.from_preset("smollm2-135m", base_model_path=str(base), adapter_path=str(ckpt))
    raw = engine.generate(["The cat sat on the mat.", "It rained all day."],
                          ["Upon the mat, a feline rested.", "Rain fell from dawn to dusk."],
                          engines.SamplingConfig(n=1, max_new_tokens=6, generation_batch_size=2), progress=False)
    assert len(raw) == 2 and all(len(r) == 1 for r in raw)


# ---------------------------------------------------------------- averaging the plateau


@pytest.mark.parametrize("table, k, force, expected", [
    # a lone spike at 8, a plateau at 40-56: the window sits on the plateau, not on the spike
    ({0: 0.0, 8: 0.30, 16: 0.1, 24: 0.1, 32: 0.2, 40: 0.25, 48: 0.26, 56: 0.25, 64: 0.2, 72: 0.1, 80: 0.1}, 3, 0,
     [40, 48, 56]),
    # the smoothed peak at the last checkpoint: the window shifts inward
    ({0: 0.0, **{s: s / 1000 for s in range(8, 88, 8)}}, 3, 0, [64, 72, 80]),
    # fewer than 2k checkpoints, means only (no paired_se to tell steps apart): the best step alone
    ({0: 0.0, 8: 0.3, 16: 0.1, 24: 0.2}, 3, 0, [8]),
    ({0: 0.0, **{s: 0.1 for s in range(8, 88, 8)}, 40: 0.3}, 1, 0, [40]),  # k = 1: the best step alone
    ({0: 0.0, **{s: 0.1 for s in range(8, 88, 8)}}, 3, 16, [16]),  # forced
    ({0: 0.9, **{s: 0.1 for s in range(8, 88, 8)}}, 3, 0, [0]),  # the base model wins: no adapter
])
def test_choose_window(table, k, force, expected):
    assert checkpoints.choose_window(table, k, force) == expected


def test_paired_standard_errors_average_each_prompt_group_first():
    groups = ["a", "a", "b", "c"]
    per_row = {0: [0.0, 0.0, 0.1, 0.0], 8: [0.3, 0.3, 0.9, 0.3], 16: [0.4, 0.4, 0.6, 0.3]}
    se = checkpoints.paired_standard_errors(per_row, groups)
    # step 16 minus the best checkpoint (8), by group: a 0.4-0.3, b 0.6-0.9, c 0.3-0.3 -> sd 0.2082 over 3 groups
    assert se[8] == 0.0 and se[16] == pytest.approx(0.20817 / 3 ** 0.5, abs=1e-4)
    assert se[0] > 0  # the base model is compared with the best checkpoint too
    assert checkpoints.paired_standard_errors({8: [0.2, 0.3]}, ["a", "a"]) == {8: 0.0}  # one group: nothing to pair


def _table(per_row: dict, groups: list) -> pd.DataFrame:
    se = checkpoints.paired_standard_errors(per_row, groups)
    return pd.DataFrame({"step": list(per_row), "scs": [float(np.mean(v)) for v in per_row.values()],
                         "paired_se": [se[s] for s in per_row]})


def test_a_run_too_short_to_average_exports_its_latest_checkpoint_within_one_standard_error():
    groups = ["a", "a", "b", "c"]
    base = [0.0, 0.0, 0.1, 0.0]
    # step 8 leads by 0.025, less than the paired standard error (0.12): the later step, still rising, is exported
    close = _table({0: base, 8: [0.3, 0.3, 0.9, 0.3], 16: [0.4, 0.4, 0.6, 0.3]}, groups)
    assert checkpoints.choose_step(close) == 8
    assert checkpoints.choose_window(close, 3) == [16]
    # step 8 leads by 0.15, more than its standard error (0.115): step 8
    clear = _table({0: base, 8: [0.3, 0.3, 0.9, 0.3], 16: [0.2, 0.4, 0.5, 0.1]}, groups)
    assert checkpoints.choose_window(clear, 3) == [8]
    # k = 1 still asks for the best step alone; a forced step and a winning base model are unchanged
    assert checkpoints.choose_window(close, 1) == [8]
    assert checkpoints.choose_window(close, 3, force_step=8) == [8]
    worse = _table({0: [0.9, 0.9, 0.9, 0.9], 8: [0.3, 0.3, 0.9, 0.3], 16: [0.4, 0.4, 0.6, 0.3]}, groups)
    assert checkpoints.choose_window(worse, 3) == [0]
    # step 16 is within the standard error of step 8 but below the base model: step 8, never a step worse than none
    below_base = _table({0: [0.36, 0.36, 0.66, 0.36], 8: [0.3, 0.3, 0.9, 0.3], 16: [0.4, 0.4, 0.6, 0.3]}, groups)
    assert checkpoints.choose_window(below_base, 3) == [8]
    with pytest.raises(checkpoints.SelectionError, match="paired_se"):
        checkpoints.latest_within_se(close.drop(columns="paired_se"))


def test_export_says_when_the_latest_checkpoint_within_one_standard_error_was_chosen(tmp_path, rewrites_csv):
    make_run(tmp_path, rewrites_csv, steps=(8, 16))
    cfg = select_cfg(tmp_path, average_checkpoints=3)
    table = _table({0: [0.0, 0.0, 0.1, 0.0], 8: [0.3, 0.3, 0.9, 0.3], 16: [0.4, 0.4, 0.6, 0.3]}, ["a", "a", "b", "c"])
    steps = checkpoints.choose_window(table, cfg.average_checkpoints)
    out = export.export_selection(cfg, table.assign(scorer="fake scorer"), steps, checkpoints.load_validation(cfg))
    sel = artifacts.Selection.read(out)
    assert (sel.step, sel.best_checkpoint_step) == (16, 8)
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights of step 16"
    assert sel.rule.startswith("the latest checkpoint within one paired standard error of the best (step 8)")
    # the same scores with step 8 passed by hand: the best step, so the best-mean rule; the summary shows the errors
    out = export.export_selection(cfg, table.assign(scorer="fake scorer"), 8, checkpoints.load_validation(cfg))
    assert artifacts.Selection.read(out).rule == "highest mean SCS; the earlier step on ties"
    assert "paired_se" in export.score_table(cfg, table.assign(**{c: 0 for c in ("cos", "rows", "fallbacks",
                                                                                "seconds")}, scorer="f"), 8)


def _lora_checkpoint(folder: Path, a, b, r=4, alpha=8):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): a, key.format("B"): b}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "peft_type": "LORA"}))
    return key


def test_averaged_adapter_applies_the_mean_of_the_checkpoints_updates(tmp_path):
    import torch
    from safetensors.torch import load_file

    updates, folders = [], []
    for i in range(3):
        a, b = torch.randn(4, 8), torch.randn(6, 4)
        key = _lora_checkpoint(tmp_path / f"checkpoint-{i}", a, b)
        folders.append(tmp_path / f"checkpoint-{i}")
        updates.append(b @ a * (8 / 4))
    out = export.average_adapters(folders, tmp_path / "avg")
    cfg = json.loads((out / "adapter_config.json").read_text())
    t = load_file(str(out / "adapter_model.safetensors"))
    assert (cfg["r"], cfg["lora_alpha"]) == (12, 24)
    got = t[key.format("B")] @ t[key.format("A")] * (cfg["lora_alpha"] / cfg["r"])
    assert torch.allclose(got, torch.stack(updates).mean(0), atol=1e-5)
    assert not torch.allclose(got, updates[1], atol=1e-3)  # not one checkpoint's update


def test_export_averages_the_window_and_records_it(tmp_path, rewrites_csv, fake_model):
    import torch
    from safetensors.torch import load_file

    steps = tuple(range(8, 88, 8))
    run = make_run(tmp_path, rewrites_csv, steps=steps)
    for s in steps:  # real LoRA tensors in place of the stand-in bytes
        folder = run / f"checkpoint-{s}"
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_config.json").unlink()
        folder.rename(tmp_path / "tmp")
        _lora_checkpoint(folder, torch.full((1, 8), float(s)), torch.ones(6, 1), r=1, alpha=2)
        (tmp_path / "tmp" / "metrics.json").rename(folder / "metrics.json")
        (tmp_path / "tmp").rmdir()
    cfg = select_cfg(tmp_path, average_checkpoints=3)
    val = checkpoints.load_validation(cfg)
    table = {0: 0.0, 8: 0.30, 16: 0.1, 24: 0.1, 32: 0.2, 40: 0.25, 48: 0.26, 56: 0.25, 64: 0.2, 72: 0.1, 80: 0.1}
    window = checkpoints.choose_window(table, cfg.average_checkpoints)
    out = export.export_selection(cfg, _scores(table), window, val)
    sel = artifacts.Selection.read(out)
    assert (sel.step, sel.averaged_steps, sel.checkpoint) == (48, [40, 48, 56], None)
    assert sel.rule.startswith("the mean of the 3 checkpoints around the peak")
    exported = json.loads((out / "adapter_config.json").read_text())
    assert (exported["r"], exported["lora_alpha"]) == (3, 6)
    # the exported weights are the exact mean of the window's updates: each checkpoint's A is filled with its step, B
    # with ones, alpha / r = 2, so step s adds 2 s to every weight and the window 40, 48, 56 adds 2 x 48
    t = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    update = t[key.format("B")] @ t[key.format("A")] * (exported["lora_alpha"] / exported["r"])
    assert torch.equal(update, torch.full((6, 8), 2.0 * 48)), f"each weight moved by {update.unique().tolist()}, not 96"
    own = [load_file(str(run / f"checkpoint-{s}" / "adapter_model.safetensors")) for s in (40, 48, 56)]
    assert torch.allclose(update, torch.stack([w[key.format("B")] @ w[key.format("A")] * 2.0 for w in own]).mean(0))
    assert not torch.allclose(update, torch.full((6, 8), 2.0 * 40))  # not the first checkpoint's update alone
    # the averaged adapter is scored on the same rows as a model of its own, and the score is recorded
    scs = checkpoints.score_selected(cfg, val, FakeScorer(), {"preset": "smollm2-135m"})
    assert fake_model.generated == ["selected"]
    assert artifacts.Selection.read(out).selected_scs == pytest.approx(scs, abs=1e-4)
    # a single step's export reads as before averaging existed: no averaged_steps key at all
    out = export.export_selection(cfg, _scores(table), 8, val)
    assert "averaged_steps" not in json.loads((out / "selection.json").read_text())


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "per-module ranks, rsLoRA scaling or DoRA cannot be averaged"),
    ({"use_rslora": True}, "per-module ranks, rsLoRA scaling or DoRA cannot be averaged"),
    ({"rank_pattern": {"q_proj": 8}}, "per-module ranks, rsLoRA scaling or DoRA cannot be averaged"),
    ({"alpha_pattern": {"q_proj": 16}}, "per-module ranks, rsLoRA scaling or DoRA cannot be averaged"),
    ({"lora_alpha": 16}, r"has r=4, lora_alpha=16; .*checkpoint-0 has r=4, lora_alpha=8"),
    ("other tensors", "holds other LoRA tensors than"),
    ("other shapes", r"lora_A.weight has shape \(4, 16\), in .*checkpoint-0 \(4, 8\)"),
], ids=["dora", "rslora", "rank_pattern", "alpha_pattern", "another_alpha", "other_tensors", "other_shapes"])
def test_averaging_refuses_adapters_whose_mean_it_cannot_write(tmp_path, change, message):
    """The last of three checkpoints differs as given; nothing is written."""
    import torch
    from safetensors.torch import load_file, save_file

    folders = []
    for i in range(3):
        folders.append(tmp_path / f"checkpoint-{i}")
        key = _lora_checkpoint(folders[-1], torch.randn(4, 8), torch.randn(6, 4))
    last = folders[-1]
    if change == "other tensors":
        extra = load_file(str(last / "adapter_model.safetensors"))
        extra[key.format("A").replace("q_proj", "k_proj")] = torch.randn(4, 8)
        save_file(extra, str(last / "adapter_model.safetensors"))
    elif change == "other shapes":  # another base model's width
        save_file({key.format("A"): torch.randn(4, 16), key.format("B"): torch.randn(6, 4)},
                  str(last / "adapter_model.safetensors"))
    else:
        written = json.loads((last / "adapter_config.json").read_text())
        (last / "adapter_config.json").write_text(json.dumps({**written, **change}))
    with pytest.raises(config.ConfigError, match=f"^average_checkpoints: .*{message}"):
        export.average_adapters(folders, tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def _selected_run(tmp_path, name, a, b, rows, preset="smollm2-135m", max_prompt_tokens=128, base_won=False):
    """A run folder after ``make select``: selected/ with a real LoRA adapter (one q_proj module) and
    selection.json, and its choice and report rows (``rows``: the first two rows, then the rest)."""
    run = tmp_path / "runs" / name
    if base_won:
        (run / "selected").mkdir(parents=True)
    else:
        _lora_checkpoint(run / "selected", a, b)
    artifacts.Selection(run=name, preset=preset, step=40, adapter=None if base_won else "adapter_model.safetensors",
                        base_model_won=base_won, averaged_steps=[] if base_won else [30, 40, 50],
                        max_prompt_tokens=max_prompt_tokens, selected_scs=0.25, scorer="stand-in").write(run / "selected")
    rows[:2].to_csv(run / "validation.csv", index=False)
    rows[2:].to_csv(run / "report.csv", index=False)
    return run


def test_a_soup_of_runs_applies_the_mean_of_their_selected_updates(tmp_path, rewrites_csv):
    """export.soup_selections (`make soup`): two seeds' selected adapters in one, its selection.json naming both
    runs, and the first run's choice and report rows beside it (the script and its plan: tests/test_scripts.py)."""
    import torch
    from safetensors.torch import load_file

    from kaggle_utils import adapters

    rows = pd.read_csv(rewrites_csv).head(5)
    torch.manual_seed(0)
    parts = [(torch.randn(4, 8), torch.randn(6, 4)) for _ in range(2)]
    runs = [_selected_run(tmp_path, f"gpu-s{i}", a, b, rows) for i, (a, b) in enumerate(parts)]
    out = tmp_path / "runs" / "gpu-soup"
    (out).mkdir()
    (out / "report.csv").write_text("id\nleft by an earlier soup\n")
    assert export.soup_selections(runs, out) == out / "selected"
    t = load_file(str(out / "selected" / "adapter_model.safetensors"))
    cfg = json.loads((out / "selected" / "adapter_config.json").read_text())
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    got = t[key.format("B")] @ t[key.format("A")] * (cfg["lora_alpha"] / cfg["r"])
    assert torch.allclose(got, torch.stack([b @ a * 2.0 for a, b in parts]).mean(0), atol=1e-5)
    sel = artifacts.Selection.read(out / "selected")
    assert (sel.run, sel.preset, sel.max_prompt_tokens, sel.base_model_won) == ("gpu-soup", "smollm2-135m", 128, False)
    assert [s["run"] for s in sel.souped] == [str(r) for r in runs]
    assert "gpu-s0: steps 30-50; gpu-s1: steps 30-50" in sel.rule
    assert pd.read_csv(out / "report.csv")["id"].tolist() == rows["id"].tolist()[2:]  # not the earlier soup's
    # the soup's adapter passes the inference stage's checks for its preset
    assert adapters.selected_adapter(str(out / "selected"), "smollm2-135m") == str(out / "selected")
    # a later soup that cannot be averaged (another LoRA scale) is refused and leaves this one as it was
    odd = _selected_run(tmp_path, "gpu-s2", *parts[0], rows)
    written = json.loads((odd / "selected" / "adapter_config.json").read_text())
    (odd / "selected" / "adapter_config.json").write_text(json.dumps({**written, "lora_alpha": 16}))
    with pytest.raises(config.ConfigError, match="has r=4, lora_alpha=16"):
        export.soup_selections([runs[0], odd], out)
    assert torch.equal(load_file(str(out / "selected" / "adapter_model.safetensors"))[key.format("A")],
                       t[key.format("A")])
    assert artifacts.Selection.read(out / "selected").souped == sel.souped


def test_make_soup_takes_runs_relative_to_the_checkout_and_writes_a_plan_that_serves_them(tmp_path, rewrites_csv):
    """scripts/soup.py as `make soup RUN=gpu-soup SOUP_RUNS="runs/gpu-s0 runs/gpu-s1"` calls it: paths relative to
    the checkout, a plan whose adapter make infer resolves there, and a refusal printed once, naming the run."""
    import os
    import subprocess
    import sys

    import torch
    import yaml

    rows = pd.read_csv(rewrites_csv).head(5)
    for i in range(2):
        _selected_run(tmp_path, f"gpu-s{i}", torch.randn(4, 8), torch.randn(6, 4), rows)
    env = {**os.environ, "KAGGLE_UTILS_ROOT": str(tmp_path)}
    soup = [sys.executable, str(ROOT / "scripts" / "soup.py"), "runs/gpu-soup"]
    done = subprocess.run(soup + ["runs/gpu-s0", "runs/gpu-s1"], cwd=tmp_path / "runs", env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = yaml.safe_load((tmp_path / "runs" / "gpu-soup" / "plan.yaml").read_text())
    assert plan["models"] == [{"name": "soup", "preset": "smollm2-135m", "adapter": "runs/gpu-soup/selected"}]
    sel = artifacts.Selection.read(tmp_path / "runs" / "gpu-soup" / "selected")
    assert [s["run"] for s in sel.souped] == ["runs/gpu-s0", "runs/gpu-s1"]
    refused = subprocess.run(soup + ["runs/gpu-s0", "runs/gpu-s9"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (f"soup: {tmp_path / 'runs' / 'gpu-s9'}: no selected/"
                                                       "selection.json (make select RUN=gpu-s9 first)")


@pytest.mark.parametrize("spoil, message", [
    ("no selection", r"gpu-s1: no selected/selection.json \(make select RUN=gpu-s1 first\)"),
    ("base won", r"gpu-s1: its selection exported no adapter"),
    ("other preset", r"gpu-s1 has preset 'mistral-7b', .*gpu-s0 'smollm2-135m'"),
    ("other prompt limit", r"gpu-s1 has max_prompt_tokens 512, .*gpu-s0 128"),
    ("other base weights", r"gpu-s1 has base_model_path '/models/other', .*gpu-s0 ''"),
    ("other split", r"gpu-s1/validation.csv holds other rows than .*gpu-s0/validation.csv"),
    ("report rows in one run", r"gpu-s0/report.csv exists, .*gpu-s1/report.csv does not"),
    ("one run", r"needs two runs or more, got 1"),
    ("a run twice", r"a run is given twice"),
    ("into a run", r"gpu-s1 is one of the runs; write the soup to a folder of its own"),
], ids=["no_selection", "base_won", "other_preset", "other_prompt_limit", "other_base_weights", "other_split",
        "report_rows_in_one_run", "one_run", "a_run_twice", "into_a_run"])
def test_a_soup_is_refused_naming_the_run_that_cannot_join(tmp_path, rewrites_csv, spoil, message):
    import torch

    rows = pd.read_csv(rewrites_csv).head(5)
    first = _selected_run(tmp_path, "gpu-s0", torch.randn(4, 8), torch.randn(6, 4), rows)
    kw = {"base won": {"base_won": True}, "other preset": {"preset": "mistral-7b"},
          "other prompt limit": {"max_prompt_tokens": 512}}.get(spoil, {})
    second = _selected_run(tmp_path, "gpu-s1", torch.randn(4, 8), torch.randn(6, 4),
                           rows.iloc[[3, 4, 0, 1, 2]] if spoil == "other split" else rows, **kw)
    if spoil == "no selection":
        (second / "selected" / "selection.json").unlink()
    if spoil == "other base weights":
        sel = artifacts.Selection.read(second / "selected")
        sel.base_model_path = "/models/other"
        sel.write(second / "selected")
    if spoil == "report rows in one run":
        (second / "report.csv").unlink()
    runs = {"one run": [first], "a run twice": [first, second, first]}.get(spoil, [first, second])
    out = second if spoil == "into a run" else tmp_path / "runs" / "soup"
    before = (second / "selected" / "adapter_config.json").read_bytes() if spoil != "base won" else None
    with pytest.raises(config.ConfigError, match=f"^soup: .*{message}"):
        export.soup_selections(runs, out)
    assert not (tmp_path / "runs" / "soup").exists()  # refused before anything was written
    if before is not None:  # the runs themselves are untouched
        assert (second / "selected" / "adapter_config.json").read_bytes() == before
        assert artifacts.Selection.find(second / "selected") is not None or spoil == "no selection"


def test_an_even_window_is_refused_where_windows_are_chosen():
    """Windows are centred on a step, so their size is odd, in the config and in the rule; averaging itself takes any
    count (a soup of two seeds' best steps is two)."""
    scores = {0: 0.0, **{s: s / 100 for s in range(1, 21)}}
    with pytest.raises(config.ConfigError, match="^average_checkpoints: must be odd"):
        checkpoints.SelectConfig(average_checkpoints=4)
    with pytest.raises(config.ConfigError, match="^average_checkpoints: must be odd"):
        checkpoints.choose_window(scores, 4)
    assert checkpoints.choose_window(scores, 5) == [16, 17, 18, 19, 20]


def test_averaging_an_embedding_lora_and_a_module_to_save(tmp_path, tiny_model_dir):
    """Checkpoints that train LoRA on the embeddings (lora_embedding_A/B, laid out unlike a linear layer's) and a
    full copy of lm_head (modules_to_save): the averaged adapter, merged into the base, gives each weight the mean of
    what the checkpoints merged give it."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("llama")
    lora = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "embed_tokens"],
                      modules_to_save=["lm_head"])
    folders = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), lora)
        with torch.no_grad():  # the trained copy of lm_head moves away from the base's, differently per checkpoint
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(str(tmp_path / f"checkpoint-{seed}"))
        folders.append(tmp_path / f"checkpoint-{seed}")
    saved = set(load_file(str(folders[0] / "adapter_model.safetensors")))
    assert any("lora_embedding_A" in n for n in saved) and any(n.endswith("lm_head.weight") for n in saved)

    def merged(folder):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(folder))
        weights = model.merge_and_unload().state_dict()
        return {k: weights[k].float() for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                                 "lm_head.weight")}

    each = [merged(f) for f in folders]
    averaged = merged(export.average_adapters(folders, tmp_path / "avg"))
    original = dict(AutoModelForCausalLM.from_pretrained(str(base)).state_dict())
    for name, weight in averaged.items():
        mean = torch.stack([e[name] for e in each]).mean(0)
        assert torch.allclose(weight, mean, atol=1e-5), f"{name}: off by {(weight - mean).abs().max():.2e}"
        assert not torch.allclose(weight, each[0][name], atol=1e-3), f"{name}: one checkpoint's weight"
        assert not torch.allclose(weight, original[name].float(), atol=1e-3), f"{name}: the base's weight"
