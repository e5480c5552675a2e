"""The fast decoding path against transformers' own ``generate``, on tiny random Llama and Mistral models.

CPU runs the fast path with ``force=True`` (eager ops, no CUDA graphs) and checks it token for token; the CUDA-only
parts (graphs, compiled ops) are checked the same way where a GPU is present. Run: `pytest tests/test_decoding.py`.
"""
from __future__ import annotations

import pytest
import torch

from kaggle_utils import decoding

VOCAB, PAD = 384, 0
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_model(arch: str, device: str = "cpu", **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=PAD, initializer_range=0.2)
    common.update(overrides)
    cfg = LlamaConfig(**common) if arch == "llama" else MistralConfig(**common, sliding_window=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(device).eval()


def left_padded(lengths, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids.to(device), mask.to(device)


def hf_generate(model, ids, mask, **kw):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_matches_generate_token_for_token(arch):
    model = tiny_model(arch)
    ids, mask = left_padded([5, 17, 9, 30, 1])
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    want = hf_generate(model, ids, mask, **kw)
    got = decoding.generate(model, force=True, input_ids=ids, attention_mask=mask, pad_token_id=PAD, **kw)
    assert got.shape == want.shape == (5, 30 + 12)
    assert torch.equal(got, want)


def test_eos_stops_each_row_and_the_batch_like_generate():
    model = tiny_model("llama")
    ids, mask = left_padded([6, 11, 8])
    free = hf_generate(model, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    # Make a token that row 0 emits at its 3rd new step the EOS: row 0 stops there, the others go on.
    eos = int(free[0, ids.shape[1] + 2])
    want = hf_generate(model, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    got = decoding.generate(model, force=True, input_ids=ids, attention_mask=mask, max_new_tokens=10,
                            do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got, want)
    new = got[0, ids.shape[1]:].tolist()
    assert eos in new and all(t == PAD for t in new[new.index(eos) + 1:])
    # Every row ends early: the output is as short as transformers' (it stops once all rows have ended).
    eos_all = [int(free[r, ids.shape[1] + 1]) for r in range(3)]
    want = hf_generate(model, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=eos_all)
    got = decoding.generate(model, force=True, input_ids=ids, attention_mask=mask, max_new_tokens=10,
                            do_sample=False, eos_token_id=eos_all, pad_token_id=PAD)
    assert got.shape[1] < ids.shape[1] + 10
    assert torch.equal(got, want)


def test_small_budgets_split_prefill_and_decode_without_changing_tokens():
    model = tiny_model("mistral")
    prompts = [list(range(3, 3 + n)) for n in (40, 7, 23, 3, 15, 31)]
    one = decoding.generate_ids(model, prompts, max_new_tokens=9, pad_token_id=PAD)
    stats: dict = {}
    split = decoding.generate_ids(model, prompts, max_new_tokens=9, pad_token_id=PAD, prefill_tokens=48,
                                  kv_budget_bytes=2 * 64 * 2 * 2 * 2 * 16 * 4, stats=stats)
    assert stats["sub_batches"] > 1
    assert torch.equal(one, split)


def test_sampling_top_p_tiny_is_greedy_and_seeded_sampling_repeats():
    model = tiny_model("llama")
    ids, mask = left_padded([4, 12, 7])
    greedy = decoding.generate(model, force=True, input_ids=ids, attention_mask=mask, max_new_tokens=8,
                               do_sample=False, eos_token_id=None, pad_token_id=PAD)
    nucleus = decoding.generate(model, force=True, input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                do_sample=True, temperature=0.7, top_p=1e-6, top_k=None, eos_token_id=None,
                                pad_token_id=PAD)
    assert torch.equal(greedy, nucleus)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(decoding.generate(model, force=True, input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                       do_sample=True, temperature=1.5, top_p=0.95, top_k=None,
                                       num_return_sequences=4, eos_token_id=None, pad_token_id=PAD))
    out = draws[0]
    assert torch.equal(draws[0], draws[1])
    assert out.shape == (3 * 4, ids.shape[1] + 8)
    assert torch.equal(out[:, :ids.shape[1]], ids.repeat_interleave(4, dim=0))  # prompt rows repeated like generate
    assert int(out.max()) < VOCAB
    # n samples of one row come from one prefill but are drawn independently
    assert len({tuple(r) for r in out[:4, ids.shape[1]:].tolist()}) > 1


def word_tokenizer():
    """A tiny word-level tokenizer built here (no model package needed, so this also runs on the GPU box)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}},
                                     unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_left_pad_matches_the_tokenizer():
    tokenizer = word_tokenizer()
    rows = [[5, 6, 7], [8], list(range(3, 40)), []]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # as the HF engine sets it
    try:
        want = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    got = decoding.left_pad(rows, tokenizer.pad_token_id)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])


def test_sampler_draws_from_the_distribution_transformers_samples():
    """The sampler's draws land only on tokens transformers' warpers keep, and as often as transformers' probabilities
    say: a sampler that always took the top token, or ignored temperature, top-k or top-p, would fail."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    sampler = decoding._Sampler(True, 0.8, 7, 0.6)
    want = TopPLogitsWarper(0.6)(None, TopKLogitsWarper(7)(None, TemperatureLogitsWarper(0.8)(None, logits.clone())))
    probs = want.softmax(-1)
    kept = torch.isfinite(want)
    assert int(kept.sum(-1).max()) <= 7 and int(kept.sum(-1).min()) >= 2  # every row has a choice to make
    draws = 4000
    drawn = sampler(logits.repeat(draws, 1)).view(draws, 5)
    assert bool(kept[torch.arange(5).expand(draws, 5), drawn].all())  # never a token transformers drops
    freq = torch.stack([torch.bincount(drawn[:, r], minlength=50) for r in range(5)]).float() / draws
    assert float((freq - probs).abs().max()) < 0.03  # 4000 draws: a standard error of at most 0.008


def test_falls_back_to_generate_off_cuda_and_for_wrapped_models(monkeypatch):
    model = tiny_model("llama")
    ids, mask = left_padded([5, 9])
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or real(**kw))
    out = decoding.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                            eos_token_id=None, pad_token_id=PAD)
    assert len(calls) == 1 and out.shape == (2, ids.shape[1] + 4)
    assert "not CUDA" in decoding.unsupported_reason(model)
    assert "keywords" in decoding.unsupported_reason(model, {"repetition_penalty": 1.2}, force=True)
    with decoding.disabled():
        assert "switched off" in decoding.unsupported_reason(model, force=False)


def test_unmerged_lora_is_refused_and_merged_lora_runs_fast():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("mistral")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert decoding.unsupported_reason(peft_model, force=True) is not None
    merged = peft_model.merge_and_unload().eval()
    assert decoding.unsupported_reason(merged, force=True) is None
    ids, mask = left_padded([6, 13])
    want = hf_generate(merged, ids, mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    got = decoding.generate(merged, force=True, input_ids=ids, attention_mask=mask, max_new_tokens=6,
                            do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(got, want)


def test_other_architectures_are_refused():
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64, num_local_experts=2, num_experts_per_tok=1)
    assert "mixtral" in decoding.unsupported_reason(AutoModelForCausalLM.from_config(cfg), force=True)


@on_gpu
@pytest.mark.parametrize("graphs,compiled", [(False, False), (True, False), (True, True)])
def test_cuda_graphs_and_compiled_ops_match_generate(graphs, compiled):
    model = tiny_model("mistral", device="cuda")
    ids, mask = left_padded([5, 17, 9, 30, 1], device="cuda")
    want = hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    prompts = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    stats: dict = {}
    new = decoding.generate_ids(model, prompts, max_new_tokens=12, pad_token_id=PAD, cuda_graphs=graphs,
                                compile_ops=compiled, kv_budget_bytes=3 * 64 * 2 * 2 * 2 * 16 * 4, stats=stats)
    assert stats["graphs_rejected"] == 0, stats
    assert stats["graphs"] == (stats["sub_batches"] if graphs else 0), stats
    diff = (new != want[:, ids.shape[1]:]).nonzero().tolist()
    assert not diff, f"first differing (row, step): {diff[:5]}; stats {stats}"


@on_gpu
def test_bf16_on_cuda_agrees_with_generate_mostly():
    """In bf16 the two paths round differently; the first greedy tokens still agree on nearly every row."""
    model = tiny_model("llama", device="cuda").to(torch.bfloat16)
    ids, mask = left_padded([8, 20, 12, 33, 5, 16, 27, 9], device="cuda")
    want = hf_generate(model, ids, mask, max_new_tokens=4, do_sample=False, eos_token_id=None)
    got = decoding.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                            eos_token_id=None, pad_token_id=PAD)
    assert got.shape == want.shape
    assert (got[:, ids.shape[1]] == want[:, ids.shape[1]]).float().mean() >= 0.75
