"""The HF engine data-parallel (one copy per card, each in its own process), on CPU worker processes with a tiny
random Mistral: every row sampled once by one worker and joined in the submission's order, resume from the model's
file and from the parts an interrupted run left, and workers that fail, die or hang named in a clear error with their
finished rows kept. Run: `.venv/bin/python -m pytest -q tests/test_card_parallel.py` (about 80 s on 2 cores).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from kaggle_utils import budget, card_parallel, data, engines, inference, sampling
from kaggle_utils.config import ConfigError
from kaggle_utils.plan import ModelEntry
from conftest import GEMMA_CSV, save_adapter


def _rows(n):
    rows = data.read_rewrites(GEMMA_CSV).head(n)
    return rows["id"].tolist(), rows["original_text"].tolist(), rows["rewritten_text"].tolist()


def _ids_in(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []


def _store(tmp_path, name="tiny"):
    return sampling.PredictionStore(tmp_path / "predictions", name, {"model": name})


def _config(tmp_path, base, n_rows, **kw):
    rows = data.read_rewrites(GEMMA_CSV).head(n_rows)
    test_file = tmp_path / "test.csv"
    rows[["id", "original_text", "rewritten_text"]].to_csv(test_file, index=False)
    entry = {"name": "tiny", "preset": "mistral-7b", "base_model": str(base), "n": 2, "temperature": 0.8,
             "top_p": 0.95}
    return inference.InferenceConfig(test_file=str(test_file), submission_path=str(tmp_path / "submission.csv"),
                                     run_dir=str(tmp_path / "run"), models=[entry], engine="hf", hf_copies=2,
                                     max_new_tokens=4, generation_batch_size=2, max_prompt_tokens=256, **kw)


SCFG = engines.SamplingConfig(max_new_tokens=4, generation_batch_size=2, max_prompt_tokens=256)


# ---------------------------------------------------------------- pure parts


def test_rows_are_dealt_longest_first_in_turn():
    originals = ["a" * n for n in (5, 50, 20, 40, 10, 30)]
    shares = card_parallel.deal_rows(originals, [""] * 6, [0, 1, 2, 3, 4, 5], 2)
    assert shares == [[1, 4, 5], [0, 2, 3]]  # 50, 30, 10 | 40, 20, 5: each card gets long and short rows
    assert card_parallel.deal_rows(originals, [""] * 6, [0, 4], 3) == [[4], [0], []]


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_hf_copies_must_be_a_whole_number_from_zero(value):
    with pytest.raises(ConfigError, match="hf_copies"):
        inference.InferenceConfig(hf_copies=value)
    assert inference.InferenceConfig().hf_copies == 0  # one process unless asked


def test_parts_of_another_setting_are_set_aside_not_folded(tmp_path):
    store = _store(tmp_path)
    folder = card_parallel.parts_folder(store)
    same = sampling.PredictionStore(folder, "part0", store.fingerprint)
    same.append([{"id": "a", "key": "k", "predictions": ["Rewrite a."]}])
    other = sampling.PredictionStore(folder, "part1", {"model": "another"})
    other.append([{"id": "b", "key": "k", "predictions": ["Rewrite b."]}])
    assert card_parallel.fold_parts(store) == 1
    assert set(store.done) == {"a"} and _ids_in(store.path) == ["a"]
    assert not (folder / "part0.jsonl").exists() and not (folder / "part1.jsonl").exists()
    assert len(list(folder.glob("part1.*.stale.jsonl"))) == 1  # kept aside, as the store keeps its own stale file
    assert card_parallel.fold_parts(store) == 0


# ---------------------------------------------------------------- worker processes on a tiny model


def test_two_workers_sample_disjoint_shares_joined_in_row_order(tmp_path, tiny_model_dir, monkeypatch):
    base = tiny_model_dir("mistral")
    adapter = save_adapter(base, tmp_path / "adapter")
    entry = ModelEntry(name="tiny", preset="mistral-7b", base_model=str(base), adapter=str(adapter))
    ids, originals, rewrittens = _rows(9)
    store = _store(tmp_path)
    monkeypatch.setattr(card_parallel, "_remove_parts", lambda folder: None)  # keep the parts, to look at them
    result = card_parallel.sample_on_cards(entry, SCFG, ids, originals, rewrittens, store, "Improve this text.", 2)
    folder = card_parallel.parts_folder(store)
    parts = [_ids_in(folder / "part0.jsonl"), _ids_in(folder / "part1.jsonl")]
    assert all(parts) and not set(parts[0]) & set(parts[1])  # both sampled, no row twice
    assert sorted(parts[0] + parts[1]) == sorted(ids)
    assert _ids_in(store.path) == ids  # every id once, in the submission's order
    workers = result.workers
    assert [w.ids for w in workers] == [sorted(p, key=ids.index) for p in parts]
    pids = {w.report["pid"] for w in workers}
    assert len(pids) == 2 and os.getpid() not in pids  # two processes of their own
    assert all(w.report["sampled"] == len(w.ids) and not w.report["four_bit"] for w in workers)  # CPU: 16-bit
    report = result.report
    assert (report.sampled, report.resumed, report.undone, report.engine) == (9, 0, 0, "hf")
    assert report.rows_per_s > 0 and report.load_s > 0
    assert all(len(store.done[i]["predictions"]) == 1 for i in ids)


def test_sample_models_with_hf_copies_resumes_only_the_missing_rows(tmp_path, tiny_model_dir):
    """Through the submission stage: run, lose part of the output as an interrupted run would (rows in the model's
    file, rows in a worker's part, rows nowhere), run again: only the rows nowhere are sampled."""
    cfg = _config(tmp_path, tiny_model_dir("mistral"), 10)
    test = inference.read_test(cfg)
    ids = test["id"].tolist()
    deadline = budget.Deadline(start=time.time(), hours=1)
    predictions, report = inference.sample_models(cfg, test, deadline)
    path = tmp_path / "run" / "predictions" / "tiny.jsonl"
    assert report["sampled"].tolist() == [10] and _ids_in(path) == ids and len(predictions["tiny"]) == 10
    assert not list((tmp_path / "run" / "predictions").glob("tiny.parts/part*.jsonl"))  # joined, then removed

    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines[:4]))  # rows 0-3 stay in the model's file
    part = tmp_path / "run" / "predictions" / "tiny.parts" / "part1.jsonl"
    part.write_text("".join(line + "\n" for line in lines[4:7]))  # rows 4-6 in a worker's part; 7-9 lost
    (part.parent / "part1.meta.json").write_text(json.dumps(json.loads(
        (tmp_path / "run" / "predictions" / "tiny.meta.json").read_text())))
    again, report2 = inference.sample_models(cfg, test, deadline)
    assert report2["sampled"].tolist() == [3] and report2["undone"].tolist() == [0]
    assert _ids_in(path) == ids  # each id once, in order
    assert path.read_text().splitlines()[:7] == lines[:7]  # the kept rows were not sampled again
    assert len(again["tiny"]) == 10 and all(len(p) == 2 for p in again["tiny"].values())
    sub = inference.build_submission(cfg, test, again)
    inference.validate_submission(inference.write_submission(cfg, sub), test)


def test_a_failing_worker_is_named_with_its_log_and_the_submission_goes_on(tmp_path, tiny_model_dir, caplog):
    """Worker 1 cannot write its part file: the stage logs the failure naming the worker and its log, keeps worker
    0's rows (and the model's row of sampling.csv), and the submission is complete with the fallback elsewhere."""
    cfg = _config(tmp_path, tiny_model_dir("mistral"), 6)
    test = inference.read_test(cfg)
    folder = tmp_path / "run" / "predictions" / "tiny.parts"
    (folder / "part1.jsonl").mkdir(parents=True)
    predictions, report = inference.sample_models(cfg, test, budget.Deadline(start=time.time(), hours=1))
    assert "tiny failed" in caplog.text
    assert "worker 1 (a CPU process) failed: IsADirectoryError" in caplog.text
    assert f"its log: {folder / 'part1.log'}" in caplog.text and "worker 0 (" not in caplog.text
    ids = test["id"].tolist()
    share = card_parallel.deal_rows(test["original_text"].tolist(), test["rewritten_text"].tolist(), range(6), 2)
    kept = [ids[i] for i in share[0]]
    assert _ids_in(tmp_path / "run" / "predictions" / "tiny.jsonl") == kept  # worker 0's rows, in row order
    assert sorted(predictions["tiny"]) == sorted(kept)
    assert report[["sampled", "undone"]].values.tolist() == [[len(kept), 6 - len(kept)]]
    sub = inference.build_submission(cfg, test, predictions)
    inference.validate_submission(inference.write_submission(cfg, sub), test)


def _pid_of(job: Path) -> int | None:
    """The worker process whose command line names ``job`` (Linux's /proc)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(job) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    return int(entry.name)
            except OSError:
                continue
    return None


def test_a_worker_killed_mid_run_keeps_the_rows_it_finished(tmp_path, tiny_model_dir):
    """SIGKILL one worker after its first rows (as an out-of-memory kill would): the parent names it and the signal,
    and the rows both workers finished are in the model's file; the rest are left for a later run."""
    entry = ModelEntry(name="tiny", preset="mistral-7b", base_model=str(tiny_model_dir("mistral")))
    ids, originals, rewrittens = _rows(60)
    store = _store(tmp_path)
    folder = card_parallel.parts_folder(store)
    scfg = engines.SamplingConfig(max_new_tokens=16, generation_batch_size=1, max_prompt_tokens=256)
    outcome = {}

    def run():
        try:
            outcome["result"] = card_parallel.sample_on_cards(entry, scfg, ids, originals, rewrittens, store,
                                                              "Improve this text.", 2, poll_s=0.05)
        except Exception as e:  # noqa: BLE001  (checked below)
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while len(_ids_in(folder / "part1.jsonl")) < 2 and thread.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    pid = _pid_of(folder / "part1.job.json")
    assert pid is not None, "worker 1 was not found running"
    os.kill(pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, card_parallel.WorkerError), outcome
    assert "worker 1 (a CPU process) was killed by signal 9" in str(error)
    done = _ids_in(store.path)
    share = card_parallel.deal_rows(originals, rewrittens, range(60), 2)
    worker1 = {ids[i] for i in share[1]}
    assert 2 <= len(set(done) & worker1) < len(worker1)  # its finished rows kept, the rest undone
    assert set(done) >= {ids[i] for i in share[0]} and len(done) == len(set(done))
    assert done == [i for i in ids if i in set(done)]  # in row order
    assert not (folder / "part1.jsonl").exists()  # joined into the model's file


def test_a_worker_still_running_after_the_time_share_is_killed_and_named(tmp_path, tiny_model_dir, monkeypatch):
    entry = ModelEntry(name="tiny", preset="mistral-7b", base_model=str(tiny_model_dir("mistral")))
    ids, originals, rewrittens = _rows(4)
    monkeypatch.setattr(card_parallel, "KILL_GRACE_S", 0.0)
    share = budget.ModelBudget(ends_at=time.time() - 1)  # the share is over before the workers start
    started = time.time()
    with pytest.raises(card_parallel.WorkerError, match=r"worker 0 .*was killed, still running 0 s after the model's "
                                                        r"time share ended; its log: .*part0\.log"):
        card_parallel.sample_on_cards(entry, SCFG, ids, originals, rewrittens, _store(tmp_path),
                                      "Improve this text.", 2, share=share)
    assert time.time() - started < 30  # never waits on a worker past its time
