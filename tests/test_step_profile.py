"""The step profile (``profile_steps``): where each training process's steps go, written per process, and the
benchmark's side-by-side table of it.

Run: `pytest tests/test_step_profile.py` (the two-process gloo run is marked slow: two processes each load a model).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kaggle_utils import artifacts, callbacks, config, training
from conftest import EXTRA_CSV, GEMMA_CSV, free_port

REPO = Path(__file__).resolve().parents[1]
DDP_PHASES = ("ddp_pre_forward", "grad_allreduce")  # DDP's own collectives: none on one process
ONE_PROCESS_PHASES = ("data", "forward_backward", "optimizer", "log", "evaluate", "save")


def cfg_of(tmp_path, base, **kw):
    values = dict(run_name="profiled", runs_dir=str(tmp_path), preset="mistral-7b", base_model_path=str(base),
                  train_files=[str(GEMMA_CSV)], validation_file=str(GEMMA_CSV), val_rows=4, max_train_rows=8,
                  max_steps=2, batch_size=4, micro_batch_size=2, save_steps=2, logging_steps=1, max_seq_length=512,
                  load_in_4bit=False, learning_rate=1e-2, warmup_steps=0, profile_steps=2)
    values.update(kw)
    return training.TrainConfig(**values)


def _trainer(cfg):
    training.prepare_run(cfg)
    return training.load_for_training(cfg)[2]


def _profile(run_dir: Path, rank: int = 0) -> dict:
    return json.loads((run_dir / artifacts.STEP_PROFILE_FILE.format(rank=rank)).read_text())


def _tiles_the_wall_time(profile: dict) -> None:
    phases = profile["phases"]
    assert set(phases) == set(callbacks.STEP_PHASES) and profile["includes"] == callbacks.STEP_PHASES
    assert sum(p["share"] for p in phases.values()) == pytest.approx(1.0, abs=0.01)
    assert sum(p["total_s"] for p in phases.values()) == pytest.approx(profile["wall_s"], rel=0.01, abs=0.002)
    for name, p in phases.items():  # the steps' records add up to the totals
        assert sum(r.get(name, 0.0) for r in profile["per_step"]) == pytest.approx(p["total_s"], abs=0.002)


def test_one_process_times_every_phase_of_its_steps(tmp_path, tiny_model_dir):
    """Two steps of 2 micro steps each, logged every step, evaluated at steps 0 and 2 and saved at 2: every phase of a
    one-process run took time, DDP's collectives none, and the phases tile the profiled wall time."""
    cfg = cfg_of(tmp_path, tiny_model_dir("mistral"))
    training.train(cfg, _trainer(cfg))
    profile = _profile(cfg.run_dir)
    assert (profile["rank"], profile["world_size"], profile["steps"]) == (0, 1, [1, 2])
    assert profile["torch_threads"] == torch.get_num_threads() and profile["process_threads"] >= 1
    assert profile["device"] == "cpu" and profile["cuda_synchronized"] is False
    phases = profile["phases"]
    assert all(phases[p]["total_s"] > 0 and phases[p]["mean_s"] > 0 for p in ONE_PROCESS_PHASES), phases
    assert all(phases[p]["total_s"] == 0 and phases[p]["count"] == 0 for p in DDP_PHASES)
    counts = {p: phases[p]["count"] for p in ONE_PROCESS_PHASES}
    assert counts == {"data": 2, "forward_backward": 4, "optimizer": 2, "log": 2, "evaluate": 2, "save": 1}
    assert [r["step"] for r in profile["per_step"]] == [0, 1, 2]  # step 0: the evaluation before training
    assert set(profile["per_step"][0]) == {"step", "evaluate"} and "save" in profile["per_step"][2]
    _tiles_the_wall_time(profile)


def test_the_profile_stops_after_profile_steps(tmp_path, tiny_model_dir):
    """profile_steps 1 of 2: the first step and the evaluation before it; the second step, its evaluation and its
    checkpoint are not timed."""
    cfg = cfg_of(tmp_path, tiny_model_dir("mistral"), profile_steps=1)
    training.train(cfg, _trainer(cfg))
    profile = _profile(cfg.run_dir)
    assert profile["steps"] == [1, 1] and [r["step"] for r in profile["per_step"]] == [0, 1]
    assert (profile["phases"]["evaluate"]["count"], profile["phases"]["save"]["count"]) == (1, 0)
    assert profile["phases"]["forward_backward"]["count"] == 2
    _tiles_the_wall_time(profile)


def test_off_the_trainer_has_no_profile(tmp_path, tiny_model_dir):
    trainer = _trainer(cfg_of(tmp_path, tiny_model_dir("mistral"), profile_steps=0))
    names = {type(c).__name__ for c in trainer.callback_handler.callbacks}
    assert "StepProfile" not in names and "MetricsWriter" in names
    with pytest.raises(config.ConfigError, match="profile_steps: must be >= 0"):
        cfg_of(tmp_path, tiny_model_dir("mistral"), profile_steps=-1)


def test_a_master_port_in_the_environment_is_the_launch_s(tmp_path, tiny_model_dir, monkeypatch):
    """accelerate's notebook launcher rendezvouses on 29500 unless told otherwise: MASTER_PORT tells it."""
    import accelerate

    from kaggle_utils import distributed

    ports = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(accelerate, "notebook_launcher", lambda fn, args, num_processes, use_port="29500":
                        ports.append(use_port))
    cfg = cfg_of(tmp_path, tiny_model_dir("mistral"), num_processes=2)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    distributed.launch(cfg)
    monkeypatch.setenv("MASTER_PORT", "41234")
    distributed.launch(cfg)
    assert ports == ["29500", "41234"]


@pytest.mark.slow
def test_two_cpu_processes_each_write_their_profile(tmp_path, tiny_model_dir):
    """A real launch, 2 gloo processes through distributed.launch on a free port: each process writes its own profile,
    and DDP's collectives (the buffer broadcast before every training forward, the gradient all-reduce of every
    optimizer step) are timed apart from the forward and backward."""
    script = f"""
import json
from kaggle_utils import config, distributed, training
config.setup_logging()
cfg = training.TrainConfig(run_name="ddp", runs_dir={str(tmp_path)!r}, preset="mistral-7b",
    base_model_path={str(tiny_model_dir("mistral"))!r}, train_files={[str(GEMMA_CSV), str(EXTRA_CSV)]!r},
    validation_file={str(GEMMA_CSV)!r}, val_rows=4, max_prompt_tokens=128, max_steps=3, batch_size=4,
    micro_batch_size=1, save_steps=3, logging_steps=1, max_seq_length=512, load_in_4bit=False, learning_rate=1e-2,
    warmup_steps=0, num_processes=2, profile_steps=3)
training.prepare_run(cfg)
print("RESULT " + json.dumps(distributed.launch(cfg)))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "ddp"
    assert sorted(p.name for p in run.glob(artifacts.STEP_PROFILE_FILE.format(rank="*"))) == [
        "step_profile_rank0.json", "step_profile_rank1.json"]
    for rank in (0, 1):
        profile = _profile(run, rank)
        assert (profile["rank"], profile["world_size"], profile["steps"]) == (rank, 2, [1, 3])
        assert profile["torch_threads"] == 1  # the OMP_NUM_THREADS this test launches with
        assert profile["gradient_accumulation_steps"] == 2  # 1 row x 2 processes x 2 = the recipe's 4
        phases = profile["phases"]
        assert all(phases[p]["total_s"] > 0 for p in (*ONE_PROCESS_PHASES, *DDP_PHASES)), (rank, phases)
        assert phases["forward_backward"]["count"] == phases["ddp_pre_forward"]["count"] == 3 * 2
        assert phases["grad_allreduce"]["count"] >= 3  # one per gradient bucket of each optimizer step
        assert phases["save"]["count"] == 1  # every process passes through the save; the main one writes
        _tiles_the_wall_time(profile)


def test_the_benchmark_sets_one_process_beside_each_of_n():
    """training_speed.py --profile: steps 2..last (step 1 holds the warm-up) in seconds a step with their shares,
    evaluations and saves in seconds each, one column for the single process and one per process of N."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import training_speed as ts

    def profile(rank: int, world: int, allreduce: float) -> dict:
        per_step = [{"step": 0, "evaluate": 2.0}, {"step": 1, "data": 9.0, "forward_backward": 9.0}]
        per_step += [{"step": s, "data": 0.1, "forward_backward": 1.0, "grad_allreduce": allreduce, "optimizer": 0.1,
                      "log": 0.1 - allreduce} for s in (2, 3)]
        return {"rank": rank, "world_size": world, "torch_threads": 1, "process_threads": 9, "per_step": per_step,
                "gradient_accumulation_steps": 8 // world,
                "phases": {"evaluate": {"count": 1, "mean_s": 2.0}, "save": {"count": 0, "mean_s": 0.0}}}

    split = ts.profile_split(profile(0, 2, 0.05))
    assert split["steps"] == 2 and split["s_per_step"] == pytest.approx(1.3)
    assert split["phases"]["grad_allreduce"] == pytest.approx(0.05) and split["phases"]["ddp_pre_forward"] == 0
    assert sum(split["shares"].values()) == pytest.approx(1.0)
    assert (split["evaluate_s"], split["save_s"]) == (2.0, None)  # no save was timed
    summary = {"rows": [{"model": "mistral-7b", "processes": 1, "step_profile": {"0": ts.profile_split(
        profile(0, 1, 0.0))}}, {"model": "mistral-7b", "processes": 2, "step_profile": {
            "1": ts.profile_split(profile(1, 2, 0.08)), "0": split}}, {"model": "tiny", "processes": 1}]}
    table = ts.render_profile(summary)
    assert "| mistral-7b: phase | 1 process | 2 processes, rank 0 | 2 processes, rank 1 |" in table
    assert "| gradient all-reduce (with the wait) | 0.000 (0%) | 0.050 (4%) | 0.080 (6%) |" in table
    assert "| **step** | **1.300** | **1.300** | **1.300** |" in table
    assert "| forward + backward, s a micro step | 0.125 | 0.250 | 0.250 |" in table  # 8 micro steps a step, or 4
    assert "| checkpoint save, s each | - | - | - |" in table and "tiny: phase" not in table  # tiny: not profiled
