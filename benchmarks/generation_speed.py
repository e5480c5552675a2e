"""Sampling speed of the project's engines on one GPU, against the card's own roofline, in one run.

Usage (on a GPU box; writes results.json, results.md and cfg.json to --out):
    python benchmarks/generation_speed.py --out runs/bench/generation_speed
CPU smoke test of the whole script (tiny model, a few rows, no 4-bit):
    python benchmarks/generation_speed.py --model tiny --rows 24 --out runs/bench/tiny
The project's decoder against transformers' static cache + torch.compile only (no vLLM needed; below):
    python benchmarks/generation_speed.py --out runs/bench/static \
        --skip one_row baseline fast_repeat ablations quant tests vllm_lora vllm_merged

Workload: the Mistral-7B shape with random bf16 weights, a rank-1 LoRA adapter on the preset's modules merged by the
project's loader (``HFEngine.from_preset``), ``rows`` prompts whose token lengths are drawn from the real
distribution (``benchmarks/prompt_lengths.json``), ``max_new_tokens`` sampled new tokens per row, EOS never emitted.

Phases: the card's matrix rate and copy bandwidth; the roofline for the workload; then each way of sampling, timed
end to end through the engines' ``generate_batches`` (tokenizing, batching, decoding the text included):
one row at a time (a sample of rows, extrapolated), transformers ``generate`` in padded batches (the engine before
the fast path), the engine with the fast path at n=1 and n=4, ablations of the fast path, the 4-bit path (a sample
of rows); then vLLM through the project's ``VLLMEngine``: the adapter as a ``LoRARequest`` and the merged folder
with LoRA off, each at n=1 and n=4, with its start-up time. Every vLLM phase gets prompts of its own (the same
lengths, other words), so its prefix cache (on, as in the submission) never holds a timed prompt before it is timed.

vLLM runs on every visible GPU (tensor parallel when the heads split): on a 2-GPU box, the Kaggle 2xT4 setting is
``--vllm_dtype float16 --hf_dtype float16`` with the HF engine's layers split over both cards
(``--baseline_every 5`` keeps that slow path short). There ``hf_copies`` is the HF engine's other arm, as the
submission runs it with ``hf_copies``: one 4-bit copy of the base + adapter per card, each sampling its share of the
rows in a process of its own (``kaggle_utils.card_parallel``), with its rows/s over the slowest card's sampling, the
wall time start-up included, and each card's start-up seconds and peak memory (``per_card``). It runs on CUDA
(``--hf_copies N``: N cards, else every visible one) and on CPU only when ``--hf_copies N`` asks (N processes).

Is the project's decoder worth keeping? ``hf_static`` / ``hf_static_n4`` against ``fast`` / ``fast_n4``, one run,
one card (``--skip one_row baseline fast_repeat ablations quant tests vllm_lora vllm_merged`` runs only these four;
vLLM need not be installed). Both arms get the same rows, the same merged model in the same dtype, the same engine
batches (``fast_batch_size`` rows; at n=4 a quarter of that, so both hold about as many sequences), the same sampling
(temperature, top-p, no top-k, ``max_new_tokens`` new tokens: EOS lies outside the vocabulary, so never sampled) and
the same ``HFEngine.generate_batches`` loop around the generate call: tokenizing with the chat template, length
sorting, left padding, the per-batch seed, moving ids to the GPU, decoding the text. Only the call differs:

- ``fast``: ``kaggle_utils.decoding`` (static KV cache, CUDA graphs, compiled element-wise ops, length-sorted prefill
  chunks, n samples from one prefill). Its rows/s exclude its one-time warm-up (``warmup_s``: compiling the ops,
  capturing on 8 rows), as before; the comparison adds that warm-up back for its end-to-end figure, at n=4 too (a
  fresh process pays it once).
- ``hf_static``: ``model.generate(..., cache_implementation="static")`` with transformers' automatic compilation of
  the decoding forward (``torch.compile``, its default ``CompileConfig``: inductor, mode "reduce-overhead" = CUDA
  graphs; the prefill runs eagerly, as transformers runs it); at n=4 ``num_return_sequences=4`` (the prompt is
  prefilled 4 times: transformers' own way). The static cache is sized by the first (longest-prompt) batch and kept
  for the later ones, as transformers does to avoid recompiling. Timed from the first batch on, compilation
  INCLUDED (each phase starts from a reset compiler, as a fresh process would; inductor's on-disk cache may still hold
  kernels of an earlier phase). A CUDA out-of-memory error in a batch restarts the phase at half the batch (said in
  the results and the table): on an 80 GB H100 325 rows do not fit (the static cache for the longest prompts is
  42 GiB, the eager prefill's MLP activations ~27 GiB more), so there it ran batches of 162 rows (40 at n=4); on a
  141 GB H200 they should fit.

The comparison gives each arm's end-to-end rows/s (compile included) and their ratio, the steady-state rows/s of both
over the full-size batches after the first (the first holds the longest prompts and the compilation; a smaller last
batch, a new shape, is left out) and that ratio, and each phase's peak GPU memory. Off CUDA (the CPU smoke test) the
fast path is forced on (eager ops, no graphs) and ``hf_static`` compiles through
``CompileConfig._compile_all_devices`` unless ``--hf_static_compile cuda``.
"""
from __future__ import annotations

import contextlib
import gc
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as common  # noqa: E402  (benchmarks/ is not a package; _common puts the repo on sys.path)


@dataclass
class Config:
    """One benchmark run."""

    out: str = "runs/bench/generation_speed"  # results folder
    work_dir: str = "/tmp/kaggle_utils_bench"  # where the random model and adapter folders are written
    model: str = "mistral-7b"  # a name in benchmarks/_common.py REAL_CONFIGS ("tiny" for a CPU smoke test)
    rows: int = 1300  # prompts, like the hidden test set
    max_new_tokens: int = 32  # new tokens per row (all of them: EOS is never emitted)
    temperature: float = 0.7  # sampled, as the submissions sample
    top_p: float = 0.9  # nucleus mass
    lengths_file: str = "benchmarks/prompt_lengths.json"  # real prompt-token lengths to draw from
    seed: int = 0  # draws of lengths, words, samples
    lora_r: int = 1  # rank of the merged adapter
    one_row_sample: int = 8  # rows timed one at a time (spread over the lengths), extrapolated to all rows
    baseline_batch_size: int = 128  # rows per transformers-generate batch (the engine's old path)
    fast_batch_size: int = 325  # rows per engine batch on the fast path (1300 = 4 batches)
    ablation_every: int = 4  # ablations run on every k-th row of the length-sorted workload
    quant_every: int = 5  # the 4-bit path runs on every k-th row, extrapolated
    n_extra: int = 4  # the n of the "n=4" phases (predictions per row)
    baseline_every: int = 1  # transformers-generate batches time every k-th row by length, extrapolated
    hf_copies: int = 0  # the hf_copies arm's processes, one 4-bit copy per card: 0 = every visible GPU (none on CPU)
    copies_every: int = 1  # the hf_copies arm samples every k-th row by length (1 = all of them)
    hf_dtype: str = "auto"  # the HF engine's dtype: auto (bf16 on this card) | float16 | bfloat16
    vllm_dtype: str = "auto"  # vLLM's dtype: auto | float16 (Kaggle's T4) | bfloat16
    vllm_max_model_len: int = 2048  # vLLM context (prompts + new tokens)
    vllm_one_call: bool = False  # also time the LoRA engine with every row in one generate call (not chunks of 128)
    hf_static_batch_size: int = 0  # rows per generate call of hf_static (0: fast_batch_size; n=4 takes 1/n_extra)
    hf_static_compile: str = "on"  # on: compile on any device | cuda: only on CUDA (eager static cache elsewhere) | off
    # phases to skip: one_row, baseline, fast, fast_repeat, fast_n4 (runs only with fast), ablations, hf_static,
    # hf_static_n4, quant, hf_copies, tests, vllm_lora, vllm_merged
    skip: list = field(default_factory=list)


def draw_lengths(cfg: Config) -> list[int]:
    """``cfg.rows`` prompt lengths drawn (with replacement) from the measured distribution."""
    data = json.loads((common.REPO / cfg.lengths_file).read_text())
    rng = random.Random(cfg.seed)
    return [rng.choice(data["prompt_tokens"]) for _ in range(cfg.rows)]


def synthesize_rows(tokenizer, lengths: list[int], seed: int, vocab_size: int):
    """(originals, rewrittens) whose prompts through the project's template are exactly ``lengths`` tokens."""
    from kaggle_utils import prompts

    overhead = len(prompts.generation_ids(tokenizer, "w3", "w3", 4096)[0]) - 2
    rng = random.Random(seed)
    originals, rewrittens = [], []
    for n in lengths:
        words = max(n - overhead, 2)
        n_orig = max(1, round(words * 0.55))
        pick = lambda k: " ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(k))  # noqa: E731
        originals.append(pick(n_orig))
        rewrittens.append(pick(words - n_orig))
    return originals, rewrittens


def sampling_config(cfg: Config, batch_size: int = 16, n: int = 1):
    """The workload's sampling settings (the run's temperature, top-p, new tokens and seed) for one timed pass."""
    from kaggle_utils import engines

    return engines.SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                  generation_batch_size=batch_size, seed=cfg.seed, n=n)


def timed_engine_run(engine, originals, rewrittens, scfg) -> dict:
    """Seconds, rows/s and peak GPU memory of one full ``generate_batches`` pass, and when each batch was done
    (``batch_s``: seconds since the start; a batch's texts are decoded on the host, so its GPU work is over)."""
    import torch

    from kaggle_utils import decoding

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = dict(decoding.counters)
    t0 = time.perf_counter()
    n_out = empty = 0
    batch_rows, batch_s = [], []
    for rows, texts in engine.generate_batches(originals, rewrittens, scfg, progress=False):
        n_out += sum(len(t) for t in texts)
        empty += sum(1 for t in texts for x in t if not x.strip())
        batch_rows.append(len(rows))
        batch_s.append(round(time.perf_counter() - t0, 3))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    used = {k: round(v - before[k], 3) for k, v in decoding.counters.items() if v != before[k]}
    return {"rows": len(originals), "completions": n_out, "empty_completions": empty, "seconds": round(seconds, 3),
            "rows_per_s": len(originals) / seconds,
            "peak_gib": common.gib(torch.cuda.max_memory_allocated()) if cuda else None, "decoding": used,
            "batch_rows": batch_rows, "batch_s": batch_s}


def steady_rate(r: dict) -> dict | None:
    """Rows/s over the full-size batches after the first (steady state: no compilation, no warm-up; a smaller last
    batch is left out, as a new batch shape recompiles a compiled forward), or None when there are none."""
    rows, ends = r.get("batch_rows") or [], r.get("batch_s") or []
    took = [b - a for a, b in zip([0.0] + ends, ends)]
    keep = [i for i in range(1, len(rows)) if rows[i] == rows[0]]
    seconds = sum(took[i] for i in keep)
    if not keep or seconds <= 0:
        return None
    return {"rows": sum(rows[i] for i in keep), "batches": len(keep), "seconds": round(seconds, 3),
            "rows_per_s": sum(rows[i] for i in keep) / seconds}


@contextlib.contextmanager
def fast_path_forced(on: bool):
    """Within this block the HF engine takes ``kaggle_utils.decoding``'s fast path off CUDA too (as the decoding
    tests force it on CPU), so the CPU smoke test runs the fast phases; on CUDA it changes nothing."""
    from kaggle_utils import decoding

    if not on:
        yield
        return
    check = decoding.unsupported_reason
    decoding.unsupported_reason = lambda model, kwargs=None, force=False: check(model, kwargs, force=True)
    try:
        yield
    finally:
        decoding.unsupported_reason = check


def timed_fast(model, ids, cfg: Config, **options) -> dict:
    """The fast path alone on pre-tokenized prompts (for the ablations)."""
    import torch

    from kaggle_utils import decoding

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stats: dict = {}
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    out = decoding.generate_ids(model, ids, max_new_tokens=options.pop("max_new_tokens", cfg.max_new_tokens),
                                eos_token_id=None, pad_token_id=0, do_sample=True, temperature=cfg.temperature,
                                top_p=cfg.top_p, stats=stats, **options)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"rows": len(ids), "seconds": round(seconds, 3), "rows_per_s": len(ids) / seconds,
            "new_tokens": list(out.shape), "distinct_tokens": int(out.unique().numel()),
            "peak_gib": common.gib(torch.cuda.max_memory_allocated()), **stats}


def static_cache_engine(engine, compile_config):
    """The engine's model and tokenizer behind the same ``generate_batches`` loop, whose generate call is
    transformers' ``model.generate(cache_implementation="static", ...)`` with its automatic compilation."""
    from kaggle_utils import engines

    class StaticCacheEngine(engines.HFEngine):
        name = "hf_static"

        def __init__(self, model, tokenizer):
            super().__init__(model, tokenizer)
            self.calls = 0
            self.new_tokens: set[int] = set()

        def _generate(self, input_ids, attention_mask, cfg):
            """The arguments ``HFEngine._generate`` passes (same sampling, EOS and pad), plus the static cache."""
            sample = cfg.temperature > 0
            kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=cfg.max_new_tokens,
                          do_sample=sample, temperature=cfg.temperature if sample else None,
                          top_p=cfg.top_p if sample else None, top_k=None, num_return_sequences=cfg.n,
                          eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                          cache_implementation="static")
            if compile_config is not None:
                kwargs["compile_config"] = compile_config
            out = self.model.generate(**kwargs)  # generate runs under no_grad itself
            self.calls += 1
            self.new_tokens.add(int(out.shape[1] - input_ids.shape[1]))
            return out

    return StaticCacheEngine(engine.model, engine.tokenizer)


def reset_compiled(model) -> None:
    """Forget every compiled graph (dynamo's caches, CUDA graph trees) and the model's compiled forward and static
    cache size, so the next phase compiles and sizes from scratch, as a fresh process would."""
    import torch

    torch._dynamo.reset()
    try:
        torch._dynamo.utils.counters.clear()  # reset() keeps them; dynamo_counts() reports per phase
    except AttributeError:
        pass
    for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
        if attr in model.__dict__:
            delattr(model, attr)


def dynamo_counts() -> dict:
    """What was compiled since the last :func:`reset_compiled`: graphs, frames compiled (recompilations
    included), graph breaks, and the graphs inductor ran without CUDA graphs ("reduce-overhead" skipped)."""
    try:
        from torch._dynamo.utils import counters

        return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                "frames_compiled": counters["frames"].get("ok", 0),
                "graph_breaks": sum(counters["graph_break"].values()),
                "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0)}
    except Exception as e:  # counters are internal; their layout may change
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def timed_static(cfg: Config, engine, originals, rewrittens, n: int) -> dict:
    """One ``hf_static`` phase: the rows through transformers' static cache + compiled decoding, compilation timed
    in (see the module docstring). A CUDA out-of-memory error restarts it at half the batch (recorded)."""
    import torch

    cuda = torch.cuda.is_available()
    compile_on = cfg.hf_static_compile == "on" or (cfg.hf_static_compile == "cuda" and cuda)
    compile_config = None  # on CUDA: transformers' own default CompileConfig (inductor, "reduce-overhead")
    if compile_on and not cuda:
        from transformers import CompileConfig  # exported by transformers 5.17 and 5.24 alike

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers' switch for compiling off CUDA (tests use it)
    gen = engine.model.generation_config
    rows = cfg.hf_static_batch_size or cfg.fast_batch_size
    tried = []
    while True:
        batch = max(1, rows // n)
        reset_compiled(engine.model)
        free()  # the earlier phases' cached blocks back to the card, so the static cache starts from the same place
        static = static_cache_engine(engine, compile_config)
        gen.disable_compile = None if compile_on else True  # generate's own switch: a static cache, eager
        try:
            r = timed_engine_run(static, originals, rewrittens, sampling_config(cfg, batch, n))
            r.update(generate_calls=static.calls, new_tokens_per_row=sorted(static.new_tokens))
            break
        except Exception as e:
            if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()):
                raise
            tried.append({"batch_rows": batch, "error": str(e).splitlines()[0][:300]})
            if not cuda or batch <= 8:
                raise
            rows //= 2
        finally:
            gen.disable_compile = None
            static = None
            free()
    r.update(batch_rows_per_call=batch, sequences_per_call=batch * n, compile=compile_on,
             compiled_forward_built=hasattr(engine.model, "_compiled_call"), dynamo=dynamo_counts())
    if tried:
        r["oom_restarts"] = tried
    reset_compiled(engine.model)  # later phases see the model as it was loaded
    return r


def free() -> None:
    """Return what the dropped objects held to the GPU (the caller drops its references first)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(cfg: Config) -> dict:
    import torch

    from kaggle_utils import decoding, engines, models

    rec = common.Recorder(Path(cfg.out), cfg)
    cuda = torch.cuda.is_available()
    rec.put("environment", common.environment())

    # ---- phase 1: the card
    card = common.measure_card() if cuda else {"device": "cpu", "matmul_flops": 1e12, "copy_bytes_per_s": 5e10}
    rec.put("card", card)

    if cuda and "tests" not in cfg.skip:  # the CUDA-only correctness tests (graphs, compiled ops), first
        import subprocess
        import sys

        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                               "--tb=short", str(common.REPO / "tests" / "test_decoding.py")],
                              capture_output=True, text=True)
        rec.put("tests_on_gpu", {"rc": proc.returncode, "tail": proc.stdout[-3000:] + proc.stderr[-500:],
                                 "seconds": round(time.perf_counter() - t0, 1)})

    # ---- phase 2: the model folder (random weights + a rank-r adapter), the workload, the roofline
    t0 = time.perf_counter()
    work = Path(cfg.work_dir) / cfg.model
    base_dir, adapter_dir = work / "base", work / "adapter"
    model = common.build_random_model(cfg.model, device="cuda" if cuda else "cpu")
    counts = common.parameter_counts(model)
    vocab = model.config.vocab_size
    tokenizer = common.word_tokenizer(vocab)
    if not (base_dir / "config.json").exists():
        common.save_model_folder(model, tokenizer, base_dir)
    preset = models.get_preset("mistral-7b")
    if not (adapter_dir / "adapter_config.json").exists():
        from peft import LoraConfig, get_peft_model

        lora = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=16, init_lora_weights=False,
                                                target_modules=list(preset.lora_target_modules)))
        lora.save_pretrained(str(adapter_dir))
        model = lora.unload()
    merged_dir = work / "merged"
    if cuda and "vllm_merged" not in cfg.skip and not (merged_dir / "config.json").exists():
        from peft import PeftModel  # the adapter merged into the weights, as export.export_merged writes it

        common.save_model_folder(PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload(), tokenizer,
                                 merged_dir)
    lora = None
    config = model.config
    model = lora = None
    free()
    rec.put("model", {"name": cfg.model, "params": counts, "build_and_save_s": round(time.perf_counter() - t0, 1),
                      "folder": str(base_dir)})

    lengths = draw_lengths(cfg)
    originals, rewrittens = synthesize_rows(tokenizer, lengths, cfg.seed, vocab)
    roof = common.roofline(counts, config, lengths, cfg.max_new_tokens, card["matmul_flops"], card["copy_bytes_per_s"])
    if "matmul_sustained" in card:  # the same arithmetic at the rate the card holds for seconds
        roof["sustained"] = common.roofline(counts, config, lengths, cfg.max_new_tokens, card["matmul_sustained"],
                                            card["copy_bytes_per_s"])
    rec.put("roofline", roof)

    # ---- phase 3: the project's engine, LoRA merged (the user's path: from_preset with an adapter folder)
    t0 = time.perf_counter()
    engine = engines.HFEngine.from_preset("mistral-7b", base_model_path=str(base_dir), adapter_path=str(adapter_dir),
                                          options=engines.EngineOptions(dtype=cfg.hf_dtype))
    ids, _ = engine.encode_rows(originals, rewrittens, engines.SamplingConfig())
    got = [len(i) for i in ids]
    hf_gpus = len({p.device for p in engine.model.parameters()}) if cuda else 0
    rec.put("engine_load", {"seconds": round(time.perf_counter() - t0, 1), "gpus": hf_gpus,
                            "dtype": str(next(engine.model.parameters()).dtype),
                            "fast_path": decoding.unsupported_reason(engine.model) or "applies",
                            "prompt_tokens_match": got == lengths, "mean_prompt_tokens": statistics.mean(got)})
    lengths = got
    scfg = lambda bs, n=1: sampling_config(cfg, bs, n)  # noqa: E731
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pick = lambda every: sorted(order[::every])  # noqa: E731  (every k-th row by length: the same length mix)
    results: dict = {}

    if "fast" not in cfg.skip:  # off CUDA forced on (eager ops, no graphs): the CPU smoke test runs it too
        try:
            with fast_path_forced(not cuda):
                t0 = time.perf_counter()  # one-time: compiling the element-wise ops (excluded from rows/s, reported)
                few = order[:4] + order[-4:]
                timed_engine_run(engine, [originals[i] for i in few], [rewrittens[i] for i in few], scfg(8))
                warm = round(time.perf_counter() - t0, 1)
                for key in ("fast", "fast_repeat"):  # twice: the spread between equal runs is the noise
                    if key in cfg.skip:
                        continue
                    r = timed_engine_run(engine, originals, rewrittens, scfg(cfg.fast_batch_size))
                    r["how"] = f"engine + kaggle_utils.decoding, engine batches of {cfg.fast_batch_size}"
                    r["warmup_s"] = warm
                    results[key] = r
                    rec.put(key, r)
                if "fast_n4" not in cfg.skip:  # n rows' worth of sequences per batch: batches of a quarter the rows
                    r = timed_engine_run(engine, originals, rewrittens, scfg(cfg.fast_batch_size // cfg.n_extra,
                                                                             cfg.n_extra))
                    r["how"] = f"the same at n={cfg.n_extra}"
                    r["warmup_s"] = warm  # paid once per process, before the first call (here: before "fast")
                    results["fast_n4"] = r
                    rec.put("fast_n4", r)
        except Exception as e:
            import traceback

            rec.put("fast", {"error": f"{type(e).__name__}: {str(e)[:500]}",
                             "traceback": traceback.format_exc()[-3000:]})

    if "one_row" not in cfg.skip:
        k = max(1, len(order) // cfg.one_row_sample)
        sample = sorted(order[k // 2::k][:cfg.one_row_sample])
        with decoding.disabled():
            timed_engine_run(engine, [originals[i] for i in sample[:1]], [rewrittens[i] for i in sample[:1]],
                             scfg(1))  # warm-up
            r = timed_engine_run(engine, [originals[i] for i in sample], [rewrittens[i] for i in sample], scfg(1))
        r["extrapolated_from_rows"] = len(sample)
        r["sample_mean_prompt_tokens"] = statistics.mean(lengths[i] for i in sample)
        results["one_row"] = r
        rec.put("one_row", r)

    if "baseline" not in cfg.skip:
        sub = pick(cfg.baseline_every)
        with decoding.disabled():
            r = timed_engine_run(engine, [originals[i] for i in sub], [rewrittens[i] for i in sub],
                                 scfg(cfg.baseline_batch_size))
        r["how"] = f"transformers generate, padded batches of {cfg.baseline_batch_size}"
        r.update(extrapolated_from_rows=len(sub), gpus=hf_gpus, empty_or_nan=r["empty_completions"])
        results["hf_batches"] = r
        rec.put("hf_batches", r)

    if cuda and "ablations" not in cfg.skip:
        sub = pick(cfg.ablation_every)
        sub_ids = [ids[i] for i in sub]
        abl = {}
        variants = {
            "full": {},
            "full_again": {},
            "no_cuda_graphs": {"cuda_graphs": False},
            "no_compiled_ops": {"compile_ops": False},
            "decode_batch_128": {"max_batch_rows": 128},
            "prefill_only": {"max_new_tokens": 1},
            "prefill_chunk_32k": {"prefill_tokens": 32768},
        }
        for name, options in variants.items():
            try:
                abl[name] = timed_fast(engine.model, sub_ids, cfg, **options)
            except Exception as e:  # one failing variant must not cost the others
                abl[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            rec.put(f"ablation_{name}", abl[name])
        results["ablations"] = abl

    # ---- phase 3b: transformers' own fast generation (static cache + torch.compile), after everything that uses
    # the fast path's compiled ops (each phase resets the compiler)
    for key, n in (("hf_static", 1), ("hf_static_n4", cfg.n_extra)):
        if key in cfg.skip:
            continue
        try:
            r = timed_static(cfg, engine, originals, rewrittens, n)
            r["how"] = (f"transformers generate, static cache, {'compiled' if r['compile'] else 'eager'}, "
                        f"engine batches of {r['batch_rows_per_call']}" + (f" at n={n}" if n > 1 else ""))
            results[key] = r
            rec.put(key, r)
        except Exception as e:  # one failing phase must not cost the other
            import traceback

            rec.put(key, {"error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-3000:]})
            free()
        fast_key = "fast" if n == 1 else "fast_n4"
        if key in results and fast_key in results:  # the pair's verdict now, in case the run is cut short later
            rec.put(f"{key}_vs_{fast_key}", compare_static(results[fast_key], results[key]))

    # ---- phase 4: the project's 4-bit path (QLoRA base, adapter unmerged: transformers generate)
    q_engine = None
    if cuda and "quant" not in cfg.skip:
        engine = None
        free()
        try:
            t0 = time.perf_counter()
            q_engine = engines.HFEngine.from_preset("mistral-7b", base_model_path=str(base_dir),
                                                    adapter_path=str(adapter_dir), load_in_4bit=True)
            load_s = round(time.perf_counter() - t0, 1)
            sub = pick(cfg.quant_every)
            r = timed_engine_run(q_engine, [originals[i] for i in sub], [rewrittens[i] for i in sub],
                                 scfg(cfg.baseline_batch_size))
            r.update(load_s=load_s, extrapolated_from_rows=len(sub),
                     fast_path=decoding.unsupported_reason(q_engine.model) or "applies")
            results["quant4"] = r
            rec.put("quant4", r)
        except Exception as e:
            rec.put("quant4", {"error": f"{type(e).__name__}: {str(e)[:500]}"})

    # ---- phase 4b: one 4-bit copy per card, each in its own process (this process holds no model now)
    engine = q_engine = None
    free()
    if "hf_copies" not in cfg.skip and (cuda or cfg.hf_copies):
        try:
            results["hf_copies"] = hf_copies_run(cfg, base_dir, adapter_dir, originals, rewrittens,
                                                 pick(cfg.copies_every))
            rec.put("hf_copies", results["hf_copies"])
        except Exception as e:  # one failing arm must not cost the others
            import traceback

            rec.put("hf_copies", {"error": f"{type(e).__name__}: {str(e)[:2000]}",
                                  "traceback": traceback.format_exc()[-3000:]})

    # ---- phase 5: vLLM through the project's VLLMEngine (fresh prompts per phase)
    vllm_phases = [k for k in ("vllm_lora", "vllm_merged") if k not in cfg.skip]
    if cuda and vllm_phases:
        results.update(vllm_phases_run(cfg, rec, vllm_phases, base_dir, adapter_dir, work / "merged", lengths, vocab))

    summary = summarize(cfg, card, roof, results)
    rec.put("summary", summary)
    md = render_table(cfg, card, roof, summary)
    (Path(cfg.out) / "results.md").write_text(md)
    print(md)
    return rec.data


def hf_copies_run(cfg: Config, base_dir: Path, adapter_dir: Path, originals, rewrittens, rows: list[int]) -> dict:
    """The rows through ``kaggle_utils.card_parallel.sample_on_cards`` (one 4-bit copy of base + adapter per card,
    each its share in a process of its own, joined in row order), from an empty prediction file."""
    import shutil

    from kaggle_utils import card_parallel, engines, models, plan, sampling

    copies = cfg.hf_copies or models.gpu_count()
    folder = Path(cfg.work_dir) / cfg.model / "hf_copies"
    shutil.rmtree(folder, ignore_errors=True)  # every run samples every row
    store = sampling.PredictionStore(folder, "hf_copies", {"benchmark": "hf_copies"})
    entry = plan.ModelEntry(name="hf_copies", preset="mistral-7b", base_model=str(base_dir), adapter=str(adapter_dir))
    out = card_parallel.sample_on_cards(entry, sampling_config(cfg, cfg.baseline_batch_size), [str(i) for i in rows],
                                        [originals[i] for i in rows], [rewrittens[i] for i in rows], store,
                                        "Improve this text.", copies, options=engines.EngineOptions(dtype=cfg.hf_dtype))
    r = out.report
    cards = [{"card": w.card, "rows": len(w.ids), **{k: w.report.get(k) for k in (
        "sampled", "seconds", "rows_per_s", "load_s", "peak_gib", "four_bit", "device")}} for w in out.workers]
    peaks = [c["peak_gib"] for c in cards if c["peak_gib"] is not None]
    return {"rows": r.rows, "completions": sum(len(store.done[str(i)]["predictions"]) for i in rows),
            "seconds": r.seconds, "rows_per_s": r.rows_per_s, "start_s": r.load_s, "wall_s": out.wall_s,
            "rows_per_s_wall": r.rows / out.wall_s if out.wall_s else None,
            "gpus": 0 if all(c["card"] == "cpu" for c in cards) else len(cards),
            "peak_gib": max(peaks) if peaks else None, "per_card": cards, "extrapolated_from_rows": len(rows)}


def wait_for_free_gpus(share: float = 0.9, timeout_s: float = 60.0) -> float:
    """Seconds until every visible card has ``share`` of its memory free again (vLLM's engine process exits after
    the engine is dropped; the next start needs the memory)."""
    import torch

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if all(f >= share * t for f, t in (torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count()))):
            break
        time.sleep(1)
    return round(time.perf_counter() - t0, 1)


def vllm_phases_run(cfg: Config, rec, phases: list[str], base_dir: Path, adapter_dir: Path, merged_dir: Path,
                    lengths: list[int], vocab: int) -> dict:
    """vLLM started once per phase (the adapter as a LoRARequest; the merged folder with LoRA off); n=1 and n=4 on
    fresh prompts; the start-up and the first-batch warm-up timed apart."""
    from kaggle_utils import engines, models

    tokenizer = models.load_tokenizer(base_dir)
    out: dict = {}
    seed = cfg.seed + 100  # the HF phases used cfg.seed's words; each vLLM run below draws its own
    for phase in phases:
        folder, adapter = (base_dir, str(adapter_dir)) if phase == "vllm_lora" else (merged_dir, "")
        engine = None
        try:
            t0 = time.perf_counter()
            options = engines.EngineOptions(dtype=cfg.vllm_dtype, max_model_len=cfg.vllm_max_model_len, seed=cfg.seed)
            engine = engines.VLLMEngine.from_preset("mistral-7b", base_model_path=str(folder), adapter_path=adapter,
                                                    options=options)
            start_s = round(time.perf_counter() - t0, 1)
            gpus = engines.vllm_llm_kwargs(folder, num_gpus=models.gpu_count(), capability=None)["tensor_parallel_size"]
            seed += 1
            o, w = synthesize_rows(tokenizer, lengths[:16], seed, vocab)  # first batch: Triton JIT, graphs warm
            t0 = time.perf_counter()
            timed_engine_run(engine, o, w, sampling_config(cfg))
            warm_s = round(time.perf_counter() - t0, 1)
            runs = [(1, engine.rows_per_call, ""), (cfg.n_extra, engine.rows_per_call, "")]
            if cfg.vllm_one_call and phase == "vllm_lora":
                runs.append((1, len(lengths), "_one_call"))
            for n, per_call, suffix in runs:
                seed += 1
                o, w = synthesize_rows(tokenizer, lengths, seed, vocab)
                engine.rows_per_call = per_call
                r = timed_engine_run(engine, o, w, sampling_config(cfg, n=n))
                key = f"{phase}_n{n}{suffix}"
                r.update(start_s=start_s, warmup_s=warm_s, gpus=gpus, dtype=cfg.vllm_dtype, rows_per_call=per_call,
                         peak_gib=None, fresh_prompts_seed=seed)
                out[key] = r
                rec.put(key, r)
        except Exception as e:  # one failing engine must not cost the others
            import traceback

            rec.put(phase, {"error": f"{type(e).__name__}: {str(e)[:800]}",
                            "traceback": traceback.format_exc()[-3000:]})
        finally:
            if engine is not None:
                engine.close()  # its engine process holds the GPUs the next phase needs
        engine = None
        free()
        rec.put(f"{phase}_released_s", wait_for_free_gpus())
    return out


KEEP_RATIO = 1.25  # the project's decoder stays only if it is at least this much faster end to end


def compare_static(fast: dict, hf: dict) -> dict:
    """The project's fast path against transformers' static cache + compile on the same rows: end to end (each
    arm's one-time compilation included: the fast path's warm-up added to its pass, hf_static's inside its first
    batch) and steady (:func:`steady_rate`, both warm)."""
    warm = fast.get("warmup_s") or 0.0
    fast_e2e = fast["rows"] / (fast["seconds"] + warm)
    hf_e2e = hf["rows"] / hf["seconds"]
    fs, hs = steady_rate(fast), steady_rate(hf)
    out = {"rows": fast["rows"], "completions": [fast["completions"], hf["completions"]],
           "fast_rows_per_s": fast["rows_per_s"], "fast_warmup_s": warm,
           "fast_rows_per_s_end_to_end": fast_e2e, "hf_static_rows_per_s_end_to_end": hf_e2e,
           "ratio_end_to_end": fast_e2e / hf_e2e,
           "fast_first_batch_s": (fast.get("batch_s") or [None])[0],
           "hf_static_first_batch_s": (hf.get("batch_s") or [None])[0],
           "fast_rows_per_s_steady": fs["rows_per_s"] if fs else None,
           "hf_static_rows_per_s_steady": hs["rows_per_s"] if hs else None,
           "ratio_steady": fs["rows_per_s"] / hs["rows_per_s"] if fs and hs else None,
           "steady_batches": [fs["batches"] if fs else 0, hs["batches"] if hs else 0],
           "same_batches": fast.get("batch_rows") == hf.get("batch_rows"),
           "fast_peak_gib": fast.get("peak_gib"), "hf_static_peak_gib": hf.get("peak_gib"),
           "hf_static_batch_rows": hf.get("batch_rows_per_call"), "hf_static_compiled": hf.get("compile"),
           "hf_static_new_tokens_per_row": hf.get("new_tokens_per_row")}
    out[f"fast_at_least_{KEEP_RATIO}x_end_to_end"] = out["ratio_end_to_end"] >= KEEP_RATIO
    return out


def summarize(cfg: Config, card: dict, roof: dict, results: dict) -> dict:
    """rows/s of each way, its ratio to one row at a time and its share of the roofline."""
    base = results.get("one_row", {}).get("rows_per_s")
    rows = {}
    names = {"one_row": "one row at a time, transformers generate (LoRA merged)",
             "hf_batches": f"transformers generate, padded batches of {cfg.baseline_batch_size} (LoRA merged)",
             "fast": f"HF engine + decoding fast path, batches of {cfg.fast_batch_size} (LoRA merged)",
             "fast_repeat": "the same, run again",
             "fast_n4": f"the same at n={cfg.n_extra} (batches of {cfg.fast_batch_size // cfg.n_extra} rows)",
             "quant4": f"4-bit nf4 base + unmerged LoRA, transformers generate, batches of {cfg.baseline_batch_size}",
             "hf_copies": "one copy per card in its own process (4-bit nf4 base + unmerged LoRA on a GPU), "
                          f"transformers generate, batches of {cfg.baseline_batch_size}"}
    for phase, what in (("vllm_lora", "vLLM, adapter as a LoRARequest"), ("vllm_merged", "vLLM, merged folder, LoRA off")):
        for n in (1, cfg.n_extra):
            names[f"{phase}_n{n}"] = f"{what}, n={n}"
    names["vllm_lora_n1_one_call"] = "vLLM, adapter as a LoRARequest, n=1, every row in one generate call"
    for key, n in (("hf_static", 1), ("hf_static_n4", cfg.n_extra)):
        r = results.get(key) or {}
        compiled = "torch.compile" if r.get("compile", True) else "eager (not compiled)"
        names[key] = (f"transformers generate, static cache + {compiled}, batches of "
                      f"{r.get('batch_rows_per_call', '?')} rows" + (f", n={n}" if n > 1 else "")
                      + " (LoRA merged; compilation included)")
    for key, label in names.items():
        r = results.get(key)
        if not r or "rows_per_s" not in r:
            continue
        rate = r["rows_per_s"]
        cards = max(1, r.get("gpus") or 1)  # a run over 2 cards is measured against 2 cards' roofline
        dtype = cfg.vllm_dtype if key.startswith("vllm") else cfg.hf_dtype
        if dtype != "auto":
            label += f" [{dtype}]"
        if cards > 1:
            label += f" [{cards} GPUs]"
        if key.startswith("vllm"):
            label += f" (start {r['start_s']:.0f} s)"
        if key == "hf_copies":
            label += f" (start up to {r['start_s']:.0f} s; {r['wall_s']:.0f} s wall for {r['rows']} rows)"
        rows[key] = {"how": label, "rows_per_s": rate, "x_one_row": rate / base if base else None,
                     "share_of_roofline": rate / (cards * roof["rows_per_s"]),
                     "share_of_sustained_roofline": rate / (cards * roof["sustained"]["rows_per_s"])
                     if "sustained" in roof else None, "seconds": r["seconds"], "rows": r["rows"],
                     "peak_gib": r.get("peak_gib"), "decoding": r.get("decoding"), "gpus": cards,
                     "empty_completions": r.get("empty_completions"), "start_s": r.get("start_s")}
    abl = {}
    for name, r in results.get("ablations", {}).items():
        if "rows_per_s" in r:
            abl[name] = {"rows_per_s": r["rows_per_s"], "seconds": r["seconds"], "rows": r["rows"],
                         "sub_batches": r.get("sub_batches"), "graphs": r.get("graphs"),
                         "compiled_ops": r.get("compiled_ops")}
        else:
            abl[name] = r
    versus = {}
    for label, fast_key, hf_key in (("n1", "fast", "hf_static"), (f"n{cfg.n_extra}", "fast_n4", "hf_static_n4")):
        if "rows_per_s" in results.get(fast_key, {}) and "rows_per_s" in results.get(hf_key, {}):
            versus[label] = compare_static(results[fast_key], results[hf_key])
    return {"card": card["device"], "roofline_rows_per_s": roof["rows_per_s"], "rows": rows, "ablations": abl,
            "static_vs_fast": versus}


def render_table(cfg: Config, card: dict, roof: dict, summary: dict) -> str:
    sus = roof.get("sustained")
    lines = [f"Card: {card['device']}; measured bf16 matrix rate {card['matmul_flops'] / 1e12:.0f} TFLOP/s (best short "
             f"burst; {card.get('matmul_sustained', 0) / 1e12:.0f} sustained for 2 s; one Mistral-7B layer's products "
             f"at 32k tokens {card.get('layer_matmuls', 0) / 1e12:.0f}), copy bandwidth "
             f"{card['copy_bytes_per_s'] / 1e12:.2f} TB/s.",
             f"Workload: {cfg.model}, {roof['rows']} rows, mean prompt {roof['mean_prompt_tokens']:.0f} tokens, "
             f"{cfg.max_new_tokens} new tokens; roofline {roof['seconds']:.1f} s (prefill {roof['t_prefill_s']:.1f} s "
             f"+ decode {roof['t_decode_s']:.1f} s) = {roof['rows_per_s']:.1f} rows/s"
             + (f"; at the sustained rate {sus['seconds']:.1f} s = {sus['rows_per_s']:.1f} rows/s."
                if sus else "."), "",
             "| how | rows/s | x one row at a time | share of roofline | (sustained-rate roofline) | s (rows timed) "
             "| peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in summary["rows"].values():
        x = f"{r['x_one_row']:.0f}x" if r["x_one_row"] else "-"
        s2 = f"{100 * r['share_of_sustained_roofline']:.0f}%" if r.get("share_of_sustained_roofline") else "-"
        lines.append(f"| {r['how']} | {common.fmt_rate(r['rows_per_s'])} | {x} | {100 * r['share_of_roofline']:.0f}% | "
                     f"{s2} | {r['seconds']:.1f} ({r['rows']}) | {'-' if r['peak_gib'] is None else r['peak_gib']} |")
    lines.append(f"| roofline | {roof['rows_per_s']:.1f} | | 100% | {sus['rows_per_s']:.1f} if sustained | "
                 f"{roof['seconds']:.1f} | |" if sus else f"| roofline | {roof['rows_per_s']:.1f} | | 100% | | "
                 f"{roof['seconds']:.1f} | |")
    if summary["ablations"]:
        lines += ["", "Fast-path ablations (decoding.generate_ids on pre-tokenized prompts, every "
                      f"{cfg.ablation_every}th row by length):", "",
                  "| variant | rows/s | s | sub-batches |", "|---|---|---|---|"]
        for name, r in summary["ablations"].items():
            if "rows_per_s" in r:
                lines.append(f"| {name} | {common.fmt_rate(r['rows_per_s'])} | {r['seconds']:.2f} | "
                             f"{r['sub_batches']} |")
            else:
                lines.append(f"| {name} | error: {r.get('error', '')[:120]} | | |")
    if summary.get("static_vs_fast"):
        lines += ["", f"The project's fast path (`fast`) against transformers' static cache + torch.compile "
                      f"(`hf_static`) on {card['device']}: the same rows and engine batches. End to end = each arm's "
                      f"one-time compilation included (fast: + its warm-up; hf_static: in its first batch); steady = "
                      f"the full-size batches after the first, both warm. The fast path stays if it is at least "
                      f"{KEEP_RATIO}x faster end to end.", "",
                  "| n | fast rows/s (warm-up excluded) | fast warm-up s | fast end to end | hf_static end to end | "
                  "**fast / hf_static, end to end** | fast steady | hf_static steady | fast / hf_static steady | "
                  "1st batch s, fast / hf_static | hf_static rows per call | peak GiB, fast / hf_static |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rate = lambda x: "-" if x is None else common.fmt_rate(x)  # noqa: E731
        ratio = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        for label, v in summary["static_vs_fast"].items():
            other = "" if v["same_batches"] else " (other batches: steady spans other rows)"
            lines.append(f"| {label[1:]} | {rate(v['fast_rows_per_s'])} | {v['fast_warmup_s']:.1f} | "
                         f"{rate(v['fast_rows_per_s_end_to_end'])} | {rate(v['hf_static_rows_per_s_end_to_end'])} | "
                         f"**{ratio(v['ratio_end_to_end'])}** | {rate(v['fast_rows_per_s_steady'])} | "
                         f"{rate(v['hf_static_rows_per_s_steady'])} | {ratio(v['ratio_steady'])} | "
                         f"{v['fast_first_batch_s']} / {v['hf_static_first_batch_s']} | "
                         f"{v['hf_static_batch_rows']}{other} | "
                         f"{v['fast_peak_gib']} / {v['hf_static_peak_gib']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> Config:
    return common.parse_config(Config, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main(parse_args())
