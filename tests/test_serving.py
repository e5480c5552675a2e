"""Serving one model of the plan: the engine rule, the adapter resolved once, what the served engine says it is and
what it cost. The merge at kernel start, end to end: tests/test_merge.py.

Run: `.venv/bin/python -m pytest -q tests/test_serving.py`.
"""
from __future__ import annotations

import pytest
import torch

from conftest import save_adapter
from kaggle_utils import adapters, engines, models, serving
from kaggle_utils.config import ConfigError
from kaggle_utils.plan import ModelEntry


# ---------------------------------------------------------------- choosing the engine


def test_pick_engine_on_cpu(caplog):
    assert serving.pick_engine("hf") == "hf"
    assert serving.pick_engine("auto") == "hf"
    assert "engine: hf (auto; vLLM not used: no CUDA device)" in caplog.text
    assert serving.pick_engine("vllm") == "hf"  # never a lost submission: logged as an error, HF runs
    assert "engine: 'vllm' was asked for but cannot run here (no CUDA device)" in caplog.text
    with pytest.raises(ConfigError, match="engine"):
        serving.pick_engine("fastest")


def test_pick_engine_auto_takes_vllm_when_cuda_and_vllm(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(serving, "vllm_import_error", lambda: "")
    assert serving.pick_engine("auto") == "vllm"
    assert "engine: vllm (auto" in caplog.text
    monkeypatch.setattr(serving, "vllm_import_error", lambda: "ModuleNotFoundError: No module named 'vllm'")
    assert serving.pick_engine("auto") == "hf"
    assert "No module named 'vllm'" in caplog.text


def test_pick_engine_auto_weighs_the_model_against_the_cards(monkeypatch, caplog, tiny_model_dir):
    """With a model given, auto reads its weights' size and the cards' memory: a small model on two T4-sized cards
    takes the HF engine; the same model on cards too small for one copy takes vLLM's tensor parallel."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(serving, "vllm_import_error", lambda: "")
    folder = tiny_model_dir("mistral")
    monkeypatch.setattr(models, "card_memory_gib", lambda: [15.0, 15.0])
    assert serving.pick_engine("auto", "mistral-7b", str(folder)) == "hf"
    assert "engine: hf (auto, mistral-7b: 0.0 GiB of 16-bit weights fit one 15 GiB card" in caplog.text
    tiny = models.weights_bytes(folder) / 2**30
    monkeypatch.setattr(models, "card_memory_gib", lambda: [tiny, tiny])
    assert serving.pick_engine("auto", "mistral-7b", str(folder)) == "vllm"
    assert "need vLLM's tensor parallel over 2 cards" in caplog.text

    def unreadable():
        raise RuntimeError("CUDA error: unknown error")

    monkeypatch.setattr(models, "card_memory_gib", unreadable)  # weighing fails: vLLM, which can still fall back
    assert serving.pick_engine("auto", "mistral-7b", str(folder)) == "vllm"
    assert "the model's size could not be weighed (RuntimeError: CUDA error: unknown error)" in caplog.text


@pytest.mark.parametrize("gib, cards, fast, four_bit, kind, words", [
    (0.3, [15.0, 15.0], True, False, "hf", "fit one 15 GiB card"),  # SmolLM2 on Kaggle's 2xT4
    (13.5, [15.0, 15.0], True, False, "vllm", "tensor parallel over 2 cards"),  # Mistral-7B on 2xT4
    (24.2, [15.0, 15.0], True, True, "hf", "4 bits"),  # Llama-2-13B on 2xT4: 26 GB of 16-bit weights
    (13.5, [80.0], True, False, "hf", "fast path"),  # Mistral-7B on an A100 80GB
    (41.0, [140.0], True, True, "vllm", "4 bits"),  # Mistral-22B on an H200: vLLM's 16 bits beat HF's 4
    (87.0, [140.0], False, True, "vllm", "on a 140 GiB card"),  # Mixtral on an H200
    (87.0, [15.0, 15.0], False, True, "hf", "do not fit"),  # Mixtral on 2xT4
])
def test_auto_picks_the_engine_by_the_cards_and_the_weights(gib, cards, fast, four_bit, kind, words):
    got, why = serving.auto_choice(gib, cards, fast, four_bit)
    assert got == kind and words in why and f"{gib:.1f} GiB" in why


# ---------------------------------------------------------------- serving


def test_serve_resolves_the_adapter_once_and_says_what_it_started(tmp_path, tiny_model_dir, monkeypatch):
    """One call: the adapter is resolved once (the engine only checks it), the HF engine starts with it merged in, and
    the engine says what it is and what starting it took."""
    base = tiny_model_dir("mistral")
    adapter = save_adapter(base, tmp_path / "selected")
    resolved = []
    real = adapters.selected_adapter
    monkeypatch.setattr(adapters, "selected_adapter", lambda *a: resolved.append(a) or real(*a))
    entry = ModelEntry(name="m", preset="mistral-7b", base_model=str(base), adapter=str(adapter))
    engine = serving.serve(entry, rows=3, engine="auto")
    try:
        assert resolved == [(str(adapter), "mistral-7b")]
        assert isinstance(engine, engines.HFEngine) and engine.name == "hf"  # no CUDA here: auto is the HF engine
        assert not type(engine.model).__module__.startswith("peft")  # the adapter merged into the weights
        assert engine.startup.merged is False and engine.startup.merge_s == 0.0 and engine.startup.load_s >= 0.0
    finally:
        engine.close()


def test_serve_runs_the_base_model_alone_when_it_won_the_selection(tmp_path, tiny_model_dir, caplog):
    """A selected/ folder without an adapter (step 0 won): the base model serves, and the log says so."""
    (tmp_path / "selection.json").write_text('{"preset": "mistral-7b", "step": 0, "adapter": null, '
                                             '"base_model_won": true}')
    entry = ModelEntry(name="m", preset="mistral-7b", base_model=str(tiny_model_dir("mistral")), adapter=str(tmp_path))
    engine = serving.serve(entry, engine="hf")
    try:
        assert "base model won" in caplog.text and not hasattr(engine.model, "peft_config")
    finally:
        engine.close()


def test_a_wrong_plan_is_raised_not_served(tmp_path, tiny_model_dir):
    entry = ModelEntry(name="m", preset="mistral-7b", base_model=str(tiny_model_dir("mistral")),
                       adapter=str(tmp_path / "nowhere"))
    with pytest.raises(adapters.AdapterError, match="does not exist"):
        serving.serve(entry, engine="hf")
    with pytest.raises(ConfigError, match="^engine:"):
        serving.serve(ModelEntry(name="m", preset="mistral-7b", base_model=str(tiny_model_dir("mistral"))),
                      engine="fastest")
