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
