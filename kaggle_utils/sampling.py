"""Sampling engines: n predictions per row from (original_text, rewritten_text) pairs.

``HFEngine`` is the embedded default and the CPU path: transformers ``generate`` over length-sorted, left-padded
batches, with a LoRA adapter merged (default, faster) or unmerged. Engines yield raw completions batch by batch so a
caller can persist them as it goes (resume) and watch the clock (budget).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import models, prompts
from .config import require, resolve_path

logger = logging.getLogger("kaggle_utils")


@dataclass
class SamplingConfig:
    """How to sample. Temperature 0 means greedy (then n > 1 repeats the same answer, so it is refused)."""

    n: int = 1  # predictions per row
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    max_new_tokens: int = 32  # a recovered prompt is one sentence
    seed: int = 0  # sampling seed; batch b uses seed + b, so a resumed run samples the same
    forced_start: str = ""  # the answer starts with this text, e.g. "Rewrite"
    batch_size: int = 16  # rows per generate call (x n sequences)
    max_prompt_tokens: int = 1024  # longer prompts are truncated, keeping the instruction and both texts

    def __post_init__(self):
        require(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(not (self.temperature == 0 and self.n > 1), "n",
                f"n={self.n} with temperature 0 would repeat one greedy answer; set temperature > 0")


class AdapterError(ValueError):
    """An adapter folder is missing, incomplete, or was trained on another base model."""


def check_adapter(adapter_path: str) -> Path:
    """The adapter folder, checked for ``adapter_config.json`` and weights."""
    path = resolve_path(adapter_path)
    if not path.is_dir():
        raise AdapterError(f"adapter path '{path}' does not exist")
    if not (path / "adapter_config.json").exists() or not (
            (path / "adapter_model.safetensors").exists() or (path / "adapter_model.bin").exists()):
        raise AdapterError(f"adapter path '{path}' has no adapter_config.json + adapter_model.safetensors")
    return path


def attach_adapter(model, adapter_path: str, merge: bool = True):
    """Apply a LoRA adapter to a loaded base model; a shape mismatch (other base model) is a clear error."""
    from peft import PeftModel

    path = check_adapter(adapter_path)
    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        base = getattr(model.config, "_name_or_path", "?")
        raise AdapterError(f"adapter '{path}' does not fit base model '{base}': {str(e).splitlines()[0][:300]}") from e
    if merge:
        model = model.merge_and_unload()
    return model


class HFEngine:
    """transformers ``generate`` in length-sorted, left-padded batches; stops at EOS."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.marker = prompts.response_marker(tokenizer)

    @classmethod
    def from_preset(cls, preset: str, base_model_path: str = "", adapter_path: str = "", merge: bool = True,
                    load_in_4bit: bool = False, max_gpu_memory_gib: float | None = None) -> "HFEngine":
        """Load base model (+ adapter) for a preset from local folders."""
        import torch

        spec = models.get_preset(preset)
        base = models.resolve_base_path(spec, base_model_path)
        if adapter_path:
            check_adapter(adapter_path)
        tokenizer = models.load_tokenizer(base)
        prompts.ensure_chat_template(tokenizer, spec.family)
        resized = prompts.ensure_pad_token(tokenizer)
        # bf16 generation is about 6x faster than fp32 on these CPUs (AMX); GPUs use their own best dtype.
        dtype = models.compute_dtype() if torch.cuda.is_available() else torch.bfloat16
        model = models.load_model(spec, base, load_in_4bit=load_in_4bit, dtype=dtype, max_memory_gib=max_gpu_memory_gib)
        if resized:
            model.resize_token_embeddings(len(tokenizer))
        if adapter_path:
            # Merging into 4-bit weights would dequantize and requantize them (lossy), so 4-bit stays unmerged.
            model = attach_adapter(model, adapter_path, merge=merge and not load_in_4bit)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer)

    def encode_rows(self, originals, rewrittens, cfg: SamplingConfig) -> tuple[list[list[int]], list[int]]:
        """Prompt ids per row, and the indices of rows whose texts were truncated to fit ``max_prompt_tokens``."""
        ids, truncated = [], []
        for i, (o, r) in enumerate(zip(originals, rewrittens)):
            row_ids, cut = prompts.generation_ids(self.tokenizer, o, r, cfg.max_prompt_tokens, cfg.forced_start)
            ids.append(row_ids)
            if cut:
                truncated.append(i)
        if truncated:
            logger.warning("truncated %d row(s) to %d prompt tokens (rows %s%s)", len(truncated), cfg.max_prompt_tokens,
                           truncated[:10], "..." if len(truncated) > 10 else "")
        return ids, truncated

    def generate_batches(self, originals, rewrittens, cfg: SamplingConfig, skip=frozenset(),
                         progress: bool = True) -> Iterator[tuple[list[int], list[list[str]]]]:
        """Yield ``(row_indices, completions)`` per batch, longest rows first; ``completions[k]`` has n strings.

        Rows in ``skip`` (already done, e.g. on resume) are not generated. Completions start with the forced start.
        """
        import torch
        from tqdm.auto import tqdm

        ids, _ = self.encode_rows(originals, rewrittens, cfg)
        todo = sorted((i for i in range(len(ids)) if i not in skip), key=lambda i: -len(ids[i]))
        forced_len = len(prompts.encode(self.tokenizer, cfg.forced_start.strip())) if cfg.forced_start.strip() else 0
        device = next(self.model.parameters()).device
        batches = [todo[k:k + cfg.batch_size] for k in range(0, len(todo), cfg.batch_size)]
        bar = tqdm(total=len(todo), desc=f"{self.name} sampling n={cfg.n}", unit="row", disable=not progress)
        for b, rows in enumerate(batches):
            enc = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, padding=True, return_tensors="pt")
            torch.manual_seed(cfg.seed + b)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                    max_new_tokens=cfg.max_new_tokens, do_sample=cfg.temperature > 0,
                    temperature=cfg.temperature if cfg.temperature > 0 else None,
                    top_p=cfg.top_p if cfg.temperature > 0 else None, top_k=None,
                    num_return_sequences=cfg.n, eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            start = enc["input_ids"].shape[1] - forced_len
            texts = self.tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
            yield rows, [texts[k * cfg.n:(k + 1) * cfg.n] for k in range(len(rows))]
            bar.update(len(rows))
        bar.close()

    def generate(self, originals, rewrittens, cfg: SamplingConfig, progress: bool = True) -> list[list[str]]:
        """n raw completions per row, in input order."""
        out: list[list[str]] = [[] for _ in originals]
        for rows, texts in self.generate_batches(originals, rewrittens, cfg, progress=progress):
            for i, t in zip(rows, texts):
                out[i] = t
        return out
