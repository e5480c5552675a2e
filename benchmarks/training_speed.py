"""Data-parallel training speed: samples/s on 1 GPU and on N through the project's own ``distributed.launch`` (what
``make train-<model> GPUS=N`` runs), the loss curves of both over the same rows, and one QLoRA preset trained
data-parallel, 4-bit per card, in one run.

Usage (on a box with 2+ GPUs, TRL, datasets and bitsandbytes; writes results.json, results.md, loss_curves.png):
    python benchmarks/training_speed.py --out runs/bench/training_speed
CPU smoke test (two gloo processes, a 2-layer stand-in; about a minute):
    python benchmarks/training_speed.py --models tiny --steps 3 --qlora "" --out runs/bench/training-tiny
Where the second card waits (each step's phases timed per process, side by side; docs/gpu.md says how to read it):
    python benchmarks/training_speed.py --models mistral-7b --steps 12 --qlora "" --profile --out runs/bench/ddp_profile

Each (model, process count) is one phase, run in a fresh Python (``--phase``): ``distributed.launch`` forks its workers
with accelerate's ``notebook_launcher``, which needs a parent that never touched CUDA, and the one-GPU phase sees one
card (``CUDA_VISIBLE_DEVICES=0``), as ``GPUS`` unset on a one-card box. Every phase trains the model's own recipe
(``configs/<preset>.yaml``; SmolLM2: ``configs/smollm2-135m-gpu.yaml``) on the real data, with ``max_steps`` cut short,
one evaluation at step 0 and one at the end, and the train loss logged every step. The micro batch is the largest
that every process count shares (16 rows = 8 x 2 GPUs x 1 or 8 x 1 x 2): the same rows per optimizer step.

- ``smollm2-135m``: the real weights (``make prepare``'s folder).
- other names of ``benchmarks/_common.py`` ``REAL_CONFIGS``: the published shape with random weights, built on each
  process's card by the patched ``models.load_model`` (4-bit through transformers' bitsandbytes quantizer where the
  preset is QLoRA; ``check_architectures.build_random``) instead of read from disk; SmolLM2's tokenizer, so the rows
  have real lengths (the vocabulary is SmolLM2's 49,152 instead of 32,000: 2% more parameters).

samples/s counts optimizer steps 2..last (step 1 holds the warm-up), from the wall-clock times that ``metrics.jsonl``
records for each logged step, so model loading and the two evaluations are outside it; they are in ``phase_s``.
Each process also records its own step times (micro steps, and the last one with the all-reduce and the optimizer),
and nvidia-smi samples the cards' clocks and power during each phase: where a data-parallel step loses time.
``--extra '{"gradient_checkpointing": false}'`` changes the recipe of every phase. ``--profile`` trains every phase
with ``profile_steps`` (``callbacks.step_profile_callback``: data, forward + backward, DDP's collectives, optimizer,
evaluation and saves, per process) and adds their table, 1 process against each of N, to results.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as common  # noqa: E402  (benchmarks/ is not a package; _common puts the repo on sys.path)

RECIPES = {"smollm2-135m": "configs/smollm2-135m-gpu.yaml", "mistral-7b": "configs/mistral-7b.yaml",
           "llama2-13b": "configs/llama2-13b.yaml", "mistral-22b": "configs/mistral-22b.yaml",
           "mixtral-8x7b": "configs/mixtral-8x7b.yaml", "tiny": "configs/mistral-7b.yaml"}
TINY_PRESET = "mistral-7b"  # the tiny stand-in trains through the Mistral-7B preset (its layout)


@dataclass
class Config:
    """One training-speed run."""

    out: str = "runs/bench/training_speed"  # results folder
    work_dir: str = "/tmp/kaggle_utils_train_bench"  # run folders and the (weightless) model folders
    models: list = field(default_factory=lambda: ["smollm2-135m", "mistral-7b"])  # compared on 1 GPU and on N
    steps: list = field(default_factory=lambda: ["60", "30"])  # optimizer steps per model (same order as models)
    processes: int = 2  # N: data-parallel processes (GPUs) compared with one
    batch_size: int = 16  # effective batch of every phase (the recipes' 16)
    val_rows: int = 16  # choice rows: the step-0 and last evaluation
    qlora: str = "llama2-13b"  # a QLoRA preset trained on N GPUs with random weights ("" skips)
    qlora_steps: int = 10  # its optimizer steps
    phase_timeout_s: int = 900  # a phase that runs longer is stopped (its error is recorded, the rest go on)
    extra: str = ""  # JSON of TrainConfig fields for every phase, e.g. '{"gradient_checkpointing": false}'
    gpu_sampling_ms: int = 500  # nvidia-smi samples clocks, power and load this often during each phase (0 = off)
    profile: bool = False  # time every step's phases per process (profile_steps) and add their side-by-side table
    phase: str = ""  # internal: run one phase (JSON) in this process and print its result


# ---------------------------------------------------------------- one phase (a fresh process)


def model_folder(name: str, work: Path, tokenizer_dir: Path) -> Path:
    """A folder the project's checks accept for ``name``'s random-weight network: config, SmolLM2's tokenizer and a
    placeholder weights file (never read: the phase builds the weights)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    folder = work / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    common.make_config(name, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "model.safetensors").touch()
    return folder


def patch_random_weights(name: str, folder: Path) -> None:
    """``models.load_model`` builds ``name``'s network with random weights on the process's own device (4-bit when the
    preset says so) instead of reading the folder. The launcher forks its workers, so they inherit the patch."""
    import check_architectures as arch
    from transformers import AutoConfig

    from kaggle_utils import models

    config = AutoConfig.from_pretrained(str(folder))

    def load_random(preset, path, load_in_4bit=False, dtype=None, num_gpus=None, max_memory_gib=None,
                    for_training=False):
        import torch

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        qcfg = models.quantization_config(preset) if load_in_4bit else None
        return arch.build_random(name, config, qcfg, device=device, dtype=None if load_in_4bit else dtype)

    models.load_model = load_random


STEP_TIMES = "step_times_rank{rank}.jsonl"  # per process: when each optimizer step began, its micro steps, its end


def patch_step_timer() -> None:
    """``training.build_trainer`` adds a callback that writes, in every process, the wall-clock times of each optimizer
    step's start, its accumulation micro steps and its end (``STEP_TIMES`` in the run folder): where a data-parallel
    step's time goes, per process. Forked workers inherit the patch. transformers' trainer module is imported in the
    worker only: it imports bitsandbytes, and accelerate refuses to fork a process that has."""
    from kaggle_utils import training

    build = training.build_trainer

    def build_timed(cfg, *args, **kwargs):
        from transformers import TrainerCallback

        class StepTimer(TrainerCallback):
            def __init__(self, path: Path):
                self.path, self.events = path, []

            def on_step_begin(self, args, state, control, **kwargs):
                self.events = [time.time()]

            def on_substep_end(self, args, state, control, **kwargs):
                self.events.append(time.time())

            def on_step_end(self, args, state, control, **kwargs):
                with open(self.path, "a") as fh:
                    fh.write(json.dumps({"step": state.global_step, "times": self.events + [time.time()]}) + "\n")

        trainer = build(cfg, *args, **kwargs)
        rank = int(os.environ.get("RANK", "0"))
        trainer.add_callback(StepTimer(cfg.run_dir / STEP_TIMES.format(rank=rank)))
        return trainer

    training.build_trainer = build_timed


def run_phase(spec: dict) -> dict:
    """Train one (model, processes) phase through ``distributed.launch``; what its metrics log and step times say."""
    import yaml

    from kaggle_utils import artifacts, config, distributed, models, training

    config.setup_logging()
    values = yaml.safe_load((common.REPO / spec["recipe"]).read_text())
    values.update(spec["overrides"])
    if spec["random_weights"]:
        patch_random_weights(spec["model"], Path(values["base_model_path"]))
    patch_step_timer()
    cfg = training.TrainConfig(**values)
    training.prepare_run(cfg)
    t0 = time.perf_counter()
    state = distributed.launch(cfg)
    seconds = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (cfg.run_dir / training.METRICS_FILE).read_text().splitlines() if ln.strip()]
    ranks = {int(p.stem.rsplit("rank", 1)[1]): [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
             for p in sorted(cfg.run_dir.glob(STEP_TIMES.format(rank="*")))}
    profiled = {}
    if cfg.profile_steps:  # each process's step_profile_rank<R>.json
        profiled = {"step_profile": {int(p.stem.rsplit("rank", 1)[1]): json.loads(p.read_text())
                                     for p in sorted(cfg.run_dir.glob(artifacts.STEP_PROFILE_FILE.format(rank="*")))}}
    return {**measure(rows, cfg.batch_size), **profiled, "per_process": {r: step_split(ev) for r, ev in ranks.items()},
            "launch_s": round(seconds, 1), "final": state,
            "lora_moved": lora_moved(state.get("checkpoint")), "gpu": gpu_name(),
            "recipe": spec["recipe"], "config": {k: values[k] for k in sorted(spec["overrides"])},
            "preset": cfg.preset, "load_in_4bit": cfg.load_in_4bit, "lora_r": cfg.lora_r,
            "micro_batch_size": cfg.micro_batch_size, "accumulation": training.batch_split(cfg, cfg.num_processes)[1],
            "models_num_gpus_seen": models.gpu_count()}


def measure(rows: list[dict], batch_size: int) -> dict:
    """samples/s over steps 2..last from the logged wall-clock times; the loss per step; evals; peak memory."""
    train = [r for r in rows if "loss" in r and "time" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    out = {"losses": [(r["step"], r["loss"]) for r in train], "eval_losses": evals,
           "gpu_peak_gib": max((r["gpu_peak_gib"] for r in rows if "gpu_peak_gib" in r), default=None)}
    if len(train) >= 2:
        first, last = train[0], train[-1]
        steps = last["step"] - first["step"]
        seconds = last["time"] - first["time"]
        out.update(timed_steps=steps, timed_s=round(seconds, 2), s_per_step=seconds / steps,
                   samples_per_s=steps * batch_size / seconds)
    return out


def step_split(events: list[dict]) -> dict:
    """One process's median seconds per optimizer step (steps 2..), per micro step before the last, and for the last
    micro step with the optimizer step (where data-parallel processes wait for each other's gradients)."""
    import statistics

    later = [e["times"] for e in events if e["step"] >= 2 and len(e["times"]) >= 2]
    if not later:
        return {}
    micro = [b - a for t in later for a, b in zip(t[:-2], t[1:-1])]
    return {"steps": len(later), "s_per_step": statistics.median(t[-1] - t[0] for t in later),
            "s_per_micro_step": statistics.median(micro) if micro else None,
            "s_last_micro_and_optimizer": statistics.median(t[-1] - t[-2] for t in later)}


def lora_moved(checkpoint: str | None) -> bool | None:
    """True when some LoRA B matrix of the final adapter is non-zero (B starts at zero)."""
    if not checkpoint:
        return None
    from safetensors.torch import load_file

    tensors = load_file(str(Path(checkpoint) / "adapter_model.safetensors"))
    return any(float(t.abs().sum()) > 0 for n, t in tensors.items() if "lora_B" in n)


def gpu_name() -> str:
    """The first visible card's name, or "cpu"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- the run (never touches CUDA itself)


def phase_spec(cfg: Config, model: str, processes: int, steps: int, work: Path, folders: dict) -> dict:
    """The phase's recipe file and what it overrides: base folder, steps, batch, split, logging, processes."""
    import yaml

    recipe = RECIPES[model]
    values = yaml.safe_load((common.REPO / recipe).read_text())
    preset = TINY_PRESET if model == "tiny" else model
    biggest = max(cfg.processes, processes)
    micro = min(int(values.get("micro_batch_size", 4)), cfg.batch_size // biggest)
    overrides = dict(preset=preset, base_model_path=str(folders[model]), run_name=f"{model}-{processes}gpu",
                     runs_dir=str(work / "runs"), max_steps=steps, save_steps=steps, logging_steps=1,
                     batch_size=cfg.batch_size, micro_batch_size=micro, val_rows=cfg.val_rows, report_rows=0,
                     warmup_steps=min(int(values.get("warmup_steps", 0)), steps // 4), num_processes=processes)
    if cfg.profile:
        overrides["profile_steps"] = steps
    overrides.update(json.loads(cfg.extra) if cfg.extra else {})
    return {"model": model, "recipe": recipe, "random_weights": model != "smollm2-135m", "overrides": overrides}


def run_in_child(spec: dict, gpus: int, out: Path, timeout_s: int, sampling_ms: int = 0) -> dict:
    """One phase in a fresh Python that sees ``gpus`` cards, in a fresh run folder (never a resumed one); its log goes
    to ``out/<run_name>.log``. A phase past ``timeout_s`` is stopped with every worker it forked."""
    import shutil
    import signal

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpus == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    run_dir = Path(spec["overrides"]["runs_dir"]) / spec["overrides"]["run_name"]
    shutil.rmtree(run_dir, ignore_errors=True)  # an old run's checkpoints would be resumed, its metrics re-read
    log = out / f"{spec['overrides']['run_name']}.log"
    sampler = gpu_sampler(out / f"{spec['overrides']['run_name']}.gpu.csv", sampling_ms)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--phase", json.dumps(spec)], cwd=common.REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the phase and the training workers it forked
        text, _ = proc.communicate()
        text, rc = f"{text}\nstopped after {timeout_s} s", "timeout"
    if sampler:
        sampler.terminate()
        sampler.wait()
    log.write_text(text)
    found = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(found[-1][7:]) if found and rc == 0 else {"error": f"rc {rc}", "tail": text[-3000:]}
    result["phase_s"] = round(time.perf_counter() - t0, 1)
    result["gpus_under_load"] = gpu_load_summary(out / f"{spec['overrides']['run_name']}.gpu.csv")
    return result


def gpu_sampler(path: Path, every_ms: int):
    """nvidia-smi writing each card's SM clock, power and load every ``every_ms`` to ``path`` (None without it)."""
    import shutil

    if not every_ms or not shutil.which("nvidia-smi"):
        return None
    with open(path, "w") as fh:  # the child keeps its own handle
        return subprocess.Popen(["nvidia-smi", "--query-gpu=index,clocks.sm,power.draw,utilization.gpu",
                                 "--format=csv,noheader,nounits", f"-lms={every_ms}"],
                                stdout=fh, stderr=subprocess.DEVNULL)


def gpu_load_summary(path: Path) -> dict:
    """Per card, the median SM clock (MHz) and power (W) over the samples where it was over 50% busy."""
    import statistics

    if not path.exists():
        return {}
    busy: dict = {}
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            index, clock, power, load = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
        except (ValueError, IndexError):
            continue
        if load > 50:
            busy.setdefault(index, []).append((clock, power))
    return {i: {"samples": len(v), "sm_mhz": statistics.median(c for c, _ in v),
                "watts": statistics.median(w for _, w in v)} for i, v in busy.items()}


def main(cfg: Config) -> dict:
    from kaggle_utils import models

    if len(cfg.steps) != len(cfg.models) or not all(str(n).isdigit() and int(n) > 0 for n in cfg.steps):
        raise SystemExit(f"--steps needs one positive number per model: models {cfg.models}, steps {cfg.steps}")
    if cfg.qlora and cfg.qlora in cfg.models:
        raise SystemExit(f"--qlora {cfg.qlora} is also in --models: the two phases would share a run folder")
    rec = common.Recorder(Path(cfg.out), cfg)
    out = Path(cfg.out)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    smollm = models.prepare_default_model()  # on the CPU: the parent stays CUDA-free for the launcher's fork
    names = list(dict.fromkeys(list(cfg.models) + ([cfg.qlora] if cfg.qlora else [])))
    folders = {m: smollm if m == "smollm2-135m" else model_folder(m, work, smollm) for m in names}
    results: dict = {}
    for model, steps in zip(cfg.models, cfg.steps):
        for n in dict.fromkeys([1, cfg.processes]):
            key = f"{model}/{n}"
            results[key] = run_in_child(phase_spec(cfg, model, n, int(steps), work, folders), n, out,
                                        cfg.phase_timeout_s, cfg.gpu_sampling_ms)
            rec.put(key, results[key])
    if cfg.qlora:
        key = f"{cfg.qlora}/{cfg.processes} (QLoRA)"
        results[key] = run_in_child(phase_spec(cfg, cfg.qlora, cfg.processes, cfg.qlora_steps, work, folders),
                                    cfg.processes, out, cfg.phase_timeout_s, cfg.gpu_sampling_ms)
        rec.put(key, results[key])
    summary = summarize(cfg, results)
    rec.put("summary", summary)
    plot_losses(cfg, results, out / "loss_curves.png")
    md = render_table(cfg, summary)
    if cfg.profile:
        md += render_profile(summary)
    (out / "results.md").write_text(md)
    print(md)
    return rec.data


def summarize(cfg: Config, results: dict) -> dict:
    """Per model: samples/s on 1 and N, the speed-up, and how far the N-process losses are from the 1-process ones."""
    rows = []
    for key, r in results.items():
        model, n = key.split("/")[0], int(key.split("/")[1].split()[0])
        row = {"phase": key, "model": model, "processes": n, "error": r.get("error")}
        for k in ("samples_per_s", "s_per_step", "gpu_peak_gib", "phase_s", "micro_batch_size", "accumulation",
                  "load_in_4bit", "lora_moved", "gpu", "timed_steps", "per_process", "gpus_under_load"):
            row[k] = r.get(k)
        losses = r.get("losses") or []
        row["final_loss"] = losses[-1][1] if losses else None
        row["eval_losses"] = r.get("eval_losses")
        if r.get("step_profile"):
            row["step_profile"] = {rank: profile_split(p) for rank, p in r["step_profile"].items()}
        one = results.get(f"{model}/1")
        if n != 1 and one and one.get("samples_per_s") and r.get("samples_per_s"):
            row["x_one_gpu"] = r["samples_per_s"] / one["samples_per_s"]
            a, b = dict(map(tuple, one.get("losses", []))), dict(map(tuple, losses))
            common_steps = sorted(set(a) & set(b))
            if common_steps:
                diffs = [abs(a[s] - b[s]) for s in common_steps]
                row["loss_vs_one_gpu"] = {"steps": len(common_steps), "max_abs_diff": max(diffs),
                                          "mean_abs_diff": sum(diffs) / len(diffs),
                                          "mean_loss": sum(a[s] for s in common_steps) / len(common_steps)}
        rows.append(row)
    return {"card": next((r.get("gpu") for r in results.values() if r.get("gpu")), None), "rows": rows}


def plot_losses(cfg: Config, results: dict, path: Path) -> None:
    """Train loss per optimizer step, 1 GPU against N, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in cfg.models if any(results.get(f"{m}/{n}", {}).get("losses") for n in (1, cfg.processes))]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, model in zip(axes[0], panels):
        for n, style in ((1, "-"), (cfg.processes, "--")):
            losses = results.get(f"{model}/{n}", {}).get("losses")
            if losses:
                ax.plot([s for s, _ in losses], [v for _, v in losses], style, label=f"{n} GPU(s)", alpha=0.8)
        ax.set_title(f"{model}: train loss, 1 vs {cfg.processes} GPUs")
        ax.set_xlabel(f"optimizer step (effective batch {cfg.batch_size}, the same rows)")
        ax.set_ylabel("loss (answer tokens)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_table(cfg: Config, summary: dict) -> str:
    """The summary as the Markdown table of BENCHMARKS.md."""
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = [f"Card: {summary['card']}. Effective batch {cfg.batch_size}; samples/s over optimizer steps 2..last "
             "(loading and the evaluations excluded); peak memory of the main process.", "",
             "| model | GPUs | micro x accumulation | samples/s | x 1 GPU | s/step | peak GiB/GPU | loss vs 1 GPU "
             "(max abs diff, steps) | final train loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        if r["error"]:
            lines.append(f"| {r['phase']} | {r['processes']} | error: {r['error']} | | | | | | |")
            continue
        lv = r.get("loss_vs_one_gpu")
        agree = f"{lv['max_abs_diff']:.4f} ({lv['steps']})" if lv else "-"
        name = r["model"] + (" (QLoRA, 4-bit)" if r["load_in_4bit"] else "")
        lines.append(f"| {name} | {r['processes']} | {r['micro_batch_size']} x {r['accumulation']} | "
                     f"{fmt(r['samples_per_s'], '{:.1f}')} | {fmt(r.get('x_one_gpu'), '{:.2f}x')} | "
                     f"{fmt(r['s_per_step'], '{:.3f}')} | {fmt(r['gpu_peak_gib'], '{:.1f}')} | "
                     f"{agree} | "
                     f"{fmt(r['final_loss'], '{:.4f}')} |")
    lines += ["", "Where each process's step goes (medians over steps 2..last; the last micro step holds the gradient "
              "all-reduce and the optimizer step), and the cards under load (nvidia-smi, samples over 50% busy):", "",
              "| phase | process | s/step | s per micro step | s last micro step + optimizer | card: SM MHz, W |",
              "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        cards = r.get("gpus_under_load") or {}
        for rank, t in sorted((r.get("per_process") or {}).items(), key=lambda kv: int(kv[0])):
            card = cards.get(str(rank)) or cards.get(int(rank)) or {}  # JSON turned the card indices into text
            card_text = f"{card['sm_mhz']:.0f} MHz, {card['watts']:.0f} W" if card else "-"
            lines.append(f"| {r['phase']} | {rank} | {fmt(t.get('s_per_step'), '{:.3f}')} | "
                         f"{fmt(t.get('s_per_micro_step'), '{:.3f}')} | "
                         f"{fmt(t.get('s_last_micro_and_optimizer'), '{:.3f}')} | {card_text} |")
    return "\n".join(lines) + "\n"


# The profile's phases of a training step, in the table's order (kaggle_utils.callbacks.STEP_PHASES says what each
# holds); evaluations and saves are shown apart, in seconds each, as samples/s leaves them out.
STEP_PHASE_ROWS = {"data": "data: next batches + token-count gather", "forward_backward": "forward + backward",
                   "ddp_pre_forward": "DDP pre-forward (buffer broadcast)",
                   "grad_allreduce": "gradient all-reduce (with the wait)", "optimizer": "optimizer step",
                   "log": "train-loss log (loss gather)"}


def profile_split(profile: dict) -> dict:
    """One process's step profile over optimizer steps 2..last (step 1 holds the warm-up), as samples/s counts them:
    seconds a step in each phase and its share of the step, forward + backward a micro step (N processes take fewer
    micro steps a step), evaluations and saves in seconds each."""
    steps = [r for r in profile.get("per_step", []) if r["step"] >= 1]  # step 0: the evaluation before training
    rows = [r for r in steps if r["step"] >= 2] or steps
    totals = {p: sum(r.get(p, 0.0) for r in rows) for p in STEP_PHASE_ROWS}
    step = sum(totals.values())
    micro_steps = len(rows) * profile.get("gradient_accumulation_steps", 0)
    phases = profile.get("phases", {})
    each = lambda p: phases[p]["mean_s"] if phases.get(p, {}).get("count") else None  # noqa: E731
    return {"steps": len(rows), "s_per_step": step / len(rows) if rows else None,
            "phases": {p: t / len(rows) for p, t in totals.items()} if rows else {},
            "shares": {p: t / step for p, t in totals.items()} if step > 0 else {},
            "forward_backward_per_micro_s": totals["forward_backward"] / micro_steps if micro_steps else None,
            "evaluate_s": each("evaluate"), "save_s": each("save"),
            "torch_threads": profile.get("torch_threads"), "process_threads": profile.get("process_threads")}


def render_profile(summary: dict) -> str:
    """Each model's step profile as one Markdown table: 1 process against each process of N, phase by phase."""
    lines = ["", "Where each process's step goes (`--profile`): seconds a step over optimizer steps 2..last (share of "
             "the step). Every phase boundary waits for the card, so a profiled step runs a little slower than the "
             "speed table's; the waits for another process sit in the collectives (token-count gather, buffer "
             "broadcast, all-reduce, loss gather)."]
    for model in dict.fromkeys(r["model"] for r in summary["rows"]):
        columns = [(f"{r['processes']} process{'es' if r['processes'] > 1 else ''}"
                    + (f", rank {rank}" if r["processes"] > 1 else ""), split)
                   for r in summary["rows"] if r["model"] == model and r.get("step_profile")
                   for rank, split in sorted(r["step_profile"].items(), key=lambda kv: int(kv[0]))]
        if not columns:
            continue
        lines += ["", f"| {model}: phase | " + " | ".join(c for c, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for phase, label in STEP_PHASE_ROWS.items():
            cells = [f"{t['phases'][phase]:.3f} ({t['shares'].get(phase, 0):.0%})" if t["phases"] else "-"
                     for _, t in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines += ["| **step** | " + " | ".join(f"**{fmt(t['s_per_step'])}**" for _, t in columns) + " |",
                  "| forward + backward, s a micro step | " + " | ".join(fmt(t["forward_backward_per_micro_s"])
                                                                    for _, t in columns) + " |",
                  "| evaluation, s each | " + " | ".join(fmt(t["evaluate_s"]) for _, t in columns) + " |",
                  "| checkpoint save, s each | " + " | ".join(fmt(t["save_s"]) for _, t in columns) + " |",
                  "| CPU threads: torch / process | " + " | ".join(f"{t['torch_threads']} / {t['process_threads']}"
                                                               for _, t in columns) + " |"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> Config:
    return common.parse_config(Config, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    args = parse_args()
    if args.phase:
        print("RESULT " + json.dumps(run_phase(json.loads(args.phase)), default=str), flush=True)
    else:
        main(args)
