"""The instruction template per chat family, the response marker, tokenization for training and generation, and
extracting the recovered prompt from a generation.

The tokenizer's own chat template is used when it has one (Mistral ``[INST]``, Llama-2, SmolLM2's ChatML, Gemma);
a family template fills in when it has none. Everything is tokenized with ``add_special_tokens=False`` because the
rendered template already carries the BOS text, so no model ever sees two BOS tokens.
"""
from __future__ import annotations

import logging
import re

logger = logging.getLogger("kaggle_utils")

# What an empty generation is replaced by, in checkpoint selection and in the submission alike, so a step's
# selection score counts it the way the submission will.
FALLBACK_PROMPT = "Improve this text."
# Prompt tokens kept when nothing says how long the model's training prompts were (the real presets' training limit).
DEFAULT_PROMPT_TOKENS = 1024

USER_TEMPLATE = (
    "An LLM was given the original text below and an instruction, and it wrote the rewritten text.\n\n"
    "Original text:\n{original_text}\n\n"
    "Rewritten text:\n{rewritten_text}\n\n"
    "Write the instruction the LLM was given. Answer with the instruction only."
)

# Used only when a tokenizer has no chat template of its own. Each renders the user turn and, with
# add_generation_prompt, ends exactly where the answer starts; an assistant turn ends with EOS.
FAMILY_TEMPLATES = {
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "llama2": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}

# The text right before the answer, per family: what a completion-only loss starts after, and what a generation
# may echo back.
FAMILY_MARKERS = {
    "mistral": "[/INST]",
    "llama2": "[/INST]",
    "chatml": "<|im_start|>assistant\n",
    "gemma": "<start_of_turn>model\n",
}

_PROBE = "\u2063probe\u2063"  # invisible, so it never occurs in a real template


def ensure_chat_template(tokenizer, family: str) -> None:
    """Give ``tokenizer`` the family's template when it has none of its own."""
    if family not in FAMILY_TEMPLATES:
        raise ValueError(f"unknown chat family '{family}'; known: {', '.join(FAMILY_TEMPLATES)}")
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FAMILY_TEMPLATES[family]


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token of its own, never EOS.

    With pad == EOS, the collator masks every EOS as padding, the model never learns to stop, and a fine-tuned model
    generates until max_new_tokens (the original author hit exactly this). An existing non-EOS special token (unk)
    is preferred because it needs no new embedding row; otherwise ``<pad>`` is added and True is returned, meaning
    the model's embeddings must be resized.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return False
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return True


def user_message(original_text: str, rewritten_text: str) -> str:
    """The user turn: both texts and the instruction."""
    return USER_TEMPLATE.format(original_text=original_text, rewritten_text=rewritten_text)


def render_prompt(tokenizer, original_text: str, rewritten_text: str) -> str:
    """The chat-formatted prompt text, ending where the answer begins."""
    messages = [{"role": "user", "content": user_message(original_text, rewritten_text)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def response_marker(tokenizer) -> str:
    """What the template puts between the user's text and the answer, read off the tokenizer's own template."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                             add_generation_prompt=True)
    tail = rendered.split(_PROBE)[-1]
    for marker in FAMILY_MARKERS.values():  # the known assistant openers, without the user turn's closing tag
        if tail.rstrip().endswith(marker.rstrip()):
            return marker
    return tail.lstrip()


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens (the template text carries them)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_training_example(tokenizer, original_text: str, rewritten_text: str, rewrite_prompt: str,
                            max_prompt_tokens: int = 0) -> dict:
    """``input_ids`` of prompt + answer + EOS and a ``completion_mask`` that is 1 exactly on answer + EOS.

    TRL's SFTTrainer turns the mask into labels (-100 elsewhere) when ``completion_only_loss`` is on, so the loss
    falls on the recovered prompt alone. ``max_prompt_tokens`` > 0 cuts a longer prompt exactly as generation does
    (:func:`generation_ids`), so the model trains on what it will be shown.
    """
    cut = False
    if max_prompt_tokens:
        prompt_ids, cut = generation_ids(tokenizer, original_text, rewritten_text, max_prompt_tokens)
    else:
        prompt_ids = encode(tokenizer, render_prompt(tokenizer, original_text, rewritten_text))
    answer_ids = encode(tokenizer, rewrite_prompt.strip()) + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + answer_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids),
            "truncated": cut}


def _truncate(tokenizer, text: str, max_tokens: int) -> str:
    ids = encode(tokenizer, text)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def generation_ids(tokenizer, original_text: str, rewritten_text: str, max_prompt_tokens: int,
                   forced_start: str = "") -> tuple[list[int], bool]:
    """Prompt ids for generation, truncated to ``max_prompt_tokens`` (returned flag: whether it was).

    Truncation keeps the instruction and a part of both texts: the template's own tokens are counted first, and the
    rest is shared between the texts, a short text passing its unused share to the long one.
    ``forced_start`` (e.g. "Rewrite") is appended so the model continues from it.
    """
    forced = encode(tokenizer, forced_start.strip()) if forced_start.strip() else []
    ids = encode(tokenizer, render_prompt(tokenizer, original_text, rewritten_text)) + forced
    if len(ids) <= max_prompt_tokens:
        return ids, False
    overhead = len(encode(tokenizer, render_prompt(tokenizer, "", ""))) + len(forced)
    text_tokens = max_prompt_tokens - overhead - 4  # a few spare: re-tokenizing at the cut may merge differently
    if text_tokens < 16:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room for the texts (template is {overhead})")
    n_orig, n_rewr = len(encode(tokenizer, original_text)), len(encode(tokenizer, rewritten_text))
    half = text_tokens // 2
    keep_orig = min(n_orig, max(half, text_tokens - n_rewr))
    keep_rewr = text_tokens - keep_orig
    original_text = _truncate(tokenizer, original_text, keep_orig)
    rewritten_text = _truncate(tokenizer, rewritten_text, keep_rewr)
    ids = encode(tokenizer, render_prompt(tokenizer, original_text, rewritten_text)) + forced
    return ids[-max_prompt_tokens:] if len(ids) > max_prompt_tokens else ids, True


_PREFIX = re.compile(
    r"^\s*(?:the\s+)?(?:rewrite\s+prompt|prompt|instruction|rewritten\s+instruction|answer|response)\s*(?:was|is)?\s*[:\-]\s*",
    re.IGNORECASE,
)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"


def drop_repetition(text: str, longest: int = 6) -> str:
    """``text`` cut where it starts looping: the first run of 2 to ``longest`` words that comes again right after
    itself, or a word three times in a row ("Rewrite it as a line from a line from ..." -> "Rewrite it as a line
    from"). A small model's greedy output can loop until it runs out of tokens, and the loop drags the embedding away
    from the instruction it began with. A phrase that returns later, not back to back ("in the style of X and in the
    style of Y"), is kept.
    """
    words = text.split()
    key = [w.lower().strip(".,;:!?") for w in words]
    for end in range(1, len(words)):
        for k in range(1, min(longest, end) + 1):
            times = 3 if k == 1 else 2  # "very very formal" is English; "the the the" is a loop
            if end + (times - 1) * k <= len(key) and all(key[end - k:end] == key[end + j * k:end + (j + 1) * k]
                                                       for j in range(times - 1)):
                return " ".join(words[:end]).rstrip(" ,;:")
    return text


def extract_prompt(generation: str, marker: str = "") -> str:
    """The recovered prompt sentence from a raw generation; "" when nothing usable is left.

    Strips an echoed response marker (and anything before it), chat special tokens, "Prompt:"-style prefixes and
    surrounding quotes, keeps the first non-empty line, and cuts it where it starts looping (:func:`drop_repetition`).
    """
    text = generation or ""
    for m in {marker.strip(), *(m.strip() for m in FAMILY_MARKERS.values())} - {""}:
        if m in text:
            text = text.split(m)[-1]
    text = re.sub(r"<\|[^|>]*\|>|</?s>|<(?:start|end)_of_turn>|\[/?INST\]", " ", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        line = _PREFIX.sub("", line).strip()
        line = line.strip(_QUOTES + " ").strip()
        line = drop_repetition(re.sub(r"\s+", " ", line))
        if line and re.search(r"\w", line):
            return line
    return ""
