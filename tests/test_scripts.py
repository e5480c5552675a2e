"""The research scripts behind numbers in RESULTS.md (research/), and scripts/seed_runs.sh.

Run: `pytest tests/test_scripts.py`.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "research" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sweep_run(folder, choice: dict, step: int, report: dict, averaged=None):
    """A sweep run as research/sweep.sh leaves it: the select stage's selection.json and report_by_step.json."""
    folder.mkdir(parents=True)
    selection = {"run": folder.name, "step": step, "scores": {str(k): v for k, v in choice.items()}}
    by_step = {"scores": {str(k): v for k, v in report.items()}}
    if averaged:  # (choice score, report score) of an average of checkpoints around ``step``
        selection.update(averaged_steps=[step - 50, step, step + 50], selected_scs=averaged[0])
        by_step["selected"] = {"steps": selection["averaged_steps"], "scs": averaged[1], "rows": 129}
    (folder / "selection.json").write_text(json.dumps(selection))
    (folder / "report_by_step.json").write_text(json.dumps(by_step))


def test_sweep_table_reads_the_exported_step_of_both_splits_and_pairs_by_seed(tmp_path, capsys, monkeypatch):
    table = _script("sweep_table")
    sweep = tmp_path / "sweep"
    _sweep_run(sweep / "x3-s0", {0: 0.02, 50: 0.15, 100: 0.12}, 50, {0: 0.01, 50: 0.17, 100: 0.19})
    _sweep_run(sweep / "x3-s1", {0: 0.02, 50: 0.10, 100: 0.14}, 100, {0: 0.01, 50: 0.12, 100: 0.16})
    _sweep_run(sweep / "x10-s0", {0: 0.02, 100: 0.18}, 100, {0: 0.01, 100: 0.20})
    _sweep_run(sweep / "x10-s1", {0: 0.02, 100: 0.17}, 100, {0: 0.01, 100: 0.15})
    run = table.read_run(sweep / "x3-s0")
    # the report rows are read at the step the choice rows exported (50), not at their own best (100)
    assert run == {"arm": "x3", "seed": 0, "step": 50, "choice": 0.15, "report": 0.17, "choice_last": 0.12,
                   "report_last": 0.19}
    assert table.read_run(sweep / "x10-s1")["report"] == 0.15
    # an averaged export's own scores stand for the exported step's
    _sweep_run(tmp_path / "avg" / "a-s0", {0: 0.02, 50: 0.15, 100: 0.12}, 50, {0: 0.01, 50: 0.17, 100: 0.19},
               averaged=(0.16, 0.18))
    run = table.read_run(tmp_path / "avg" / "a-s0")
    assert (run["choice"], run["report"]) == (0.16, 0.18)
    runs = table.read_runs(sweep)
    # x10 - x3 by seed on the choice rows: 0.18 - 0.15 and 0.17 - 0.14, both +0.03
    assert table.describe_paired(runs, "x10", "x3", "choice").startswith("+0.030 [+0.030, +0.030] (2/2)")
    saved = tmp_path / "runs.csv"
    monkeypatch.setattr("sys.argv", ["sweep_table.py", str(sweep), "--save", str(saved)])
    table.main()
    assert "x10" in capsys.readouterr().out
    assert table.read_runs(saved).sort_values(["arm", "seed"]).reset_index(drop=True).equals(
        runs.sort_values(["arm", "seed"]).reset_index(drop=True))
    monkeypatch.setattr("sys.argv", ["sweep_table.py", str(saved), "--baseline", "x5"])
    with pytest.raises(SystemExit, match="--baseline x5: no such arm; the arms are \\['x10', 'x3'\\]"):
        table.main()


def test_sweep_table_names_what_it_cannot_read(tmp_path):
    table = _script("sweep_table")
    with pytest.raises(SystemExit, match="no sweep runs"):
        table.read_runs(tmp_path)
    with pytest.raises(SystemExit, match="no such folder or file"):
        table.read_runs(tmp_path / "absent")
    (tmp_path / "x3-s0").mkdir()
    with pytest.raises(SystemExit, match="x3-s0: not a sweep run"):
        table.read_runs(tmp_path)
    _sweep_run(tmp_path / "other" / "x3-s0", {0: 0.02, 50: 0.15}, 100, {0: 0.01, 50: 0.17})
    with pytest.raises(SystemExit, match="step 100 is not among the scored steps"):
        table.read_run(tmp_path / "other" / "x3-s0")


class _BagOfWords:
    """A scorer stand-in without a model: normalized word counts over the words of ``texts``, SCS = cos^3."""

    name = "bag of words"

    def __init__(self, texts):
        self.vocab = sorted({w for t in texts for w in self._words(t)})

    @staticmethod
    def _words(text):
        import re
        return re.findall(r"\w+", text.lower())

    def embed(self, texts):
        import numpy as np
        vecs = np.array([[self._words(t).count(w) for w in self.vocab] for t in texts], dtype=float)
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)

    def scs(self, predictions, truths):
        return (self.embed(predictions) * self.embed(truths)).sum(axis=1) ** 3


def test_neighbour_probe_bins_report_rows_by_their_nearest_training_prompt(tmp_path):
    probe = _script("neighbour_probe")
    train = pd.DataFrame({
        "id": ["t1", "t2", "c1", "r1", "r2"],
        "original_text": ["a"] * 5, "rewritten_text": ["b"] * 5,
        "rewrite_prompt": ["Rewrite this as a poem.", "Make it formal.", "Translate this into French.",
                           "Rewrite this as a short poem.", "Translate into French."]})
    train_file = tmp_path / "rows.csv"
    train.to_csv(train_file, index=False)
    run = tmp_path / "run"
    (run / "report" / "predictions").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train_files": [str(train_file)]}))
    train[train["id"] == "c1"].to_csv(run / "validation.csv", index=False)
    train[train["id"].isin(["r1", "r2"])].to_csv(run / "report.csv", index=False)
    preds = [{"id": "r1", "predictions": ["Rewrite this as a short poem."]},
             {"id": "r2", "predictions": ["Make it formal."]}]
    (run / "report" / "predictions" / "smollm.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    scorer = _BagOfWords(list(train["rewrite_prompt"]))
    table, now, reweighted = probe.probe([run], scorer, tmp_path)
    # r1 has a close neighbour in training ("Rewrite this as a poem.": cos 0.91) and was recovered exactly; r2
    # ("Translate into French.") shares no word with any trained prompt and scored 0
    assert table["rows"].tolist() == [1, 0, 0, 0, 1]
    assert table["scs"].iloc[-1] == pytest.approx(1.0) and table["scs"].iloc[0] == pytest.approx(0.0)
    assert now == pytest.approx(0.5)
    # with nothing held out r2's nearest is the choice group's "Translate this into French." (cos 0.87): it moves to
    # the 0.8-0.9 bin, which has no scored row, so it counts at the overall mean (0.5): (1.0 + 0.5) / 2
    assert table["rows, nearest among every other group"].tolist() == [0, 0, 0, 1, 1]
    assert reweighted == pytest.approx(0.75)
    other = tmp_path / "other"
    (other / "report" / "predictions").mkdir(parents=True)
    train[train["id"] == "r1"].to_csv(other / "report.csv", index=False)
    (other / "report" / "predictions" / "smollm.jsonl").write_text(json.dumps(preds[0]) + "\n")
    with pytest.raises(SystemExit, match="report rows differ"):
        probe.probe([run, other], scorer, tmp_path)


def test_concat_probe_joins_the_greedy_predictions_of_several_runs(tmp_path):
    probe = _script("concat_probe")
    truth = pd.DataFrame({"id": ["a", "b"], "rewrite_prompt": ["Make it formal.", "Rewrite this as a poem."]})
    guesses = {"r1": ["Make it formal.", "Translate into French."], "r2": ["Translate into French.",
                                                                        "Rewrite this as a poem."]}
    runs = []
    for name, preds in guesses.items():
        run = tmp_path / name
        (run / "inference" / "predictions").mkdir(parents=True)
        truth.to_csv(run / "validation.csv", index=False)
        (run / "inference" / "predictions" / "m.jsonl").write_text("".join(
            json.dumps({"id": i, "predictions": [p, "unused sample"]}) + "\n" for i, p in zip(["a", "b"], preds)))
        runs.append(run)
    scorer = _BagOfWords(list(truth["rewrite_prompt"]) + ["Translate into French."])
    table = probe.probe(runs, scorer)
    assert table["runs"].tolist() == ["r1+r2"] and table["rows"].tolist() == [2]
    # each run is right on one row and shares no word with the truth on the other: 0.5 alone, 0.5 at best. Joined,
    # row a is "Make it formal. Translate into French." (cos 3 / sqrt(18)) and row b "Translate into French.
    # Rewrite this as a poem." (cos 5 / sqrt(40)): the right prompt diluted by a wrong one on both rows
    joined = ((3 / 18 ** 0.5) ** 3 + (5 / 40 ** 0.5) ** 3) / 2
    assert table["joined"].iloc[0] == pytest.approx(joined)
    assert table["alone (mean)"].iloc[0] == pytest.approx(0.5) and table["alone (best)"].iloc[0] == pytest.approx(0.5)
    assert table["gain"].iloc[0] == pytest.approx(joined - 0.5) and table["gain"].iloc[0] < 0


def test_selection_rules_pick_from_the_curve_as_documented():
    rules = _script("selection_rules")
    groups = np.repeat(np.arange(10), 2)  # 20 rows, 10 prompt groups
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.3, size=20)
    # a lone spike at 100, a plateau at 250-350, a dip after
    level = {0: -0.15, 50: 0.0, 100: 0.06, 150: 0.0, 200: 0.02, 250: 0.04, 300: 0.045, 350: 0.04, 400: 0.0}
    per_step = {s: base + v for s, v in level.items()}
    picks = rules.choose(per_step, groups)
    assert picks["best"] == 100  # the spike
    assert picks["smooth3"] == 300  # the plateau's middle: (0.04 + 0.045 + 0.04) / 3 beats (0 + 0.06 + 0) / 3
    # every step's rows move together here (no noise), so the standard error is 0 and only the best qualifies
    assert picks["latest_1se"] == 100
    # rows that scatter (sd 0.05 a row): the spike's lead over step 250 (0.0095) is inside its standard error
    # (0.0100), so latest_1se moves past the spike; step 300 (0.022 behind) and later are not within theirs
    noise = np.random.default_rng(1)
    noisy = {s: v + noise.normal(0, 0.05, size=20) for s, v in per_step.items()}
    noisy_picks = rules.choose(noisy, groups)
    assert (noisy_picks["best"], noisy_picks["latest_1se"]) == (100, 250)


def test_average_windows_centres_each_window_on_the_smoothed_peak_and_keeps_it_inside_the_run():
    windows = _script("average_windows").windows
    # a lone spike at 100, a plateau at 500-700, the base model (step 0) and an unscored step left out
    means = {0: 0.3, 50: 0.1, 100: 0.4, 150: 0.1, 200: 0.15, 250: 0.18, 300: 0.2, 350: 0.22, 400: 0.24, 450: 0.26,
             500: 0.3, 550: 0.31, 600: 0.32, 650: 0.31, 700: 0.3, 750: 0.2, 800: float("nan")}
    got = windows(means, ks=[5, 9, 21], tails=[3, 40])
    assert got["best"] == [100]  # the spike wins alone; the base model's 0.3 never counts
    assert got["peak5"] == [500, 550, 600, 650, 700]  # centred on the plateau, not on the spike
    # the 9-checkpoint average peaks at 700 (fewer neighbours at the end); the window is shifted inward to fit
    assert got["peak9"] == [350, 400, 450, 500, 550, 600, 650, 700, 750]
    assert got["last3"] == [650, 700, 750]
    assert "peak21" not in got and "last40" not in got  # wider than the 15 scored checkpoints


def test_seed_runs_trains_and_selects_each_seed_and_writes_a_joined_plan(tmp_path):
    """scripts/seed_runs.sh with a stand-in `make` that records its calls: the plan names each seed's selection, and
    the seeds' selected adapters go to `make soup` (its own test: tests/test_checkpoints.py)."""
    import os
    import subprocess

    import yaml

    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "scripts" / "seed_runs.sh").write_text((ROOT / "scripts" / "seed_runs.sh").read_text())
    (root / "configs" / "r.yaml").write_text("# a recipe\npreset: smollm2-135m\nmax_steps: 10\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "make").write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n')
    (bin_dir / "make").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    out = subprocess.run(["bash", "scripts/seed_runs.sh", "gpu", "configs/r.yaml", "2", "-p", "max_steps", "5"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [
        "--no-print-directory train RUN=gpu-s0 CONFIG=configs/r.yaml TRAIN_ARGS=-p seed 0 -p max_steps 5",
        "--no-print-directory select RUN=gpu-s0",
        "--no-print-directory train RUN=gpu-s1 CONFIG=configs/r.yaml TRAIN_ARGS=-p seed 1 -p max_steps 5",
        "--no-print-directory select RUN=gpu-s1",
        "--no-print-directory soup RUN=gpu-soup SOUP_RUNS=runs/gpu-s0 runs/gpu-s1"]
    plan = yaml.safe_load((root / "runs" / "gpu-seeds" / "plan.yaml").read_text())
    assert plan == {"models": [
        {"name": "s0", "preset": "smollm2-135m", "adapter": "runs/gpu-s0/selected"},
        {"name": "s1", "preset": "smollm2-135m", "adapter": "runs/gpu-s1/selected"}]}
    bad = subprocess.run(["bash", "scripts/seed_runs.sh", "gpu", "configs/none.yaml", "2"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no recipe configs/none.yaml" in bad.stderr


def test_show_scores_prints_the_table_and_what_the_time_budget_chose(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "demo"
    run.mkdir()
    pd.DataFrame([{"system": "smollm fine-tuned, 1 prediction (submission)", "scorer": "all-MiniLM-L6-v2 (stand-in)",
                   "split": "report", "rows": 129, "scs": 0.2, "scs_lo": 0.15, "scs_hi": 0.25, "cos": 0.5}]).to_csv(
        run / "scores.csv", index=False)
    show = [sys.executable, str(ROOT / "scripts" / "show_scores.py"), str(run / "scores.csv")]
    out = subprocess.run(show, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "(submission)" in out.stdout and "training:" not in out.stdout
    (run / "budget.json").write_text(json.dumps({"budget_minutes": 8.5, "planned_steps": 150, "max_steps": 41,
                                                 "save_steps": 14, "seconds_per_step": 11.8}))
    out = subprocess.run(show, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "training: 41 of the 150 planned steps in the 8.5-minute budget (11.8 s a step on this machine); fewer" \
        in out.stdout
