"""Presets, base-path checks, 4-bit settings, device maps. Run: `pytest tests/test_models.py`."""
from __future__ import annotations

import pytest

from kaggle_utils import models
from kaggle_utils.config import ConfigError


def test_the_five_presets():
    assert set(models.PRESETS) == {"smollm2-135m", "mistral-7b", "llama2-13b", "mistral-22b", "mixtral-8x7b"}
    assert models.DEFAULT_PRESET == "smollm2-135m"
    for p in models.PRESETS.values():
        assert p.family in {"chatml", "mistral", "llama2", "gemma"}
        assert p.lora_target_modules and p.make_target.startswith("train-")
        assert p.default_path == "" or p.default_path.startswith("/kaggle/input/")


@pytest.mark.parametrize("name,four_bit", [("mistral-7b", False), ("llama2-13b", True), ("mistral-22b", True),
                                           ("mixtral-8x7b", True), ("smollm2-135m", False)])
def test_4bit_defaults(name, four_bit):
    assert models.get_preset(name).load_in_4bit is four_bit


def test_mixtral_keeps_router_and_head_unquantized():
    cfg = models.quantization_config(models.get_preset("mixtral-8x7b"))
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert set(cfg.llm_int8_skip_modules) == {"gate", "lm_head"}


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="unknown preset 'gpt-5'.*mistral-7b"):
        models.get_preset("gpt-5")


def test_missing_base_path_names_preset_path_and_fix(tmp_path):
    with pytest.raises(models.ModelPathError) as err:
        models.check_base_path(models.get_preset("mistral-7b"), str(tmp_path / "absent"))
    msg = str(err.value)
    assert "mistral-7b" in msg and str(tmp_path / "absent") in msg and "BASE_MODEL=" in msg


def test_default_kaggle_path_missing_here():
    with pytest.raises(models.ModelPathError, match="/kaggle/input/mixtral"):
        models.check_base_path(models.get_preset("mixtral-8x7b"), "")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(models.ModelPathError, match="not a model folder with weights"):
        models.check_base_path(models.get_preset("llama2-13b"), str(tmp_path))


@pytest.mark.parametrize("n,expected", [(0, None), (1, {"": 0}), (2, "auto")])
def test_device_map(n, expected):
    assert models.device_map(n) == expected


def test_cpu_dtype_is_fp32():
    import torch

    assert models.compute_dtype() == torch.float32


def test_prepared_default_is_a_plain_model(smollm_dir):
    import json

    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert models.has_weights(smollm_dir)
    assert models.prepare_default_model() == smollm_dir  # cached: second call does nothing


def test_layer_device_map_splits_layers_evenly_with_the_lm_head_on_gpu0():
    dm = models.layer_device_map(32, 2)
    assert [dm[f"model.layers.{i}"] for i in range(32)] == [0] * 16 + [1] * 16
    # TRL divides the loss (on the LM head's card) by a token count it keeps on GPU 0
    assert dm["lm_head"] == dm["model.norm"] == dm["model.embed_tokens"] == 0
    assert set(models.layer_device_map(40, 4).values()) == {0, 1, 2, 3}


@pytest.mark.parametrize("for_training,expected", [(True, "layers"), (False, "auto")])
def test_load_model_on_two_gpus_splits_layers_for_training(tiny_model_dir, monkeypatch, caplog, for_training, expected):
    from transformers import AutoModelForCausalLM

    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.update(kw) or "model")
    folder = tiny_model_dir("mistral")
    got = models.load_model(models.get_preset("mistral-7b"), folder, num_gpus=2, max_memory_gib=12,
                            for_training=for_training)
    assert got == "model" and seen["local_files_only"] is True
    if expected == "layers":
        assert seen["device_map"] == models.layer_device_map(2, 2) and "max_memory" not in seen
        assert "max_memory_gib=12 is not used" in caplog.text
    else:  # inference and merged export keep accelerate's split with its cap (and CPU spill)
        assert seen["device_map"] == "auto" and seen["max_memory"] == {0: "12GiB", 1: "12GiB"}


def test_the_cpu_computes_in_bf16_only_with_bf16_instructions(monkeypatch, caplog):
    """Training's autocast and the HF engine's CPU dtype follow the CPU: bf16 with AVX512-BF16/AMX, else fp32 (bf16
    emulated in software is slower than fp32), and the choice is logged."""
    import torch

    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "native_cpu_bf16", lambda native=native: native)
        monkeypatch.delattr(models.cpu_dtype, "_said", raising=False)
        assert models.cpu_dtype() == dtype
        assert f"computing in {'bf16' if native else 'fp32'}" in caplog.text


def test_default_model_prepared_by_several_processes_at_once(tmp_path, monkeypatch):
    """Runs started together (research/sweep.sh) each convert the GGUF; every one gets the whole folder, none is
    left half-written, no temporary folder stays behind."""
    import threading

    both_writing = threading.Barrier(3)

    def fake_convert(dest):  # both conversions are in flight before either renames its folder into place
        (dest / "config.json").write_text('{"model_type": "llama", "writer": "%s"}' % threading.current_thread().name)
        both_writing.wait(timeout=10)
        (dest / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    target = tmp_path / "models" / "smollm2-135m-instruct"
    results, errors = [], []

    def prepare():
        try:
            results.append(models.prepare_default_model(target))
        except Exception as e:  # noqa: BLE001 - the assertion below names it
            errors.append(e)

    workers = [threading.Thread(target=prepare, name=f"w{i}") for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert errors == [] and results == [target] * 3
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no .partial folder left
