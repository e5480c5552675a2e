"""Templates per family, the response marker, the completion mask, pad tokens, prompt extraction.

Run: `pytest tests/test_prompts.py`.
"""
from __future__ import annotations

import copy

import pytest

from kaggle_utils import prompts


@pytest.mark.parametrize("family", sorted(prompts.FAMILY_TEMPLATES))
def test_family_template_ends_with_its_marker(tokenizer, family):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    prompts.ensure_chat_template(tok, family)
    text = prompts.render_prompt(tok, "ORIGINAL", "REWRITTEN")
    assert text.rstrip().endswith(prompts.FAMILY_MARKERS[family].rstrip())
    assert prompts.response_marker(tok).strip() == prompts.FAMILY_MARKERS[family].strip()
    assert "ORIGINAL" in text and "REWRITTEN" in text and "instruction" in text


def test_own_chat_template_is_kept(tokenizer):
    tok = copy.deepcopy(tokenizer)
    prompts.ensure_chat_template(tok, "mistral")  # SmolLM2 has ChatML: not replaced
    assert prompts.response_marker(tok) == "<|im_start|>assistant\n"


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown chat family 'vicuna'"):
        prompts.ensure_chat_template(object(), "vicuna")


def test_pad_token_is_not_eos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2 ships pad == eos: the trap
    assert prompts.ensure_pad_token(tok) is False  # reuses <|endoftext|>, no new embedding row
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token == "<|endoftext|>"


def test_pad_token_added_when_no_spare_token(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.unk_token = None
    tok.pad_token = tok.eos_token
    n = len(tok)
    assert prompts.ensure_pad_token(tok) is True
    assert tok.pad_token == "<pad>" and len(tok) == n + 1


def test_completion_mask_covers_exactly_the_answer(tokenizer):
    ex = prompts.encode_training_example(tokenizer, "Hello there.", "Greetings, friend.", "Make it formal.")
    assert len(ex["input_ids"]) == len(ex["completion_mask"])
    answer = [t for t, m in zip(ex["input_ids"], ex["completion_mask"]) if m]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == "Make it formal."
    prompt = [t for t, m in zip(ex["input_ids"], ex["completion_mask"]) if not m]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert ex["completion_mask"] == sorted(ex["completion_mask"])  # one contiguous answer span at the end


def test_generation_ids_truncate_but_keep_both_texts_and_instruction(tokenizer):
    long_original = "alpha " * 3000
    ids, cut = prompts.generation_ids(tokenizer, long_original, "The short rewrite.", max_prompt_tokens=300,
                                      forced_start="Rewrite")
    text = tokenizer.decode(ids)
    assert cut and len(ids) <= 300
    assert "The short rewrite." in text and "alpha" in text
    assert "Answer with the instruction only." in text
    assert text.endswith("<|im_start|>assistant\nRewrite")


def test_generation_ids_untouched_when_short(tokenizer):
    ids, cut = prompts.generation_ids(tokenizer, "a", "b", max_prompt_tokens=1000)
    assert not cut and tokenizer.decode(ids).endswith("assistant\n")


@pytest.mark.parametrize("raw,expected", [
    ("Rewrite this as a poem.", "Rewrite this as a poem."),
    ('"Make it formal."', "Make it formal."),
    ("Prompt: Convert this into a haiku.", "Convert this into a haiku."),
    ("Instruction - Shorten the text", "Shorten the text"),
    ("\n\n  Rewrite in pirate speak.\nExtra chatter here", "Rewrite in pirate speak."),
    ("<|im_start|>assistant\nTurn it into a tweet.<|im_end|>", "Turn it into a tweet."),
    ("blah [/INST] Summarize it.", "Summarize it."),
    ("", ""),
    ('  ""  ', ""),
    ("...", ""),
])
def test_extract_prompt(raw, expected):
    assert prompts.extract_prompt(raw, marker="[/INST]") == expected


@pytest.mark.parametrize("raw,expected", [
    ("Rewrite it as a line from a line from a line from a line", "Rewrite it as a line from"),
    ("Make it formal. Make it formal. Make it formal.", "Make it formal."),
    ("Rewrite the text as a poem about the sea.", "Rewrite the text as a poem about the sea."),
    ("Rewrite it in the style of a pirate and in the style of Shakespeare.",
     "Rewrite it in the style of a pirate and in the style of Shakespeare."),  # a phrase again later: kept
    ("Make it very very formal.", "Make it very very formal."),
    ("Make it a poem poem poem poem", "Make it a poem"),
])
def test_a_looping_generation_is_cut_at_the_first_repeat(raw, expected):
    assert prompts.extract_prompt(raw) == expected


def test_training_example_is_cut_like_generation(tokenizer):
    long_original = "word " * 2000
    full = prompts.encode_training_example(tokenizer, long_original, "Short.", "Make it short.")
    cut = prompts.encode_training_example(tokenizer, long_original, "Short.", "Make it short.", max_prompt_tokens=200)
    gen, truncated = prompts.generation_ids(tokenizer, long_original, "Short.", 200)
    assert truncated and cut["truncated"] and not full["truncated"]
    answer = sum(cut["completion_mask"])
    assert cut["input_ids"][:-answer] == gen  # the model trains on exactly what generation will show it
    assert cut["input_ids"][-answer:] == full["input_ids"][-answer:]  # the answer is never cut
    assert len(full["input_ids"]) > 2000 > len(cut["input_ids"])
