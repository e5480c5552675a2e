"""Training in one process or data-parallel in several, one per GPU: the launch from the notebook, each process's
CPU threads, and what the run ended with.

Every process runs the same :func:`kaggle_utils.training.run` (one training path for 1 and N GPUs); accelerate's
``notebook_launcher`` forks them from the notebook kernel, so ``train.ipynb`` stays the entry point.
"""
from __future__ import annotations

import json
import logging
import os

from . import training
from .config import require
from .models import usable_cores
from .training import TrainConfig

logger = logging.getLogger("kaggle_utils")


def rank_threads(cfg: TrainConfig, gpus: int, cores: int, env_threads: str = "") -> int:
    """torch CPU threads for one of ``cfg.num_processes`` data-parallel processes: ``cpu_threads`` when set, else
    the environment's OMP_NUM_THREADS when the user set one, else 1 per GPU process (what ``accelerate launch`` and
    torchrun set; a GPU process's own CPU work is launching kernels, and idle OpenMP pools of several processes can
    contend with those launch threads: no measurable effect on a 32-CPU host, BENCHMARKS.md), else the ``cores``
    this process may use shared out between CPU (gloo) processes."""
    if cfg.cpu_threads:
        return cfg.cpu_threads
    if env_threads.strip().isdigit() and int(env_threads) > 0:
        return int(env_threads)
    return 1 if gpus else max(1, cores // cfg.num_processes)


def _run_rank(cfg: TrainConfig) -> None:
    import torch

    from .config import setup_logging

    setup_logging()
    # accelerate's notebook launcher forks without setting OMP_NUM_THREADS (its command-line launcher does), so
    # each process would otherwise start torch's default pool, as many threads as the host has cores.
    threads = rank_threads(cfg, torch.cuda.device_count(), usable_cores(), os.environ.get("OMP_NUM_THREADS", ""))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    logger.info("process %s: %d CPU thread(s)", os.environ.get("RANK", "0"), threads)
    training.run(cfg)


def launch(cfg: TrainConfig) -> dict:
    """Train ``cfg`` in this process (``num_processes`` 1), or data-parallel in ``num_processes`` processes, one per
    GPU (gloo on CPUs), through accelerate's ``notebook_launcher``.

    The launcher forks the processes from this one, so the notebook stays the entry point (Kaggle's 2xT4 included)
    and each process's log lands in the executed notebook. Nothing here may touch CUDA before the fork (the config,
    the run folder and this call do not). Each process loads the whole model on its own GPU, draws its share of every
    batch, and only the main process writes checkpoints, ``metrics.jsonl`` and the split files. Returns
    :func:`final_state`, read back from the run folder.
    """
    if cfg.num_processes <= 1:
        if cfg.cpu_threads:
            import torch

            torch.set_num_threads(cfg.cpu_threads)  # stays set in this kernel after training
            logger.info("%d CPU thread(s)", cfg.cpu_threads)
        training.run(cfg)
        return final_state(cfg)
    import torch
    from accelerate import notebook_launcher

    # device_count (and is_available, with the NVML check the training module sets on import) leaves CUDA
    # uninitialized, so the fork below stays safe.
    gpus = torch.cuda.device_count()
    require(not gpus or cfg.num_processes <= gpus, "num_processes",
            f"{cfg.num_processes} processes need as many GPUs; {gpus} are visible (GPUS=... of make train)")
    _, accumulation = training.batch_split(cfg, cfg.num_processes)
    logger.info("data-parallel: %d processes x micro batch %d x %d accumulation = effective batch %d",
                cfg.num_processes, cfg.micro_batch_size, accumulation, cfg.batch_size)
    # accelerate's launcher rendezvouses on port 29500 whatever the environment says; a MASTER_PORT set there wins, so
    # two runs on one host need not collide
    port = {"use_port": os.environ["MASTER_PORT"]} if os.environ.get("MASTER_PORT") else {}
    notebook_launcher(_run_rank, args=(cfg,), num_processes=cfg.num_processes, **port)
    return final_state(cfg)


def final_state(cfg: TrainConfig) -> dict:
    """What the run ended with, read from its folder (the same for one process or several): the last complete
    checkpoint, its step, the last logged train loss and eval loss, and the processes that trained it."""
    last = training.find_last_checkpoint(cfg.run_dir)
    state = json.loads((last / "trainer_state.json").read_text()) if last else {}
    history = state.get("log_history", [])
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"global_step": state.get("global_step"), "checkpoint": str(last) if last else None,
            "train_loss": losses[-1] if losses else None, "eval_loss": evals[-1] if evals else None,
            "num_processes": cfg.num_processes}
