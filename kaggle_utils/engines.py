"""Sampling engines: n raw completions per row from (original_text, rewritten_text) pairs, behind one interface.

:class:`Engine` is the interface, with two engines:

- ``HFEngine``: transformers ``generate`` over length-sorted, left-padded batches, the LoRA adapter merged in (unmerged
  on a 4-bit base, or swapped in step by step for the select stage: :meth:`HFEngine.use_adapter`), 4-bit optional,
  layers over 1-2 GPUs. The embedded default and the CPU path.
- ``VLLMEngine``: vLLM's ``LLM`` with ``SamplingParams(n=...)`` and a ``LoRARequest`` (or a merged folder), over
  every visible GPU (``tensor_parallel_size``). The fast path on Kaggle's 2xT4.

What is sampled is a :class:`SamplingConfig`; how a model is loaded is an :class:`EngineOptions` (dtype, vLLM's GPU
share, context and seed), one object from the inference config down to ``vllm.LLM``; what starting it took is its
:class:`Startup`. Which engine a model gets, the merged copy vLLM may serve, and the fallback to HF are
:mod:`kaggle_utils.serving`'s; the adapter checks are :mod:`kaggle_utils.adapters`'. Engines yield completions batch
by batch; :mod:`kaggle_utils.sampling` runs the loop that stores them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import decoding, models, prompts
from .adapters import AdapterError, adapter_rank, attach_adapter, check_adapter, check_adapter_fits, swap_adapter
from .config import require, resolve_path

logger = logging.getLogger("kaggle_utils")

DTYPES = ("auto", "float16", "bfloat16")  # "auto": fp16 below compute capability 8.0 (T4), bf16 above, CPU its own
EAGER_CHOICES = ("auto", "on", "off")  # vLLM's eager mode; "auto": on below compute capability 8.0
# vLLM accepts only these LoRA ranks as max_lora_rank; T4 LoRA kernels need at least 8 (a rank-1 adapter still fits).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


# ---------------------------------------------------------------- what to sample, and how to load the model


@dataclass
class SamplingConfig:
    """How to sample. Temperature 0 means greedy (then n > 1 repeats the same answer, so it is refused)."""

    n: int = 1  # predictions per row
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    max_new_tokens: int = 32  # a recovered prompt is one sentence
    seed: int = 0  # sampling seed; batch b uses seed + b (HF), row i uses seed + i (vLLM)
    forced_start: str = ""  # the answer starts with this text, e.g. "Rewrite"
    generation_batch_size: int = 16  # rows per generate call (x n sequences)
    max_prompt_tokens: int = prompts.DEFAULT_PROMPT_TOKENS  # prompt-token limit (kaggle_utils.artifacts), resolved
    greedy_first: bool = False  # the first of the n predictions is greedy, the others sampled at ``temperature``

    def __post_init__(self):
        require(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.generation_batch_size >= 1, "generation_batch_size",
                f"must be >= 1, got {self.generation_batch_size}")
        require(not (self.temperature == 0 and self.n > 1), "n",
                f"n={self.n} with temperature 0 would repeat one greedy answer; set temperature > 0")

    def passes(self) -> list["SamplingConfig"]:
        """How the n predictions are drawn: one pass, or with ``greedy_first`` a greedy pass of 1 and a sampled
        pass of n - 1 (none when n is 1). Each row's predictions are the passes' outputs in this order."""
        if not self.greedy_first:
            return [self]
        greedy = dataclasses.replace(self, n=1, temperature=0.0, greedy_first=False)
        rest = [dataclasses.replace(self, n=self.n - 1, greedy_first=False)] if self.n > 1 else []
        return [greedy, *rest]


@dataclass(frozen=True)
class EngineOptions:
    """How an engine loads its model, the same object from the inference config down to ``vllm.LLM``: the HF engine
    reads ``dtype``; vLLM reads every field."""

    dtype: str = "auto"  # one of DTYPES; float16 on a newer GPU runs as a T4 would
    gpu_memory_utilization: float = 0.9  # vLLM's share of each GPU's memory (weights, KV cache, activations)
    max_model_len: int = 2048  # vLLM's longest sequence: prompt + answer tokens (sizes its KV cache)
    seed: int = 0  # vLLM's engine seed (each row's sampling seed is SamplingConfig.seed + its index)
    attention_backend: str = "auto"  # vLLM's attention: auto = TRITON_ATTN below compute capability 8.0 (a T4 has no
    # FlashAttention), vLLM's own choice above; or a backend name, e.g. TRITON_ATTN to run as on a T4
    enforce_eager: str = "auto"  # vLLM without CUDA graphs or torch.compile: auto = on below compute capability 8.0

    def __post_init__(self):
        require(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got '{self.dtype}'")
        require(self.enforce_eager in EAGER_CHOICES, "enforce_eager",
                f"must be one of {EAGER_CHOICES}, got '{self.enforce_eager}'")
        require(self.attention_backend == "auto" or self.attention_backend.isupper(), "attention_backend",
                f"must be auto or a vLLM backend name such as TRITON_ATTN, got '{self.attention_backend}'")
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
                f"must be in (0, 1], got {self.gpu_memory_utilization}")
        require(self.max_model_len >= 1, "max_model_len", f"must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class Startup:
    """What starting an engine took (:func:`kaggle_utils.serving.serve` sets it; ``sampling.csv``'s columns)."""

    merged: bool = False  # vLLM serves a merged copy (use_merged, or the merge at start) rather than a LoRARequest;
    # the HF engine merges the adapter in memory either way, so False there
    merge_s: float = 0.0  # seconds merging the adapter into a copy of the base before the start (vLLM)
    load_s: float = 0.0  # seconds starting the engine (model load, vLLM's start)


# ---------------------------------------------------------------- the engine interface


class Engine:
    """n raw completions per row. Subclasses implement :meth:`generate_batches`. ``name`` says which engine it is
    (hf | vllm), ``startup`` what starting it took, ``marker`` the response marker a completion may echo (used by
    :func:`kaggle_utils.sampling.postprocess`)."""

    name = "engine"
    marker = ""
    startup = Startup()

    def generate_batches(self, originals, rewrittens, cfg: SamplingConfig, skip=frozenset(),
                         progress: bool = True) -> Iterator[tuple[list[int], list[list[str]]]]:
        """Yield ``(row_indices, completions)`` per batch; ``completions[k]`` has ``cfg.n`` strings that start with
        the forced start. Rows in ``skip`` (done, e.g. on resume) are not generated."""
        raise NotImplementedError

    def generate(self, originals, rewrittens, cfg: SamplingConfig, progress: bool = True) -> list[list[str]]:
        """n raw completions per row, in input order."""
        out: list[list[str]] = [[] for _ in originals]
        for rows, texts in self.generate_batches(originals, rewrittens, cfg, progress=progress):
            for i, t in zip(rows, texts):
                out[i] = t
        return out

    def close(self) -> None:
        """Free the model (GPU memory) before the next model of the plan loads."""
        for attr in ("model", "llm"):
            if hasattr(self, attr):
                setattr(self, attr, None)
        models.free_gpu_memory()


class HFEngine(Engine):
    """transformers ``generate`` in length-sorted, left-padded batches; stops at EOS."""

    name = "hf"
    _adapter_off = False  # use_adapter(None) after an adapter was swapped in: generate with it switched off

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.marker = prompts.response_marker(tokenizer)

    @classmethod
    def from_preset(cls, preset: str, base_model_path: str = "", adapter_path: str = "", load_in_4bit: bool = False,
                    max_gpu_memory_gib: float | None = None, options: EngineOptions | None = None) -> "HFEngine":
        """Load base model (+ adapter, merged in) for a preset from local folders, in ``options.dtype``."""
        import torch

        options = options or EngineOptions()
        spec = models.get_preset(preset)
        base = models.resolve_base_path(spec, base_model_path)
        if adapter_path:
            check_adapter(adapter_path, preset)
            check_adapter_fits(adapter_path, base)
        tokenizer, resized = models.load_chat_tokenizer(base, spec.family)
        # bf16 generation is about 6x faster than fp32 on a CPU with AMX, slower on one without bf16 instructions
        # (models.cpu_dtype checks and logs it); GPUs use their own best dtype.
        torch_dtype = models.compute_dtype() if torch.cuda.is_available() else models.cpu_dtype()
        if options.dtype != "auto":
            torch_dtype = getattr(torch, options.dtype)
        num_gpus = None
        if not load_in_4bit and models.gpu_count() > 1 and _fits_one_card(base):
            num_gpus = 1  # the fast path needs the model on one device; split, it would run plain generate
            logger.info("HF engine: %s fits one card; loaded on GPU 0 alone", base.name)
        model = models.load_model(spec, base, load_in_4bit=load_in_4bit, dtype=torch_dtype, num_gpus=num_gpus,
                                  max_memory_gib=max_gpu_memory_gib)
        if resized:
            model.resize_token_embeddings(len(tokenizer))
        if adapter_path:
            # Merged is faster to generate with; merging into 4-bit weights would dequantize and requantize them
            # (lossy), so 4-bit stays unmerged.
            model = attach_adapter(model, adapter_path, merge=not load_in_4bit)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer)

    def use_adapter(self, adapter_path: str | os.PathLike | None) -> None:
        """From now on generate with the adapter in ``adapter_path``, unmerged, in place of the one before (None: the
        base model alone), so one loaded base serves every checkpoint the select stage scores."""
        if adapter_path is not None:
            self.model = swap_adapter(self.model, adapter_path)
        # The base model alone has nothing to switch off; a PeftModel (an adapter swapped in before) does.
        self._adapter_off = adapter_path is None and hasattr(self.model, "disable_adapter")

    def encode_rows(self, originals, rewrittens, cfg: SamplingConfig) -> tuple[list[list[int]], list[int]]:
        """Prompt ids per row, and the indices of rows whose texts were truncated to fit ``max_prompt_tokens``."""
        return encode_rows(self.tokenizer, originals, rewrittens, cfg)

    def generate_batches(self, originals, rewrittens, cfg: SamplingConfig, skip=frozenset(),
                         progress: bool = True) -> Iterator[tuple[list[int], list[list[str]]]]:
        """Yield ``(row_indices, completions)`` per batch, longest rows first; ``completions[k]`` has n strings.

        Rows in ``skip`` (already done, e.g. on resume) are not generated. Completions start with the forced start.
        """
        import torch
        from tqdm.auto import tqdm

        todo = [i for i in range(len(originals)) if i not in skip]
        ids_todo, _ = encode_rows(self.tokenizer, [originals[i] for i in todo], [rewrittens[i] for i in todo], cfg,
                                  labels=todo)
        ids = dict(zip(todo, ids_todo))
        todo.sort(key=lambda i: -len(ids[i]))  # similar lengths share a batch, so little padding is computed
        forced_len = len(prompts.encode(self.tokenizer, cfg.forced_start.strip())) if cfg.forced_start.strip() else 0
        device = next(self.model.parameters()).device
        size = cfg.generation_batch_size
        batches = [todo[k:k + size] for k in range(0, len(todo), size)]
        bar = tqdm(total=len(todo), desc=f"{self.name} sampling n={cfg.n}", unit="row", disable=not progress)
        for b, rows in enumerate(batches):
            # decoding.left_pad = tokenizer.pad (left) without its per-element Python cost (seconds per large batch).
            enc = decoding.left_pad([ids[i] for i in rows], self.tokenizer.pad_token_id)
            start = enc["input_ids"].shape[1] - forced_len
            completions: list[list[str]] = [[] for _ in rows]
            for part in cfg.passes():
                torch.manual_seed(cfg.seed + b)
                out = self._generate(enc["input_ids"].to(device), enc["attention_mask"].to(device), part)
                texts = self.tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
                for k in range(len(rows)):
                    completions[k] += texts[k * part.n:(k + 1) * part.n]
            yield rows, completions
            bar.update(len(rows))
        bar.close()

    def _generate(self, input_ids, attention_mask, cfg: SamplingConfig):
        """Token ids of prompt + completion, n rows per prompt (``generate``'s own layout).

        On CUDA, plain Llama/Mistral models (LoRA merged) take the static-cache fast path; anything else falls back
        to ``self.model.generate`` with the same arguments (kaggle_utils/decoding.py). Where that fallback runs with
        n > 1 (the CPU), the prompt goes through the model once and its KV cache is copied n times, instead of
        ``num_return_sequences`` running the same prompt n times: the prompt is most of the compute (hundreds of
        tokens against 32 new ones), so n=4 costs a fraction of the plain way.
        """
        import torch

        sample = cfg.temperature > 0
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=cfg.max_new_tokens,
                      do_sample=sample, temperature=cfg.temperature if sample else None,
                      top_p=cfg.top_p if sample else None, top_k=None, num_return_sequences=cfg.n,
                      eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        with torch.inference_mode(), self.model.disable_adapter() if self._adapter_off else contextlib.nullcontext():
            cache_kwarg = _shared_prefill_cache_kwarg(self.model) if cfg.n > 1 and input_ids.shape[1] > 1 else ""
            if cache_kwarg and decoding.unsupported_reason(self.model, kwargs) is not None:
                # Positions as generate derives them from a left-padded mask, so the cached prefix matches.
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                out = self.model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                                 position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1)
                cache = out.get("cache") if "cache" in out else out.get("past_key_values")
                if cache is not None and hasattr(cache, "batch_repeat_interleave"):
                    cache.batch_repeat_interleave(cfg.n)
                    kwargs.update(input_ids=input_ids.repeat_interleave(cfg.n, 0),
                                  attention_mask=attention_mask.repeat_interleave(cfg.n, 0), num_return_sequences=1)
                    return self.model.generate(**kwargs, **{cache_kwarg: cache})
            return decoding.generate(self.model, **kwargs)


def _shared_prefill_cache_kwarg(model) -> str:
    """The name under which this model's ``forward`` takes a KV cache ("cache" in newer transformers,
    "past_key_values" before); "" when it is wrapped (PEFT, unmerged) or takes none, so no shared prefill."""
    import inspect

    if type(model).__module__.startswith("peft"):
        return ""
    params = inspect.signature(model.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), "")


def encode_rows(tokenizer, originals, rewrittens, cfg: SamplingConfig, labels=None) -> tuple[list[list[int]], list[int]]:
    """Prompt ids per row (chat template + forced start), and the indices of rows truncated to ``max_prompt_tokens``
    (logged, by ``labels[i]`` when given: a text far over the context keeps the instruction and part of both texts)."""
    ids, truncated = [], []
    for i, (o, r) in enumerate(zip(originals, rewrittens)):
        row_ids, cut = prompts.generation_ids(tokenizer, o, r, cfg.max_prompt_tokens, cfg.forced_start)
        ids.append(row_ids)
        if cut:
            truncated.append(i)
    if truncated:
        shown = [labels[i] for i in truncated[:10]] if labels is not None else truncated[:10]
        logger.warning("truncated %d row(s) to %d prompt tokens (rows %s%s)", len(truncated), cfg.max_prompt_tokens,
                       shown, "..." if len(truncated) > 10 else "")
    return ids, truncated


# ---------------------------------------------------------------- vLLM


def vllm_dtype(capability: tuple[int, int] | None) -> str:
    """"half" below compute capability 8.0 (Kaggle's T4 has no bf16), "bfloat16" from Ampere on."""
    return "half" if capability is None or capability[0] < 8 else "bfloat16"


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds ``rank`` (never below 8, for T4 kernels)."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise AdapterError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def vllm_tensor_parallel_size(num_gpus: int, num_heads: int = 0, num_kv_heads: int = 0) -> int:
    """The most GPUs, up to ``num_gpus``, that split the attention heads evenly (vLLM refuses any other split):
    2 for Mistral-7B (32 heads, 8 KV heads) on Kaggle's 2xT4, but 1 for SmolLM2-135M, whose 9 heads do not halve."""
    for tp in range(max(1, num_gpus), 0, -1):
        if (not num_heads or num_heads % tp == 0) and (not num_kv_heads or num_kv_heads % tp == 0):
            return tp
    return 1


def vllm_llm_kwargs(model_path: str | os.PathLike, *, num_gpus: int, capability: tuple[int, int] | None,
                    lora_rank: int = 0, options: EngineOptions | None = None) -> dict:
    """Keyword arguments of ``vllm.LLM(...)`` for one model folder (the base with a LoRA, or a merged folder), with
    ``options`` (default :class:`EngineOptions`).

    ``lora_rank`` 0 means no adapter (a merged folder): LoRA support stays off, which is also the maintainers'
    workaround where the GPU has no LoRA kernels. A ``dtype`` other than "auto" overrides the card's choice.
    """
    options = options or EngineOptions()
    config = models._config_json(Path(model_path))
    tp = vllm_tensor_parallel_size(num_gpus, int(config.get("num_attention_heads") or 0),
                                   int(config.get("num_key_value_heads") or 0))
    if tp < num_gpus:
        logger.warning("vLLM on %d of %d GPUs: %s's %s attention heads do not split over %d", tp, num_gpus,
                       Path(model_path).name, config.get("num_attention_heads"), num_gpus)
    dtype = options.dtype
    chosen = vllm_dtype(capability) if dtype == "auto" else "half" if dtype == "float16" else dtype
    kwargs = dict(model=str(model_path), tokenizer=str(model_path), dtype=chosen,
                  tensor_parallel_size=tp, gpu_memory_utilization=options.gpu_memory_utilization,
                  max_model_len=options.max_model_len, seed=options.seed, trust_remote_code=False)
    if lora_rank:
        kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(lora_rank), max_loras=1)
    # Turing (a T4, compute capability 7.5): no FlashAttention and no bf16. vLLM would try FlashInfer there (it
    # compiles at start); its Triton attention runs on every card. Eager mode skips torch.compile and CUDA-graph
    # capture, the least-tried paths on Turing, and the minutes they take at start; this workload is mostly prefill,
    # which graphs do not speed up. Two T4s talk over PCIe, where vLLM's custom all-reduce has nothing to offer.
    turing = capability is None or capability[0] < 8
    backend = options.attention_backend if options.attention_backend != "auto" else "TRITON_ATTN" if turing else ""
    if backend:
        kwargs["attention_backend"] = backend
    if options.enforce_eager == "on" or (options.enforce_eager == "auto" and turing):
        kwargs["enforce_eager"] = True
    if turing and tp > 1:
        kwargs["disable_custom_all_reduce"] = True
    return kwargs


def vllm_sampling_kwargs(cfg: SamplingConfig, seed: int) -> dict:
    """Keyword arguments of ``vllm.SamplingParams(...)`` for one row (``seed`` = the config's seed + row index)."""
    return dict(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=seed)


def vllm_lora_kwargs(adapter_path: str | os.PathLike) -> dict:
    """Keyword arguments of ``vllm.lora.request.LoRARequest(...)`` for the plan's one adapter per model."""
    return dict(lora_name=Path(adapter_path).name or "adapter", lora_int_id=1, lora_path=str(adapter_path))


class VLLMEngine(Engine):
    """vLLM ``LLM.generate`` over token-id prompts, ``SamplingParams(n=...)`` per row, the adapter as a
    ``LoRARequest``.

    vLLM schedules its own batches; rows go to it in chunks of ``rows_per_call`` so that resume and the budget see
    progress between chunks.
    """

    name = "vllm"

    def __init__(self, llm, tokenizer, adapter_path: str = "", rows_per_call: int = 128):
        self.llm = llm
        self.tokenizer = tokenizer
        self.adapter_path = adapter_path
        self.rows_per_call = rows_per_call
        self.marker = prompts.response_marker(tokenizer)

    @classmethod
    def from_preset(cls, preset: str, base_model_path: str = "", adapter_path: str = "",
                    options: EngineOptions | None = None) -> "VLLMEngine":
        """Start vLLM on every visible GPU for a preset's base (+ adapter) or a merged folder as ``base_model_path``,
        with ``options`` (default :class:`EngineOptions`)."""
        import torch
        from vllm import LLM

        spec = models.get_preset(preset)
        base = models.resolve_base_path(spec, base_model_path)
        rank = 0
        if adapter_path:
            check_adapter(adapter_path, preset)
            check_adapter_fits(adapter_path, base)
            rank = adapter_rank(adapter_path)
        if spec.load_in_4bit:
            logger.warning("preset %s is 4-bit under HF; vLLM loads the weights as stored (16-bit unless the folder is "
                           "pre-quantized, e.g. AWQ/GPTQ): use engine 'hf' if they do not fit", preset)
        tokenizer, _ = models.load_chat_tokenizer(base, spec.family)  # vLLM sizes the model's vocabulary itself
        n_gpus = models.gpu_count()
        capability = torch.cuda.get_device_capability(0) if n_gpus else None
        kwargs = vllm_llm_kwargs(base, num_gpus=n_gpus, capability=capability, lora_rank=rank, options=options)
        logger.info("starting vLLM on %d GPU(s) of compute capability %s: %s", n_gpus,
                    ".".join(map(str, capability)) if capability else "?", kwargs)
        return cls(LLM(**kwargs), tokenizer, adapter_path=str(resolve_path(adapter_path)) if adapter_path else "")

    def generate_batches(self, originals, rewrittens, cfg: SamplingConfig, skip=frozenset(),
                         progress: bool = True) -> Iterator[tuple[list[int], list[list[str]]]]:
        """Yield ``(row_indices, completions)`` per chunk of ``rows_per_call`` rows, longest first."""
        from tqdm.auto import tqdm
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        todo = [i for i in range(len(originals)) if i not in skip]
        ids_todo, _ = encode_rows(self.tokenizer, [originals[i] for i in todo], [rewrittens[i] for i in todo], cfg,
                                  labels=todo)
        ids = dict(zip(todo, ids_todo))
        todo.sort(key=lambda i: -len(ids[i]))
        lora = LoRARequest(**vllm_lora_kwargs(self.adapter_path)) if self.adapter_path else None
        forced = cfg.forced_start.strip()
        bar = tqdm(total=len(todo), desc=f"{self.name} sampling n={cfg.n}", unit="row", disable=not progress)
        passes = cfg.passes()
        for k in range(0, len(todo), self.rows_per_call):
            rows = todo[k:k + self.rows_per_call]
            # One request per row and pass (greedy_first: a greedy one and a sampled one, whose prompt vLLM's prefix
            # cache shares), all in one generate call so vLLM schedules them together.
            requests = [(i, part) for i in rows for part in passes]
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i, _ in requests],
                                        [SamplingParams(**vllm_sampling_kwargs(part, cfg.seed + i))
                                         for i, part in requests],
                                        use_tqdm=False, lora_request=lora)
            texts = completions_from_outputs(outputs, forced)
            yield rows, [sum(texts[r * len(passes):(r + 1) * len(passes)], []) for r in range(len(rows))]
            bar.update(len(rows))
        bar.close()

    def close(self) -> None:
        """Shut vLLM's workers down, then free what is left, so the next model of the plan gets the GPUs."""
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception as e:  # best effort: a failed clean-up must not cost the submission
            logger.warning("vLLM clean-up: %s", e)
        super().close()


def completions_from_outputs(outputs, forced_start: str = "") -> list[list[str]]:
    """Texts of vLLM ``RequestOutput`` objects (one per row, ``.outputs`` holding n completions), each prefixed with
    the forced start the prompt ended with, so both engines return completions that start with it."""
    return [[forced_start + o.text for o in out.outputs] for out in outputs]


def _fits_one_card(base: Path) -> bool:
    try:
        return models.fits_one_card(models.weights_bytes(base) / 2**30, models.card_memory_gib())
    except Exception:  # an unreadable folder: leave the layout to accelerate
        return False
