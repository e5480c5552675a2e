"""The helper scripts behind numbers in RESULTS.md.

Run: `pytest tests/test_scripts.py`.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_consensus_probe_picks_the_prediction_the_others_agree_with(tmp_path):
    from kaggle_utils import metric

    run = tmp_path / "run"
    (run / "inference" / "predictions").mkdir(parents=True)
    pd.DataFrame({"id": ["a", "b"], "rewrite_prompt": ["Rewrite this text as a poem.",
                                                       "Rewrite this as a pirate would say it."]}).to_csv(
        run / "validation.csv", index=False)
    rows = [{"id": "a", "predictions": ["Translate this into French.", "Rewrite this as a poem.",
                                        "Turn the text into a poem.", "Make this a short poem."]},
            {"id": "b", "predictions": ["Rewrite it as a pirate.", "Rewrite this like a pirate.",
                                        "Make it sound like a pirate.", "Summarize the text."]}]
    (run / "inference" / "predictions" / "smollm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = _script("consensus_probe").probe(run, metric.Scorer("", device="cpu"))
    assert found["rows"] == 2 and found["model"] == "smollm"
    # row a: the greedy guess is the odd one out, so the consensus pick (a poem) scores higher there
    assert found["consensus"] > found["greedy"] and found["gain"] == pytest.approx(
        found["consensus"] - found["greedy"])
    assert found["oracle"] >= found["consensus"]


def test_consensus_probe_names_a_run_without_predictions(tmp_path):
    with pytest.raises(SystemExit, match="no inference/predictions"):
        _script("consensus_probe").probe(tmp_path, scorer=None)


def _mix_summary(steps_choice: dict, selected: int, steps_report: dict) -> str:
    lines = ["args: -p seed 0"]
    lines += [f"step {s}: mean SCS {v:.4f} (cos 0.4000) on 65 rows" for s, v in steps_choice.items()]
    lines.append(f"selected step {selected}")
    lines += [f"step {s}: mean SCS {v:.4f} (cos 0.4000) on 129 rows" for s, v in steps_report.items()]
    return "\n".join(lines) + "\n"


def test_mix_table_reads_the_selected_step_of_both_splits_and_pairs_by_seed(tmp_path, capsys, monkeypatch):
    table = _script("mix_table")
    (tmp_path / "x3-s0.txt").write_text(_mix_summary({0: 0.02, 50: 0.15, 100: 0.12}, 50,
                                                     {0: 0.01, 50: 0.17, 100: 0.19}))
    (tmp_path / "x3-s1.txt").write_text(_mix_summary({0: 0.02, 50: 0.10, 100: 0.14}, 100,
                                                     {0: 0.01, 50: 0.12, 100: 0.16}))
    (tmp_path / "x10-s0.txt").write_text(_mix_summary({0: 0.02, 100: 0.18}, 100, {0: 0.01, 100: 0.20}))
    (tmp_path / "x10-s1.txt").write_text(_mix_summary({0: 0.02, 100: 0.17}, 100, {0: 0.01, 100: 0.15}))
    run = table.read_run(tmp_path / "x3-s0.txt")
    # the report rows are read at the step the choice rows selected (50), not at their own best (100)
    assert run == {"arm": "x3", "seed": 0, "step": 50, "choice": 0.15, "report": 0.17, "choice_last": 0.12,
                   "report_last": 0.19}
    runs = pd.DataFrame([table.read_run(p) for p in sorted(tmp_path.glob("*.txt"))])
    # x10 - x3 by seed on the choice rows: 0.18 - 0.15 and 0.17 - 0.14, both +0.03
    assert table.paired(runs, "x10", "x3", "choice").startswith("+0.030 [+0.030, +0.030] (2/2)")
    saved = tmp_path / "runs.csv"
    monkeypatch.setattr("sys.argv", ["mix_table.py", str(tmp_path), "--save", str(saved)])
    table.main()
    assert "x10" in capsys.readouterr().out and len(pd.read_csv(saved)) == 4


def test_mix_table_names_a_folder_without_summaries(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["mix_table.py", str(tmp_path)])
    with pytest.raises(SystemExit, match="no run summaries"):
        _script("mix_table").main()


class _BagOfWords:
    """A scorer stand-in without a model: normalized word counts, SCS = cos^3 of them."""

    name = "bag of words"

    def embed(self, texts):
        import numpy as np
        vocab = sorted({w for t in self.texts for w in t.lower().strip(".").split()})
        vecs = np.array([[t.lower().strip(".").split().count(w) for w in vocab] for t in texts], dtype=float)
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)

    def scs(self, predictions, truths):
        cos = (self.embed(predictions) * self.embed(truths)).sum(axis=1)
        return cos ** 3


def test_neighbour_probe_bins_report_rows_by_their_nearest_training_prompt(tmp_path):
    probe = _script("neighbour_probe")
    train = pd.DataFrame({
        "id": ["t1", "t2", "c1", "r1", "r2"],
        "original_text": ["a"] * 5, "rewritten_text": ["b"] * 5,
        "rewrite_prompt": ["Rewrite this as a poem.", "Make it formal.", "Make it a limerick.",
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
    scorer = _BagOfWords()
    scorer.texts = list(train["rewrite_prompt"]) + [p["predictions"][0] for p in preds]
    table, now, reweighted = probe.probe([run], scorer, tmp_path)
    # r1 has a close neighbour in training ("Rewrite this as a poem.": cos 0.91) and was recovered exactly; r2
    # ("Translate into French.") shares no word with any training prompt and scored 0
    assert table["rows"].tolist() == [1, 0, 0, 0, 1]
    assert table["scs"].iloc[-1] == pytest.approx(1.0) and table["scs"].iloc[0] == pytest.approx(0.0)
    assert now == pytest.approx(0.5)
    # with nothing held out the neighbours stay in the same bins here (no other group is nearer), so no change
    assert table["rows, nearest among every other group"].tolist() == [1, 0, 0, 0, 1]
    assert reweighted == pytest.approx(0.5)
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
    scorer = _BagOfWords()
    scorer.texts = list(truth["rewrite_prompt"]) + ["Translate into French.", "unused sample"]
    table = probe.probe(runs, scorer)
    assert table["runs"].tolist() == ["r1+r2"] and table["rows"].tolist() == [2]
    # each run is right on one row and shares no word with the truth on the other: 0.5 alone; joined, each row
    # holds the right prompt beside a wrong one, which beats 0 on both rows and loses to 1 on both
    assert table["alone (mean)"].iloc[0] == pytest.approx(0.5)
    assert 0.0 < table["joined"].iloc[0] < 1.0
    assert table["gain"].iloc[0] == pytest.approx(table["joined"].iloc[0] - 0.5)
