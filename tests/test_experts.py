"""4-bit fused MoE experts (Mixtral QLoRA). Run: `pytest tests/test_experts.py`.

bitsandbytes' nf4 path runs on CPU, so the real quantization, the real transformers loader (per-expert w1/w2/w3 in
the checkpoint, fused while loading) and a real TRL step are exercised here; the GPU numbers are in BENCHMARKS.md.
"""
from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in requirements.txt (make setup installs it)")

from kaggle_utils import experts, models  # noqa: E402

from conftest import _tiny_config  # noqa: E402


def _dequantized(layer) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def _reference_experts(config):
    """transformers' own fused experts of a tiny Mixtral, random fp32 weights."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    ref = MixtralExperts(config)
    with torch.no_grad():
        ref.gate_up_proj.normal_(0, 0.2)
        ref.down_proj.normal_(0, 0.2)
    return ref


def _quant(compute=torch.float32):
    return {"quant_type": "nf4", "compress_statistics": True, "quant_storage": torch.uint8, "compute_dtype": compute}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_input_gradient_match_the_dequantized_fused_experts(device):
    config = _tiny_config("mixtral", 256)
    ref = _reference_experts(config).to(device)
    q = experts.Experts4bit(config, _quant())
    q.set_fused("gate_up_proj", ref.gate_up_proj.detach().clone())
    q.set_fused("down_proj", ref.down_proj.detach().clone())
    assert not any(p.dim() == 3 for p in q.parameters()), "the fused 16-bit copies must be gone"
    assert all(type(p).__name__ == "Params4bit" and p.dtype == torch.uint8 for p in q.parameters())

    # transformers' loop over the same weights after the 4-bit round trip: must agree to float rounding
    with torch.no_grad():
        for e in range(config.num_local_experts):
            ref.gate_up_proj[e] = _dequantized(q.experts[e]["gate_up"])
            ref.down_proj[e] = _dequantized(q.experts[e]["down"])
    tokens = 10
    x = torch.randn(tokens, config.hidden_size, device=device, requires_grad=True)
    top_k_index = torch.stack([torch.randperm(config.num_local_experts)[:2] for _ in range(tokens)]).to(device)
    top_k_weights = torch.softmax(torch.randn(tokens, 2, device=device), dim=-1)
    out = q(x, top_k_index, top_k_weights)
    expected = ref(x, top_k_index, top_k_weights)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    out.square().sum().backward()  # LoRA layers below the experts train through this gradient
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref, top_k_index, top_k_weights).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_wrong_fused_shape_names_the_weight():
    config = _tiny_config("mixtral", 256)
    q = experts.Experts4bit(config, _quant())
    with pytest.raises(experts.ExpertsLoadError, match="down_proj: expected shape"):
        q.set_fused("down_proj", torch.zeros(config.num_local_experts, 3, 3))


def test_load_model_quantizes_the_experts_from_a_real_checkpoint(tiny_model_dir):
    """models.load_model on a saved tiny Mixtral (per-expert w1/w2/w3 keys, as the real checkpoint has)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral import modeling_mixtral

    folder = tiny_model_dir("mixtral")
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        keys = list(f.keys())
    assert any(".experts.0.w1." in k for k in keys), "the fixture should be in the checkpoint's per-expert layout"
    original_class = modeling_mixtral.MixtralExperts
    preset = models.get_preset("mixtral-8x7b")
    model = models.load_model(preset, folder, load_in_4bit=True, dtype=torch.float32, num_gpus=0)
    assert modeling_mixtral.MixtralExperts is original_class, "the class swap must end with the load"

    moe = [m for m in model.modules() if isinstance(m, experts.Experts4bit)]
    assert len(moe) == 2
    floating_3d = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert not floating_3d, floating_3d
    fp_params = sum(p.numel() for p in model.parameters() if p.dtype != torch.uint8)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    expert_params = sum(p.numel() for n, p in ref.named_parameters() if ".experts." in n)
    attention_params = sum(p.numel() for n, p in ref.named_parameters() if "_proj" in n and ".experts." not in n)
    assert fp_params == sum(p.numel() for p in ref.parameters()) - expert_params - attention_params

    # every expert holds its own slice of the checkpoint, 4-bit rounded (checked before any forward pass: on CPU,
    # bitsandbytes repacks the bytes for its own kernel at the first inference call)
    for i, layer_moe in enumerate(moe):
        fused = ref.model.layers[i].mlp.experts
        for e in range(ref.config.num_local_experts):
            for key, full in (("gate_up", fused.gate_up_proj[e]), ("down", fused.down_proj[e])):
                got = _dequantized(layer_moe.experts[e][key])
                assert not torch.equal(got, full) and torch.allclose(got, full, atol=0.02), (i, e, key)
    # the 4-bit model computes what the full-precision one does, up to nf4 rounding (tiny widths are the worst case)
    ids = torch.randint(3, len(ref.get_input_embeddings().weight), (2, 16))
    with torch.no_grad():
        a, b = ref(ids).logits.flatten(), model(ids).logits.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95
    # that no-grad pass must not have repacked the weights for bitsandbytes' CPU kernel, which has no backward
    packed = [n for n, p in model.named_parameters() if getattr(getattr(p, "quant_state", None),
                                                                 "packing_format_for_cpu", False)]
    assert not packed, packed[:3]


def test_missing_expert_weights_name_the_layer(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tiny_model_dir("mixtral")
    target = tmp_path / "broken"
    target.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (target / f.name).write_bytes(f.read_bytes())
    shard = next(folder.glob("*.safetensors"))
    tensors = {k: v for k, v in load_file(str(shard)).items() if not (".layers.1." in k and ".experts." in k)}
    save_file(tensors, str(target / shard.name), metadata={"format": "pt"})
    with pytest.raises(experts.ExpertsLoadError, match=r"model\.layers\.1\.mlp\.experts\.(gate_up|down)_proj"):
        models.load_model(models.get_preset("mixtral-8x7b"), target, load_in_4bit=True, dtype=torch.float32,
                          num_gpus=0)
    from transformers.models.mixtral import modeling_mixtral

    assert not issubclass(modeling_mixtral.MixtralExperts, experts.Experts4bit), "restored after the error"


def test_the_class_swap_is_scoped_and_only_for_fused_experts():
    from transformers import BitsAndBytesConfig
    from transformers.models.mixtral import modeling_mixtral

    original = modeling_mixtral.MixtralExperts
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert not experts.has_fused_experts("mistral") and experts.has_fused_experts("mixtral")
    with experts.fused_experts_4bit("llama", qcfg):
        assert modeling_mixtral.MixtralExperts is original
    with pytest.raises(RuntimeError, match="boom"):
        with experts.fused_experts_4bit("mixtral", qcfg):
            swapped = modeling_mixtral.MixtralExperts
            assert issubclass(swapped, experts.Experts4bit) and swapped.quant["quant_type"] == "nf4"
            raise RuntimeError("boom")
    assert modeling_mixtral.MixtralExperts is original


# bitsandbytes' CPU inference repack has no backward; torch says so with this warning (models.load_model prevents it)
@pytest.mark.filterwarnings("error:.*autograd kernel was not registered")
def test_qlora_training_step_through_4bit_experts(tiny_model_dir, tmp_path, tokenizer):
    """The project's trainer on a tiny Mixtral in 4-bit: finite loss, the attention LoRA changes, experts frozen."""
    from datasets import Dataset

    from kaggle_utils import training

    folder = tiny_model_dir("mixtral")
    cfg = training.TrainConfig(run_name="mixtral-tiny", runs_dir=str(tmp_path), preset="mixtral-8x7b",
                               base_model_path=str(folder), train_files=["(rows)"], validation_file="(rows)",
                               val_rows=2, max_steps=2, batch_size=2, micro_batch_size=2, save_steps=5,
                               warmup_steps=0, learning_rate=1e-2, max_seq_length=256, load_in_4bit=True)
    training.prepare_run(cfg)
    model, tok = training.load_model_and_tokenizer(cfg)
    assert any(isinstance(m, experts.Experts4bit) for m in model.modules())
    rows = []
    for i in range(6):
        ids = tok(f"Rewrite text number {i} as a poem about the sea.", add_special_tokens=False)["input_ids"]
        answer = tok(f"Make it a sea poem {i}.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": ids + answer, "completion_mask": [0] * len(ids) + [1] * len(answer)})
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora_before and frozen_before
    trainer = training.build_trainer(cfg, model, tok, Dataset.from_list(rows[2:]), Dataset.from_list(rows[:2]))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    after = dict(model.named_parameters())
    changed = [n for n in lora_before if not torch.equal(lora_before[n], after[n].detach())]
    assert len(changed) == len(lora_before), "every attention LoRA tensor should move"
    assert all(torch.equal(frozen_before[n], after[n].detach()) for n in frozen_before)
    assert json.loads((tmp_path / "mixtral-tiny" / "config.json").read_text())["load_in_4bit"] is True
