"""Shared pieces of the GPU benchmarks: real configs, random-weight model folders, a word-level stand-in tokenizer,
the card's measured ceilings and the roofline arithmetic.

No weights and no tokenizer of the real models exist on the GPU machine, so:
- models are built from their published configs with random weights (``build_random_model``);
- the tokenizer is a word-level one whose vocabulary is ``w3 ... w<N-1>``: a text of k such words is exactly k tokens,
  so the benchmark's prompts have exactly the token lengths measured on the real data
  (``benchmarks/prompt_lengths.json``).
  Its EOS id is the vocabulary size, one past the model's last logit, so a random model never stops early and every
  row gets exactly ``max_new_tokens`` new tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The published configs (config.json of each checkpoint), reduced to what shapes the network.
REAL_CONFIGS = {
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                   max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                                   sliding_window=None)),
    "llama2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "mistral-22b": ("mistral", dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                                    num_attention_heads=48, num_key_value_heads=8, vocab_size=32000,
                                    max_position_embeddings=65536, rope_theta=1e6, rms_norm_eps=1e-5,
                                    sliding_window=None)),
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                     num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                                     rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None)),
    # A CPU smoke-test stand-in with the Mistral-7B layout.
    "tiny": ("mistral", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096,
                             sliding_window=None)),
}


def make_config(name: str, **overrides):
    """A transformers config for ``name`` (see REAL_CONFIGS), untied embeddings, bos=1."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig

    arch, values = REAL_CONFIGS[name]
    values = {**values, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    rope_theta = values.pop("rope_theta", None)
    cls = {"mistral": MistralConfig, "llama": LlamaConfig, "mixtral": MixtralConfig}[arch]
    cfg = cls(**values)
    if rope_theta is not None:
        if getattr(cfg, "rope_parameters", None) is not None:
            cfg.rope_parameters["rope_theta"] = rope_theta
        else:
            cfg.rope_theta = rope_theta
    return cfg


def word_tokenizer(vocab_size: int, family: str = "mistral", eos_inside: bool = False):
    """The stand-in tokenizer: ``<unk>``=0, ``<s>``=1, words ``w3..``; ``</s>`` is ``vocab_size`` (never emitted, for
    timing) or, with ``eos_inside``, id 2 (for training, where every answer ends with EOS and must embed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kaggle_utils import prompts

    vocab = {"<unk>": 0, "<s>": 1, "</s>" if eos_inside else "<reserved>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    if not eos_inside:
        vocab["</s>"] = vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = prompts.FAMILY_TEMPLATES[family]
    return fast


def build_random_model(name: str, device: str = "cuda", dtype=None, **overrides):
    """``name``'s network with random weights, built directly on ``device`` (no CPU copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(make_config(name, **overrides), dtype=dtype)
    return model.eval()


def save_model_folder(model, tokenizer, folder: Path) -> Path:
    """A normal HF folder (config, safetensors, tokenizer) that the project's loaders accept."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="50GB")
    tokenizer.save_pretrained(folder)
    return folder


def parameter_counts(model) -> dict:
    """Parameters by role: the decoder layers' matrices, the embedding, the LM head, the rest (norms)."""
    import torch

    layers = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}.")
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "layer_matrices": layers, "embedding": embed, "lm_head": head,
            "other": total - layers - embed - head}


# ---------------------------------------------------------------- the card's ceilings


def _time_cuda(fn, warmup: int = 3, repeat: int = 15) -> float:
    """Median seconds of ``fn()`` timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_card() -> dict:
    """The card's bf16 matrix rate (best of a few large products) and copy bandwidth (read + write bytes)."""
    import torch

    out = {"device": torch.cuda.get_device_name(0), "matmul": {}, "copy": {}}
    best = 0.0
    for m, k, n in ((8192, 8192, 8192), (16384, 4096, 14336), (32768, 4096, 4096)):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        t = _time_cuda(lambda: a @ b)
        rate = 2 * m * k * n / t
        out["matmul"][f"{m}x{k}x{n}"] = rate
        best = max(best, rate)
        del a, b
    # Sustained: the same product back to back for about 2 s, as a long prefill runs it (clocks settle under load).
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    reps = max(1, int(2.0 / max(2 * 8192 ** 3 / best, 1e-6)))
    c = torch.empty_like(a)

    def products():
        for _ in range(reps):
            torch.mm(a, b, out=c)

    out["matmul_sustained"] = reps * 2 * 8192 ** 3 / _time_cuda(products, 1, 3)
    # One decoder layer's products at a prefill chunk's size (Mistral-7B shapes, 32k tokens): what the model's own
    # matrices reach, sustained; the gap from here to the prefill time is everything else.
    x = torch.randn(32768, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(32768, 14336, device="cuda", dtype=torch.bfloat16)
    ws = {n: torch.randn(o, i, device="cuda", dtype=torch.bfloat16) for n, (o, i) in
          {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096), "gate": (14336, 4096),
           "up": (14336, 4096), "down": (4096, 14336)}.items()}
    flops = 2 * 32768 * sum(w.numel() for w in ws.values())

    def layer():
        for n, w in ws.items():
            torch.nn.functional.linear(g if n == "down" else x, w)

    out["layer_matmuls"] = 8 * flops / _time_cuda(lambda: [layer() for _ in range(8)], 1, 3)
    del a, b, c, x, g, ws
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    t = _time_cuda(lambda: dst.copy_(src))
    out["copy"]["2GiB"] = 2 * src.numel() * src.element_size() / t
    del src, dst
    torch.cuda.empty_cache()
    out["matmul_flops"] = best
    out["copy_bytes_per_s"] = out["copy"]["2GiB"]
    return out


def roofline(counts: dict, config, prompt_lengths: list[int], new_tokens: int, flops: float, bandwidth: float,
             weight_bytes_per_param: float = 2.0, kv_bytes_per_value: float = 2.0) -> dict:
    """The least time the workload needs: prefill at the matrix rate, then decoding at max(matrix, memory) time.

    - prefill: 2 x (decoder-layer matrix parameters) FLOPs per prompt token, plus causal attention
      (2 x L^2 x hidden per layer for a prompt of L tokens), plus the LM head once per row;
    - decoding: ``new_tokens - 1`` steps per row (the first new token comes from the prefill), each 2 x (layer
      matrices + LM head) FLOPs plus attention over the context; its bytes are the weights once per step for all rows
      together (the whole workload as one batch: the least possible) plus every row's KV cache once per step.
    """
    layers = config.num_hidden_layers
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    kv_per_token = layers * 2 * kv_heads * head_dim * kv_bytes_per_value
    steps = new_tokens - 1
    p_layers, p_head = counts["layer_matrices"], counts["lm_head"]
    prefill_flops = sum(2 * p_layers * n + 2 * layers * n * n * hidden + 2 * p_head for n in prompt_lengths)
    decode_flops = 0.0
    kv_bytes = 0.0
    for n in prompt_lengths:
        ctx_sum = steps * n + steps * (steps + 1) / 2  # context lengths n+1 .. n+steps
        decode_flops += steps * 2 * (p_layers + p_head) + 4 * layers * hidden * ctx_sum
        kv_bytes += ctx_sum * kv_per_token
    weight_bytes = (p_layers + p_head) * weight_bytes_per_param * steps
    t_prefill = prefill_flops / flops
    t_decode = max(decode_flops / flops, (weight_bytes + kv_bytes) / bandwidth)
    seconds = t_prefill + t_decode
    return {"rows": len(prompt_lengths), "mean_prompt_tokens": statistics.mean(prompt_lengths),
            "prefill_flops": prefill_flops, "decode_flops": decode_flops, "decode_bytes": weight_bytes + kv_bytes,
            "t_prefill_s": t_prefill, "t_decode_s": t_decode, "seconds": seconds,
            "rows_per_s": len(prompt_lengths) / seconds}


# ---------------------------------------------------------------- bookkeeping


class Recorder:
    """Results as they come: appended to ``results.json`` in the output folder after every step (a crash keeps them)."""

    def __init__(self, out: Path, cfg):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        (out / "cfg.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}

    def put(self, key: str, value) -> None:
        self.data["steps"][key] = value
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {json.dumps(value, default=str)[:600]}", flush=True)


def environment() -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count)
    info["env"] = {k: v for k, v in os.environ.items() if k.startswith(("CUDA_VISIBLE", "KAGGLE_UTILS"))}
    return info


def fmt_rate(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def parse_config(cls, description: str, argv=None):
    """A benchmark's ``@dataclass Config`` from the command line: one ``--field`` per field, its default as default."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action="store_true", default=default)
        elif isinstance(default, list):
            parser.add_argument(f"--{f.name}", nargs="*", default=default)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default)
    return cls(**vars(parser.parse_args(argv)))
