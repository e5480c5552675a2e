"""The submission notebook end to end on a full-size model shape: the adapter served as a LoRARequest against merged
into a copy of the base at kernel start, each with the settings a Kaggle T4 gets (or any you force), in one run.

Usage (on a GPU box; writes results.json and results.md to --out):
    python benchmarks/kernel_e2e.py --out runs/bench/kernel_e2e
The T4's code path on a newer card (what the rendered kernel does on Kaggle's 2xT4):
    python benchmarks/kernel_e2e.py --dtype float16 --attention_backend TRITON_ATTN --enforce_eager on
CPU smoke test of the whole script (tiny model, a few rows, the HF engine, no merge):
    python benchmarks/kernel_e2e.py --model tiny --rows 8 --engine hf --arms lora --n 1 --out runs/bench/e2e-tiny

Workload: the model shape with random weights and a rank-1 LoRA adapter on the preset's modules (folders written
once under --work_dir), ``rows`` test rows whose prompt lengths are drawn from the real distribution
(``benchmarks/prompt_lengths.json``; the word-level stand-in tokenizer of ``_common``, so a row's length is its
number of words), every row ``max_new_tokens`` new tokens long (EOS is never emitted).

Each arm runs ``notebooks/inference.ipynb`` headless with papermill, as ``make infer`` does: the plan holds one model
entry per ``n`` (same base and adapter), sampled one after the other. Arm ``lora``: ``merge_adapters=off``. Arm
``merge``: ``merge_adapters=on`` into a fresh ``merge_dir``, so the first entry pays the merge and the next reuse the
merged folder. The sampling table (``sampling.csv``) gives each entry's merge, engine-start and sampling seconds; the
end-to-end time of a plan of one entry is merge + start + sampling (the merge counted for every n). The arms run
in the order given; the first pays the cold read of the base folder, so run them twice (``--arms lora merge lora``)
to see it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as common  # noqa: E402  (benchmarks/ is not a package; _common puts the repo on sys.path)


@dataclass
class Config:
    """One benchmark run."""

    out: str = "runs/bench/kernel_e2e"  # results folder (each arm's notebook, log and submission under it)
    work_dir: str = "/tmp/kaggle_utils_bench"  # where the random model, adapter and test file are written
    model: str = "mistral-7b"  # a name in benchmarks/_common.py REAL_CONFIGS ("tiny" for a CPU smoke test)
    preset: str = "mistral-7b"  # the project preset whose chat template and LoRA modules the plan uses
    rows: int = 1300  # test rows, like the hidden test set
    n: list = field(default_factory=lambda: [1, 4])  # predictions per row: one plan entry each
    arms: list = field(default_factory=lambda: ["lora", "merge"])  # lora | merge, run in this order
    engine: str = "vllm"  # the notebook's engine (hf for the CPU smoke test)
    dtype: str = "auto"  # the notebook's dtype: auto | float16 (the T4's) | bfloat16
    attention_backend: str = "auto"  # vLLM attention backend: auto | e.g. TRITON_ATTN (the T4's)
    enforce_eager: str = "auto"  # vLLM eager mode: auto | on (the T4's) | off
    max_new_tokens: int = 32  # new tokens per prediction
    temperature: float = 0.7  # sampled, as the submissions sample
    top_p: float = 0.95
    lengths_file: str = "benchmarks/prompt_lengths.json"  # real prompt-token lengths to draw from
    seed: int = 0

    def __post_init__(self):
        self.n = [int(x) for x in self.n]  # from the command line they come as strings


def build_workload(cfg: Config) -> tuple[Path, Path, Path]:
    """(base folder, adapter folder, test CSV), written once under ``work_dir``."""
    import random

    import pandas as pd
    import torch

    from kaggle_utils import models

    work = Path(cfg.work_dir) / cfg.model
    base_dir, adapter_dir, test_file = work / "base", work / "adapter", work / f"test-{cfg.rows}.csv"
    if not (base_dir / "config.json").exists() or not (adapter_dir / "adapter_config.json").exists():
        cuda = torch.cuda.is_available()
        model = common.build_random_model(cfg.model, device="cuda" if cuda else "cpu",
                                          dtype=torch.float16 if cuda else torch.float32)
        if not (base_dir / "config.json").exists():
            common.save_model_folder(model, common.word_tokenizer(model.config.vocab_size), base_dir)
        from peft import LoraConfig, get_peft_model

        lora = get_peft_model(model, LoraConfig(r=1, lora_alpha=16, init_lora_weights=False,
                                                target_modules=list(models.get_preset(cfg.preset).lora_target_modules)))
        lora.save_pretrained(str(adapter_dir))
        del lora, model
        import gc

        gc.collect()
        torch.cuda.empty_cache()  # the notebook's vLLM wants the card's memory
    if not test_file.exists():
        lengths = json.loads((common.REPO / cfg.lengths_file).read_text())["prompt_tokens"]
        rng = random.Random(cfg.seed)
        vocab = int(json.loads((base_dir / "config.json").read_text())["vocab_size"])
        words = lambda k: " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(max(1, k)))  # noqa: E731
        rows = []
        for i in range(cfg.rows):
            n = max(rng.choice(lengths) - 40, 4)  # the chat template and instructions take about 40 tokens
            half = round(n * 0.55)
            rows.append({"id": f"r{i}", "original_text": words(half), "rewritten_text": words(n - half)})
        pd.DataFrame(rows).to_csv(test_file, index=False)
    return base_dir, adapter_dir, test_file


def run_arm(cfg: Config, arm: str, index: int, base_dir: Path, adapter_dir: Path, test_file: Path) -> dict:
    """One headless run of the submission notebook; its sampling table, wall time and submission check."""
    import pandas as pd

    out = Path(cfg.out) / f"{index}-{arm}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    merge_dir = Path(cfg.work_dir) / f"merged-{index}"
    if merge_dir.exists():
        shutil.rmtree(merge_dir)  # every merge arm pays its merge
    plan = [{"name": f"n{n}", "preset": cfg.preset, "base_model": str(base_dir), "adapter": str(adapter_dir),
             "n": n, "temperature": cfg.temperature, "top_p": cfg.top_p, "greedy_first": False} for n in cfg.n]
    params = {"test_file": str(test_file), "submission_path": str(out / "submission.csv"), "run_dir": str(out / "run"),
              "models": plan, "engine": cfg.engine, "dtype": cfg.dtype, "attention_backend": cfg.attention_backend,
              "enforce_eager": cfg.enforce_eager, "merge_adapters": "on" if arm == "merge" else "off",
              "merge_dir": str(merge_dir), "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    (out / "params.json").write_text(json.dumps(params, indent=2))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "papermill", "notebooks/inference.ipynb", str(out / "inference.ipynb"),
                           "-f", str(out / "params.json"), "--cwd", str(common.REPO), "--log-output"],
                          cwd=common.REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    result: dict = {"arm": arm, "rc": proc.returncode, "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        result["error"] = (proc.stdout + proc.stderr)[-3000:]
        return result
    table = pd.read_csv(out / "run" / "sampling.csv")
    result["models"] = table.to_dict(orient="records")
    sub = pd.read_csv(out / "submission.csv", keep_default_na=False)
    test = pd.read_csv(test_file)
    result["submission_ok"] = bool(sorted(sub["id"]) == sorted(test["id"]) and sub["rewrite_prompt"].str.strip().all())
    log = proc.stdout + proc.stderr
    result["vllm_settings"] = next((line.split("starting vLLM", 1)[1][:600] for line in log.splitlines()
                                    if "starting vLLM" in line), "")
    result["merged_folder_gib"] = round(sum(f.stat().st_size for f in merge_dir.rglob("*") if f.is_file()) / 2**30, 2) \
        if merge_dir.exists() else 0.0
    return result


def end_to_end(results: list[dict]) -> list[dict]:
    """One line per arm and n: merge + start + sampling seconds of a plan holding that entry alone."""
    lines = []
    for r in results:
        if r.get("rc"):
            continue
        merge_s = max((m.get("merge_s") or 0.0) for m in r["models"])  # the first entry merged, the others reused
        for m in r["models"]:
            total = merge_s + m["load_s"] + m["seconds"]
            lines.append({"arm": r["arm"], "model": m["model"], "engine": m["engine"], "rows": m["rows"],
                          "n": m["n_used"], "merge_s": merge_s, "start_s": m["load_s"], "sampling_s": m["seconds"],
                          "rows_per_s": m["rows_per_s"], "end_to_end_s": round(total, 1)})
    return lines


def render(cfg: Config, card: str, lines: list[dict], results: list[dict]) -> str:
    md = [f"Card: {card}. Model: {cfg.model} shape, random weights, rank-1 adapter; {cfg.rows} rows, "
          f"{cfg.max_new_tokens} new tokens; engine {cfg.engine}, dtype {cfg.dtype}, "
          f"attention {cfg.attention_backend}, eager {cfg.enforce_eager}.", "",
          "| arm | n | merge s | engine start s | sampling s | rows/s | end to end s |",
          "|---|---|---|---|---|---|---|"]
    for x in lines:
        md.append(f"| {x['arm']} ({x['engine']}) | {x['n']} | {x['merge_s']:.0f} | {x['start_s']:.0f} | "
                  f"{x['sampling_s']:.0f} | {x['rows_per_s']:.2f} | {x['end_to_end_s']:.0f} |")
    for r in results:
        if r.get("rc"):
            md.append(f"\n{r['arm']}: failed (rc {r['rc']}), see its log.txt")
    return "\n".join(md) + "\n"


def main(cfg: Config) -> dict:
    import torch

    rec = common.Recorder(Path(cfg.out), cfg)
    rec.put("environment", common.environment())
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    t0 = time.perf_counter()
    base_dir, adapter_dir, test_file = build_workload(cfg)
    rec.put("workload_s", round(time.perf_counter() - t0, 1))
    results = []
    for i, arm in enumerate(cfg.arms):
        if arm not in ("lora", "merge"):
            raise SystemExit(f"--arms: unknown arm '{arm}' (lora | merge)")
        results.append(run_arm(cfg, arm, i, base_dir, adapter_dir, test_file))
        rec.put(f"arm_{i}_{arm}", results[-1])
    lines = end_to_end(results)
    rec.put("end_to_end", lines)
    md = render(cfg, card, lines, results)
    (Path(cfg.out) / "results.md").write_text(md)
    print(md)
    return rec.data


if __name__ == "__main__":
    main(common.parse_config(Config, __doc__.split("\n")[0]))
