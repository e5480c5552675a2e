"""Merging an adapter into a copy of its base at kernel start (vLLM then serves the copy, with no LoRA kernels):
the decision, the merged weights, the reuse of a finished merge, and the fallback when a merge fails."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from kaggle_utils import adapters, engines, inference, models, serving
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


def _merged_by_hand(base: Path, adapter: Path) -> tuple[dict, set]:
    """The weights a merge must write, computed here from the saved files alone: W + B @ A * (lora_alpha / r) for
    each LoRA pair in the adapter's own weight file (``adapter_model.safetensors``, else an older
    ``adapter_model.bin``), W for every other base weight; and the names of the weights a pair moved."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    file = adapter / "adapter_model.safetensors"
    lora = load_file(str(file)) if file.exists() else torch.load(adapter / "adapter_model.bin", weights_only=True)
    expected = {k: v.float() for k, v in load_file(str(base / "model.safetensors")).items()}
    moved = set()
    for name, a in lora.items():
        if ".lora_A." not in name:
            continue
        target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        b = lora[name.replace(".lora_A.", ".lora_B.")]
        expected[target] = expected[target] + b.float() @ a.float() * scale
        moved.add(target)
    return expected, moved


def _assert_merged_as_by_hand(out: Path, base: Path, adapter: Path) -> None:
    import torch
    from safetensors.torch import load_file

    merged = load_file(str(next(out.glob("*.safetensors"))))
    expected, moved = _merged_by_hand(base, adapter)
    assert len(moved) == 8  # q, k, v and o of both layers
    assert set(merged) == set(expected)
    original = load_file(str(base / "model.safetensors"))
    for name, weight in merged.items():
        assert weight.dtype == torch.float16, name
        # fp16 keeps 11 significant bits: within 1e-3 of the fp32 sum, relative to its size
        assert torch.allclose(weight.float(), expected[name], rtol=1e-3, atol=1e-4), (
            f"{name}: off by {(weight.float() - expected[name]).abs().max():.2e} from the by-hand merge")
        if name in moved:
            assert not torch.allclose(weight.float(), original[name].float(), atol=1e-2), f"{name}: the base's weight"


@pytest.fixture()
def folders(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama")
    return base, _adapter(base, tmp_path / "adapter")


def test_merge_decision_follows_the_choice_the_card_the_rows_and_the_disk(folders, tmp_path, monkeypatch):
    base, adapter = folders

    def decide(choice, rows=5000, a=str(adapter), preset="smollm2-135m", cap=(9, 0)):
        return serving.merge_decision(choice, preset, str(base), a, rows, tmp_path / "merged", cap)

    assert decide("off") == (False, "merge_adapters is off")
    assert decide("on", rows=1)[0] is True
    assert decide("auto", a="") == (False, "no adapter")
    merge, why = decide("auto", serving.MERGE_MIN_ROWS - 1)
    assert not merge and f"{serving.MERGE_MIN_ROWS - 1} rows to sample" in why
    merge, why = decide("auto", serving.MERGE_MIN_ROWS)
    assert merge and "GiB free" in why
    merge, why = decide("auto", rows=10, cap=(7, 5))  # a T4: merged at any size
    assert merge and "compute capability 7.5" in why and "no LoRA kernels" in why
    merge, why = decide("on", preset="mixtral-8x7b")  # 4-bit presets never merge
    assert not merge and "4-bit" in why
    monkeypatch.setattr(serving, "_free_disk", lambda folder: 10)
    merge, why = decide("on")
    assert not merge and "do not fit" in why and str(tmp_path / "merged") in why
    ready = serving.merge_decision("auto", "smollm2-135m", str(base), str(adapter), 10, tmp_path, (9, 0), ready=True)
    assert ready == (True, f"a copy with this adapter merged is already in {tmp_path}")  # a finished copy: no disk
    assert serving.merge_decision("off", "smollm2-135m", str(base), str(adapter), 10, tmp_path, ready=True)[0] is False
    with pytest.raises(ConfigError, match="^merge_adapters: must be one of"):
        decide("yes")


def test_merge_adapter_writes_the_base_plus_the_update_and_reuses_a_finished_merge(folders, tmp_path):
    import torch
    from safetensors.torch import load_file

    base, adapter = folders
    out = adapters.merge_adapter("smollm2-135m", str(base), str(adapter), tmp_path / "merged")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not (tmp_path / "merged.partial").exists()
    marker = json.loads((out / adapters.MERGE_MARKER).read_text())
    assert marker["adapter"] == str(adapter) and len(marker["adapter_sha256"]) == 64
    # every weight is the base's plus B @ A * (alpha / r) where the adapter has a pair, computed from the files
    _assert_merged_as_by_hand(out, base, adapter)
    merged = load_file(str(next(out.glob("*.safetensors"))))
    key = next(k for k in merged if k.endswith("layers.0.self_attn.q_proj.weight"))
    stamp = next(out.glob("*.safetensors")).stat().st_mtime_ns
    adapters.merge_adapter("smollm2-135m", str(base), str(adapter), out)
    assert next(out.glob("*.safetensors")).stat().st_mtime_ns == stamp  # reused, not rewritten
    second = _adapter(base, tmp_path / "second", seed=5)  # another adapter into the same folder: merged again
    adapters.merge_adapter("smollm2-135m", str(base), str(second), out)
    assert json.loads((out / adapters.MERGE_MARKER).read_text())["adapter"] == str(second)
    assert not torch.equal(load_file(str(next(out.glob("*.safetensors"))))[key], merged[key])


def _plan(base: Path, adapter: Path, tmp_path: Path, **over) -> inference.InferenceConfig:
    spec = {"name": "m", "preset": "smollm2-135m", "base_model": str(base), "adapter": str(adapter), "n": 1}
    return inference.InferenceConfig(models=[spec], merge_dir=str(tmp_path / "merged"), run_dir=str(tmp_path / "run"),
                                     **over)


def _merged_copy(cfg: inference.InferenceConfig, adapter: Path, rows: int) -> str:
    """The merged folder serving hands vLLM for the plan's one model ("" = its adapter as a LoRARequest)."""
    return serving.merged_copy_for_vllm(cfg.model_entries[0], str(adapter), rows, cfg.merge_adapters, cfg.merge_dir)


def test_the_kernel_merges_for_vllm_once_per_adapter_and_logs_why(folders, tmp_path, caplog):
    base, adapter = folders
    cfg = _plan(base, adapter, tmp_path, merge_adapters="auto")
    assert _merged_copy(cfg, adapter, 10) == ""  # a small plan on a newer card: the LoRARequest
    assert "the adapter served as a LoRARequest" in caplog.text and "10 rows to sample" in caplog.text
    caplog.clear()
    folder = _merged_copy(cfg, adapter, serving.MERGE_MIN_ROWS * 2)
    assert folder and Path(folder).parent == tmp_path / "merged" and (Path(folder) / "config.json").exists()
    assert "served merged into a copy of the base" in caplog.text and "merged into" in caplog.text
    caplog.clear()
    assert _merged_copy(cfg, adapter, 10) == folder  # the finished copy serves a small plan too
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
    monkeypatch.setattr(models, "free_gpu_memory", lambda: freed.append(True))
    with caplog.at_level(logging.ERROR, logger="kaggle_utils"):
        assert _merged_copy(cfg, adapter, 10**6) == ""
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
    out = adapters.merge_adapter("smollm2-135m", str(base), str(bin_adapter), tmp_path / "merged")
    # the .bin's own tensors are in the merged weights (a merge that loaded nothing from it would leave the base's)
    _assert_merged_as_by_hand(out, base, bin_adapter)
    assert adapters.holds_merge(out, adapters.merge_key("smollm2-135m", str(base), str(bin_adapter)))
    assert not adapters.holds_merge(out, adapters.merge_key("smollm2-135m", str(base), str(adapter)))  # other bytes


def test_a_bad_merge_choice_names_the_parameter(folders, tmp_path):
    base, adapter = folders
    with pytest.raises(ConfigError, match="^merge_adapters: must be one of"):
        _plan(base, adapter, tmp_path, merge_adapters="always")


# ---------------------------------------------------------------- the merged folder handed to the engine, end to end


class _Clock:
    """inference's clock: moves only where a fake says how long its part took."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


@pytest.mark.parametrize("case", ["merged", "vllm_fails", "lora_request"])
def test_the_kernel_merge_reaches_the_engine_and_sampling_csv(folders, tmp_path, monkeypatch, caplog, case):
    """sample_models with vLLM (a stand-in that serves whatever folder it is given with the HF engine): merge_adapters
    on merges the adapter into a copy of the base, load_engine gets that copy with no adapter, and sampling.csv says
    merged, with the merge's and the start's seconds apart. When vLLM fails to start, the HF engine serves the same
    merged copy (merged is False: vLLM did not serve it), and the log says the copy made for vLLM is served by the HF
    engine; with merge_adapters off, vLLM gets the base and the adapter as a LoRARequest."""
    import torch
    from safetensors.torch import load_file

    from kaggle_utils import budget, data
    from conftest import GEMMA_CSV

    base, adapter = folders
    clock, handed, started, served = _Clock(), [], [], {}
    monkeypatch.setattr(serving, "time", clock)
    merge = adapters.merge_adapter

    def timed_merge(*args, **kwargs):
        clock.now += 5.0  # the merge takes 5 s on serving's clock
        return merge(*args, **kwargs)

    load = serving.load_engine

    def timed_load(kind, preset, weights="", adapter="", options=None, load_in_4bit=None, merged=False):
        handed.append({"kind": kind, "weights": weights, "adapter": adapter, "merged": merged})
        clock.now += 3.0  # the engine takes 3 s to start
        engine = load(kind, preset, weights, adapter, options, load_in_4bit, merged=merged)
        served.update({k: w.detach().float().clone() for k, w in engine.model.named_parameters() if "proj" in k})
        return engine

    class ServedByHF(engines.VLLMEngine):
        """vLLM's place in the plan, sampling with the HF engine loaded from the folders vLLM was given."""

        def __init__(self, hf):
            super().__init__(llm=None, tokenizer=hf.tokenizer, adapter_path="")
            self.hf, self.model = hf, hf.model

        def generate_batches(self, *args, **kwargs):
            return self.hf.generate_batches(*args, **kwargs)

        def close(self):
            self.hf.close()

    def vllm_start(cls, preset, base_model_path="", adapter_path="", options=None):
        started.append({"base": str(base_model_path), "adapter": str(adapter_path)})
        if case == "vllm_fails":
            raise RuntimeError("CUDA error: no kernel image is available (simulated)")
        return ServedByHF(engines.HFEngine.from_preset(preset, base_model_path, adapter_path, options=options))

    monkeypatch.setattr(adapters, "merge_adapter", timed_merge)
    monkeypatch.setattr(serving, "load_engine", timed_load)
    monkeypatch.setattr(engines.VLLMEngine, "from_preset", classmethod(vllm_start))
    monkeypatch.setattr(serving, "pick_engine", lambda requested, *model: "vllm")  # as on a GPU where vLLM imports
    test_csv = tmp_path / "test.csv"
    data.read_rewrites(GEMMA_CSV).head(3)[["id", "original_text", "rewritten_text"]].to_csv(test_csv, index=False)
    cfg = _plan(base, adapter, tmp_path, merge_adapters="off" if case == "lora_request" else "on", engine="vllm",
                test_file=str(test_csv), submission_path=str(tmp_path / "submission.csv"), max_new_tokens=4,
                generation_batch_size=3)
    inference.prepare_run(cfg)
    test = inference.read_test(cfg)
    predictions, _ = inference.sample_models(cfg, test, budget.Deadline.from_notebook_start(1.0))
    assert sorted(predictions["m"]) == sorted(test["id"])
    written = pd.read_csv(tmp_path / "run" / inference.SAMPLING_FILE)
    assert len(handed) == 1 and handed[0]["kind"] == "vllm"
    row = written.iloc[0].to_dict()
    # whichever way, the engine that sampled holds base + B @ A * (alpha / r) (bf16 on CPU), never the base alone
    expected, moved = _merged_by_hand(base, adapter)
    for name in moved:
        assert torch.allclose(served[name], expected[name], rtol=1e-2, atol=1e-2), name
        assert not torch.allclose(served[name], load_file(str(base / "model.safetensors"))[name].float(), atol=1e-2)
    assert row["sampled"] == 3
    if case == "lora_request":
        assert handed[0] == {"kind": "vllm", "weights": str(base), "adapter": str(adapter), "merged": False}
        assert started == [{"base": str(base), "adapter": str(adapter)}]
        assert not (tmp_path / "merged").exists()
        assert (row["engine"], bool(row["merged"]), row["merge_s"], row["load_s"]) == ("vllm", False, 0.0, 3.0)
        return
    folder = Path(handed[0]["weights"])
    assert (handed[0]["adapter"], handed[0]["merged"]) == ("", True) and folder.parent == tmp_path / "merged"
    assert json.loads((folder / adapters.MERGE_MARKER).read_text())["adapter"] == str(adapter)
    assert started == [{"base": str(folder), "adapter": ""}]  # the merged copy, with no adapter on top
    if case == "merged":
        assert (row["engine"], bool(row["merged"]), row["merge_s"], row["load_s"]) == ("vllm", True, 5.0, 3.0)
    else:  # the HF engine serves the same copy, with no adapter on top either, and the log says so
        assert (row["engine"], bool(row["merged"]), row["merge_s"], row["load_s"]) == ("hf", False, 5.0, 3.0)
        assert "falling back to the HF engine for this model, on the merged copy" in caplog.text
