"""Is Mistral-7B's LoRA training step bound by the host's op dispatch, and do two such processes slow each other?
(A benchmark of the machine, not of the project's code.)

Usage (any box with torch, transformers and peft; on the GPU machine its own Python has them):
    python benchmarks/host_dispatch.py --out runs/bench/host_dispatch
    python benchmarks/host_dispatch.py --steps 3 --cases "0" "0,1"      # a quick look
    python benchmarks/host_dispatch.py --compile --cases   # torch.compile's step against eager (minutes to compile)

The model is Mistral-7B's layout (32 layers, the recipe's rank-1 LoRA with dropout 0.05 on all seven projections,
activation checkpointing, 2 rows of 300 tokens: ``configs/mistral-7b.yaml``) made 64 wide, on the CPU with one thread.
Its arithmetic is then negligible, so a micro step takes what the host spends issuing the ops: the same op graph a
GPU step issues, each op a kernel launch there. Two numbers come out:
- the op count of one micro step (torch.profiler) and the seconds it takes this host to dispatch them, to set
  beside a GPU micro step's seconds (BENCHMARKS.md: 0.585-0.78 s on an H200);
- each case of ``--cases`` (CPUs, comma-separated) runs one process per CPU, pinned, all timing the same seconds:
  a case of two CPUs shows what a second busy process costs the first, as in 2-GPU data-parallel training where
  both processes dispatch at once. Times are compared with the one-CPU cases of the same run only.
Writes results.json and results.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as common  # noqa: E402  (puts the repo on sys.path)


@dataclass
class Config:
    """One host-dispatch run."""

    out: str = "runs/bench/host_dispatch"  # results folder
    steps: int = 15  # timed micro steps per process (after 3 untimed)
    rows: int = 2  # rows per micro step (the recipe's micro batch)
    tokens: int = 300  # tokens per row
    width: int = 64  # hidden size: narrow, so the arithmetic is negligible and the dispatch is what is timed
    cases: list = field(default_factory=lambda: ["0", "5", "0,1", "0,8", "0,15", "0,16", "0,17", "0,24", "0,31",
                                                 "0,8,16,24", "0"])  # CPUs per case, one process each
    compile: bool = False  # also time torch.compile's version of the step, one process, rows of varying length
    lead_s: float = 15.0  # the processes of a case start timing together, this long after launch (imports, build)
    worker: str = ""  # (internal) "CPU,START": run one timed process pinned to CPU, timing from START (epoch s)


def build_step(cfg: Config):
    """The narrow Mistral-7B-layout model's config, a function running one micro step of it (the recipe's LoRA),
    and the model."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    from kaggle_utils import models

    recipe = yaml.safe_load((common.REPO / "configs" / "mistral-7b.yaml").read_text())
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model_cfg = common.make_config("mistral-7b", hidden_size=cfg.width, intermediate_size=2 * cfg.width,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    lora = LoraConfig(r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                      target_modules=list(models.get_preset("mistral-7b").lora_target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(MistralForCausalLM(model_cfg), lora)
    if recipe.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    ids = torch.randint(3, 1000, (cfg.rows, cfg.tokens))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    return model_cfg, step, model


def compiled_against_eager(cfg: Config, model) -> dict:
    """torch.compile's step against the eager one: the seconds its first three steps take (three lengths, as
    real micro batches differ), then seconds per micro step over ``steps`` more lengths, both versions."""
    import torch

    compiled = torch.compile(model)
    found = {}
    for name, net in (("eager", model), ("compiled", compiled)):
        def step(length, net=net):
            ids = torch.randint(3, 1000, (cfg.rows, length))
            net(input_ids=ids, labels=ids).loss.backward()

        began = time.perf_counter()
        for length in (cfg.tokens, cfg.tokens - 20, cfg.tokens - 40):
            step(length)
        first = time.perf_counter() - began
        began = time.perf_counter()
        for i in range(cfg.steps):
            step(cfg.tokens - 50 + 7 * i)
        found[name] = {"first_3_steps_s": round(first, 1),
                       "s_per_micro_step": (time.perf_counter() - began) / cfg.steps}
    found["x_eager"] = found["eager"]["s_per_micro_step"] / found["compiled"]["s_per_micro_step"]
    return found


def op_count(step) -> dict:
    """aten ops per micro step (torch.profiler, CPU), and the most frequent ones."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    aten = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    top = sorted(aten, key=lambda e: -e.count)[:8]
    return {"aten_calls": sum(e.count for e in aten), "most_called": {e.key: e.count for e in top}}


def timed_worker(cfg: Config) -> None:
    """One pinned process: build, warm up, wait for the shared start, time ``steps`` micro steps, print JSON."""
    cpu, start = cfg.worker.split(",")
    os.sched_setaffinity(0, {int(cpu)})
    _, step, _ = build_step(cfg)
    for _ in range(3):
        step()
    late = time.time() - float(start)
    while time.time() < float(start):
        time.sleep(0.001)
    began = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    print(json.dumps({"cpu": int(cpu), "s_per_micro_step": (time.perf_counter() - began) / cfg.steps,
                      "late_s": round(max(0.0, late), 2)}))


def parse_cases(cases, usable) -> list[list[int]]:
    """Each case's CPUs as numbers; a case that is not a comma-separated list of CPUs this process may use is an
    error naming it."""
    parsed = []
    for spec in cases:
        try:
            cpus = [int(c) for c in str(spec).split(",") if c.strip()]
        except ValueError:
            raise SystemExit(f"--cases {spec!r}: give CPU numbers separated by commas, e.g. 0,8") from None
        outside = [c for c in cpus if c not in usable]
        if not cpus or outside:
            raise SystemExit(f"--cases {spec!r}: CPU(s) {outside or '(none)'} not among the {len(usable)} this process "
                             f"may use ({sorted(usable)})")
        parsed.append(cpus)
    return parsed


def run_case(cfg: Config, cpus: list[int]) -> list[dict]:
    """Every process of one case at once; their results (a process that was late to the start is flagged)."""
    start = time.time() + cfg.lead_s
    args = [a for f in ("steps", "rows", "tokens", "width") for a in (f"--{f}", str(getattr(cfg, f)))]
    procs = [subprocess.Popen([sys.executable, __file__, *args, "--worker", f"{c},{start}"], stdout=subprocess.PIPE,
                              text=True) for c in cpus]
    found = []
    for proc in procs:
        out, _ = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        found.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.returncode})
    return found


def main() -> None:
    cfg = common.parse_config(Config, __doc__.splitlines()[0])
    if cfg.worker:
        timed_worker(cfg)
        return
    cases_cpus = parse_cases(cfg.cases, os.sched_getaffinity(0))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    model_cfg, step, model = build_step(cfg)
    for _ in range(3):
        step()
    ops = op_count(step)
    print(f"{model_cfg.num_hidden_layers} layers, width {cfg.width}: {ops['aten_calls']} aten calls per micro step "
          f"of {cfg.rows} x {cfg.tokens} tokens")
    compiled = compiled_against_eager(cfg, model) if cfg.compile else None
    if compiled:
        print(f"torch.compile: first 3 steps {compiled['compiled']['first_3_steps_s']} s (eager "
              f"{compiled['eager']['first_3_steps_s']} s), then {compiled['x_eager']:.2f}x eager's speed")
    cases = []
    for spec, cpus in zip(cfg.cases, cases_cpus):
        procs = run_case(cfg, cpus)
        times = [p["s_per_micro_step"] for p in procs if "s_per_micro_step" in p]
        cases.append({"cpus": cpus, "processes": procs, "mean_s": statistics.mean(times) if times else None})
        print(f"CPUs {spec}: " + ", ".join(f"{p.get('s_per_micro_step', float('nan')):.3f}" for p in procs) + " s")
    alone = [c["mean_s"] for c in cases if len(c["cpus"]) == 1 and c["mean_s"]]
    base = statistics.mean(alone) if alone else None
    for c in cases:
        c["x_alone"] = c["mean_s"] / base if base and c["mean_s"] else None
    results = {"environment": common.environment(), "config": dataclasses.asdict(cfg), "ops": ops, "compile": compiled,
               "alone_mean_s": base, "cases": cases, "usable_cpus": len(os.sched_getaffinity(0))}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Host dispatch: {ops['aten_calls']} aten calls per micro step ({model_cfg.num_hidden_layers} layers, "
             f"width {cfg.width}, {cfg.rows} x {cfg.tokens} tokens, 1 thread)", "",
             "| CPUs (one process each, same seconds) | s per micro step, each | mean | x the one-process mean |",
             "|---|---|---|---|"]
    for c in cases:
        each = " / ".join(f"{p['s_per_micro_step']:.3f}" if "s_per_micro_step" in p else "failed"
                          for p in c["processes"])
        mean = f"{c['mean_s']:.3f} | {c['x_alone']:.2f}" if c["mean_s"] and c["x_alone"] else "- | -"
        lines.append(f"| {','.join(map(str, c['cpus']))} | {each} | {mean} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
