"""Fast generation for Llama/Mistral-architecture models on CUDA: the HF engine's drop-in for ``model.generate``.

Why it exists: transformers' ``generate`` with its dynamic KV cache re-copies the whole cache every decoding step. Even
transformers' own fast path (``cache_implementation="static"`` with its compiled forward) is slower end to end on the
submission's workload: on one H100, 1300 rows of the Mistral-7B shape x 32 new tokens, compilation included, this
module ran 3.5x its rows/s at n=1 and 4.8x at n=4 (BENCHMARKS.md, "The fast path against transformers' static
cache"; the static cache of 325 rows did not fit the card beside the prefill, so transformers ran at half that batch).
This module runs the same network from the model's own weight tensors (no copies) with:

- **prefill** over right-padded, length-sorted chunks of prompts: plain causal attention (flash kernel), no padding
  mask, the LM head on the last real position only; the keys/values go straight into a preallocated cache;
- **a static KV cache** of ``[rows, T, kv_heads, head_dim]`` per layer, sized per length-sorted sub-batch, written in
  place at each row's own position; no re-copying;
- **one CUDA graph per sub-batch** for the decoding step, so a step is one launch instead of ~1000 small ones;
- **fused element-wise work** (RMSNorm, rotary, SiLU x up) through ``torch.compile`` where it works, eager otherwise;
- **n samples per row** from one prefill (the cache is copied n times; ``generate(num_return_sequences=n)`` would run
  the prompt n times), temperature / top-k / top-p sampling as transformers applies them, EOS per row.

:func:`generate` takes the same keyword arguments as ``model.generate`` and returns the same tensor (prompt ids,
left-padded as given, followed by the new tokens, pad after EOS). Where it cannot apply (CPU, a 4-bit or otherwise
wrapped model, an unmerged LoRA adapter, another architecture, layers split over several GPUs, a logits processor it
does not implement) it calls ``model.generate`` unchanged and says why once in the log. On CPU the fast path runs
only when asked (``force=True``), which is how the tests check it token for token against ``model.generate``.

Set ``KAGGLE_UTILS_FAST_DECODE=0`` (or call ``set_enabled(False)``) to always use ``model.generate``, and
``KAGGLE_UTILS_COMPILE_DECODE=0`` to keep the fast path but skip compiling its element-wise ops.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass

logger = logging.getLogger("kaggle_utils")

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_ENABLED = os.environ.get("KAGGLE_UTILS_FAST_DECODE", "1") != "0"
_warned: set[str] = set()
# Totals over this process, for benchmarks and logs: which path each generate() call took and where time went.
counters = {"fast_calls": 0, "fallback_calls": 0, "sub_batches": 0, "graphs": 0, "graphs_rejected": 0,
            "prefill_s": 0.0, "decode_s": 0.0}
# generate() keywords the fast path implements; any other keyword sends the call to model.generate.
_KNOWN_KWARGS = {"input_ids", "attention_mask", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                 "num_return_sequences", "eos_token_id", "pad_token_id"}
# generation_config fields that switch on a logits processor the fast path does not implement: (name, neutral value).
_UNSUPPORTED_GENERATION_FIELDS = (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0), ("bad_words_ids", None),
                                  ("suppress_tokens", None), ("begin_suppress_tokens", None), ("min_new_tokens", None),
                                  ("forced_bos_token_id", None), ("forced_eos_token_id", None), ("sequence_bias", None),
                                  ("typical_p", 1.0), ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0), ("min_p", None),
                                  ("num_beams", 1), ("penalty_alpha", None), ("renormalize_logits", False))


def set_enabled(enabled: bool) -> None:
    """Turn the fast path on or off for this process (off: :func:`generate` always calls ``model.generate``)."""
    global _ENABLED
    _ENABLED = bool(enabled)


@contextlib.contextmanager
def disabled():
    """Within this block :func:`generate` calls ``model.generate`` (benchmarks use it for the baseline)."""
    global _ENABLED
    before, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = before


def _log_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.info(msg)


# ---------------------------------------------------------------- which models


def unsupported_reason(model, kwargs: dict | None = None, force: bool = False) -> str | None:
    """Why the fast path cannot run ``model`` with these ``generate`` keywords, or None when it can."""
    import torch

    if not _ENABLED and not force:
        return "the fast path is switched off (KAGGLE_UTILS_FAST_DECODE=0 or set_enabled(False))"
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a plain *ForCausalLM (a PEFT wrapper? merge the adapter first)"
    linear_types = set()
    for name, module in inner.layers.named_modules():
        if name.endswith(("_proj",)):
            linear_types.add(type(module))
    if linear_types != {torch.nn.Linear}:
        names = sorted(t.__name__ for t in linear_types)
        return f"projection layers are {names}, not plain nn.Linear (4-bit, or an unmerged LoRA adapter)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases are not supported"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        return f"rope type {rope.get('rope_type') or rope.get('type')!r} is not the default"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return f"the model is spread over {len(devices)} devices"
    device = devices.pop()
    if device.type != "cuda" and not force:
        return f"the model is on {device.type}, not CUDA"
    kwargs = kwargs or {}
    extra = sorted(set(kwargs) - _KNOWN_KWARGS)
    if extra:
        return f"generate() keywords {extra} are not implemented by the fast path"
    gen = getattr(model, "generation_config", None)
    for field, neutral in _UNSUPPORTED_GENERATION_FIELDS:
        value = getattr(gen, field, neutral)
        if value not in (neutral, None) and not (field == "num_beams" and value == 1):
            return f"generation_config.{field}={value!r} needs a logits processor the fast path does not implement"
    return None


# ---------------------------------------------------------------- element-wise pieces (fused by torch.compile on CUDA)


def _rms_norm(x, weight, eps: float):
    import torch

    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _add_rms_norm(x, residual, weight, eps: float):
    """(x + residual, RMSNorm of it): one pass instead of two on CUDA."""
    x = x + residual
    return x, _rms_norm(x, weight, eps)


def _rope(x, cos, sin):
    """Rotary embedding as transformers applies it (``x * cos + rotate_half(x) * sin``), with the half-width
    ``cos``/``sin`` (both halves of transformers' are equal): the two output halves are written into one buffer,
    so no rotated copy of ``x`` and no full-width tables are materialized."""
    import torch

    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:] = x2 * cos + x1 * sin
    return out


def _silu_mul(gate, up):
    import torch

    return torch.nn.functional.silu(gate) * up


@dataclass
class _Ops:
    rms_norm: object
    add_rms_norm: object
    rope: object
    silu_mul: object
    compiled: bool


_COMPILED_OPS: _Ops | None = None
_EAGER_OPS = _Ops(_rms_norm, _add_rms_norm, _rope, _silu_mul, False)


def _ops(device, dtype, want_compile: bool, hidden: int, intermediate: int, heads: int, kv_heads: int,
         head_dim: int) -> _Ops:
    """Compiled element-wise ops when asked and they work on this device, else the eager ones.

    Every op sees token-major tensors (``[tokens, hidden]``, ``[tokens, heads, head_dim]``), so only the token count
    varies between calls. With torch.compile's automatic dynamic shapes the first call compiles for exact sizes and
    the second, with another token count, compiles once more with just that size symbolic; model sizes stay
    constants. (``dynamic=True`` made every size symbolic, and a batch that happened to equal the head count or the
    head size recompiled: about 18 s of a 325-row run on an H200.) The probe below uses the
    model's own sizes, ``nn.Parameter`` weights and distinct cos/sin tensors, because each of those differences
    from the real calls was a guard failure (a recompilation) in the first version.
    """
    global _COMPILED_OPS
    if not want_compile or device.type != "cuda":
        return _EAGER_OPS
    if _COMPILED_OPS is None:
        import torch

        try:
            c = lambda f: torch.compile(f, fullgraph=True)  # noqa: E731
            ops = _Ops(c(_rms_norm), c(_add_rms_norm), c(_rope), c(_silu_mul), True)
            # Probe two token counts now, so both compilations (and any failure) happen here, not mid-run.
            w = torch.nn.Parameter(torch.ones(hidden, device=device, dtype=dtype), requires_grad=False)
            for tokens in (6, 10):
                x = torch.randn(tokens, hidden, device=device, dtype=dtype)
                g = torch.randn(tokens, intermediate, device=device, dtype=dtype)
                cos = torch.randn(tokens, 1, head_dim // 2, device=device, dtype=dtype)
                sin = torch.randn(tokens, 1, head_dim // 2, device=device, dtype=dtype)
                ops.rms_norm(x, w, 1e-5), ops.add_rms_norm(x, x.clone(), w, 1e-5), ops.silu_mul(g, g.clone())
                for n_heads in sorted({heads, kv_heads}):
                    ops.rope(torch.randn(tokens, n_heads, head_dim, device=device, dtype=dtype), cos, sin)
            _COMPILED_OPS = ops
        except Exception as e:  # no working Triton / compiler: stay correct, lose the fusion
            logger.warning("fast decoding: torch.compile of the element-wise ops failed (%s); using eager ops",
                           str(e).splitlines()[0][:200])
            _COMPILED_OPS = _EAGER_OPS
    return _COMPILED_OPS


# ---------------------------------------------------------------- the network, from the model's own weights


def _sdpa_kernels(*names):
    """``torch.nn.attention.sdpa_kernel`` limited to the named backends this torch has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)])


class _Network:
    """References to one Llama/Mistral model's weights and the two forward passes the decoder needs."""

    def __init__(self, model, ops: _Ops):
        import torch

        cfg = model.config
        self.ops = ops
        self.hidden = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.eps = float(cfg.rms_norm_eps)
        self.sliding_window = getattr(cfg, "sliding_window", None)
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                                a.o_proj.weight, layer.post_attention_layernorm.weight, m.gate_proj.weight,
                                m.up_proj.weight, m.down_proj.weight))
        rotary = inner.rotary_emb
        self.inv_freq = rotary.inv_freq.to(device=self.device, dtype=torch.float32)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
        self.kv_bytes_per_token = len(self.layers) * 2 * self.n_kv * self.head_dim * self.embed.element_size()
        self._gqa_ok: bool | None = None

    def cos_sin(self, positions):
        """Half-width cos/sin for integer ``positions`` (any shape), as transformers computes them (its full-width
        tables repeat these twice), in the model's dtype."""
        import torch

        freqs = positions[..., None].to(torch.float32) * self.inv_freq
        return (freqs.cos() * self.rope_scale).to(self.dtype), (freqs.sin() * self.rope_scale).to(self.dtype)

    def _causal_attention(self, q, k, v):
        """Causal attention over right-padded rows (no mask needed): q ``[b, L, h, d]``, k/v ``[b, L, kv, d]``."""
        import torch
        import torch.nn.functional as F

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # On CUDA only the fused kernels are allowed: the math fallback would build [b, heads, L, L] scores.
        fused = (contextlib.nullcontext() if q.device.type != "cuda" else
                 _sdpa_kernels("FLASH_ATTENTION", "EFFICIENT_ATTENTION"))
        with fused:
            if self.group > 1 and self._gqa_ok is not False:
                try:
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    self._gqa_ok = True
                    return out.transpose(1, 2)
                except (RuntimeError, TypeError):
                    self._gqa_ok = False
            if self.group > 1:
                k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    def _layer_tail(self, i, x, attn):
        """o_proj + residual + MLP + residual of layer ``i`` on token-major ``x``; returns (x, next layer's input)."""
        import torch.nn.functional as F

        ops = self.ops
        _, wq, wk, wv, wo, ln2, wg, wu, wd = self.layers[i]
        x, h = ops.add_rms_norm(x, F.linear(attn, wo), ln2, self.eps)
        mlp = F.linear(ops.silu_mul(F.linear(h, wg), F.linear(h, wu)), wd)
        nxt = self.layers[i + 1][0] if i + 1 < len(self.layers) else self.final_norm
        return ops.add_rms_norm(x, mlp, nxt, self.eps)

    def prefill(self, ids, lengths, caches, slots: slice, copies: int):
        """Run right-padded ``ids [b, L]`` and return the last real position's logits ``[b, vocab]`` (float32).

        Keys/values land in ``caches[layer] = (k, v)`` at rows ``slots`` (each prompt ``copies`` times in a row).
        Hidden states are token-major ``[b * L, hidden]``; attention sees ``[b, L, heads, head_dim]`` views.
        """
        import torch
        import torch.nn.functional as F

        ops = self.ops
        b, length = ids.shape
        n = b * length
        x = F.embedding(ids.reshape(n), self.embed)
        cos, sin = self.cos_sin(torch.arange(length, device=ids.device))
        half = self.head_dim // 2
        cos = cos[None].expand(b, length, half).reshape(n, 1, half)
        sin = sin[None].expand(b, length, half).reshape(n, 1, half)
        h = ops.rms_norm(x, self.layers[0][0], self.eps)
        for i, (ln1, wq, wk, wv, *_) in enumerate(self.layers):
            q = ops.rope(F.linear(h, wq).view(n, self.n_heads, self.head_dim), cos, sin)
            k = ops.rope(F.linear(h, wk).view(n, self.n_kv, self.head_dim), cos, sin)
            v = F.linear(h, wv)
            q = q.view(b, length, self.n_heads, self.head_dim)
            k = k.view(b, length, self.n_kv, self.head_dim)
            v = v.view(b, length, self.n_kv, self.head_dim)
            kc, vc = caches[i]
            if copies == 1:
                kc[slots, :length] = k
                vc[slots, :length] = v
            else:
                kc[slots, :length] = k.repeat_interleave(copies, dim=0)
                vc[slots, :length] = v.repeat_interleave(copies, dim=0)
            attn = self._causal_attention(q, k, v).reshape(n, self.hidden)
            x, h = self._layer_tail(i, x, attn)
        last = h.view(b, length, self.hidden)[torch.arange(b, device=ids.device), lengths - 1]
        return F.linear(last, self.lm_head).to(torch.float32)

    def decode_step(self, tokens, positions, caches, key_index):
        """One token per row: ``tokens``/``positions`` ``[B]``; returns logits ``[B, vocab]`` (float32).

        The new key/value is written at each row's own position; attention reads the cache up to it. The query
        heads that share a key/value head are folded into the query-length axis, so no key/value is repeated.
        """
        import torch
        import torch.nn.functional as F

        ops = self.ops
        rows = tokens.shape[0]
        row_index = torch.arange(rows, device=tokens.device)
        x = F.embedding(tokens, self.embed)  # [B, H]
        cos, sin = self.cos_sin(positions)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [B, 1, d]
        visible = key_index[None, :] <= positions[:, None]
        if self.sliding_window:
            visible = visible & (key_index[None, :] > positions[:, None] - self.sliding_window)
        mask = visible[:, None, None, :]  # [B, 1, 1, T]
        h = ops.rms_norm(x, self.layers[0][0], self.eps)
        for i, (ln1, wq, wk, wv, *_) in enumerate(self.layers):
            q = ops.rope(F.linear(h, wq).view(rows, self.n_heads, self.head_dim), cos, sin)
            k = ops.rope(F.linear(h, wk).view(rows, self.n_kv, self.head_dim), cos, sin)
            v = F.linear(h, wv).view(rows, self.n_kv, self.head_dim)
            kc, vc = caches[i]
            kc[row_index, positions] = k
            vc[row_index, positions] = v
            qg = q.view(rows, self.n_kv, self.group, self.head_dim)  # [B, kv, group, d]
            with (contextlib.nullcontext() if tokens.device.type != "cuda" else  # the memory-efficient kernel
                  _sdpa_kernels("EFFICIENT_ATTENTION", "MATH")):  # takes the mask; math is the fallback
                attn = F.scaled_dot_product_attention(qg, kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=mask)
            x, h = self._layer_tail(i, x, attn.reshape(rows, self.hidden))
        return F.linear(h, self.lm_head).to(torch.float32)


def left_pad(rows, pad_id: int) -> dict:
    """``input_ids`` and ``attention_mask`` of token-id lists, left-padded: what ``tokenizer.pad`` returns, in
    milliseconds (``tokenizer.pad`` took 8 s for 325 rows of ~500 ids on a CPU here)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------- sampling


@dataclass
class _Sampler:
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float

    def __call__(self, logits):
        """The next token per row from float32 ``logits [B, vocab]``: argmax, or transformers' warpers + multinomial."""
        import torch

        if not self.do_sample:
            return logits.argmax(-1)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p < 1.0:  # as TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep the top token
            sorted_logits, order = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative <= (1 - self.top_p)
            remove[..., -1:] = False
            logits = logits.masked_fill(remove.scatter(1, order, remove), -math.inf)
        return torch.multinomial(logits.softmax(-1), 1)[:, 0]


def _resolve_sampler(model, kwargs: dict) -> _Sampler:
    """Sampling settings as ``model.generate`` resolves them: explicit keywords > model.generation_config > defaults."""
    gen = getattr(model, "generation_config", None)

    def pick(name, default):
        if name in kwargs:
            return kwargs[name]
        value = getattr(gen, name, None)
        return default if value is None else value

    do_sample = bool(pick("do_sample", False))
    temperature = pick("temperature", 1.0)
    top_p = pick("top_p", 1.0)
    top_k = pick("top_k", 50)  # transformers' global default when neither the call nor the model sets it
    return _Sampler(do_sample, 1.0 if temperature is None else float(temperature), int(top_k or 0),
                    1.0 if top_p is None else float(top_p))


# ---------------------------------------------------------------- the decoder


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


class _Decoder:
    """Generates for a list of prompts: memory-sized, length-sorted sub-batches, each prefilled then decoded."""

    def __init__(self, net: _Network, sampler: _Sampler, eos_ids, pad_id: int, cuda_graphs: bool,
                 prefill_tokens: int, kv_budget_bytes: int | None, max_batch_rows: int | None = None):
        self.net, self.sampler, self.pad_id = net, sampler, pad_id
        self.max_batch_rows = max_batch_rows
        self.eos_ids = eos_ids
        self.cuda_graphs = cuda_graphs and net.device.type == "cuda"
        self.prefill_tokens = prefill_tokens
        self.kv_budget = kv_budget_bytes
        self.stats = {"sub_batches": 0, "graphs": 0, "graphs_rejected": 0, "steps": 0, "prefill_s": 0.0,
                      "decode_s": 0.0}

    def _sync_clock(self) -> float:
        import torch

        if self.net.device.type == "cuda":
            torch.cuda.synchronize(self.net.device)
        return time.perf_counter()

    def _budget(self) -> int:
        """Bytes the KV cache of one sub-batch may use: most of what is free, less room for prefill activations."""
        import torch

        if self.kv_budget:
            return self.kv_budget
        if self.net.device.type != "cuda":
            return 2 << 30
        free, _ = torch.cuda.mem_get_info(self.net.device)
        free += torch.cuda.memory_reserved(self.net.device) - torch.cuda.memory_allocated(self.net.device)
        net = self.net
        inter = net.layers[0][6].shape[0]
        activations = self.prefill_tokens * (6 * net.hidden + 3 * inter) * net.embed.element_size()
        logits = 4 * net.lm_head.shape[0] * 4096 * 3  # float32 logits, sort buffers for top-p of up to 4096 rows
        return max(int(0.9 * (free - activations - logits - (1 << 30))), 64 << 20)

    def run(self, prompts, max_new_tokens: int, copies: int):
        """New tokens ``[len(prompts) * copies, steps]`` in input order (pad after EOS)."""
        import torch

        net = self.net
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        per_row = net.kv_bytes_per_token
        budget = self._budget()
        results: dict[int, torch.Tensor] = {}
        start = 0
        while start < len(order):
            longest = len(prompts[order[start]])
            capacity = _round_up(longest + max_new_tokens, 64)
            rows = max(1, min(len(order) - start, budget // (capacity * per_row * copies)))
            if self.max_batch_rows:
                rows = max(1, min(rows, self.max_batch_rows // copies))
            chunk = order[start:start + rows]
            out = self._sub_batch([prompts[i] for i in chunk], capacity, max_new_tokens, copies)
            for j, i in enumerate(chunk):
                results[i] = out[j * copies:(j + 1) * copies]
            start += rows
        steps = max(t.shape[1] for t in results.values())
        pad = lambda t: t if t.shape[1] == steps else torch.nn.functional.pad(t, (0, steps - t.shape[1]),  # noqa: E731
                                                                             value=self.pad_id)
        return torch.cat([pad(results[i]) for i in range(len(prompts))])

    def _sub_batch(self, prompts, capacity: int, max_new_tokens: int, copies: int):
        import torch

        net, device = self.net, self.net.device
        n = len(prompts) * copies
        self.stats["sub_batches"] += 1
        # Zeroed, not empty: a masked-out key still meets its value in probabilities @ values, and 0 * NaN from
        # stale memory would be NaN (seen: garbage logits, argmax 0). The fill costs one pass over the cache.
        caches = [(torch.zeros(n, capacity, net.n_kv, net.head_dim, device=device, dtype=net.dtype),
                   torch.zeros(n, capacity, net.n_kv, net.head_dim, device=device, dtype=net.dtype))
                  for _ in net.layers]
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        first = torch.empty(n, dtype=torch.long, device=device)
        t0 = self._sync_clock()
        # Prefill: length-sorted chunks of at most prefill_tokens padded tokens, right-padded (causal = correct).
        start = 0
        while start < len(prompts):
            longest = len(prompts[start])
            rows = max(1, min(len(prompts) - start, self.prefill_tokens // max(longest, 1)))
            ids = torch.full((rows, longest), self.pad_id, dtype=torch.long)
            for j, p in enumerate(prompts[start:start + rows]):
                ids[j, :len(p)] = torch.as_tensor(p, dtype=torch.long)
            logits = net.prefill(ids.to(device, non_blocking=True), lengths[start:start + rows], caches,
                                 slice(start * copies, (start + rows) * copies), copies)
            if copies > 1:
                logits = logits.repeat_interleave(copies, dim=0)
            first[start * copies:(start + rows) * copies] = self.sampler(logits)
            start += rows
        positions = lengths.repeat_interleave(copies)
        t1 = self._sync_clock()
        out = self._decode(first, positions, caches, capacity, max_new_tokens)
        t2 = self._sync_clock()
        self.stats["prefill_s"] += t1 - t0
        self.stats["decode_s"] += t2 - t1
        return out

    def _decode(self, tokens, positions, caches, capacity: int, max_new_tokens: int):
        import torch

        net, device = self.net, self.net.device
        n = tokens.shape[0]
        key_index = torch.arange(capacity, device=device)
        out = torch.full((n, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        eos = self.eos_ids
        finished = torch.isin(tokens, eos) if eos is not None else torch.zeros(n, dtype=torch.bool, device=device)
        out[:, 0] = tokens
        alive = []  # per step >= 1: was any row unfinished when it started (transformers stops when none is)
        step_fn = self._graphed_step(tokens, positions, caches, key_index) if self.cuda_graphs and max_new_tokens > 1 \
            else None
        for step in range(1, max_new_tokens):
            if step % 8 == 0 and eos is not None and bool(finished.all()):
                break
            alive.append(~finished.all())
            if step_fn is not None:
                logits = step_fn(tokens, positions)
            else:
                logits = net.decode_step(tokens, positions, caches, key_index)
            nxt = self.sampler(logits)
            nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
            out[:, step] = nxt
            if eos is not None:
                finished = finished | torch.isin(nxt, eos)
            tokens, positions = nxt, positions + 1
            self.stats["steps"] += 1
        steps = 1 + (int(torch.stack(alive).sum()) if alive else 0)
        return out[:, :steps]

    def _graphed_step(self, tokens, positions, caches, key_index):
        """Capture one decoding step for this sub-batch's shapes; returns ``step(tokens, positions) -> logits``.

        The warm-up run executes the step on the real first inputs: a step only writes the key/value of its own
        position, so running it again on the same inputs (the first replay) writes the same values.
        """
        import torch

        net = self.net
        static_tokens, static_positions = tokens.clone(), positions.clone()
        stream = torch.cuda.Stream(device=net.device)
        stream.wait_stream(torch.cuda.current_stream(net.device))
        with torch.cuda.stream(stream):  # one eager run: compiles/initializes what the capture must not
            eager_logits = net.decode_step(static_tokens, static_positions, caches, key_index)
        torch.cuda.current_stream(net.device).wait_stream(stream)
        # Each graph gets its own memory pool (freed with it). Sharing one pool handle across sub-batches tripped
        # an internal assert of the caching allocator once the first graph was gone (torch 2.11).
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = net.decode_step(static_tokens, static_positions, caches, key_index)
        # Self-check, once per sub-batch: a replay must give what the eager run gave (it rewrites the same key/value).
        graph.replay()
        if not torch.allclose(static_logits, eager_logits, rtol=1e-3, atol=1e-3):
            self.stats["graphs_rejected"] += 1
            logger.warning("fast decoding: a CUDA-graph replay differed from the eager step (max diff %.3g); "
                           "decoding this sub-batch without graphs", float((static_logits - eager_logits).abs().max()))
            return None
        self.stats["graphs"] += 1

        def step(tokens_now, positions_now):
            static_tokens.copy_(tokens_now)
            static_positions.copy_(positions_now)
            graph.replay()
            return static_logits

        return step


def generate_ids(model, prompts, *, max_new_tokens: int, eos_token_id=None, pad_token_id: int = 0,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, n: int = 1,
                 cuda_graphs: bool | None = None, compile_ops: bool | None = None, prefill_tokens: int = 8192,
                 kv_budget_bytes: int | None = None, max_batch_rows: int | None = None, stats: dict | None = None):
    """New tokens for each prompt (a list of token-id lists), ``[len(prompts) * n, steps]``, pad after EOS.

    The fast path itself, with no fallback (see :func:`unsupported_reason`). ``cuda_graphs`` and ``compile_ops``
    default to on for CUDA and off elsewhere; ``prefill_tokens`` caps the padded tokens of one prefill chunk (8192:
    faster than 32768 on an H100 and an H200: fewer rows a chunk span fewer lengths, so less padding);
    ``kv_budget_bytes`` caps one sub-batch's KV cache (default: most of the free GPU memory) and ``max_batch_rows``
    its rows (samples included; default: as many as the budget holds).
    """
    import torch

    with torch.inference_mode():  # also around compilation, so the compiled ops never see grad mode change
        return _generate_ids(model, prompts, max_new_tokens, eos_token_id, pad_token_id, do_sample, temperature,
                             top_k, top_p, n, cuda_graphs, compile_ops, prefill_tokens, kv_budget_bytes,
                             max_batch_rows, stats)


def _generate_ids(model, prompts, max_new_tokens, eos_token_id, pad_token_id, do_sample, temperature, top_k, top_p,
                  n, cuda_graphs, compile_ops, prefill_tokens, kv_budget_bytes, max_batch_rows, stats):
    import torch

    param = next(model.parameters())
    on_cuda = param.device.type == "cuda"
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if compile_ops is None:  # KAGGLE_UTILS_COMPILE_DECODE=0 skips the one-time compilation (about half a minute)
        compile_ops = on_cuda and os.environ.get("KAGGLE_UTILS_COMPILE_DECODE", "1") != "0"
    ops = _ops(param.device, param.dtype, compile_ops, cfg.hidden_size, cfg.intermediate_size,
               cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim)
    net = _Network(model, ops)
    window = getattr(cfg, "sliding_window", None)
    longest = max((len(p) for p in prompts), default=0) + max_new_tokens
    if window and longest > window:
        raise ValueError(f"prompt + new tokens ({longest}) exceed the sliding window ({window}); use model.generate")
    if eos_token_id is None:
        eos = None
    else:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos = torch.tensor(ids, dtype=torch.long, device=param.device)
    sampler = _Sampler(bool(do_sample), float(temperature), int(top_k or 0), float(top_p))
    decoder = _Decoder(net, sampler, eos, int(pad_token_id), on_cuda if cuda_graphs is None else cuda_graphs,
                       prefill_tokens, kv_budget_bytes, max_batch_rows)
    out = decoder.run([list(map(int, p)) for p in prompts], max_new_tokens, n)
    for key in ("sub_batches", "graphs", "graphs_rejected", "prefill_s", "decode_s"):
        counters[key] += decoder.stats[key]
    if stats is not None:
        stats.update(decoder.stats, compiled_ops=ops.compiled)
    return out


def generate(model, force: bool = False, **kwargs):
    """``model.generate(**kwargs)``, through the fast path where it applies (see the module docstring).

    Takes ``input_ids`` (left-padded, as the HF engine builds them), ``attention_mask``, ``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``num_return_sequences``, ``eos_token_id`` and
    ``pad_token_id``, and returns what ``model.generate`` returns: the prompt rows (each repeated
    ``num_return_sequences`` times) followed by the new tokens. ``force=True`` runs the fast path off CUDA too.
    """
    import torch

    reason = unsupported_reason(model, kwargs, force=force)
    if reason is not None:
        _log_once(f"fast decoding not used: {reason}; calling model.generate")
        counters["fallback_calls"] += 1
        return model.generate(**kwargs)
    input_ids = kwargs["input_ids"]
    gen = getattr(model, "generation_config", None)
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
    window = getattr(model.config, "sliding_window", None)
    max_new = kwargs.get("max_new_tokens") or getattr(gen, "max_new_tokens", None) or 20
    if window and max(map(len, prompts)) + max_new > window:
        _log_once(f"fast decoding not used: prompts reach past the sliding window ({window}); calling model.generate")
        counters["fallback_calls"] += 1
        return model.generate(**kwargs)
    sampler = _resolve_sampler(model, kwargs)
    eos = kwargs.get("eos_token_id", getattr(gen, "eos_token_id", None))
    pad = kwargs.get("pad_token_id", getattr(gen, "pad_token_id", None))
    if pad is None:
        pad = eos if isinstance(eos, int) else (eos[0] if eos else 0)
    n = int(kwargs.get("num_return_sequences") or 1)
    _log_once("fast decoding: static KV cache, CUDA graphs, length-sorted sub-batches")
    counters["fast_calls"] += 1
    new = generate_ids(model, prompts, max_new_tokens=int(max_new), eos_token_id=eos, pad_token_id=int(pad),
                       do_sample=sampler.do_sample, temperature=sampler.temperature, top_k=sampler.top_k,
                       top_p=sampler.top_p, n=n)
    return torch.cat([input_ids.repeat_interleave(n, dim=0), new.to(input_ids.device)], dim=1)
