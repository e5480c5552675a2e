"""research/average_windows.py beyond the choice of windows (tests/test_scripts.py): each window's adapters averaged
and scored on both row sets, the pick, the seeds' soup, the pairing over runs, and runs without report rows.

The fast tests stand a fake sampler in for the model (it reads how far each adapter moves the weights and gets that
many rows right) and score exact matches; the slow one trains a tiny model with ``report_rows 0``, as a submission
run is, selects its checkpoints and runs the script on it. Run: `pytest tests/test_research.py`.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_utils import checkpoints, engines

ROOT = Path(__file__).resolve().parents[1]
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


@pytest.fixture(scope="module")
def aw():
    spec = importlib.util.spec_from_file_location("average_windows", ROOT / "research" / "average_windows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(groups) -> pd.DataFrame:
    return pd.DataFrame([{"id": f"r{g}{k}", "original_text": f"The cat sat on mat {g}{k}.",
                          "rewritten_text": f"Upon mat {g}{k}, a feline rested in style {g}.",
                          "rewrite_prompt": f"Rewrite this in style {g}."} for g in groups for k in range(2)])


def make_run(root: Path, name: str, quality: dict[int, float], curve: dict[int, float], report: bool = True) -> Path:
    """A run folder as train + select leave it: checkpoint-N adapters whose update moves every weight by
    ``quality[N]`` (A filled with it, B with ones, alpha / r = 1), the select stage's cached choice-row scores by step
    (``curve``), 6 choice rows in 3 prompt groups and, with ``report``, 6 report rows in 3 others."""
    import torch
    from safetensors.torch import save_file

    run = root / name
    for step, q in quality.items():
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({KEY.format("A"): torch.full((1, 8), float(q)), KEY.format("B"): torch.ones(4, 1)},
                  str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 1, "peft_type": "LORA"}))
    (run / "selection").mkdir()
    for step, mean in curve.items():
        (run / "selection" / f"step-{step}.json").write_text(json.dumps({"step": step, "scs": [mean] * 6}))
    (run / "config.json").write_text(json.dumps({"run_name": name, "preset": "smollm2-135m", "base_model_path": "",
                                                 "train_files": [], "max_seq_length": 384}))
    _rows([0, 1, 2]).to_csv(run / "validation.csv", index=False)
    if report:
        _rows([3, 4, 5]).to_csv(run / "report.csv", index=False)
    return run


class FakeSampler(engines.Engine):
    """The select stage's served base model, standing in (checkpoints._step_engine), and its completions
    (checkpoints._step_completions): as many rows right (the first ones) as the adapter moves each weight, rounded
    down: the update B @ A * alpha / r of the adapter it is given, one checkpoint's or an average's."""

    calls: list = []

    def __init__(self, cfg, run_cfg):
        pass

    @staticmethod
    def completions(engine, label, adapter, validation, scfg):
        from safetensors.torch import load_file

        config = json.loads((adapter / "adapter_config.json").read_text())
        t = load_file(str(adapter / "adapter_model.safetensors"))
        moved = float((t[KEY.format("B")] @ t[KEY.format("A")]).mean()) * config["lora_alpha"] / config["r"]
        FakeSampler.calls.append((label, adapter, len(validation)))
        right = math.floor(moved + 1e-6)
        return [p if i < right else "Something else." for i, p in enumerate(validation["rewrite_prompt"])]


class ExactScorer:
    name, path = "exact match", "exact"

    def scs(self, predictions, truths):
        return np.array([float(p == t) for p, t in zip(predictions, truths)])

    cosine = scs


@pytest.fixture()
def fake_sampler(monkeypatch):
    FakeSampler.calls = []
    monkeypatch.setattr(checkpoints, "_step_engine", FakeSampler)
    monkeypatch.setattr(checkpoints, "_step_completions", FakeSampler.completions)
    return FakeSampler


# the select stage's curve: a lone spike at step 2, a plateau at 4-6 (the 3-checkpoint average peaks at 6, so the
# window is shifted inward to 4-6)
CURVE = {0: 0.1, 1: 0.2, 2: 0.9, 3: 0.3, 4: 0.6, 5: 0.65, 6: 0.6}
# how many of the 6 rows each checkpoint's adapter gets right: the spike does not hold up, the plateau does
QUALITY = {1: 0, 2: 1, 3: 0, 4: 3, 5: 4, 6: 5}


def test_each_window_is_averaged_scored_on_both_row_sets_and_the_pick_is_by_the_choice_rows(tmp_path, aw,
                                                                                              fake_sampler):
    run = make_run(tmp_path, "arm-s0", QUALITY, CURVE)
    found = aw.one_run(run, ks=[3], tails=[2], scorer=ExactScorer())
    assert {r: v["steps"] for r, v in found.items()} == {"best": [2], "peak3": [4, 5, 6], "last2": [5, 6],
                                                         "pick": [5, 6]}
    # best: step 2 alone, 1 row of 6; peak3: updates 3, 4, 5 averaged to 4, so 4 rows; last2: 4 and 5 to 4.5, 4 rows
    assert {r: (v["choice"], v["report"]) for r, v in found.items()} == {
        "best": (0.1667, 0.1667), "peak3": (0.6667, 0.6667), "last2": (0.6667, 0.6667), "pick": (0.6667, 0.6667)}
    assert found["pick"]["picked"] == "last2"  # a tie on the choice rows: the fewer checkpoints
    assert all((v["choice_rows"], v["report_rows"]) == (6, 6) for v in found.values())
    assert found["peak3"]["report_lo"] <= found["peak3"]["report"] <= found["peak3"]["report_hi"]
    # one adapter per window: a checkpoint as it is, several averaged into one of their summed rank
    adapters = {label: (adapter, rows) for label, adapter, rows in fake_sampler.calls}
    assert adapters["win-best"] == (run / "checkpoint-2", 6)
    assert adapters["win-peak3"] == (run / "windows" / "peak3", 6)
    assert json.loads((run / "windows" / "peak3" / "adapter_config.json").read_text())["r"] == 3
    assert [label for label, _, _ in fake_sampler.calls] == ["win-best"] * 2 + ["win-peak3"] * 2 + ["win-last2"] * 2
    assert json.loads((run / "average_windows.json").read_text()) == found
    # a rerun reads every window's predictions from the select stage's cache
    fake_sampler.calls = []
    assert aw.one_run(run, ks=[3], tails=[2], scorer=ExactScorer()) == found and fake_sampler.calls == []
    assert (run / "selection" / "step-win-peak3.json").exists()
    assert (run / "selection" / "report" / "step-win-peak3.json").exists()


def test_a_run_without_report_rows_is_scored_on_its_choice_rows_only(tmp_path, aw, fake_sampler):
    run = make_run(tmp_path, "sub-s0", QUALITY, CURVE, report=False)
    found = aw.one_run(run, ks=[3], tails=[], scorer=ExactScorer())
    assert found["peak3"] == {"steps": [4, 5, 6], "choice": 0.6667, "choice_rows": 6, "report": None,
                              "report_lo": None, "report_hi": None, "report_rows": 0}
    assert found["pick"]["picked"] == "peak3"
    assert all(rows == 6 for _, _, rows in fake_sampler.calls) and len(fake_sampler.calls) == 2  # best, peak3
    assert not (run / "selection" / "report").exists()
    assert aw.row_sets(found) == "choice rows (6) only: no report.csv (a run trained with report_rows 0)"


def test_the_soup_averages_every_seeds_window_into_one_adapter_scored_on_the_first_runs_rows(tmp_path, aw,
                                                                                               fake_sampler):
    runs = [make_run(tmp_path, "arm-s0", QUALITY, CURVE),
            make_run(tmp_path, "arm-s1", {1: 3, 2: 0, 3: 1, 4: 6, 5: 2, 6: 0}, {0: 0.1, 1: 0.5, 2: 0.1, 3: 0.2,
                                                                              4: 0.7, 5: 0.3, 6: 0.2})]
    found = {r.name: aw.one_run(r, ks=[3], tails=[], scorer=ExactScorer()) for r in runs}
    assert found["arm-s1"]["best"]["steps"] == [4]
    fake_sampler.calls = []
    soup = aw.soup(runs, found, "best", ExactScorer())
    # seed 0's step 2 (update 1) and seed 1's step 4 (update 6): 3.5 on average, 3 rows of the first run's 6
    assert soup["steps"] == ["arm-s0:2", "arm-s1:4"]
    assert (soup["choice"], soup["report"], soup["choice_rows"], soup["report_rows"]) == (0.5, 0.5, 6, 6)
    assert {adapter for _, adapter, _ in fake_sampler.calls} == {runs[0] / "windows" / "soup-best"}
    assert json.loads((runs[0] / "windows" / "soup-best" / "adapter_config.json").read_text())["r"] == 2


def test_paired_differences_over_runs(aw):
    table = pd.DataFrame({"best": [0.1, 0.2, 0.3], "peak5": [0.2, 0.4, 0.6]})
    # differences 0.1, 0.2, 0.3: mean 0.2, standard deviation 0.1, t(0.95, 2 df) = 2.920 from the t table, so the
    # half-width is 2.920 x 0.1 / sqrt(3) = 0.1686
    assert aw.paired(table, "peak5", "best") == "+0.200 [+0.031, +0.369] (3/3)"
    assert aw.paired(table, "best", "peak5") == "-0.200 [-0.369, -0.031] (0/3)"
    assert aw.paired(table.head(1), "peak5", "best") == "-"  # one run: no interval


def test_the_script_groups_runs_by_arm_pairs_them_and_says_which_rows_it_scored(tmp_path, aw, fake_sampler,
                                                                                  monkeypatch, capsys):
    """Two seeds of one arm with report rows and a submission run without: the table, which row sets each run was
    scored on, each arm's means over its seeds on the report rows (the submission arm: on its choice rows, said so),
    and the soup of the two seeds."""
    s0 = make_run(tmp_path, "arm-s0", QUALITY, CURVE)
    s1 = make_run(tmp_path, "arm-s1", {1: 3, 2: 0, 3: 1, 4: 6, 5: 2, 6: 0},
                  {0: 0.1, 1: 0.5, 2: 0.1, 3: 0.2, 4: 0.7, 5: 0.3, 6: 0.2})
    sub = make_run(tmp_path, "sub-s0", QUALITY, CURVE, report=False)
    monkeypatch.setattr(aw.metric, "Scorer", lambda path="": ExactScorer())
    monkeypatch.setattr(aw, "setup_logging", lambda: None)
    png = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["average_windows.py", str(s0), str(s1), str(sub), "--k", "3", "--soup",
                                      "--png", str(png)])
    aw.main()
    out = capsys.readouterr().out
    assert f"plot -> {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "scorer: exact match" in out
    assert "arm-s0: scored on choice rows (6) and report rows (6)" in out
    assert "sub-s0: scored on choice rows (6) only: no report.csv (a run trained with report_rows 0)" in out
    # seed 0: best 1 row, peak3 4 rows; seed 1: best (step 4) 6 rows, peak3 (steps 3-5: 1, 6, 2 -> 3) 3 rows
    arm = out.split("\narm: ")[1].split("\nsub: ")[0]
    assert arm.startswith("report rows, mean over 2 run(s), paired with best and with peak5")
    assert "  best     0.583" in arm and "  peak3    0.583" in arm
    assert "  soup-best (one adapter of 2 checkpoints): choice 0.500, report 0.500 [" in arm
    assert "  soup-peak3 (one adapter of 6 checkpoints): choice 0.500, report 0.500 [" in arm  # (3+4+5+1+6+2)/6
    sub_part = out.split("\nsub: ")[1]
    assert sub_part.startswith("choice rows (some run has no report rows; the windows were chosen on these rows")
    assert "  peak3    0.667" in sub_part
    soups = json.loads((s0 / "average_windows_soups.json").read_text())
    assert [(x["arm"], x["rule"]) for x in soups] == [("arm", "soup-best"), ("arm", "soup-peak3")]


# ---------------------------------------------------------------- a submission run, trained and selected


@pytest.mark.slow
def test_submission_runs_without_report_rows_average_and_soup(tmp_path, tiny_model_dir, monkeypatch, capsys, aw):
    """Two seeds trained with report_rows 0 (no report.csv), selected, then the script with --soup, as
    `research/average_windows.py runs/X-s0 runs/X-s1 --soup` is run on submission runs: it scores the choice rows
    only, says so, and writes the windows and the soup."""
    from test_checkpoints import train_tiny_run

    from kaggle_utils import training

    base = tiny_model_dir("llama")
    runs = [train_tiny_run(tmp_path / "runs", base, name=f"sub-s{seed}", seed=seed) for seed in (0, 1)]
    for run in runs:
        assert not (run / training.REPORT_FILE).exists() and (run / training.VALIDATION_FILE).exists()
        cfg = checkpoints.SelectConfig(run_name=run.name, runs_dir=str(run.parent), max_new_tokens=6,
                                       generation_batch_size=4)
        run_cfg = checkpoints.prepare_selection(cfg)
        checkpoints.score_steps(cfg, checkpoints.load_validation(cfg, run_cfg), ExactScorer(), run_cfg)
    monkeypatch.setattr(aw.metric, "Scorer", lambda path="": ExactScorer())
    monkeypatch.setattr(aw, "setup_logging", lambda: None)
    # the best step and the last two averaged, on one prompt group's rows (2), to keep the generation short
    monkeypatch.setattr(sys, "argv", ["average_windows.py", *map(str, runs), "--k", "--tail", "2", "--val_rows", "2",
                                      "--soup"])
    aw.main()
    out = capsys.readouterr().out
    assert "sub-s0: scored on choice rows (2) only: no report.csv" in out
    assert "sub-s1: scored on choice rows (2) only: no report.csv" in out
    assert "sub: choice rows (some run has no report rows" in out
    for run in runs:
        found = json.loads((run / "average_windows.json").read_text())
        assert set(found) == {"best", "last2", "pick"}
        assert found["last2"]["steps"] == [1, 2] and found["last2"]["report"] is None
        assert found["last2"]["choice_rows"] == 2 and 0 <= found["last2"]["choice"] <= 1
        assert json.loads((run / "windows" / "last2" / "adapter_config.json").read_text())["r"] == 2
        assert not (run / "selection" / "report").exists()
    soups = json.loads((runs[0] / "average_windows_soups.json").read_text())
    assert [x["rule"] for x in soups] == ["soup-best"] and soups[0]["report"] is None
    bests = [json.loads((r / "average_windows.json").read_text())["best"]["steps"][0] for r in runs]
    assert soups[0]["steps"] == [f"{r.name}:{b}" for r, b in zip(runs, bests)]
    assert json.loads((runs[0] / "windows" / "soup-best" / "adapter_config.json").read_text())["r"] == 2
