"""Notebook contracts: one parameters cell whose names are the stage config's fields, clean commits, thin cells;
and a headless papermill run of train.ipynb on a tiny model. Run: `pytest tests/test_notebooks.py`.
"""
from __future__ import annotations

import ast
import json
import subprocess
import time
from pathlib import Path

import nbformat
import papermill
import pytest

from kaggle_utils import config, training
from conftest import GEMMA_CSV

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STAGE_CONFIGS = {"train.ipynb": training.TrainConfig}


def _stage_config(nb_path: Path):
    return STAGE_CONFIGS.get(nb_path.name)


def test_every_notebook_has_a_stage_config():
    assert NOTEBOOKS
    assert {p.name for p in NOTEBOOKS} <= set(STAGE_CONFIGS), "a notebook without a config dataclass"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_parameters_cell_equal_to_config_fields(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = papermill.inspect_notebook(str(nb_path))
    assert list(params) == config.config_fields(_stage_config(nb_path))
    # flat literals only: nothing in the parameters cell is computed from another parameter
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.Assign)
        ast.literal_eval(node.value)
    # the defaults in the notebook are the config's defaults
    defaults = _stage_config(nb_path)()
    for name, p in params.items():
        assert ast.literal_eval(p["default"]) == getattr(defaults, name) or getattr(defaults, name) in (None, 0) \
            or name in {"max_seq_length", "load_in_4bit"}, name


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_clean_and_thin(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for c in code:
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.walk(ast.parse(c.source)))
    assert len(code) <= 12


@pytest.mark.slow
def test_train_notebook_headless_on_a_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "train.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "train.ipynb"), str(out), kernel_name="python3", cwd=str(ROOT / "notebooks"),
        progress_bar=False,
        parameters=dict(run_name="nb", runs_dir=str(tmp_path / "runs"), preset="mistral-7b",
                        base_model_path=str(tiny_model_dir("mistral")), train_files=[str(GEMMA_CSV)],
                        validation_file=str(GEMMA_CSV), val_rows=4, max_train_rows=8, max_steps=2, batch_size=2,
                        micro_batch_size=2, save_steps=1, max_seq_length=512, load_in_4bit=False),
    )
    run = tmp_path / "runs" / "nb"
    assert (run / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert (run / "loss.png").exists() and (run / "metrics.jsonl").exists()
    executed = nbformat.read(out, as_version=4)
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_make_train_mistral_without_weights_fails_fast():
    start = time.time()
    proc = subprocess.run(["make", "--no-print-directory", "train-mistral", "RUN=test-missing-weights"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    took = time.time() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "/kaggle/input/mistral/pytorch/7b-instruct-v0.2-hf/1" in output and "does not exist" in output
    assert "BASE_MODEL=" in output
    assert took < 30, f"took {took:.1f}s"
