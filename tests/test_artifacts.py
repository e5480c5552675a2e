"""What a training run leaves for the later stages: selection.json (read, written, files from before a key existed,
bad files), the checkpoint folders, and the prompt-token limit's chain. Run: `pytest tests/test_artifacts.py`.
"""
from __future__ import annotations

import json
import re

import pytest

from kaggle_utils import artifacts, prompts

# selection.json as checkpoint selection wrote it before the Selection dataclass, key for key
OLD_SELECTION = {
    "run": "demo", "preset": "smollm2-135m", "base_model_path": "", "step": 48, "adapter": "adapter_model.safetensors",
    "base_model_won": False, "forced": False, "rule": "highest mean SCS; the earlier step on ties",
    "best_checkpoint_step": 48, "scores": {"0": 0.11, "48": 0.19},
    "per_step": [{"step": 0, "scs": 0.11, "cos": 0.45, "rows": 65, "fallbacks": 0, "seconds": 30.2,
                  "scorer": "all-MiniLM-L6-v2 (stand-in)", "precision": "bfloat16", "eval_loss": 3.1},
                 {"step": 48, "scs": 0.19, "cos": 0.55, "rows": 65, "fallbacks": 0, "seconds": 31.0,
                  "scorer": "all-MiniLM-L6-v2 (stand-in)", "precision": "bfloat16", "eval_loss": 2.4}],
    "scorer": "all-MiniLM-L6-v2 (stand-in)", "scorer_precision": "bfloat16",
    "validation_file": "/work/runs/demo/validation.csv", "val_rows": 0, "rows_scored": 65, "prompt_groups": 33,
    "max_new_tokens": 24, "max_prompt_tokens": 384, "merged": None, "checkpoint": "/work/runs/demo/checkpoint-48",
    "created": "2026-11-30T10:00:00", "config": {"run_name": "demo", "every_k": 1}}


def test_an_old_selection_file_reads_and_writes_back_key_for_key(tmp_path):
    (tmp_path / "selection.json").write_text(json.dumps(OLD_SELECTION, indent=1) + "\n")
    sel = artifacts.Selection.read(tmp_path)
    assert (sel.step, sel.preset, sel.adapter, sel.max_prompt_tokens) == (48, "smollm2-135m",
                                                                          "adapter_model.safetensors", 384)
    assert sel.extra == {} and artifacts.Selection.read(tmp_path / "selection.json") == sel
    out = tmp_path / "again"
    out.mkdir()
    written = sel.write(out)
    assert written.read_text() == (tmp_path / "selection.json").read_text()  # the same bytes, the same key order


def test_a_selection_file_with_only_some_keys_reads_with_defaults(tmp_path):
    """An adapter folder from elsewhere may carry a short selection.json: it reads, and says what it says."""
    (tmp_path / "selection.json").write_text(json.dumps({"step": 200, "note": "made by hand"}))
    sel = artifacts.Selection.read(tmp_path)
    assert (sel.step, sel.preset, sel.max_prompt_tokens, sel.base_model_won) == (200, None, 0, False)
    assert sel.extra == {"note": "made by hand"}
    assert artifacts.Selection.record(tmp_path) == {"step": 200, "note": "made by hand"}  # as written
    assert json.loads(sel.write(tmp_path).read_text())["note"] == "made by hand"


def test_a_folder_without_a_selection(tmp_path):
    assert artifacts.Selection.find(tmp_path) is None and artifacts.Selection.record(tmp_path / "nope") is None
    with pytest.raises(artifacts.ArtifactError, match=rf"^{re.escape(str(tmp_path))}: no selection\.json"):
        artifacts.Selection.read(tmp_path)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"selection\.json: not readable as JSON"),
    ("[1, 2]", r"selection\.json: expected a JSON object, got list"),
    (json.dumps({"max_prompt_tokens": "384"}), r"selection\.json: field 'max_prompt_tokens' must be int, got '384'"),
    (json.dumps({"step": True}), r"selection\.json: field 'step' must be int, got True"),
    (json.dumps({"preset": 7}), r"selection\.json: field 'preset' must be str or NoneType, got 7"),
    (json.dumps({"base_model_won": "yes"}), r"selection\.json: field 'base_model_won' must be bool, got 'yes'"),
])
def test_a_bad_selection_file_names_the_file_and_the_field(tmp_path, content, message):
    (tmp_path / "selection.json").write_text(content)
    with pytest.raises(artifacts.ArtifactError, match=rf"^{re.escape(str(tmp_path))}/{message}"):
        artifacts.Selection.find(tmp_path)


def test_checkpoints_in_step_order_only_complete_ones(tmp_path, caplog):
    for step in (100, 25, 50, 125):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if step != 125:  # 125 was interrupted while saving: no adapter yet
            for name in artifacts.ADAPTER_FILES:
                (folder / name).write_text("x")
    (tmp_path / "checkpoint-best").mkdir()  # not a step
    (tmp_path / "checkpoint-7").write_text("a file, not a folder")
    found = artifacts.find_checkpoints(tmp_path)
    assert list(found) == [25, 50, 100] and found[50] == tmp_path / "checkpoint-50"
    assert "ignoring checkpoint folder(s) without adapter_config.json + adapter_model.safetensors: checkpoint-125" \
        in caplog.text
    assert artifacts.find_checkpoints(tmp_path / "missing") == {}


def test_an_adapter_folder_needs_its_config_and_weights(tmp_path):
    assert not artifacts.has_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert not artifacts.has_adapter(tmp_path)
    (tmp_path / "adapter_model.bin").write_text("x")  # an older PEFT's weights count too
    assert artifacts.has_adapter(tmp_path)


@pytest.mark.parametrize("setting, recorded, expected", [
    (256, (192, 384), 256),  # the stage's own setting wins
    (0, (192, 384), 192),  # 0: the nearest stage before that recorded one
    (0, (0, 384), 384),
    (0, (None, 0), prompts.DEFAULT_PROMPT_TOKENS),  # nothing recorded anywhere
    (0, (), prompts.DEFAULT_PROMPT_TOKENS),
])
def test_the_prompt_token_limit_is_the_first_one_set(setting, recorded, expected):
    assert artifacts.prompt_token_limit(setting, *recorded) == expected


def test_a_runs_limit_is_its_cut_else_its_sequence_length():
    assert artifacts.run_prompt_token_limit({"max_prompt_tokens": 192, "max_seq_length": 512}) == 192
    assert artifacts.run_prompt_token_limit({"max_prompt_tokens": 0, "max_seq_length": 512}) == 512
    assert artifacts.run_prompt_token_limit({"max_seq_length": 512}, setting=300) == 300
    assert artifacts.run_prompt_token_limit({}) == prompts.DEFAULT_PROMPT_TOKENS
