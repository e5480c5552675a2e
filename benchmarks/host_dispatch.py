"""Is Mistral-7B's LoRA training step bound by the host's op dispatch, and do two such processes slow each other?
(A benchmark of the machine, not of the project's code.)

Usage (any box with torch, transformers and peft; on the GPU machine its own Python has them):
    python benchmarks/host_dispatch.py --out runs/bench/host_dispatch         # cases chosen from the usable CPUs
    python benchmarks/host_dispatch.py --cases 0 0,1 --window_s 3             # a quick look
    python benchmarks/host_dispatch.py --compile --cases 0   # + torch.compile's step against eager (minutes)

The model is Mistral-7B's layout with its recipe's LoRA (``configs/mistral-7b.yaml``: 32 layers, rank 1 with dropout
0.05 on all seven projections, activation checkpointing, micro batches of 2 rows; here of 300 tokens each) made 64
wide, on the CPU with one thread. Its arithmetic is then negligible, so a micro step takes what the host spends
issuing the ops: the op graph a GPU step issues, each op a kernel launch or a view there. What comes out:
- the op count of one micro step (torch.profiler) and the seconds this host takes to issue them, to set beside a GPU
  micro step's seconds (BENCHMARKS.md: 0.585-0.78 s on an H200);
- each case of ``--cases`` (CPUs, comma-separated) runs one process per CPU, pinned; they are started together once
  all are built and warm, and each runs micro steps through the same ``window_s`` seconds. A case of two CPUs shows
  what a second busy process costs the first, as in 2-GPU data-parallel training where both processes dispatch at
  once; ``all at once`` is the share of the longest window that every process of the case ran. Times are compared
  with the one-CPU cases of the same run only.
Writes results.json, results.md and each worker's log (logs/); exits non-zero if a worker failed.
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
    steps: int = 15  # --compile: timed micro steps of each version (after three of three lengths)
    rows: int = 2  # rows per micro step (the Mistral-7B recipe's micro batch)
    tokens: int = 300  # tokens per row
    width: int = 64  # hidden size: narrow, so the arithmetic is negligible and the dispatch is what is timed
    cases: list = field(default_factory=list)  # CPUs per case ("0,8": one process on each); empty: default_cases
    window_s: float = 10.0  # every process of a case runs micro steps through the same window of this many seconds
    compile: bool = False  # also time torch.compile's version of the step, one process, rows of varying length
    worker: str = ""  # (internal) the CPU of one timed process, which reads its start time from stdin


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
    """One pinned process: build and warm up, say ``ready``, read the shared start time (epoch seconds) from stdin,
    then run micro steps from that moment until ``window_s`` has passed; print JSON with its window."""
    cpu = int(cfg.worker)
    os.sched_setaffinity(0, {cpu})
    _, step, _ = build_step(cfg)
    for _ in range(3):
        step()
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    while time.time() < start:
        time.sleep(0.001)
    began, steps = time.time(), 0
    while steps == 0 or time.time() < start + cfg.window_s:  # at least one step, however late the start
        step()
        steps += 1
    ended = time.time()
    print(json.dumps({"cpu": cpu, "s_per_micro_step": (ended - began) / steps, "steps": steps,
                      "window": [round(began, 3), round(ended, 3)]}), flush=True)


def default_cases(usable) -> list[str]:
    """Cases for any box: the first CPU alone and a middle one alone, the first with each of a few others, four
    spread CPUs at once, and the first alone again (the host may drift over the run)."""
    cpus = sorted(usable)
    n = len(cpus)
    alone = [str(cpus[0]), str(cpus[n // 2])] if n > 1 else [str(cpus[0])]
    pairs = [f"{cpus[0]},{cpus[k]}" for k in sorted({1, n // 4, n // 2, n - 1}) if 0 < k < n]
    four = [",".join(str(cpus[k * n // 4]) for k in range(4))] if n >= 4 else []
    return alone + pairs + four + [str(cpus[0])]


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
        if not cpus:
            raise SystemExit(f"--cases {spec!r} names no CPU")
        if outside:
            raise SystemExit(f"--cases {spec!r}: CPU(s) {outside} not among the {len(usable)} this process may use "
                             f"({sorted(usable)})")
        parsed.append(cpus)
    return parsed


def _wait_ready(proc) -> bool:
    """Read a worker's output up to its ``ready`` line (a library may print before it); False if it ended first."""
    for line in proc.stdout:
        if line.strip() == "ready":
            return True
    return False


def run_case(cfg: Config, cpus: list[int], logs: Path) -> dict:
    """Every process of one case, started together once all are built and warm; each one's result (or its error
    with the end of its log), the mean, and how much of the longest window all of them ran at once."""
    args = [a for f in ("rows", "tokens", "width", "window_s") for a in (f"--{f}", str(getattr(cfg, f)))]
    procs, files = [], []
    for cpu in cpus:
        files.append(open(logs / f"worker-{'-'.join(map(str, cpus))}-cpu{cpu}.log", "w"))
        procs.append(subprocess.Popen([sys.executable, __file__, *args, "--worker", str(cpu)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=files[-1], text=True))
    ready = [_wait_ready(proc) for proc in procs]  # blocks until each is warm (or dead)
    start = time.time() + 0.5
    for proc, ok in zip(procs, ready):  # every process gets the start before any is waited for
        if ok:
            proc.stdin.write(f"{start}\n")
            proc.stdin.flush()
    found = []
    for cpu, proc, log in zip(cpus, procs, files):
        try:
            out, _ = proc.communicate(timeout=cfg.window_s + 600)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = ""
        log.close()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            found.append(json.loads(lines[-1]))
        else:
            found.append({"cpu": cpu, "error": proc.returncode,
                          "log_tail": Path(log.name).read_text()[-800:]})
    case = {"cpus": cpus, "processes": found, "mean_s": None, "overlap": None}
    if all("s_per_micro_step" in p for p in found):
        case["mean_s"] = statistics.mean(p["s_per_micro_step"] for p in found)
        windows = [p["window"] for p in found]
        longest = max(b - a for a, b in windows)
        case["overlap"] = max(0.0, min(b for _, b in windows) - max(a for a, _ in windows)) / longest
    return case


def write_results(out: Path, cfg: Config, ops: dict, compile_result, cases: list[dict], usable: int,
                  layers: str) -> str:
    """results.json and results.md from the cases so far (each case's ``x_alone`` against the mean of the one-CPU
    cases); returns the markdown table."""
    alone = [c["mean_s"] for c in cases if len(c["cpus"]) == 1 and c["mean_s"]]
    base = statistics.mean(alone) if alone else None
    for c in cases:
        c["x_alone"] = c["mean_s"] / base if base and c["mean_s"] else None
    results = {"environment": common.environment(), "config": dataclasses.asdict(cfg), "ops": ops,
               "compile": compile_result, "alone_mean_s": base, "cases": cases, "usable_cpus": usable}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Host dispatch: {ops['aten_calls']} aten calls per micro step ({layers}, width {cfg.width}, "
             f"{cfg.rows} x {cfg.tokens} tokens, 1 thread)", "",
             f"| CPUs (one process each, the same {cfg.window_s:g} s) | s per micro step, each | mean "
             "| x the one-process mean | all at once |", "|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for c in cases:
        each = " / ".join(f"{p['s_per_micro_step']:.3f}" if "s_per_micro_step" in p else f"CPU {p['cpu']} failed"
                          for p in c["processes"])
        lines.append(f"| {','.join(map(str, c['cpus']))} | {each} | {fmt(c['mean_s'], '.3f')} | "
                     f"{fmt(c['x_alone'], '.2f')} | {fmt(c['overlap'], '.0%') if len(c['cpus']) > 1 else ''} |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    return table


def main() -> None:
    cfg = common.parse_config(Config, __doc__.splitlines()[0])
    if cfg.worker:
        timed_worker(cfg)
        return
    usable = os.sched_getaffinity(0)
    cfg.cases = cfg.cases or default_cases(usable)
    cases_cpus = parse_cases(cfg.cases, usable)
    out = Path(cfg.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    model_cfg, step, model = build_step(cfg)
    for _ in range(3):
        step()
    ops = op_count(step)
    print(f"{model_cfg.num_hidden_layers} layers, width {cfg.width}: {ops['aten_calls']} aten calls per micro step "
          f"of {cfg.rows} x {cfg.tokens} tokens")
    compile_result = compiled_against_eager(cfg, model) if cfg.compile else None
    if compile_result:
        print(f"torch.compile: first 3 steps {compile_result['compiled']['first_3_steps_s']} s (eager "
              f"{compile_result['eager']['first_3_steps_s']} s), then {compile_result['x_eager']:.2f}x eager's speed")
    cases = []
    for cpus in cases_cpus:
        case = run_case(cfg, cpus, out / "logs")
        cases.append(case)
        times = ", ".join(f"{p['s_per_micro_step']:.3f}" if "s_per_micro_step" in p else "failed"
                          for p in case["processes"])
        together = f" (all at once {case['overlap']:.0%} of the window)" if case["overlap"] is not None else ""
        print(f"CPUs {','.join(map(str, cpus))}: {times} s{together}", flush=True)
        table = write_results(out, cfg, ops, compile_result, cases, len(usable),
                              f"{model_cfg.num_hidden_layers} layers")  # after every case: a stopped run keeps them
    print(table)
    failed = [f"CPU {p['cpu']} of case {c['cpus']}" for c in cases for p in c["processes"] if "error" in p]
    if failed:
        raise SystemExit(f"{len(failed)} process(es) failed ({'; '.join(failed)}): see {out / 'logs'} and "
                         f"results.json")


if __name__ == "__main__":
    main()
