"""Sampling engines: both engines' configuration and load options, vLLM's contract against the real vLLM types (where
vllm imports; `make setup` installs its pure-Python part), adapter checks, and the HF engine generating for real on tiny
random models (and on SmolLM2, marked slow), adapters swapped in and out. Engine choice: tests/test_serving.py.
Run: `pytest tests/test_engines.py` (fast part: `pytest tests/test_engines.py -m "not slow"`).
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import save_adapter
from kaggle_utils import adapters, engines, models, prompts, sampling, serving
from kaggle_utils.config import ConfigError

ROWS = [("The cat sat on the mat.", "Upon the mat, a feline rested."),
        ("Short.", "A much longer rewritten text, full of flourish and ornament, about something short."),
        ("Meeting at noon tomorrow.", "Hear ye! The assembly convenes when the sun stands highest on the morrow.")]


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs,field", [
    (dict(n=0), "n"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(generation_batch_size=0), "generation_batch_size"),
    (dict(n=4, temperature=0), "n"),
])
def test_sampling_config_refuses_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        engines.SamplingConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="fp8"), r"^dtype: must be one of \('auto', 'float16', 'bfloat16'\), got 'fp8'"),
    (dict(gpu_memory_utilization=0), r"^gpu_memory_utilization: must be in \(0, 1\], got 0"),
    (dict(gpu_memory_utilization=1.5), r"^gpu_memory_utilization: must be in \(0, 1\], got 1.5"),
    (dict(max_model_len=0), r"^max_model_len: must be >= 1, got 0"),
])
def test_engine_options_refuse_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        engines.EngineOptions(**kwargs)


@pytest.mark.parametrize("capability,dtype", [(None, "half"), ((7, 5), "half"), ((8, 0), "bfloat16"),
                                              ((9, 0), "bfloat16")])
def test_vllm_dtype_half_on_t4(capability, dtype):
    assert engines.vllm_dtype(capability) == dtype


@pytest.mark.parametrize("rank,expected", [(1, 8), (4, 8), (8, 8), (9, 16), (64, 64), (300, 320)])
def test_vllm_max_lora_rank_at_least_8(rank, expected):
    assert engines.vllm_max_lora_rank(rank) == expected


def test_vllm_max_lora_rank_too_big():
    with pytest.raises(adapters.AdapterError, match="above"):
        engines.vllm_max_lora_rank(1024)


def test_vllm_llm_kwargs_with_adapter_on_two_t4():
    options = engines.EngineOptions(gpu_memory_utilization=0.85, max_model_len=1064, seed=3)
    kw = engines.vllm_llm_kwargs("/m/mistral", num_gpus=2, capability=(7, 5), lora_rank=1, options=options)
    assert kw == dict(model="/m/mistral", tokenizer="/m/mistral", dtype="half", tensor_parallel_size=2,
                      gpu_memory_utilization=0.85, max_model_len=1064, seed=3, trust_remote_code=False,
                      enable_lora=True, max_lora_rank=8, max_loras=1, attention_backend="TRITON_ATTN",
                      enforce_eager=True, disable_custom_all_reduce=True)


def test_vllm_llm_kwargs_merged_folder_has_no_lora():
    kw = engines.vllm_llm_kwargs("/m/merged", num_gpus=1, capability=(9, 0))
    assert "enable_lora" not in kw and kw["dtype"] == "bfloat16" and kw["tensor_parallel_size"] == 1
    as_t4 = engines.EngineOptions(dtype="float16")
    assert engines.vllm_llm_kwargs("/m/merged", num_gpus=1, capability=(9, 0), options=as_t4)["dtype"] == "half"
    assert kw["gpu_memory_utilization"] == engines.EngineOptions().gpu_memory_utilization == 0.9  # the default


@pytest.mark.parametrize("gpus,heads,kv,expected", [(2, 32, 8, 2), (2, 9, 3, 1), (4, 12, 4, 4), (4, 6, 2, 2),
                                                    (3, 32, 8, 2), (1, 9, 3, 1), (2, 0, 0, 2)])
def test_tensor_parallel_splits_the_heads_evenly(gpus, heads, kv, expected):
    """vLLM refuses a split that leaves uneven heads (SmolLM2's 9 heads over 2 GPUs)."""
    assert engines.vllm_tensor_parallel_size(gpus, heads, kv) == expected


def test_vllm_kwargs_read_the_heads_from_the_model_folder(tiny_model_dir, caplog):
    folder = tiny_model_dir("mistral")  # 4 attention heads, 2 KV heads
    assert engines.vllm_llm_kwargs(folder, num_gpus=2, capability=(7, 5))["tensor_parallel_size"] == 2
    assert engines.vllm_llm_kwargs(folder, num_gpus=3, capability=(7, 5))["tensor_parallel_size"] == 2
    assert "vLLM on 2 of 3 GPUs" in caplog.text


@pytest.mark.parametrize("capability,options,expected", [
    # a T4: fp16, Triton attention, eager, no custom all-reduce over PCIe
    ((7, 5), {}, dict(dtype="half", attention_backend="TRITON_ATTN", enforce_eager=True,
                      disable_custom_all_reduce=True)),
    # an A100 / H200: bf16 and vLLM's own choices
    ((9, 0), {}, dict(dtype="bfloat16")),
    # an H200 forced down the T4's path
    ((9, 0), dict(dtype="float16", attention_backend="TRITON_ATTN", enforce_eager="on"),
     dict(dtype="half", attention_backend="TRITON_ATTN", enforce_eager=True)),
    # a T4 told to capture graphs anyway
    ((7, 5), dict(enforce_eager="off"), dict(dtype="half", attention_backend="TRITON_ATTN",
                                             disable_custom_all_reduce=True)),
])
def test_vllm_kwargs_follow_the_card(tiny_model_dir, capability, options, expected):
    kw = engines.vllm_llm_kwargs(tiny_model_dir("mistral"), num_gpus=2, capability=capability,
                                 options=engines.EngineOptions(**options))
    card = {k: kw[k] for k in ("dtype", "attention_backend", "enforce_eager", "disable_custom_all_reduce") if k in kw}
    assert card == expected


def test_vllm_kwargs_refuse_unknown_settings():
    with pytest.raises(ConfigError, match="^enforce_eager: must be one of"):
        engines.EngineOptions(enforce_eager="yes")
    with pytest.raises(ConfigError, match="^attention_backend: must be auto or a vLLM backend name"):
        engines.EngineOptions(attention_backend="triton")


def test_vllm_sampling_and_lora_kwargs():
    cfg = engines.SamplingConfig(n=4, temperature=0.7, top_p=0.95, max_new_tokens=32, seed=5)
    assert engines.vllm_sampling_kwargs(cfg, seed=12) == dict(n=4, temperature=0.7, top_p=0.95, max_tokens=32,
                                                              seed=12)
    assert engines.vllm_lora_kwargs("/a/runs/x/selected") == dict(lora_name="selected", lora_int_id=1,
                                                                  lora_path="/a/runs/x/selected")


# ---------------------------------------------------------------- vLLM's own types (skipped where vllm is absent)


@pytest.fixture(scope="module")
def vllm():
    return pytest.importorskip("vllm", reason="vllm's pure-Python types are not installed (make setup installs them)")


def test_vllm_contract_sampling_params_and_lora_request(vllm):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    cfg = engines.SamplingConfig(n=4, temperature=0.7, top_p=0.95, max_new_tokens=32)
    sp = SamplingParams(**engines.vllm_sampling_kwargs(cfg, seed=7))
    assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.seed) == (4, 0.7, 0.95, 32, 7)
    lora = LoRARequest(**engines.vllm_lora_kwargs("/x/selected"))
    assert (lora.lora_name, lora.lora_int_id, lora.lora_path) == ("selected", 1, "/x/selected")


@pytest.mark.parametrize("lora_rank,capability,gpus", [(1, (7, 5), 2), (16, (9, 0), 1), (0, (7, 5), 2),
                                                      (80, (7, 5), 2)])
def test_vllm_contract_llm_kwargs_are_engine_args(vllm, tiny_model_dir, lora_rank, capability, gpus):
    """``LLM(**kwargs)`` hands every keyword to ``EngineArgs``; build that (it validates without a GPU, given a real
    model folder) and the LoRAConfig it would make. Building the engine itself needs CUDA: not tested here."""
    import dataclasses
    import typing

    from vllm.config.lora import LoRAConfig, MaxLoRARanks
    from vllm.engine.arg_utils import EngineArgs

    kw = engines.vllm_llm_kwargs(tiny_model_dir("mistral"), num_gpus=gpus, capability=capability, lora_rank=lora_rank,
                                 options=engines.EngineOptions(max_model_len=1064))
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(kw) <= fields, set(kw) - fields
    args = EngineArgs(**kw)
    assert args.dtype == kw["dtype"] and args.tensor_parallel_size == gpus
    if capability < (8, 0):  # the T4 settings reach the engine's arguments as vLLM names them
        assert args.enforce_eager and args.disable_custom_all_reduce
        assert str(getattr(args.attention_backend, "name", args.attention_backend)) == "TRITON_ATTN"
    if lora_rank:
        assert args.enable_lora and args.max_lora_rank in typing.get_args(MaxLoRARanks)
        LoRAConfig(max_lora_rank=kw["max_lora_rank"], max_loras=kw["max_loras"])  # pydantic-validated


def test_vllm_contract_generate_batches_with_real_request_types(vllm, tokenizer, tmp_path):
    """VLLMEngine against a stand-in ``LLM`` that checks the real input types and answers with real outputs."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput, RequestOutput

    calls = []

    class StandInLLM:
        def generate(self, prompts_, params, *, use_tqdm=True, lora_request=None):
            assert isinstance(lora_request, LoRARequest) and len(prompts_) == len(params)
            calls.append([len(p["prompt_token_ids"]) for p in prompts_])
            outs = []
            for i, (p, sp) in enumerate(zip(prompts_, params)):
                assert isinstance(sp, SamplingParams) and sp.n == 2 and sp.max_tokens == 16
                completions = [CompletionOutput(index=k, text=f" this text as style {k}.", token_ids=[1],
                                                cumulative_logprob=None, logprobs=None) for k in range(sp.n)]
                outs.append(RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=p["prompt_token_ids"],
                                          prompt_logprobs=None, outputs=completions, finished=True))
            return outs

    engine = engines.VLLMEngine(StandInLLM(), tokenizer, adapter_path=str(tmp_path), rows_per_call=2)
    cfg = engines.SamplingConfig(n=2, temperature=0.7, max_new_tokens=16, forced_start="Rewrite")
    got = engine.generate([o for o, _ in ROWS], [r for _, r in ROWS], cfg)
    assert got[0] == ["Rewrite this text as style 0.", "Rewrite this text as style 1."]
    assert len(calls) == 2 and sorted(calls[0] + calls[1], reverse=True) == calls[0] + calls[1]  # longest first
    preds, empty = sampling.postprocess(got[1], engine.marker)
    assert preds[0] == "Rewrite this text as style 0." and empty == 0


def test_vllm_engine_from_preset_builds_llm_from_the_folders(vllm, monkeypatch, tmp_path, tiny_model_dir):
    """from_preset / load_engine with a stand-in ``vllm.LLM`` (the real one needs CUDA): the adapter's rank, the base
    folder, LoRA off for a merged folder, and a LoRARequest on every generate call."""
    from vllm.lora.request import LoRARequest

    built = []

    class StandInLLM:
        def __init__(self, **kwargs):
            built.append(kwargs)

        def generate(self, prompts_, params, *, use_tqdm=True, lora_request=None):
            built.append({"lora_request": lora_request})
            return [type("Out", (), {"outputs": [type("C", (), {"text": " it."})()] * sp.n})() for sp in params]

    monkeypatch.setitem(vllm.__dict__, "LLM", StandInLLM)  # setattr would first import the real (CUDA) LLM
    base = tiny_model_dir("mistral")
    adapter = save_adapter(base, tmp_path / "selected")
    engine = serving.load_engine("vllm", "mistral-7b", str(base), str(adapter),
                                 options=engines.EngineOptions(max_model_len=1064, seed=2))
    assert isinstance(engine, engines.VLLMEngine)
    assert built[0]["model"] == str(base) and built[0]["enable_lora"] and built[0]["max_lora_rank"] == 8
    assert built[0]["tensor_parallel_size"] == 1 and (built[0]["max_model_len"], built[0]["seed"]) == (1064, 2)
    out = engine.generate([ROWS[0][0]], [ROWS[0][1]], engines.SamplingConfig(n=2, temperature=0.5))
    assert out == [[" it.", " it."]] and isinstance(built[1]["lora_request"], LoRARequest)
    assert built[1]["lora_request"].lora_path == str(adapter)
    serving.load_engine("vllm", "mistral-7b", str(base), "", merged=True)  # a merged copy: served with no adapter
    assert "enable_lora" not in built[-1] and built[-1]["model"] == str(base)


# ---------------------------------------------------------------- loading


def test_the_hf_engine_keeps_a_model_that_fits_one_card_on_one_card(monkeypatch, tiny_model_dir):
    """On two GPUs the HF engine loads a model that fits one card on GPU 0 alone (its fast path needs one device);
    a model too big for one card is left to accelerate's split."""
    folder = tiny_model_dir("mistral")
    asked = []

    def load_model(spec, base, **kwargs):
        asked.append(kwargs["num_gpus"])
        raise InterruptedError("stop before any weights load")

    monkeypatch.setattr(models, "gpu_count", lambda: 2)
    monkeypatch.setattr(models, "load_model", load_model)
    tiny = models.weights_bytes(folder) / 2**30
    for cards, expected in (([15.0, 15.0], 1), ([tiny, tiny], None)):
        monkeypatch.setattr(models, "card_memory_gib", lambda cards=cards: cards)
        with pytest.raises(InterruptedError):
            engines.HFEngine.from_preset("mistral-7b", str(folder))
    assert asked == [1, None]


def test_weights_bytes_counts_the_model_files_once(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral", "torch_dtype": "bfloat16"}))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x" * 300)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"x" * 200)
    (folder / "consolidated.safetensors").write_bytes(b"x" * 500)  # Mistral's own copy of the same weights
    (folder / "training_args.bin").write_bytes(b"x" * 50)
    assert models.weights_bytes(folder) == 500
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 480}}))
    assert models.weights_bytes(folder) == 480  # the index's count of the tensors, without file headers
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral", "torch_dtype": "float32"}))
    assert models.weights_bytes(folder) == 240  # fp32 on disk: half as much in 16 bits


# ---------------------------------------------------------------- adapters


def test_missing_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(adapters.AdapterError, match="does not exist"):
        adapters.check_adapter(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(adapters.AdapterError, match="adapter_config.json"):
        adapters.check_adapter(str(tmp_path / "empty"))


def test_adapter_of_another_preset_is_refused(tmp_path, tiny_model_dir):
    adapter = save_adapter(tiny_model_dir("llama"), tmp_path / "sel")
    (adapter / "selection.json").write_text(json.dumps({"run": "x", "preset": "llama2-13b", "step": 2}))
    assert adapters.check_adapter(str(adapter), "llama2-13b") == adapter
    with pytest.raises(adapters.AdapterError, match="trained on preset 'llama2-13b'.*uses preset 'mistral-7b'"):
        adapters.check_adapter(str(adapter), "mistral-7b")


def test_adapter_of_another_shape_is_refused_before_loading(tmp_path, tiny_model_dir):
    adapter = save_adapter(tiny_model_dir("mistral"), tmp_path / "other", hidden=32)
    with pytest.raises(adapters.AdapterError, match="hidden_size is 64"):
        adapters.check_adapter_fits(str(adapter), tiny_model_dir("mistral"))
    with pytest.raises(adapters.AdapterError, match="does not fit"):
        engines.HFEngine.from_preset("mistral-7b", str(tiny_model_dir("mistral")), str(adapter))


def test_attach_adapter_shape_mismatch_is_an_adapter_error(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    adapter = save_adapter(tiny_model_dir("llama"), tmp_path / "other", hidden=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    with pytest.raises(adapters.AdapterError, match="does not fit base model"):
        adapters.attach_adapter(model, str(adapter))


# ---------------------------------------------------------------- the HF engine, for real


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    """An fp32 tiny Llama with SmolLM2's tokenizer (fp32: the prefill comparison must not hinge on bf16 ties)."""
    from transformers import AutoModelForCausalLM

    from kaggle_utils import models

    folder = tiny_model_dir("llama")
    tok = models.load_tokenizer(folder)
    prompts.ensure_pad_token(tok)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return engines.HFEngine(model, tok)


def test_hf_engine_generates_n_per_row_with_forced_start(tiny_engine):
    cfg = engines.SamplingConfig(n=3, temperature=0.9, top_p=0.95, max_new_tokens=6, generation_batch_size=2,
                                 forced_start="Rewrite")
    batches = list(tiny_engine.generate_batches([o for o, _ in ROWS], [r for _, r in ROWS], cfg, progress=False))
    assert [len(rows) for rows, _ in batches] == [2, 1]
    lengths = [len(prompts.generation_ids(tiny_engine.tokenizer, o, r, 1024)[0]) for o, r in ROWS]
    first = batches[0][0]
    assert min(lengths[i] for i in first) >= max(lengths[i] for i in batches[1][0])  # longest rows first
    out = tiny_engine.generate([o for o, _ in ROWS], [r for _, r in ROWS], cfg, progress=False)
    assert all(len(c) == 3 and all(t.startswith("Rewrite") for t in c) for c in out)


def test_hf_engine_skips_done_rows(tiny_engine):
    cfg = engines.SamplingConfig(n=1, max_new_tokens=3, generation_batch_size=4)
    batches = list(tiny_engine.generate_batches([o for o, _ in ROWS], [r for _, r in ROWS], cfg, skip={0, 2},
                                                progress=False))
    assert [rows for rows, _ in batches] == [[1]]


def test_shared_prefill_gives_what_plain_generate_gives(tiny_engine, monkeypatch):
    """n samples from one prefill (KV cache copied n times) equal greedy decoding row by row: top_p this small keeps
    only the most likely token, so every sample must be the greedy answer."""
    origs, rewrs = [o for o, _ in ROWS], [r for _, r in ROWS]
    greedy = tiny_engine.generate(origs, rewrs, engines.SamplingConfig(n=1, max_new_tokens=8, generation_batch_size=3),
                                  progress=False)
    seen = []
    real_generate = tiny_engine.model.generate

    def spy(**kwargs):
        seen.append(sorted(k for k in kwargs if k in ("cache", "past_key_values")))
        return real_generate(**kwargs)

    monkeypatch.setattr(tiny_engine.model, "generate", spy)
    cfg = engines.SamplingConfig(n=3, temperature=1.0, top_p=1e-9, max_new_tokens=8, generation_batch_size=3)
    shared = tiny_engine.generate(origs, rewrs, cfg, progress=False)
    assert seen and seen[0], "the shared-prefill path was not taken"
    assert shared == [[g[0]] * 3 for g in greedy]


@pytest.mark.slow
def test_smollm_engine_with_adapter_recovers_prompt_sentences(tmp_path, smollm_dir):
    """The real embedded model with a fresh adapter of its own shape, merged into its weights: n samples per row, drawn
    apart, parsed into non-empty prompts."""
    adapter = save_adapter(smollm_dir, tmp_path / "adapter")
    engine = engines.HFEngine.from_preset("smollm2-135m", adapter_path=str(adapter))
    cfg = engines.SamplingConfig(n=2, temperature=0.7, top_p=0.95, max_new_tokens=24, generation_batch_size=2)
    raw = engine.generate([o for o, _ in ROWS[:2]], [r for _, r in ROWS[:2]], cfg, progress=False)
    parsed = [sampling.postprocess(r, engine.marker, "FALLBACK")[0] for r in raw]
    assert all(len(p) == 2 for p in parsed)
    assert sum(p != "FALLBACK" for row in parsed for p in row) >= 3
    assert all(r[0] != r[1] for r in raw)  # two samples drawn per row, not one sample copied (the shared prefill)
    assert not type(engine.model).__module__.startswith("peft")  # merged: no PEFT wrapper left around the model


def test_selection_won_by_the_base_model_runs_without_adapter(tmp_path, caplog):
    (tmp_path / "selection.json").write_text(json.dumps({"preset": "smollm2-135m", "step": 0, "adapter": None,
                                                         "base_model_won": True}))
    assert adapters.selected_adapter(str(tmp_path), "smollm2-135m") == ""
    assert "base model won" in caplog.text
    with pytest.raises(adapters.AdapterError, match="preset 'smollm2-135m'"):
        adapters.selected_adapter(str(tmp_path), "mistral-7b")
    assert adapters.selected_adapter("", "mistral-7b") == ""
    with pytest.raises(adapters.AdapterError, match="does not exist"):
        adapters.selected_adapter(str(tmp_path / "missing"))


def test_an_unreadable_selection_beside_an_adapter_is_an_adapter_error_naming_it(tmp_path):
    (tmp_path / "selection.json").write_text(json.dumps({"preset": ["smollm2-135m"]}))
    with pytest.raises(adapters.AdapterError, match=rf"^adapter '{re.escape(str(tmp_path))}': .*selection\.json: "
                                                    r"field 'preset' must be str or NoneType"):
        adapters.selected_adapter(str(tmp_path), "smollm2-135m")


def test_adapters_swapped_into_one_loaded_base_change_what_it_generates_and_come_off_again(tmp_path, tiny_model_dir):
    """The select stage's way to score every checkpoint on one loaded base: use_adapter swaps an adapter in unmerged
    (one in memory at a time), and use_adapter(None) generates as the base alone again."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir("llama")
    folders = []
    for seed in (1, 2):  # non-zero B: each adapter really moves the weights
        torch.manual_seed(seed)
        lora = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(
            r=1, lora_alpha=64, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
        lora.save_pretrained(tmp_path / f"checkpoint-{seed}")
        folders.append(tmp_path / f"checkpoint-{seed}")
    engine = engines.HFEngine.from_preset("smollm2-135m", str(folder))
    cfg = engines.SamplingConfig(n=1, max_new_tokens=8)
    rows = ([o for o, _ in ROWS], [r for _, r in ROWS])
    base = engine.generate(*rows, cfg, progress=False)
    outputs = []
    for adapter in folders:
        engine.use_adapter(adapter)
        outputs.append(engine.generate(*rows, cfg, progress=False))
        assert len(engine.model.peft_config) == 1  # the one before was dropped
    assert outputs[0] != base and outputs[1] != outputs[0]
    engine.use_adapter(None)
    assert engine.generate(*rows, cfg, progress=False) == base


def test_text_far_over_the_context_is_truncated_and_logged(tiny_engine, caplog):
    long_text = "word " * 5000
    cfg = engines.SamplingConfig(n=1, max_new_tokens=2, max_prompt_tokens=256)
    out = tiny_engine.generate([ROWS[0][0], long_text], [ROWS[0][1], long_text], cfg, progress=False)
    assert len(out) == 2 and all(len(c) == 1 for c in out)
    assert "truncated 1 row(s) to 256 prompt tokens (rows [1])" in caplog.text


# ---------------------------------------------------------------- greedy first


def test_greedy_first_splits_into_a_greedy_and_a_sampled_pass():
    cfg = engines.SamplingConfig(n=4, temperature=0.5, greedy_first=True)
    greedy, rest = cfg.passes()
    assert (greedy.n, greedy.temperature, rest.n, rest.temperature) == (1, 0.0, 3, 0.5)
    assert [p.n for p in engines.SamplingConfig(n=1, temperature=0.5, greedy_first=True).passes()] == [1]
    assert engines.SamplingConfig(n=3, temperature=0.5).passes() == [engines.SamplingConfig(n=3, temperature=0.5)]


def test_hf_greedy_first_prediction_is_the_greedy_one(tiny_engine):
    """The first of n predictions equals a plain greedy generation; the others are samples."""
    originals, rewrittens = [o for o, _ in ROWS], [r for _, r in ROWS]
    greedy = tiny_engine.generate(originals, rewrittens, engines.SamplingConfig(n=1, max_new_tokens=6),
                                  progress=False)
    cfg = engines.SamplingConfig(n=3, temperature=1.5, max_new_tokens=6, greedy_first=True, generation_batch_size=2)
    got = tiny_engine.generate(originals, rewrittens, cfg, progress=False)
    assert all(len(c) == 3 for c in got)
    assert [c[0] for c in got] == [g[0] for g in greedy]
    assert any(c[1] != c[0] or c[2] != c[0] for c in got)  # random weights at temperature 1.5: samples differ


def test_vllm_greedy_first_sends_a_greedy_and_a_sampled_request_per_row(vllm, tokenizer):
    from vllm.outputs import CompletionOutput, RequestOutput

    seen = []

    class StandInLLM:
        def generate(self, prompts_, params, *, use_tqdm=True, lora_request=None):
            outs = []
            for i, (p, sp) in enumerate(zip(prompts_, params)):
                seen.append((tuple(p["prompt_token_ids"]), sp.n, sp.temperature))
                tag = "greedy" if sp.temperature == 0 else "sampled"
                completions = [CompletionOutput(index=k, text=f" {tag} {k}", token_ids=[1], cumulative_logprob=None,
                                                logprobs=None) for k in range(sp.n)]
                outs.append(RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=p["prompt_token_ids"],
                                          prompt_logprobs=None, outputs=completions, finished=True))
            return outs

    engine = engines.VLLMEngine(StandInLLM(), tokenizer)
    cfg = engines.SamplingConfig(n=3, temperature=0.7, max_new_tokens=8, greedy_first=True)
    got = engine.generate([o for o, _ in ROWS], [r for _, r in ROWS], cfg, progress=False)
    assert got == [[" greedy 0", " sampled 0", " sampled 1"]] * len(ROWS)
    assert sorted((n, t) for _, n, t in seen) == sorted([(1, 0.0), (2, 0.7)] * len(ROWS))
    assert len({p for p, _, _ in seen}) == len(ROWS)  # both requests of a row carry the same prompt
