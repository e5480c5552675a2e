"""Notebook contracts: one parameters cell whose names are the stage config's fields, clean commits, thin cells;
and a headless papermill run of train.ipynb on a tiny model. Run: `pytest tests/test_notebooks.py`.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import time
from pathlib import Path

import nbformat
import papermill
import pytest

from kaggle_utils import blend_choice, blending, checkpoints, config, inference, mean_prompt, training
from conftest import GEMMA_CSV

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STAGE_CONFIGS = {"train.ipynb": training.TrainConfig, "select_checkpoint.ipynb": checkpoints.SelectConfig,
                 "inference.ipynb": inference.InferenceConfig, "mean_prompt.ipynb": mean_prompt.MeanPromptConfig}


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
    # the defaults in the notebook are the config's declared defaults, of the same type (0 is not False, nor None)
    declared = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(_stage_config(nb_path))}
    for name, p in params.items():
        value = ast.literal_eval(p["default"])
        assert (value, type(value)) == (declared[name], type(declared[name])), name


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
@pytest.mark.parametrize("processes", [1, 2])
def test_train_notebook_headless_on_a_tiny_model(tmp_path, tiny_model_dir, processes):
    """One process, and two forked from the notebook's own kernel (what `make train GPUS=2` runs; gloo here): both
    write the checkpoints and the plot once, and the executed notebook holds every process's log."""
    out = tmp_path / "train.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "train.ipynb"), str(out), kernel_name="python3", cwd=str(ROOT / "notebooks"),
        progress_bar=False,
        parameters=dict(run_name="nb", runs_dir=str(tmp_path / "runs"), preset="mistral-7b",
                        base_model_path=str(tiny_model_dir("mistral")), train_files=[str(GEMMA_CSV)],
                        validation_file=str(GEMMA_CSV), val_rows=4, max_train_rows=8, max_steps=2,
                        batch_size=2 * processes, micro_batch_size=2, save_steps=1, max_seq_length=512,
                        load_in_4bit=False, num_processes=processes),
    )
    run = tmp_path / "runs" / "nb"
    assert (run / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert (run / "loss.png").exists() and (run / "metrics.jsonl").exists()
    executed = nbformat.read(out, as_version=4)
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert text.count(f"effective batch {2 * processes} = {2 * processes} rows x 1 accumulation") == processes


@pytest.mark.slow
def test_select_checkpoint_notebook_headless_on_a_tiny_model(tmp_path, tiny_model_dir):
    from test_checkpoints import train_tiny_run  # two LoRA steps on a tiny Llama, a checkpoint after each

    run = train_tiny_run(tmp_path / "runs", tiny_model_dir("llama"))
    out = run / "select_checkpoint.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "select_checkpoint.ipynb"), str(out), kernel_name="python3",
        cwd=str(ROOT / "notebooks"), progress_bar=False,
        parameters=dict(run_name=run.name, runs_dir=str(run.parent), rows_per_step=4, max_new_tokens=6,
                        generation_batch_size=4, force_step=2, export_merged=True),
    )
    selected = run / "selected"
    sel = json.loads((selected / "selection.json").read_text())
    assert sel["step"] == 2 and sel["forced"] and sorted(sel["scores"]) == ["0", "1", "2"]
    assert sel["scorer"] == "all-MiniLM-L6-v2 (stand-in)" and sel["rows_scored"] >= 4
    assert (selected / "adapter_model.safetensors").read_bytes() == (run / "checkpoint-2" /
                                                                    "adapter_model.safetensors").read_bytes()
    assert (selected / "adapter_config.json").exists() and (selected / "merged" / "config.json").exists()
    assert (selected / "loss.png").exists() and (selected / "scores.png").exists()
    assert sorted(p.name for p in (run / "selection").glob("step-*.json")) == ["step-0.json", "step-1.json",
                                                                               "step-2.json"]
    executed = nbformat.read(out, as_version=4)
    pngs = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 2  # the loss curves and the metric per step
    assert any("text/html" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))  # the table


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


@pytest.mark.slow
def test_mean_prompt_notebook_headless_on_a_small_run(tmp_path):
    import pandas as pd

    from kaggle_utils import data

    run = tmp_path / "runs" / "mp"
    (run / "predictions").mkdir(parents=True)
    gemma = data.read_rewrites(GEMMA_CSV)
    _, validation = data.split_by_prompt(gemma, 8, seed=0, max_per_group=2)
    validation.drop(columns=["_file", "_row"]).to_csv(run / "validation.csv", index=False)
    with open(run / "predictions" / "echo.jsonl", "w") as f:  # a "model" that half-recovers each prompt
        for i, p in zip(validation["id"], validation["rewrite_prompt"]):
            f.write(json.dumps({"id": i, "predictions": [" ".join(p.split()[:3]), p.split()[0]]}) + "\n")
    out = run / "mean_prompt.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "mean_prompt.ipynb"), str(out), kernel_name="python3", cwd=str(ROOT / "notebooks"),
        progress_bar=False,
        parameters=dict(run_name="mp", runs_dir=str(tmp_path / "runs"), train_files=[str(GEMMA_CSV)],
                        target_files=[], vocab_size=40, max_length=3, max_targets=200, n_choices=[0, 1, 2]),
    )
    searched = json.loads((run / mean_prompt.RESULT_FILE).read_text())
    blend = json.loads((run / blending.BLEND_FILE).read_text())
    assert searched["string"] and searched["history"] and searched["scorer"] == blend["scorer"]
    table = pd.read_csv(run / blend_choice.OPTIONS_FILE, keep_default_na=False)
    assert len(table) == blend["chosen_from"]
    # the rule: the best mean SCS, or an option with fewer predictions of the same models, order and mean prompt
    best = table.iloc[0]  # the table is written best first
    assert best["option"] == blend["best_by_mean"] and best["scs"] == table["scs"].max()
    chosen = table.loc[table["option"] == blend["label"]].iloc[0]
    assert chosen["scs"] == pytest.approx(blend["scs"]) and chosen["predictions"] <= best["predictions"]
    assert (chosen["models"], chosen["mean_prompt"]) == (best["models"], best["mean_prompt"])
    assert (run / blend_choice.OPTIONS_PLOT).exists()
    curve = pd.read_csv(run / "n_curve.csv")  # the echo model's 2 predictions, without and with the mean prompt
    assert sorted(map(tuple, curve[["n", "mean_prompt"]].values.tolist())) == [(1, False), (1, True), (2, False),
                                                                               (2, True)]
    assert (curve["split"] == "choice").all() and (run / "n_curve.png").exists()
    scores = pd.read_csv(run / "scores.csv")
    assert any(s.startswith("mean prompt alone (optimized)") for s in scores["system"])
    executed = nbformat.read(out, as_version=4)
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_inference_notebook_headless_on_a_tiny_model(tmp_path, tiny_model_dir):
    import pandas as pd

    from kaggle_utils import data

    rows = data.read_rewrites(GEMMA_CSV).head(6)
    test_csv = tmp_path / "validation.csv"
    rows[["id", "original_text", "rewritten_text", "rewrite_prompt", "source"]].to_csv(test_csv, index=False)
    model = {"name": "tiny", "preset": "mistral-7b", "base_model": str(tiny_model_dir("mistral")),
             "adapter": "", "use_merged": False, "n": 2, "temperature": 0.8, "top_p": 0.95, "forced_start": ""}
    out = tmp_path / "run" / "inference.ipynb"
    out.parent.mkdir()
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "inference.ipynb"), str(out), kernel_name="python3", cwd=str(ROOT / "notebooks"),
        progress_bar=False,
        parameters=dict(test_file=str(test_csv), submission_path=str(tmp_path / "submission.csv"),
                        run_dir=str(tmp_path / "run"), models=[model], engine="auto", max_new_tokens=6,
                        generation_batch_size=4, score_base_model=True),
    )
    sub = pd.read_csv(tmp_path / "submission.csv", keep_default_na=False)
    assert list(sub.columns) == ["id", "rewrite_prompt"] and sorted(sub["id"]) == sorted(rows["id"])
    scores = pd.read_csv(tmp_path / "run" / "scores.csv")
    assert list(scores.columns) == ["system", "scorer", "split", "rows", "scs", "scs_lo", "scs_hi", "cos"]
    assert len(scores) == 5
    assert (tmp_path / "run" / "predictions" / "tiny.jsonl").exists()
    executed = nbformat.read(out, as_version=4)
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
