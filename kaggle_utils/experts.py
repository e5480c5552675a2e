"""4-bit mixture-of-experts weights for QLoRA on Mixtral-8x7B.

In transformers 5, Mixtral's experts are two fused 3-D parameters per layer (``experts.gate_up_proj``
``[experts, 2*intermediate, hidden]`` and ``experts.down_proj``), not ``nn.Linear`` layers, so bitsandbytes'
quantizer (which replaces ``nn.Linear`` only) leaves them in 16 bits: 45 of the 46.7 B parameters, 85 GiB after
loading, and PEFT's k-bit preparation then casts them to fp32 (BENCHMARKS.md).

:class:`Experts4bit` takes the experts' place while ``from_pretrained`` builds the model. It exposes the two fused
names as placeholders, so transformers' own loader still reads, renames and concatenates the checkpoint's
per-expert ``w1/w2/w3`` tensors; when the loader assigns a fused tensor, it is cut into one ``bnb.nn.Linear4bit``
per expert (nf4, double quantization, like the rest of the model) and the 16-bit copy is dropped at once, so a
loading peak holds one layer's experts in 16 bits, not the whole model. The forward pass is the same top-k routing
loop as transformers' eager experts, through bitsandbytes' 4-bit matmul (frozen weights, gradients flow to the
input, so LoRA on attention trains through it).
"""
from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn

FUSED_NAMES = ("gate_up_proj", "down_proj")

# model_type -> (module, class) of the fused experts that Experts4bit replaces while loading in 4-bit
FUSED_EXPERTS = {"mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts")}


class ExpertsLoadError(RuntimeError):
    """The checkpoint did not provide an expert weight (its name says which layer)."""


class Experts4bit(nn.Module):
    """Top-k routed experts stored as 4-bit ``Linear4bit`` pairs (fused gate/up, then down), one per expert.

    ``quant`` holds the 4-bit settings: ``quant_type``, ``compress_statistics``, ``quant_storage``,
    ``compute_dtype``. :func:`fused_experts_4bit` binds it while a model is built.
    """

    quant: dict | None = None  # set on the subclass fused_experts_4bit makes

    def __init__(self, config, quant: dict | None = None):
        super().__init__()
        from transformers.activations import ACT2FN

        # bitsandbytes' own defaults, then the model's settings
        self._quant = {"quant_type": "nf4", "compress_statistics": True, "quant_storage": torch.uint8,
                       "compute_dtype": None, **(quant if quant is not None else (self.quant or {}))}
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.act_fn = ACT2FN[config.hidden_act]
        self._shapes = {
            "gate_up_proj": (self.num_experts, 2 * self.intermediate_dim, self.hidden_dim),
            "down_proj": (self.num_experts, self.hidden_dim, self.intermediate_dim),
        }
        # Placeholders with the fused shapes (on meta while from_pretrained builds the model): the loader matches
        # the checkpoint against them and casts to their dtype. The per-expert Linear4bit layers are registered only
        # when the first fused tensor arrives; registered now, the loader would report their weights as missing
        # from the checkpoint and initialize them.
        for name, shape in self._shapes.items():
            super().__setattr__(name, nn.Parameter(torch.empty(shape), requires_grad=False))

    def __setattr__(self, name, value):
        # transformers' loader flags every tensor it read from the checkpoint with _is_hf_initialized; an unflagged
        # one is a missing weight being materialized for random init: it stays a placeholder, and finish() says so.
        if (name in FUSED_NAMES and isinstance(value, torch.Tensor) and value.device.type != "meta"
                and getattr(value, "_is_hf_initialized", False)):
            self.set_fused(name, value)
            return
        super().__setattr__(name, value)

    @torch.no_grad()
    def set_fused(self, name: str, fused: torch.Tensor) -> None:
        """Quantize ``fused`` ([experts, out, in]) into the experts' ``Linear4bit`` layers and drop the 16-bit copy."""
        import bitsandbytes as bnb

        if tuple(fused.shape) != self._shapes[name]:
            raise ExpertsLoadError(f"{name}: expected shape {self._shapes[name]}, got {tuple(fused.shape)}")
        key = "gate_up" if name == "gate_up_proj" else "down"
        q = self._quant
        if "experts" not in self._modules:
            kw = dict(bias=False, **q)
            with torch.device("meta"):  # shells only: the weights are set below
                self.experts = nn.ModuleList(
                    nn.ModuleDict({"gate_up": bnb.nn.Linear4bit(self.hidden_dim, 2 * self.intermediate_dim, **kw),
                                   "down": bnb.nn.Linear4bit(self.intermediate_dim, self.hidden_dim, **kw)})
                    for _ in range(self.num_experts)
                )
        for e in range(self.num_experts):
            layer = self.experts[e][key]
            layer.weight = bnb.nn.Params4bit(
                fused[e].contiguous(), requires_grad=False, quant_type=q["quant_type"],
                compress_statistics=q["compress_statistics"], quant_storage=q["quant_storage"], module=layer,
            ).to(fused.device)  # Params4bit quantizes on its first move to a device
            layer.weight._is_hf_initialized = True  # transformers' weight init must not touch the packed bytes
        self._parameters.pop(name, None)
        stub = torch.empty(self._shapes[name], device="meta")
        stub._is_hf_initialized = True  # transformers' weight init skips it
        object.__setattr__(self, name, stub)

    def finish(self, where: str = "") -> None:
        """Check that both fused weights arrived through the loader (and were quantized).

        A placeholder left over means the checkpoint had no such weight (transformers would fill it with random
        numbers and only warn): a clear error naming the module."""
        left = [name for name in FUSED_NAMES if name in self._parameters]
        if left:
            raise ExpertsLoadError(
                f"{where or 'experts'}.{left[0]}: the checkpoint has no weights for these experts "
                f"({', '.join(left)}); is the model folder a complete Mixtral checkpoint?")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [experts + 1, top_k, tokens]: which token sends which of its k slots to which expert; index
            # num_experts is the slot no local expert takes (as in transformers' loop), skipped below
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for e in hit:
            if e == self.num_experts:
                continue
            slot, token = torch.where(mask[e])
            expert = self.experts[e]
            gate, up = expert["gate_up"](hidden_states[token]).chunk(2, dim=-1)
            h = expert["down"](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, 4-bit"


def quant_settings(quantization_config) -> dict:
    """The 4-bit settings of a ``BitsAndBytesConfig``, as :class:`Experts4bit` wants them."""
    storage = getattr(quantization_config, "bnb_4bit_quant_storage", None) or torch.uint8
    if isinstance(storage, str):
        storage = getattr(torch, storage)
    return {
        "quant_type": quantization_config.bnb_4bit_quant_type,
        "compress_statistics": bool(quantization_config.bnb_4bit_use_double_quant),
        "quant_storage": storage,
        "compute_dtype": quantization_config.bnb_4bit_compute_dtype,
    }


def has_fused_experts(model_type: str) -> bool:
    """True for architectures whose experts transformers stores fused (bitsandbytes leaves them 16-bit)."""
    return model_type in FUSED_EXPERTS


@contextlib.contextmanager
def fused_experts_4bit(model_type: str, quantization_config):
    """While active, models of ``model_type`` are built with :class:`Experts4bit` in place of the fused experts.

    Swaps the class name that the architecture's MoE block instantiates (restored on exit, also on errors); a model
    type without fused experts is left as it is.
    """
    if not has_fused_experts(model_type):
        yield
        return
    module_name, class_name = FUSED_EXPERTS[model_type]
    module = importlib.import_module(module_name)
    original = getattr(module, class_name)
    bound = type(f"{class_name}4bit", (Experts4bit,), {"quant": quant_settings(quantization_config)})
    setattr(module, class_name, bound)
    try:
        yield
    finally:
        setattr(module, class_name, original)


def finish_experts(model) -> int:
    """Check every :class:`Experts4bit` of ``model`` got its weights; returns how many there are."""
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, Experts4bit):
            module.finish(name)
            n += 1
    return n
