"""Sampling engines: n raw completions per row from (original_text, rewritten_text) pairs, behind one interface.

:class:`Engine` is the interface, with two engines:

- ``HFEngine``: transformers ``generate`` over length-sorted, left-padded batches, with a LoRA adapter merged
  (default, faster) or unmerged, 4-bit optional, layers over 1-2 GPUs. The embedded default and the CPU path.
- ``VLLMEngine``: vLLM's ``LLM`` with ``SamplingParams(n=...)`` and a ``LoRARequest`` (or a merged folder), over
  every visible GPU (``tensor_parallel_size``). The fast path on Kaggle's 2xT4.

What is sampled is a :class:`SamplingConfig`; how a model is loaded is an :class:`EngineOptions` (dtype, vLLM's GPU
share, context and seed), one object from the inference config down to ``vllm.LLM``. Also here: the adapter checks
that run before any model loads, and :func:`pick_engine` / :func:`load_engine`, which choose and start an engine and
fall back to HF when vLLM cannot start. Engines yield completions batch by batch; :mod:`kaggle_utils.sampling` runs
the loop that stores them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import artifacts, decoding, models, prompts
from .config import ConfigError, error_summary, require, resolve_path

logger = logging.getLogger("kaggle_utils")

ENGINES = ("auto", "vllm", "hf")
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


# ---------------------------------------------------------------- adapters


class AdapterError(ValueError):
    """An adapter folder is missing, incomplete, or was trained on another base model."""


def _selection(path: Path) -> artifacts.Selection | None:
    """The adapter folder's ``selection.json``, if any; an unreadable one is an :class:`AdapterError` naming it."""
    try:
        return artifacts.Selection.find(path)
    except artifacts.ArtifactError as e:
        raise AdapterError(f"adapter '{path}': {e}") from None


def check_adapter(adapter_path: str, preset: str = "") -> Path:
    """The adapter folder, checked for ``adapter_config.json`` and weights.

    When the folder holds a ``selection.json`` (written by checkpoint selection) and ``preset`` is given, the
    preset it was trained on must be ``preset``: an adapter of another base model is refused before anything loads.
    """
    path = resolve_path(adapter_path)
    if not path.is_dir():
        raise AdapterError(f"adapter path '{path}' does not exist (for the demo's adapter run `make demo` first)")
    if not artifacts.has_adapter(path):
        raise AdapterError(f"adapter path '{path}' has no adapter_config.json + adapter_model.safetensors")
    selection = _selection(path) if preset else None
    if selection is not None and selection.preset and selection.preset != preset:
        raise AdapterError(f"adapter '{path}' was trained on preset '{selection.preset}' "
                           f"({artifacts.SELECTION_FILE}), but the model entry uses preset '{preset}'")
    return path


def selected_adapter(adapter_path: str, preset: str = "") -> str:
    """The adapter folder to apply, checked (see :func:`check_adapter`); "" for none.

    Checkpoint selection exports no adapter when the base model (step 0) scored best: its ``selection.json`` then
    says ``"adapter": null``, and the base model runs as it is (logged), rather than failing the submission.
    """
    if not adapter_path:
        return ""
    path = resolve_path(adapter_path)
    if path.is_dir() and not (path / artifacts.ADAPTER_FILES[0]).exists():
        selection = _selection(path)
        if selection is not None and selection.adapter is None and selection.base_model_won:
            if preset and selection.preset and selection.preset != preset:
                raise AdapterError(f"selection '{path}' was made on preset '{selection.preset}', but the model "
                                   f"entry uses preset '{preset}'")
            logger.warning("%s: the base model won checkpoint selection (no adapter exported); running it without "
                           "an adapter", path)
            return ""
    return str(check_adapter(adapter_path, preset))


def adapter_rank(adapter_path: str) -> int:
    """The LoRA rank ``r`` in the adapter's ``adapter_config.json``."""
    cfg = json.loads((check_adapter(adapter_path) / "adapter_config.json").read_text())
    return int(cfg.get("r") or 1)


def check_adapter_fits(adapter_path: str, base_path: str | os.PathLike) -> None:
    """Compare the adapter's LoRA shapes with the base model's ``config.json`` without loading either model.

    Every projection that reads the residual stream (q/k/v/gate/up) has ``lora_A`` of shape (r, hidden_size); a
    mismatch means the adapter belongs to another base model, which is a clear error before minutes of loading.
    """
    path = check_adapter(adapter_path)
    weights = path / "adapter_model.safetensors"
    base_cfg = Path(base_path) / "config.json"
    if not weights.exists() or not base_cfg.exists():
        return  # a .bin adapter or a folder without config: attach_adapter still reports a mismatch
    from safetensors import safe_open

    hidden = json.loads(base_cfg.read_text()).get("hidden_size")
    if not hidden:
        return
    with safe_open(str(weights), framework="np") as fh:
        for key in fh.keys():
            module = key.split(".lora_A")[0].rsplit(".", 1)[-1] if ".lora_A" in key else ""
            if module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                width = fh.get_slice(key).get_shape()[-1]
                if width != hidden:
                    raise AdapterError(
                        f"adapter '{path}' does not fit base model '{base_path}': {key} reads {width} features, "
                        f"the base model's hidden_size is {hidden} (adapter trained on another base model?)")


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


# ---------------------------------------------------------------- the engine interface


class Engine:
    """n raw completions per row. Subclasses implement :meth:`generate_batches`; ``marker`` is the response marker
    a completion may echo (used by :func:`kaggle_utils.sampling.postprocess`)."""

    name = "engine"
    marker = ""

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

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.marker = prompts.response_marker(tokenizer)

    @classmethod
    def from_preset(cls, preset: str, base_model_path: str = "", adapter_path: str = "", merge: bool = True,
                    load_in_4bit: bool = False, max_gpu_memory_gib: float | None = None,
                    options: EngineOptions | None = None) -> "HFEngine":
        """Load base model (+ adapter) for a preset from local folders, in ``options.dtype``."""
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
            # Merging into 4-bit weights would dequantize and requantize them (lossy), so 4-bit stays unmerged.
            model = attach_adapter(model, adapter_path, merge=merge and not load_in_4bit)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer)

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
        with torch.inference_mode():
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


# ---------------------------------------------------------------- choosing an engine


def vllm_import_error() -> str:
    """"" when ``vllm.LLM`` imports; otherwise why not (the first line of the error)."""
    try:
        from vllm import LLM  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA/torch mismatch raised while importing
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


# auto's rule for a model whose engines can both run (the numbers: BENCHMARKS.md, "Which engine, on which card"):
ONE_CARD_SHARE = 0.6  # 16-bit weights up to this share of one card's memory: the HF engine's fast path, on one card
ALL_CARDS_SHARE = 0.8  # up to this share of all the cards' memory: vLLM, tensor parallel; above it the HF engine


def fits_one_card(weights_gib: float, cards_gib: list[float]) -> bool:
    """Whether 16-bit weights leave one card (the smallest) room to batch: ``ONE_CARD_SHARE`` of its memory."""
    return bool(cards_gib) and weights_gib <= ONE_CARD_SHARE * min(cards_gib)


def _fits_one_card(base: Path) -> bool:
    try:
        return fits_one_card(weights_bytes(base) / 2**30, _cards_gib())
    except Exception:  # an unreadable folder: leave the layout to accelerate
        return False


def auto_choice(weights_gib: float, cards_gib: list[float], fast_path: bool, four_bit: bool) -> tuple[str, str]:
    """``auto``'s engine for one model where both engines can run, and why.

    - The 16-bit weights fit one card with room to spare (:func:`fits_one_card`), the HF engine's fast path takes the
      model (a plain Llama/Mistral) and the preset is not 4-bit: the HF engine, on one card. On one H200 it sampled
      Mistral-7B's 1300 rows in 20.8 s (62.4 rows/s, n=1; 40.6 at n=4) after seconds of loading and 16 s of compile,
      while vLLM starts in 31-213 s, and merged needs a 26 s merge first: the HF engine is done first.
    - Else the weights fit all the cards (``ALL_CARDS_SHARE``): vLLM, tensor parallel where the heads split (Mistral-7B
      on Kaggle's two 15 GB T4s). The HF engine would split the layers over the cards: 7.4 rows/s on two H200s.
    - Else: the HF engine, which loads a 4-bit preset in 4 bits (vLLM would load the 16-bit weights).
    """
    one, total = min(cards_gib), sum(cards_gib)
    size = f"{weights_gib:.1f} GiB of 16-bit weights"
    if fast_path and not four_bit and fits_one_card(weights_gib, cards_gib):
        return "hf", (f"{size} fit one {one:.0f} GiB card: the HF engine's fast path, which starts in seconds "
                      "where vLLM takes minutes")
    if weights_gib <= ALL_CARDS_SHARE * total:
        if len(cards_gib) > 1 and weights_gib > ALL_CARDS_SHARE * one:
            return "vllm", f"{size} need vLLM's tensor parallel over {len(cards_gib)} cards of {one:.0f} GiB"
        hf_why = "would run this preset in 4 bits" if four_bit else (
            "has no fast path for this model type" if not fast_path else "would not leave room to batch")
        return "vllm", f"{size} on a {one:.0f} GiB card, where the HF engine {hf_why}"
    return "hf", (f"{size} do not fit {len(cards_gib)} card(s) of {one:.0f} GiB" +
                  (": the HF engine loads them in 4 bits" if four_bit else ": the HF engine spreads the layers"))


def card_capability() -> tuple[int, int] | None:
    """The first GPU's compute capability, or None without CUDA."""
    import torch

    return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None


def _cards_gib() -> list[float]:
    import torch

    return [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(torch.cuda.device_count())]


def pick_engine(requested: str = "auto", preset: str = "", base_model_path: str = "") -> str:
    """"vllm" or "hf" for one model, and the log says which and why.

    ``auto`` takes the HF engine when there is no CUDA, ``vllm.LLM`` does not import, or an earlier check ruled vLLM
    out (the Kaggle install check sets ``KAGGLE_UTILS_NO_VLLM``, :mod:`kaggle_utils.wheels`); otherwise, given the
    model (``preset`` and its weights), :func:`auto_choice` picks by the cards and the weights' size, and without one
    it takes vLLM. ``vllm`` asked for where it cannot run is logged as an error and runs the HF engine: a submission
    must never be lost to the engine choice.
    """
    import torch

    from .wheels import NO_VLLM_ENV

    require(requested in ENGINES, "engine", f"must be one of {ENGINES}, got '{requested}'")
    if requested == "hf":
        logger.info("engine: hf (asked for)")
        return "hf"
    why_not = os.environ.get(NO_VLLM_ENV, "")
    if not why_not:
        why_not = "no CUDA device" if not torch.cuda.is_available() else vllm_import_error()
    if requested == "vllm":
        if why_not:
            logger.error("engine: 'vllm' was asked for but cannot run here (%s); using the HF engine instead", why_not)
            return "hf"
        logger.info("engine: vllm (asked for)")
        return "vllm"
    if why_not:
        logger.info("engine: hf (auto; vLLM not used: %s)", why_not)
        return "hf"
    if not preset:
        logger.info("engine: vllm (auto; CUDA and vLLM available)")
        return "vllm"
    spec = models.get_preset(preset)
    base = models.resolve_base_path(spec, base_model_path)  # a missing folder is the plan's error: raised
    try:
        model_type = str(models._config_json(base).get("model_type", ""))
        kind, why = auto_choice(weights_bytes(base) / 2**30, _cards_gib(),
                                model_type in decoding.SUPPORTED_MODEL_TYPES, spec.load_in_4bit)
    except Exception as e:  # an unreadable folder or card: vLLM, which falls back to the HF engine if it must
        kind, why = "vllm", f"the model's size could not be weighed ({type(e).__name__}: {e})"
    logger.info("engine: %s (auto, %s: %s)", kind, preset, why)
    return kind


# ---------------------------------------------------------------- merging an adapter at kernel start

MERGE_CHOICES = ("auto", "on", "off")
MERGE_MARKER = "merge.json"  # in a merged folder: which base and adapter it holds (a later run reuses it)
# auto merges for vLLM on a card below compute capability 8.0 (a T4), or when the model samples at least this many
# rows. Measured end to end with the T4's settings on one H200 (BENCHMARKS.md, "Merging at kernel start"): the merge
# of Mistral-7B took 26 s, and the merged model sampled 1300 rows at 35.1 rows/s (n=4) against the LoRARequest's
# 20.3, so it pays back from about 870 rows there; a T4 samples about 15x slower while its merge is bound by the disk,
# so it pays back sooner, and the merged model needs no LoRA kernels, the least-tried part of vLLM on Turing.
MERGE_MIN_ROWS = 1000


def weights_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the model's weights as a 16-bit folder would hold them: the safetensors index's ``total_size``, else
    the ``model*.safetensors`` files (not a ``consolidated.safetensors`` copy beside them), else the
    ``pytorch_model*.bin`` shards; fp32 weights count half."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    total = json.loads(index.read_text()).get("metadata", {}).get("total_size") if index.exists() else None
    if total is None:
        files = list(folder.glob("model*.safetensors")) or list(folder.glob("pytorch_model*.bin"))
        total = sum(f.stat().st_size for f in files)
    config = models._config_json(folder)
    stored = str(config.get("torch_dtype") or config.get("dtype") or "")
    return int(total) // 2 if stored == "float32" else int(total)


def _free_disk(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def merge_decision(choice: str, preset: str, base_model_path: str, adapter_path: str, rows: int,
                   merge_dir: str | os.PathLike, capability: tuple[int, int] | None = None,
                   ready: bool = False) -> tuple[bool, str]:
    """Whether vLLM should serve this model merged (the adapter folded into a 16-bit copy of the base, written to
    ``merge_dir``) rather than as a ``LoRARequest``, and why (the caller logs it).

    ``choice`` "off" never merges and "on" always does where it can; "auto" merges on a card of compute capability
    below 8.0 (``capability`` of the first GPU; a T4) or when the model samples at least :data:`MERGE_MIN_ROWS` rows.
    None merges a 4-bit preset (the merged copy would be 16-bit) or without the disk for the copy (weights + 5%).
    A copy that is ``ready`` (:func:`holds_merge`) costs nothing: any choice but "off" serves it.
    """
    require(choice in MERGE_CHOICES, "merge_adapters", f"must be one of {MERGE_CHOICES}, got '{choice}'")
    if choice == "off":
        return False, "merge_adapters is off"
    if not adapter_path:
        return False, "no adapter"
    spec = models.get_preset(preset)
    if spec.load_in_4bit:
        return False, f"preset {preset} runs 4-bit; a merged copy would be 16-bit"
    if ready:
        return True, f"a copy with this adapter merged is already in {merge_dir}"
    base = models.resolve_base_path(spec, base_model_path)
    need, free = weights_bytes(base), _free_disk(Path(merge_dir))
    if need * 1.05 > free:
        return False, (f"{need / 2**30:.1f} GiB of merged weights do not fit the {free / 2**30:.1f} GiB free at "
                       f"{merge_dir}")
    disk = f"{need / 2**30:.1f} GiB to write, {free / 2**30:.1f} GiB free at {merge_dir}"
    if choice == "on":
        return True, f"merge_adapters is on; {disk}"
    if capability is not None and capability[0] < 8:
        return True, (f"compute capability {capability[0]}.{capability[1]}: a merged model needs no LoRA kernels and "
                      f"samples faster; {disk}")
    if rows < MERGE_MIN_ROWS:
        return False, (f"{rows} rows to sample, fewer than the {MERGE_MIN_ROWS} from which a merge pays back "
                       "(merge_adapters=on forces it)")
    return True, f"{rows} rows to sample (a merge pays back from {MERGE_MIN_ROWS}); {disk}"


def _merge_key(base: Path, adapter: Path) -> dict:
    """What ``merge.json`` records of a merge: the base folder and the adapter, with its weights' sha256."""
    weights = adapter / artifacts.ADAPTER_FILES[1]
    if not weights.exists():
        weights = adapter / "adapter_model.bin"  # an older adapter's weights
    from .sources import sha256_of  # here: sources loads pandas, which importing the engines must not

    return {"base": str(base), "adapter": str(adapter), "adapter_sha256": sha256_of(weights)}


def _holds(out: Path, key: dict) -> bool:
    """Whether ``out``'s ``merge.json`` records the merge ``key`` describes (a finished merge: it is written last)."""
    try:
        held = json.loads((out / MERGE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return held.get("adapter_sha256") == key["adapter_sha256"] and held.get("base") == key["base"]


def holds_merge(out: str | os.PathLike, preset: str, base_model_path: str, adapter_path: str) -> bool:
    """Whether ``out`` is a finished merge of this adapter into this base (its ``merge.json``)."""
    if not (Path(out) / MERGE_MARKER).exists():
        return False
    base = models.resolve_base_path(models.get_preset(preset), base_model_path)
    return _holds(Path(out), _merge_key(base, check_adapter(adapter_path, preset)))


def merge_adapter(preset: str, base_model_path: str, adapter_path: str, out: str | os.PathLike) -> Path:
    """Fold the adapter into a 16-bit copy of the base and save it, with the tokenizer, as a model folder at ``out``.

    The base loads unquantized (merging into 4-bit weights would requantize them), on the GPUs when there are any
    (fp16; layers spread over every card), else on CPU in fp32 (CPU half-precision matmuls are slow and lose
    precision in the merge) and saved as fp16. The folder is written under a ``.partial`` name and renamed when
    complete, with ``merge.json`` naming its base and adapter: a folder that already holds this merge is reused.
    """
    import torch
    from peft import PeftModel

    spec = models.get_preset(preset)
    base = models.resolve_base_path(spec, base_model_path)
    adapter = check_adapter(adapter_path, preset)
    out = Path(out)
    key = _merge_key(base, adapter)
    if _holds(out, key):
        logger.info("merge: %s already holds %s merged into %s; reused", out, adapter, base.name)
        return out
    start = time.time()
    tmp = out.with_name(out.name + ".partial")
    model = None
    try:
        tokenizer, resized = models.load_chat_tokenizer(base, spec.family)
        on_gpu = models.gpu_count() > 0
        model = models.load_model(spec, base, load_in_4bit=False, dtype=torch.float16 if on_gpu else torch.float32)
        if resized:
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).merge_and_unload()
        model = model.to(torch.float16)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGE_MARKER).write_text(json.dumps({**key, "seconds": round(time.time() - start, 1)}, indent=2)
                                        + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # a half-written merged folder never looks complete
    finally:  # also on failure: the weights leave the GPUs and a half-written copy leaves the disk
        del model
        shutil.rmtree(tmp, ignore_errors=True)
        models.free_gpu_memory()
    logger.info("merge: %s merged into %s -> %s (fp16) in %.0f s", adapter, base.name, out, time.time() - start)
    return out


# Errors of the plan itself (a missing folder, an adapter of another model, a bad setting): the user's to fix, never
# papered over by a fallback.
PLAN_ERRORS = (ConfigError, AdapterError, models.ModelPathError)


def load_engine(kind: str, preset: str, base_model_path: str = "", adapter_path: str = "", merged_path: str = "",
                options: EngineOptions | None = None) -> Engine:
    """Load one model of the plan in engine ``kind`` ("hf" or "vllm") with ``options`` (default
    :class:`EngineOptions`); a non-empty ``merged_path`` is served as is, with no adapter.

    When vLLM fails to start (a driver too old for its CUDA, out of memory, a config it refuses) the error is logged
    and the same model loads in the HF engine: the engine can never cost the submission. A wrong plan (a missing
    folder, an adapter of another model) is raised instead, for the user to fix.
    """
    base = merged_path or base_model_path
    adapter = "" if merged_path else selected_adapter(adapter_path, preset)
    if kind == "vllm":
        try:
            return VLLMEngine.from_preset(preset, base, adapter, options=options)
        except PLAN_ERRORS:
            raise
        except Exception as e:
            import traceback

            logger.error("vLLM failed to start for %s (%s: %s); falling back to the HF engine for this model\n%s",
                         Path(base).name if base else preset, type(e).__name__, error_summary(e),
                         traceback.format_exc())
            models.free_gpu_memory()
    spec = models.get_preset(preset)
    # 4-bit only where the preset wants it and a GPU runs it: on CPU bitsandbytes is slow and the small models fit.
    four_bit = spec.load_in_4bit and models.gpu_count() > 0
    return HFEngine.from_preset(preset, base, adapter, merge=True, load_in_4bit=four_bit, options=options)
