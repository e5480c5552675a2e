"""The four planned base models, proven on a GPU through the project's own presets and training code.

Usage (on a GPU box with bitsandbytes, trl and datasets; writes results.json, results.md, cfg.json to --out):
    python benchmarks/check_architectures.py --out runs/bench/architectures
CPU smoke test (the same code on 2-layer, 64-wide stand-ins of each architecture; needs bitsandbytes for 4-bit):
    python benchmarks/check_architectures.py --tiny --out runs/bench/architectures-tiny

For each preset (Mistral-7B, Llama-2-13B, Mistral-22B, Mixtral-8x7B) the network is built from its published config
with random weights, directly on the GPU and 4-bit where the preset says, with the very ``BitsAndBytesConfig`` that
``models.quantization_config(preset)`` gives and transformers' own bitsandbytes quantizer (only the reading of a
checkpoint is replaced: ``models.load_model`` is patched to build instead of load). Then, through the project's code:
``training.load_model_and_tokenizer`` (pad token, k-bit preparation, LoRA on the preset's modules),
``training.build_trainer`` (TRL's SFTTrainer, completion-only loss) and two optimizer steps (the second timed); the
loss must be finite and the adapter must change. Last, one sampled generation through ``engines.HFEngine``.

A model whose memory under the project's path is larger than the card is built with fewer layers (the row says so
and gives the per-layer arithmetic for the full depth).

For presets with fused MoE experts (Mixtral) it also writes a real ``--checkpoint_layers``-layer checkpoint (random
bf16, the checkpoint's per-expert layout) and loads and trains it through the project's unpatched path
(``training.load_model_and_tokenizer`` -> ``models.load_model``) over every visible GPU.

On a machine with several GPUs the full-depth build sits on GPU 0 alone, and transformers' Trainer would wrap it in
``nn.DataParallel``, which TRL refuses: that step then runs in this script's plain AdamW loop (the row says so). For
the TRL path at full depth, make one GPU visible (``CUDA_VISIBLE_DEVICES=0``).
"""
from __future__ import annotations

import gc
import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import _common as common  # noqa: E402

# The merged 16-bit model's generation takes the fast path; its one-time compilation is not what this check measures.
os.environ.setdefault("KAGGLE_UTILS_COMPILE_DECODE", "0")

PRESETS = ["mistral-7b", "llama2-13b", "mistral-22b", "mixtral-8x7b"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@dataclass
class Config:
    """One architecture check."""

    out: str = "runs/bench/architectures"  # results folder
    work_dir: str = "/tmp/kaggle_utils_arch"  # run folders and the (weightless) model folders
    presets: list = field(default_factory=lambda: list(PRESETS))  # which presets to check
    tiny: bool = False  # 2-layer, 64-wide stand-ins (a CPU smoke test of this script)
    prompt_tokens: int = 480  # tokens per training/generation prompt (about the real mean)
    micro_batch_size: int = 2  # rows per step
    steps: int = 2  # optimizer steps; the last one is timed
    memory_fraction: float = 0.8  # build fewer layers when the estimate passes this share of the card
    max_new_tokens: int = 16  # tokens of the sampled generation
    seed: int = 0
    checkpoint_layers: int = 2  # fused-expert presets: also load a real checkpoint of this many layers (0 = skip)


# ---------------------------------------------------------------- building models with random weights


def estimate_bytes(name: str, config, load_in_4bit: bool, skip: tuple) -> dict:
    """GPU bytes of the weights under the project's path: 4-bit nn.Linear layers and fused MoE experts (0.5 byte a
    parameter plus about 3% of statistics), every other parameter 16-bit, and after
    ``prepare_model_for_kbit_training`` (4-bit only) every non-4-bit parameter in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from kaggle_utils import experts

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    linear, other, per_layer_other = 0, 0, 0
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}"
            is_linear = type(module) is torch.nn.Linear and not any(full.split(".")[-2] == s or
                                                                     mod_name.endswith(s) for s in skip)
            # fused MoE experts: 4-bit through kaggle_utils.experts
            is_experts = experts.has_fused_experts(config.model_type) and p_name in experts.FUSED_NAMES
            if load_in_4bit and (is_linear or is_experts):
                linear += p.numel()
            else:
                other += p.numel()
                if ".layers.0." in f".{full}":
                    per_layer_other += p.numel()
    quant = linear * 0.5 * 1.03
    loaded = quant + other * 2
    trained = quant + other * (4 if load_in_4bit else 2)
    return {"params": linear + other, "params_4bit": linear, "params_16bit": other, "loaded_bytes": loaded,
            "after_kbit_prep_bytes": trained,
            "per_layer_16bit_params": per_layer_other, "per_layer_after_prep_bytes":
                per_layer_other * (4 if load_in_4bit else 2) + (linear / config.num_hidden_layers) * 0.5 * 1.03}


def build_random(name: str, config, quantization_config=None, device: str = "cuda", dtype=None):
    """``config``'s network with random weights on ``device``; 4-bit through transformers' bitsandbytes quantizer
    (the same module replacement and ``Params4bit`` quantization ``from_pretrained`` does) when a config is given."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(0)
    if quantization_config is None:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    import bitsandbytes as bnb
    from transformers.quantizers import AutoHfQuantizer

    from kaggle_utils import experts

    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    # Fused MoE experts (Mixtral) become kaggle_utils.experts.Experts4bit, as models.load_model builds them.
    with torch.device("meta"), experts.fused_experts_4bit(config.model_type, quantization_config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": device}, checkpoint_files=None,
                               use_kernels=False)
    std = getattr(config, "initializer_range", 0.02)
    for mod_name, module in model.named_modules():
        for p_name, p in list(module.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            value = torch.empty(p.shape, device=device, dtype=dtype)
            if "norm" in mod_name.rsplit(".", 1)[-1]:
                value.fill_(1.0)
            else:
                value.normal_(0.0, std)
            if quantizer.param_needs_quantization(model, full):
                module._parameters[p_name] = bnb.nn.Params4bit(value, requires_grad=False, **p.__dict__).to(device)
            else:  # flagged and set as transformers' loader does: Experts4bit quantizes its fused weights here
                new = torch.nn.Parameter(value, requires_grad=False)
                new._is_hf_initialized = True
                setattr(module, p_name, new)
            del value
    experts.finish_experts(model)
    # Non-persistent buffers (rotary frequencies) were created on meta: rebuild the rotary module on the device.
    inner = model.model
    if hasattr(inner, "rotary_emb"):
        with torch.device(device):
            inner.rotary_emb = type(inner.rotary_emb)(config=model.config)
    for name_, buf in model.named_buffers():
        if buf.device.type == "meta":
            raise RuntimeError(f"buffer {name_} left on meta")
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model.eval()


def synthetic_train_config(name: str, work: Path, run_name: str, folder: Path, steps: int, micro_batch: int,
                           max_seq_length: int):
    """The project's TrainConfig for a check on synthetic rows (the rows are built here, not read from files)."""
    from kaggle_utils import training

    return training.TrainConfig(run_name=run_name, runs_dir=str(work / "runs"), preset=name,
                                base_model_path=str(folder), train_files=["(synthetic rows)"],
                                validation_file="(synthetic rows)", val_rows=2, max_steps=steps,
                                batch_size=micro_batch, micro_batch_size=micro_batch, save_steps=5, warmup_steps=0,
                                learning_rate=1e-3, max_seq_length=max_seq_length)


def lora_snapshot(model) -> dict:
    """A copy of every LoRA tensor, to tell afterwards which ones training moved."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def lora_changed(model, before: dict) -> int:
    """How many of the ``before`` LoRA tensors differ now."""
    import torch

    now = dict(model.named_parameters())
    return sum(not torch.equal(v, now[n].detach().float()) for n, v in before.items())


def load_checkpoint_check(name: str, overrides: dict, layers: int, work: Path) -> dict:
    """Write a real checkpoint (per-expert ``w1/w2/w3`` tensors, random bf16) of ``layers`` layers and load it with
    ``models.load_model`` itself (nothing patched): the experts must arrive 4-bit and the loading peak must stay near
    the 4-bit size (one layer's 16-bit experts at a time), not near the 16-bit model."""
    import torch
    from transformers import AutoModelForCausalLM

    from kaggle_utils import experts, training

    cfg_n = common.make_config(name, **{**overrides, "num_hidden_layers": layers})
    folder = work / "models" / f"{name}-{layers}-layer-checkpoint"
    t0 = time.perf_counter()
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg_n, dtype=torch.bfloat16)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        common.save_model_folder(model, common.word_tokenizer(cfg_n.vocab_size, "mistral", eos_inside=True), folder)
        del model
        gc.collect()
    out: dict = {"layers": layers, "write_s": round(time.perf_counter() - t0, 1),
                 "checkpoint_gib": common.gib(sum(f.stat().st_size for f in folder.glob("*.safetensors")))}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    tcfg = synthetic_train_config(name, work, f"{name}-checkpoint", folder, steps=2, micro_batch=2,
                                  max_seq_length=1024)
    shutil.rmtree(tcfg.run_dir, ignore_errors=True)
    training.prepare_run(tcfg)
    t0 = time.perf_counter()
    model, tok = training.load_model_and_tokenizer(tcfg)  # models.load_model, k-bit preparation, LoRA: unpatched
    out["load_s"] = round(time.perf_counter() - t0, 1)
    moe = [m for m in model.modules() if isinstance(m, experts.Experts4bit)]
    float_3d = [n for n, p in model.named_parameters() if p.dim() == 3]
    per_layer_16bit = cfg_n.num_local_experts * 3 * cfg_n.intermediate_size * cfg_n.hidden_size * 2
    out["gpus"] = torch.cuda.device_count() if cuda else 0
    out["devices"] = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()})
    out.update({"experts_modules": len(moe), "float_3d_params": len(float_3d),
                "one_layer_16bit_experts_gib": common.gib(per_layer_16bit)})
    if cuda:
        gpus = range(torch.cuda.device_count())
        out["weights_gib"] = common.gib(sum(torch.cuda.memory_allocated(i) for i in gpus))
        out["load_peak_gib"] = common.gib(max(torch.cuda.max_memory_allocated(i) for i in gpus))
        out["weights_gib_per_gpu"] = [common.gib(torch.cuda.memory_allocated(i)) for i in gpus]
    ids = torch.randint(3, cfg_n.vocab_size, (1, 32), device=model.device)
    with torch.no_grad():
        logits = model(ids).logits
    out["forward_finite"] = bool(torch.isfinite(logits).all())
    # two optimizer steps through the project's trainer, on however many GPUs load_model spread the layers over
    # (after one step only LoRA's B matrices have moved: B starts at zero, so A's first gradient is zero)
    from datasets import Dataset

    rows, _ = synthetic_rows(tok, 6, 480, 0)
    lora_before = lora_snapshot(model)
    trainer = training.build_trainer(tcfg, model, tok, Dataset.from_list(rows[2:]), Dataset.from_list(rows[:2]))
    t0 = time.perf_counter()
    trainer.train()
    out["train_s"] = round(time.perf_counter() - t0, 1)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    changed = lora_changed(model, lora_before)
    out["train"] = {"losses": losses, "adapter_tensors_changed": f"{changed}/{len(lora_before)}"}
    if cuda:
        out["train_peak_gib_per_gpu"] = [common.gib(torch.cuda.max_memory_allocated(i))
                                         for i in range(torch.cuda.device_count())]
    out["ok"] = (bool(moe) and not float_3d and out["forward_finite"] and bool(losses)
                 and all(math.isfinite(x) for x in losses) and changed == len(lora_before) > 0)
    del model, logits, trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- one preset


def synthetic_rows(tokenizer, n: int, prompt_tokens: int, seed: int):
    """Training rows as ``training.build_datasets`` makes them (input_ids + completion_mask), from word texts."""
    import random

    from kaggle_utils import prompts

    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(3, 32000)}" for _ in range(k))  # noqa: E731
    overhead = len(prompts.generation_ids(tokenizer, "w3", "w3", 4096)[0]) - 2
    body = max(prompt_tokens - overhead, 4)
    rows, texts = [], []
    for _ in range(n):
        o, r = words(body * 6 // 10), words(body - body * 6 // 10)
        rows.append(prompts.encode_training_example(tokenizer, o, r, words(rng.randrange(6, 16))))
        texts.append((o, r))
    return rows, texts


def check_preset(cfg: Config, name: str, work: Path) -> dict:
    import torch

    from kaggle_utils import engines, experts, models, prompts, training

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    preset = models.get_preset(name)
    overrides = dict(TINY) if cfg.tiny else {}
    config = common.make_config(name, **overrides)
    row: dict = {"preset": name, "title": preset.title, "load_in_4bit": preset.load_in_4bit,
                 "lora_targets": list(preset.lora_target_modules), "layers_real": config.num_hidden_layers}
    est = estimate_bytes(name, config, preset.load_in_4bit, preset.skip_quantization)
    row["estimate_gib"] = {k: common.gib(v) for k, v in est.items() if k.endswith("bytes")}
    row["params_b"] = round(est["params"] / 1e9, 2)
    if cuda:
        card = torch.cuda.get_device_properties(0).total_memory
        limit = cfg.memory_fraction * card
        if est["after_kbit_prep_bytes"] > limit:
            fixed = est["after_kbit_prep_bytes"] - est["per_layer_after_prep_bytes"] * config.num_hidden_layers
            layers = max(1, int((limit - fixed) // est["per_layer_after_prep_bytes"]))
            layers = min(layers, config.num_hidden_layers)
            row["layers_built"] = layers
            row["why_fewer_layers"] = (
                f"under the project's path this model needs {common.gib(est['after_kbit_prep_bytes'])} GiB "
                f"({common.gib(est['per_layer_after_prep_bytes'])} GiB a layer), more than "
                f"{cfg.memory_fraction:.0%} of the card's {common.gib(card)} GiB")
            config = common.make_config(name, **overrides, num_hidden_layers=layers)
    row.setdefault("layers_built", config.num_hidden_layers)

    # A model folder the project's checks accept: config + tokenizer + a placeholder weights file. The weights are
    # never read: models.load_model is patched below to build them on the GPU instead.
    folder = work / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    common.word_tokenizer(config.vocab_size, preset.family, eos_inside=True).save_pretrained(folder)
    (folder / "model.safetensors").touch()

    qcfg_holder = {}
    real_load_model = models.load_model

    def load_random(preset_, path, load_in_4bit=False, dtype=None, num_gpus=None, max_memory_gib=None,
                    for_training=False):
        qcfg = models.quantization_config(preset_) if load_in_4bit else None
        qcfg_holder["q"] = qcfg
        return build_random(name, config, qcfg, device=device, dtype=None if load_in_4bit else dtype)

    tcfg = synthetic_train_config(name, work, name, folder, steps=cfg.steps, micro_batch=cfg.micro_batch_size,
                                  max_seq_length=max(1024, cfg.prompt_tokens + 64))
    training.prepare_run(tcfg)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    models.load_model = load_random
    try:
        model, tok = training.load_model_and_tokenizer(tcfg)
    finally:
        models.load_model = real_load_model
    row["build_s"] = round(time.perf_counter() - t0, 1)
    q = qcfg_holder.get("q")
    row["quantization"] = (f"nf4={q.bnb_4bit_quant_type == 'nf4'}, double_quant={q.bnb_4bit_use_double_quant}, "
                           f"compute={str(q.bnb_4bit_compute_dtype).replace('torch.', '')}, "
                           f"skip={q.llm_int8_skip_modules}") if q else "none (16-bit)"
    kinds: dict = {}
    for p in model.parameters():
        key = "4-bit" if type(p).__name__ == "Params4bit" else str(p.dtype).replace("torch.", "")
        kinds[key] = kinds.get(key, 0) + p.numel() * (2 if key == "4-bit" else 1)
    row["params_by_storage_b"] = {k: round(v / 1e9, 2) for k, v in kinds.items()}
    if cuda:
        row["weights_gib"] = common.gib(torch.cuda.memory_allocated())

    # ---- two optimizer steps through the project's trainer
    train_rows, texts = synthetic_rows(tok, cfg.micro_batch_size * cfg.steps + 2, cfg.prompt_tokens, cfg.seed)
    lora_before = lora_snapshot(model)
    step_times, how = [], ""
    try:  # the project's trainer needs trl + datasets; any import failure means the fallback loop below
        from datasets import Dataset
        from transformers import TrainerCallback

        import trl  # noqa: F401
        trl_error = ""
    except Exception as e:
        trl_error = f"{type(e).__name__}: {str(e)[:200]}"
    if not trl_error:

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if cuda:
                    torch.cuda.synchronize()
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if cuda:
                    torch.cuda.synchronize()
                step_times.append(time.perf_counter() - self.t)

        try:
            trainer = training.build_trainer(tcfg, model, tok, Dataset.from_list(train_rows[2:]),
                                             Dataset.from_list(train_rows[:2]))
            trainer.add_callback(StepTimer())
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            how = "TRL SFTTrainer via training.build_trainer"
        except Exception as e:  # a version mismatch on this machine must not hide the model's own check
            if "out of memory" in str(e).lower():
                raise
            trl_error = f"trainer failed: {type(e).__name__}: {str(e)[:300]}"
            step_times.clear()
        trainer = None
    if trl_error:  # no trl/datasets on this machine: the same loss, one plain optimizer loop
        how = f"plain AdamW loop (trl/datasets unusable: {trl_error})"
        losses = plain_steps(model, tok, train_rows[2:], cfg, step_times, cuda)
    row["train"] = {"how": how, "losses": losses, "finite": bool(losses) and all(math.isfinite(x) for x in losses),
                    "step_s": [round(t, 2) for t in step_times]}
    changed = lora_changed(model, lora_before)
    row["train"]["adapter_tensors_changed"] = f"{changed}/{len(lora_before)}"
    row["train"]["adapter_changed"] = changed > 0
    if cuda:
        row["train_peak_gib"] = common.gib(torch.cuda.max_memory_allocated())

    # ---- one sampled generation through the project's engine (unmerged adapter: transformers generate)
    model.eval()
    engine = engines.HFEngine(model, tok)
    scfg = engines.SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=cfg.max_new_tokens,
                                  generation_batch_size=2)
    t0 = time.perf_counter()
    outs = engine.generate([t[0] for t in texts[:2]], [t[1] for t in texts[:2]], scfg, progress=False)
    row["generate"] = {"s": round(time.perf_counter() - t0, 2), "rows": len(outs),
                       "ok": all(len(o) == 1 and isinstance(o[0], str) and o[0].strip() for o in outs),
                       "sample": outs[0][0][:80]}
    if not preset.load_in_4bit and cuda:  # 16-bit: the merged model takes the fast decoding path too
        from kaggle_utils import decoding

        merged = model.merge_and_unload()
        fast = engines.HFEngine(merged, tok)
        t0 = time.perf_counter()
        outs = fast.generate([t[0] for t in texts[:2]], [t[1] for t in texts[:2]], scfg, progress=False)
        row["generate_merged_fast"] = {"s": round(time.perf_counter() - t0, 2),
                                       "fast_path": decoding.unsupported_reason(merged) or "applies",
                                       "ok": all(o[0].strip() for o in outs)}
        merged = fast = None
    row["ok"] = row["train"]["finite"] and row["train"]["adapter_changed"] and row["generate"]["ok"]
    if cuda:
        row["peak_gib"] = common.gib(torch.cuda.max_memory_allocated())
    model = engine = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if cfg.checkpoint_layers and preset.load_in_4bit and experts.has_fused_experts(config.model_type):
        try:
            row["checkpoint_load"] = load_checkpoint_check(name, overrides, cfg.checkpoint_layers, work)
        except Exception as e:  # keep the rest of the row
            row["checkpoint_load"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}",
                                      "traceback": traceback.format_exc()[-2000:]}
        row["ok"] = row["ok"] and row["checkpoint_load"]["ok"]
    _ = prompts  # (imported for synthetic_rows' template; keeps the import list honest)
    return row


def plain_steps(model, tok, rows, cfg: Config, step_times: list, cuda: bool) -> list[float]:
    """The fallback training loop: AdamW on the LoRA parameters, loss on the answer tokens only."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    device = next(model.parameters()).device
    losses = []
    model.train()
    for step in range(cfg.steps):
        batch = rows[step * cfg.micro_batch_size:(step + 1) * cfg.micro_batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.where(torch.tensor(r["completion_mask"]) == 1, torch.tensor(r["input_ids"]), -100)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return losses


def render(rows: list[dict], device: str) -> str:
    lines = [f"Card: {device}", "",
             "| preset | 4-bit | layers built / real | params (B) | weights GiB | peak GiB (train step) | "
             "build s | step s (last) | loss | adapter changed | sampled generation |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | | | | | | | | error: {r['error'][:160]} | | |")
            continue
        t = r["train"]
        loss = ", ".join(f"{x:.3f}" for x in t["losses"]) or "none logged"
        lines.append(
            f"| {r['preset']} | {'yes' if r['load_in_4bit'] else 'no'} | {r['layers_built']} / {r['layers_real']} | "
            f"{r['params_b']} | {r.get('weights_gib', '-')} | {r.get('train_peak_gib', '-')} | {r['build_s']} | "
            f"{t['step_s'][-1] if t['step_s'] else '-'} | {loss} | {t['adapter_tensors_changed']} | "
            f"{'ok' if r['generate']['ok'] else 'FAILED'} ({r['generate']['s']} s) |")
    notes = [f"- {r['preset']}: built {r['layers_built']} of {r['layers_real']} layers: {r['why_fewer_layers']}."
             for r in rows if r.get("why_fewer_layers")]
    for r in rows:
        c = r.get("checkpoint_load")
        if c and c.get("error"):
            notes.append(f"- {r['preset']}: the real-checkpoint check FAILED: {c['error']}")
        elif c:
            notes.append(
                f"- {r['preset']}: a real {c['layers']}-layer checkpoint ({c['checkpoint_gib']} GiB of bf16 "
                f"safetensors, per-expert tensors) through `models.load_model`: {c['experts_modules']} experts modules "
                f"4-bit, {c['float_3d_params']} fused 16-bit tensors left, on {c.get('gpus', 0)} GPU(s) "
                f"{c.get('devices')}, weights {c.get('weights_gib', '-')} GiB {c.get('weights_gib_per_gpu', '')}, "
                f"largest per-GPU peak while loading and preparing for k-bit training "
                f"{c.get('load_peak_gib', '-')} GiB (one layer's experts in 16 bits: "
                f"{c['one_layer_16bit_experts_gib']} GiB), load {c['load_s']} s, forward "
                f"{'finite' if c['forward_finite'] else 'NOT finite'}; two training steps through "
                f"`training.build_trainer`: loss {c['train']['losses']}, LoRA tensors changed "
                f"{c['train']['adapter_tensors_changed']}, peak GiB per GPU {c.get('train_peak_gib_per_gpu', '-')}.")
    return "\n".join(lines + [""] + notes) + "\n"


def main(cfg: Config) -> list[dict]:
    import torch

    rec = common.Recorder(Path(cfg.out), cfg)
    rec.put("environment", common.environment())
    work = Path(cfg.work_dir)
    rows = []
    for name in cfg.presets:
        t0 = time.perf_counter()
        try:
            row = check_preset(cfg, name, work)
        except Exception as e:  # one broken preset must not hide the others
            row = {"preset": name, "error": f"{type(e).__name__}: {str(e)[:400]}",
                   "traceback": traceback.format_exc()[-2000:]}
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row["total_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        rec.put(name, row)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    md = render(rows, device)
    (Path(cfg.out) / "results.md").write_text(md)
    print(md)
    return rows


def parse_args(argv=None) -> Config:
    return common.parse_config(Config, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main(parse_args())
