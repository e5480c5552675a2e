"""Data-parallel training through accelerate, what can be checked without GPUs: the batch arithmetic, the
launcher's process count, that only the main process writes, and a real 2-process gloo DDP run of the tiny model.

Run: `pytest tests/test_distributed.py` (the DDP run is marked slow: two processes each load a model).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kaggle_utils import artifacts, callbacks, config, distributed, training
from conftest import EXTRA_CSV, GEMMA_CSV, free_port

REPO = Path(__file__).resolve().parents[1]


def cfg_of(tmp_path, base, **kw):
    values = dict(run_name="ddp", runs_dir=str(tmp_path), preset="mistral-7b", base_model_path=str(base),
                  train_files=[str(GEMMA_CSV)], validation_file=str(GEMMA_CSV), val_rows=4, max_train_rows=16,
                  max_steps=2, batch_size=4, micro_batch_size=2, save_steps=1, max_seq_length=512,
                  load_in_4bit=False, learning_rate=1e-2, warmup_steps=0)
    values.update(kw)
    return training.TrainConfig(**values)


@pytest.mark.parametrize("batch,micro,processes,expected", [(16, 2, 1, (2, 8)), (16, 2, 2, (4, 4)), (16, 2, 4, (8, 2)),
                                                            (8, 4, 2, (8, 1))])
def test_the_effective_batch_stays_the_recipes(tmp_path, tiny_model_dir, batch, micro, processes, expected):
    cfg = cfg_of(tmp_path, tiny_model_dir("mistral"), batch_size=batch, micro_batch_size=micro,
                 num_processes=processes)
    per_step, accumulation = training.batch_split(cfg, processes)
    assert (per_step, accumulation) == expected and per_step * accumulation == batch


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(config.ConfigError, match=r"batch_size: must be a multiple of micro_batch_size x num_processes "
                                                 r"= 2 x 3 = 6"):
        cfg_of(tmp_path, tiny_model_dir("mistral"), batch_size=16, micro_batch_size=2, num_processes=3)


def test_launch_runs_here_for_one_process_and_forks_n_otherwise(tmp_path, tiny_model_dir, monkeypatch):
    import accelerate

    calls = []
    monkeypatch.setattr(training, "run", lambda cfg: calls.append(("here", cfg.num_processes)))
    monkeypatch.setattr(accelerate, "notebook_launcher",
                        lambda fn, args, num_processes: calls.append(("launcher", num_processes, fn, args[0])))
    one = distributed.launch(cfg_of(tmp_path, tiny_model_dir("mistral")))
    cfg = cfg_of(tmp_path, tiny_model_dir("mistral"), num_processes=2)
    two = distributed.launch(cfg)
    assert calls[0] == ("here", 1)
    assert calls[1][:2] == ("launcher", 2) and calls[1][2] is distributed._run_rank and calls[1][3] is cfg
    assert set(one) == set(two) and (one["num_processes"], two["num_processes"]) == (1, 2)  # the same summary
    assert two["global_step"] is None  # nothing trained here: no checkpoint to read


def test_more_processes_than_gpus_is_refused_before_any_fork(tmp_path, tiny_model_dir, monkeypatch):
    import accelerate
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(accelerate, "notebook_launcher", lambda *a, **k: pytest.fail("must not launch"))
    with pytest.raises(config.ConfigError, match="num_processes: 2 processes need as many GPUs; 1 are visible"):
        distributed.launch(cfg_of(tmp_path, tiny_model_dir("mistral"), num_processes=2))


def test_nothing_before_the_fork_asks_the_cuda_driver(tmp_path, tiny_model_dir, monkeypatch):
    """A process that asked the CUDA driver anything (torch.cuda.is_available() does, by default) forks workers that
    fail with "Cannot re-initialize CUDA in forked subprocess". Importing the training module turns on torch's NVML
    check, and what train.ipynb runs before the fork (the config, prepare_run, launch) never asks."""
    import accelerate
    import torch

    clean = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    out = subprocess.run([sys.executable, "-c", "import os; from kaggle_utils import training; "
                          "print(os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'))"],
                         cwd=REPO, capture_output=True, text=True, env=clean)
    assert out.stdout.strip() == "1", out.stderr[-2000:]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("asked the CUDA driver before forking"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launched = []
    monkeypatch.setattr(accelerate, "notebook_launcher", lambda fn, args, num_processes: launched.append(num_processes))
    cfg = cfg_of(tmp_path, tiny_model_dir("mistral"), num_processes=2)
    training.prepare_run(cfg)
    distributed.launch(cfg)
    assert launched == [2]


@pytest.mark.parametrize("threads,gpus,cores,env,expected", [(0, 2, 32, "", 1), (0, 0, 32, "", 16), (0, 0, 3, "", 1),
                                                            (4, 2, 32, "", 4), (0, 2, 32, "6", 6), (3, 2, 32, "6", 3),
                                                            (0, 0, 32, "x", 16)])
def test_each_process_gets_its_cpu_threads(tmp_path, tiny_model_dir, threads, gpus, cores, env, expected):
    """cpu_threads when set, else the user's OMP_NUM_THREADS, else 1 per GPU process (as accelerate launch and torchrun
    set), else the usable cores shared out on CPUs."""
    cfg = cfg_of(tmp_path, tiny_model_dir("mistral"), num_processes=2, cpu_threads=threads)
    assert distributed.rank_threads(cfg, gpus, cores, env) == expected


def test_usable_cores_are_this_process_s_share(monkeypatch):
    """The CPUs this process may run on (its affinity), not the host's count; the host's count where there is no
    affinity (not Linux)."""
    assert distributed.usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})  # a job given 3 of the host's 64 CPUs
    assert distributed.usable_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    assert distributed.usable_cores() == 64


def test_make_passes_gpus_to_the_notebook():
    out = subprocess.run(["make", "-n", "train-mistral", "GPUS=2"], cwd=REPO, capture_output=True, text=True)
    assert "-p num_processes 2" in out.stdout
    out = subprocess.run(["make", "-n", "train-mistral"], cwd=REPO, capture_output=True, text=True)
    assert "num_processes" not in out.stdout  # no GPUS: the notebook's own default (one process)


def test_only_the_main_process_writes(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import TrainerState

    cfg = cfg_of(tmp_path, tiny_model_dir("mistral"))
    training.prepare_run(cfg)
    model, tok = training.load_model_and_tokenizer(cfg)
    monkeypatch.setenv("RANK", "1")
    training.build_datasets(cfg, tok)
    assert not (cfg.run_dir / training.VALIDATION_FILE).exists()
    writer = callbacks.metrics_callback(cfg.run_dir)
    (cfg.run_dir / "checkpoint-1").mkdir()
    other = TrainerState(global_step=1, is_world_process_zero=False)
    writer.on_log(None, other, None, logs={"loss": 1.0})
    writer.on_save(None, other, None)
    assert not (cfg.run_dir / training.METRICS_FILE).exists()
    assert not (cfg.run_dir / "checkpoint-1" / "metrics.json").exists()
    monkeypatch.setenv("RANK", "0")
    training.build_datasets(cfg, tok)
    main = TrainerState(global_step=1, is_world_process_zero=True)
    writer.on_log(None, main, None, logs={"loss": 1.0})
    writer.on_save(None, main, None)
    assert (cfg.run_dir / training.VALIDATION_FILE).exists() and (cfg.run_dir / training.METRICS_FILE).exists()
    assert json.loads((cfg.run_dir / "checkpoint-1" / "metrics.json").read_text())["step"] == 1


def _launch_in_a_child(tmp_path, base, run_name: str, processes: int, max_steps: int = 6):
    """distributed.launch in a fresh Python (the launcher forks it), as `make train GPUS=N` does; its output."""
    script = f"""
import json, sys
from kaggle_utils import config, distributed, training
config.setup_logging()
cfg = training.TrainConfig(run_name={run_name!r}, runs_dir={str(tmp_path)!r}, preset="mistral-7b",
    base_model_path={str(base)!r}, train_files={[str(GEMMA_CSV), str(EXTRA_CSV)]!r}, validation_file={str(GEMMA_CSV)!r},
    val_rows=4, max_prompt_tokens=128, max_steps={max_steps}, batch_size=4, micro_batch_size=1, save_steps=3, logging_steps=1,
    max_seq_length=512, load_in_4bit=False, learning_rate=1e-2, warmup_steps=0, num_processes={processes})
training.prepare_run(cfg)
print("RESULT " + json.dumps(distributed.launch(cfg)))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_cpu_processes_train_data_parallel_through_accelerate(tmp_path, tiny_model_dir):
    """A real launch: 2 processes, gloo, the tiny Mistral; each step logged once, checkpoints written once, LoRA moved;
    and the same rows per optimizer step as one process: the two runs' losses agree step by step."""
    base = tiny_model_dir("mistral")
    out = _launch_in_a_child(tmp_path, base, "ddp", 2)
    text = out.stdout + out.stderr
    assert "Launching training on 2 " in text  # accelerate's launcher (it names the device type CUDA even on CPUs)
    # each of the two processes built its trainer: 1 row x 2 processes x 2 accumulation = the recipe's 4
    assert text.count("effective batch 4 = 2 rows x 2 accumulation") == 2
    for rank in (0, 1):  # each process set its own pool, to the OMP_NUM_THREADS=1 this test launches with
        assert f"process {rank}: 1 CPU thread(s)" in text
    result = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert result["global_step"] == 6 and result["num_processes"] == 2 and result["eval_loss"] > 0
    run = tmp_path / "ddp"
    assert list(artifacts.find_checkpoints(run)) == [3, 6]
    steps = [json.loads(ln)["step"] for ln in (run / training.METRICS_FILE).read_text().splitlines()
             if "eval_loss" in ln]
    assert steps == [0, 3, 6]  # one process logged, once per evaluation
    from safetensors.torch import load_file

    lora_b = [t for n, t in load_file(run / "checkpoint-6" / "adapter_model.safetensors").items() if "lora_B" in n]
    assert lora_b and any(float(t.abs().sum()) > 0 for t in lora_b)  # B starts at zero: it moved

    # Resume: the same run asked for 9 steps goes on from checkpoint-6 in both processes.
    again = _launch_in_a_child(tmp_path, base, "ddp", 2, max_steps=9)
    assert (again.stdout + again.stderr).count("resuming from checkpoint-6") == 2
    assert list(artifacts.find_checkpoints(run)) == [3, 6, 9]
    assert json.loads(next(ln for ln in again.stdout.splitlines() if ln.startswith("RESULT "))[7:])["global_step"] == 9

    # One process, the same recipe (4 rows x 1 process x 4 accumulation): the same rows in each optimizer step (the
    # grouping by length works in effective batches: training._trainer_class; with transformers' blocks of one
    # process's rows, 1900 rows grouped in 200s and in 100s part ways at step 2), so the same answer tokens counted
    # and losses that agree (the step-1 loss exactly; after an update, up to the order of the gradient sums).
    _launch_in_a_child(tmp_path, base, "one", 1)
    logged = {name: [r for r in map(json.loads, (tmp_path / name / training.METRICS_FILE).read_text().splitlines())
                     if "loss" in r] for name in ("ddp", "one")}
    logged["ddp"] = logged["ddp"][:6]  # the resumed steps 7-9 have no one-process twin
    assert [r["step"] for r in logged["ddp"]] == [r["step"] for r in logged["one"]] == [1, 2, 3, 4, 5, 6]
    assert [r["num_tokens"] for r in logged["ddp"]] == [r["num_tokens"] for r in logged["one"]]
    assert logged["ddp"][0]["loss"] == pytest.approx(logged["one"][0]["loss"], rel=1e-5)
    assert [r["loss"] for r in logged["ddp"]] == pytest.approx([r["loss"] for r in logged["one"]], rel=1e-2)
