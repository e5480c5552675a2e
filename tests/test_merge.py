"""Merging an adapter into a copy of its base at kernel start (vLLM then serves the copy, with no LoRA kernels):
the decision, the merged weights, the reuse of a finished merge, and the fallback when a merge fails."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kaggle_utils import engines, inference
from kaggle_utils.config import ConfigError


def _adapter(base: Path, out: Path, seed: int = 1) -> Path:
    """A rank-1 LoRA on the attention projections of the tiny model in ``base``, with non-zero B (a real update)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    lora = get_peft_model(model, LoraConfig(r=1, lora_alpha=16, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    lora.save_pretrained(str(out))
    return out


@pytest.fixture()
def folders(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama")
    return base, _adapter(base, tmp_path / "adapter")


def test_merge_decision_follows_the_choice_the_card_the_rows_and_the_disk(folders, tmp_path, monkeypatch):
    base, adapter = folders

    def decide(choice, rows=5000, a=str(adapter), preset="smollm2-135m", cap=(9, 0)):
        return engines.merge_decision(choice, preset, str(base), a, rows, tmp_path / "merged", cap)

    assert decide("off") == (False, "merge_adapters is off")
    assert decide("on", rows=1)[0] is True
    assert decide("auto", a="") == (False, "no adapter")
    merge, why = decide("auto", engines.MERGE_MIN_ROWS - 1)
    assert not merge and f"{engines.MERGE_MIN_ROWS - 1} rows to sample" in why
    merge, why = decide("auto", engines.MERGE_MIN_ROWS)
    assert merge and "GiB free" in why
    merge, why = decide("auto", rows=10, cap=(7, 5))  # a T4: merged at any size
    assert merge and "compute capability 7.5" in why and "no LoRA kernels" in why
    merge, why = decide("on", preset="mixtral-8x7b")  # 4-bit presets never merge
    assert not merge and "4-bit" in why
    monkeypatch.setattr(engines, "_free_disk", lambda folder: 10)
    merge, why = decide("on")
    assert not merge and "do not fit" in why and str(tmp_path / "merged") in why
    ready = engines.merge_decision("auto", "smollm2-135m", str(base), str(adapter), 10, tmp_path, (9, 0), ready=True)
    assert ready == (True, f"a copy with this adapter merged is already in {tmp_path}")  # a finished copy: no disk
    assert engines.merge_decision("off", "smollm2-135m", str(base), str(adapter), 10, tmp_path, ready=True)[0] is False
    with pytest.raises(ConfigError, match="^merge_adapters: must be one of"):
        decide("yes")


def test_merge_adapter_writes_the_base_plus_the_update_and_reuses_a_finished_merge(folders, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, adapter = folders
    out = engines.merge_adapter("smollm2-135m", str(base), str(adapter), tmp_path / "merged")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not (tmp_path / "merged.partial").exists()
    marker = json.loads((out / engines.MERGE_MARKER).read_text())
    assert marker["adapter"] == str(adapter) and len(marker["adapter_sha256"]) == 64
    merged = load_file(str(next(out.glob("*.safetensors"))))
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)),
                                         str(adapter)).merge_and_unload().state_dict()
    original = load_file(str(base / "model.safetensors"))
    key = next(k for k in merged if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert merged[key].dtype == torch.float16
    assert not torch.allclose(merged[key].float(), original[key].float(), atol=1e-3)  # the update is in
    assert torch.allclose(merged[key].float(), expected[key].float(), atol=2e-3)  # and it is PEFT's merge
    stamp = next(out.glob("*.safetensors")).stat().st_mtime_ns
    engines.merge_adapter("smollm2-135m", str(base), str(adapter), out)
    assert next(out.glob("*.safetensors")).stat().st_mtime_ns == stamp  # reused, not rewritten
    second = _adapter(base, tmp_path / "second", seed=5)  # another adapter into the same folder: merged again
    engines.merge_adapter("smollm2-135m", str(base), str(second), out)
    assert json.loads((out / engines.MERGE_MARKER).read_text())["adapter"] == str(second)
    assert not torch.equal(load_file(str(next(out.glob("*.safetensors"))))[key], merged[key])


def _plan(base: Path, adapter: Path, tmp_path: Path, **over) -> inference.InferenceConfig:
    spec = {"name": "m", "preset": "smollm2-135m", "base_model_path": str(base), "adapter_path": str(adapter), "n": 1}
    return inference.InferenceConfig(models=[spec], merge_dir=str(tmp_path / "merged"), run_dir=str(tmp_path / "run"),
                                     **over)


def test_the_kernel_merges_for_vllm_once_per_adapter_and_logs_why(folders, tmp_path, caplog):
    base, adapter = folders
    cfg = _plan(base, adapter, tmp_path, merge_adapters="auto")
    spec = cfg.model_specs[0]
    assert inference._merged_for_vllm(cfg, spec, 10) == ""  # a small plan on a newer card: the LoRARequest
    assert "the adapter served as a LoRARequest" in caplog.text and "10 rows to sample" in caplog.text
    caplog.clear()
    folder = inference._merged_for_vllm(cfg, spec, engines.MERGE_MIN_ROWS * 2)
    assert folder and Path(folder).parent == tmp_path / "merged" and (Path(folder) / "config.json").exists()
    assert "served merged into a copy of the base" in caplog.text and "merged into" in caplog.text
    caplog.clear()
    assert inference._merged_for_vllm(cfg, spec, 10) == folder  # the finished copy serves a small plan too
    assert "already in" in caplog.text and "reused" in caplog.text


def test_a_failed_merge_is_logged_cleaned_up_and_the_adapter_is_served_as_is(folders, tmp_path, caplog,
                                                                             monkeypatch):
    """The disk fills while the copy is written: the half-written folder is removed, the memory is freed once the
    error is handled, and the adapter is served as a LoRARequest."""
    from transformers import PreTrainedModel

    base, adapter = folders
    cfg = _plan(base, adapter, tmp_path, merge_adapters="on")

    def disk_full(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    freed = []
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    monkeypatch.setattr(engines, "free_gpu_memory", lambda: freed.append(True))
    with caplog.at_level(logging.ERROR, logger="kaggle_utils"):
        assert inference._merged_for_vllm(cfg, cfg.model_specs[0], 10**6) == ""
    assert "merging failed (OSError: [Errno 28] No space left on device); serving the adapter as a LoRARequest" \
        in caplog.text
    assert list((tmp_path / "merged").glob("*")) == []  # no .partial folder left to eat the next model's disk
    assert len(freed) >= 2  # in the merge's own clean-up, and again once the error is handled


def test_an_older_adapter_with_bin_weights_merges(folders, tmp_path):
    import torch
    from safetensors.torch import load_file

    base, adapter = folders
    bin_adapter = tmp_path / "bin_adapter"
    bin_adapter.mkdir()
    (bin_adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), bin_adapter / "adapter_model.bin")
    out = engines.merge_adapter("smollm2-135m", str(base), str(bin_adapter), tmp_path / "merged")
    assert engines.holds_merge(out, "smollm2-135m", str(base), str(bin_adapter))
    assert not engines.holds_merge(out, "smollm2-135m", str(base), str(adapter))  # other bytes: another merge


def test_a_bad_merge_choice_names_the_parameter(folders, tmp_path):
    base, adapter = folders
    with pytest.raises(ConfigError, match="^merge_adapters: must be one of"):
        _plan(base, adapter, tmp_path, merge_adapters="always")


@pytest.mark.parametrize("gib, cards, fast, four_bit, kind, words", [
    (0.3, [15.0, 15.0], True, False, "hf", "fit one 15 GiB card"),  # SmolLM2 on Kaggle's 2xT4
    (13.5, [15.0, 15.0], True, False, "vllm", "tensor parallel over 2 cards"),  # Mistral-7B on 2xT4
    (24.2, [15.0, 15.0], True, True, "hf", "4 bits"),  # Llama-2-13B on 2xT4: 26 GB of 16-bit weights
    (13.5, [80.0], True, False, "hf", "fast path"),  # Mistral-7B on an A100 80GB
    (41.0, [140.0], True, True, "vllm", "4 bits"),  # Mistral-22B on an H200: vLLM's 16 bits beat HF's 4
    (87.0, [140.0], False, True, "vllm", "on a 140 GiB card"),  # Mixtral on an H200
    (87.0, [15.0, 15.0], False, True, "hf", "do not fit"),  # Mixtral on 2xT4
])
def test_auto_picks_the_engine_by_the_cards_and_the_weights(gib, cards, fast, four_bit, kind, words):
    got, why = engines.auto_choice(gib, cards, fast, four_bit)
    assert got == kind and words in why and f"{gib:.1f} GiB" in why
