"""Checkpoint-selection rules compared on the rows that chose nothing: which step would each rule pick from a run's
choice-row curve, and what does that step score on the run's report rows?

Usage: python research/selection_rules.py RUN [RUN ...] [--choice-dir selection-choice] [--average]

Each RUN folder needs its choice rows scored by step (``make select RUN=...``, then that ``selection/`` copied to
``selection-choice/``) and its report rows scored by step (``make select RUN=... SELECT_ARGS="-r validation_file
runs/RUN/report.csv"`` writes ``report_by_step.json``). The rules:

- ``best``: the highest mean on the choice rows (the earlier step on ties), the select stage's rule;
- ``smooth3`` / ``smooth5``: the highest mean of each step with its neighbours (3 or 5 scored checkpoints);
- ``latest_1se``: the latest step whose mean is within one standard error (over prompt groups, paired) of the best;
- ``avg5`` (with ``--average``): the adapters of the 5 checkpoints around the ``smooth5`` peak averaged into one, as
  a concatenation (rank 5r, lora_alpha 5x, each B scaled 1/5: exactly the mean of their weight updates).
  Written to ``RUN/averaged/avg5/`` with a ``selection.json`` copied from ``selected/``; score it with the inference
  notebook (``adapter_path``), since no step of the report curve holds it.

Writes ``RUN/selection_rules.json`` and prints one row per run and rule.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils import data


def read_choice(run: Path, choice_dir: str) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Per-step per-row SCS on the choice rows, and each row's prompt group (from validation.csv by id)."""
    folder = run / choice_dir
    files = sorted(folder.glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise SystemExit(f"{folder}: no step-N.json (copy selection/ there after `make select RUN={run.name}`)")
    val = pd.read_csv(run / "validation.csv", dtype={"id": str}).set_index("id")
    per_step, ids = {}, None
    for f in files:
        entry = json.loads(f.read_text())
        if ids is None:
            ids = entry["ids"]
        elif entry["ids"] != ids:
            raise SystemExit(f"{f}: scored other rows than the other steps")
        per_step[int(entry["step"])] = np.asarray(entry["scs"], dtype=float)
    groups = val.loc[ids, "rewrite_prompt"].map(data.normalize_prompt).to_numpy()
    return per_step, groups


def read_report(run: Path) -> dict[int, float]:
    """The report rows' mean SCS by step (``report_by_step.json``)."""
    path = run / "report_by_step.json"
    if not path.exists():
        raise SystemExit(f"{path}: missing (make select RUN={run.name} SELECT_ARGS=\"-r validation_file "
                         f"runs/{run.name}/report.csv\")")
    return {int(s): float(v) for s, v in json.loads(path.read_text())["scores"].items()}


def smoothed(means: dict[int, float], width: int) -> dict[int, float]:
    """Each checkpoint's mean with its ``width`` scored neighbours on either side (step 0, the base model, is not a
    neighbour); at the ends, the neighbours there are."""
    steps = sorted(s for s in means if s > 0)
    return {s: float(np.mean([means[t] for t in steps[max(0, i - width):i + width + 1]])) for i, s in enumerate(steps)}


def _argmax(scores: dict[int, float]) -> int:
    best = max(scores.values())
    return min(s for s, v in scores.items() if v >= best - 1e-9)


def latest_within_se(per_step: dict[int, np.ndarray], groups: np.ndarray) -> int:
    """The latest checkpoint whose mean is within one paired standard error (over prompt groups) of the best's."""
    means = {s: float(v.mean()) for s, v in per_step.items() if s > 0}
    best = _argmax(means)
    frame = pd.DataFrame({s: v for s, v in per_step.items() if s > 0})
    by_group = frame.groupby(groups).mean()
    eligible = []
    for s in means:
        d = by_group[s] - by_group[best]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        if means[s] >= means[best] - se:
            eligible.append(s)
    return max(eligible)


def choose(per_step: dict[int, np.ndarray], groups: np.ndarray) -> dict[str, int]:
    """Every rule's step."""
    means = {s: float(v.mean()) for s, v in per_step.items()}
    return {"best": _argmax(means), "smooth3": _argmax(smoothed(means, 1)), "smooth5": _argmax(smoothed(means, 2)),
            "latest_1se": latest_within_se(per_step, groups)}


def window(steps: list[int], center: int, k: int) -> list[int]:
    """The ``k`` checkpoints nearest ``center`` in step order (shifted inward at the ends)."""
    ckpts = sorted(s for s in steps if s > 0)
    i = ckpts.index(center)
    lo = min(max(0, i - k // 2), max(0, len(ckpts) - k))
    return ckpts[lo:lo + k]


def average_adapters(run: Path, steps: list[int], out: Path) -> Path:
    """One adapter whose weight update is the mean of those of ``checkpoint-<step>`` for ``steps``: the LoRA factors
    concatenated along the rank (A stacked, B side by side and divided by k), lora_alpha times k so the scaling
    alpha / r stays the same."""
    from safetensors.torch import load_file, save_file
    import torch

    k = len(steps)
    tensors = [load_file(run / f"checkpoint-{s}" / "adapter_model.safetensors") for s in steps]
    merged = {}
    for name in tensors[0]:
        parts = [t[name] for t in tensors]
        if "lora_A" in name:
            merged[name] = torch.cat(parts, dim=0).contiguous()
        elif "lora_B" in name:
            merged[name] = (torch.cat(parts, dim=1) / k).contiguous()
        else:
            merged[name] = torch.stack(parts).mean(0)
    cfg = json.loads((run / f"checkpoint-{steps[0]}" / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * k
    cfg["r"] = cfg["r"] * k
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(merged, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    selection = json.loads((run / "selected" / "selection.json").read_text())
    selection.update(step=steps[len(steps) // 2], averaged_steps=steps, checkpoint=None)
    (out / "selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--choice-dir", default="selection-choice", help="the choice rows' step-N.json, in each run")
    parser.add_argument("--average", action="store_true", help="also write the averaged adapter of avg5")
    args = parser.parse_args()
    rows = []
    for name in args.runs:
        run = Path(name)
        per_step, groups = read_choice(run, args.choice_dir)
        report = read_report(run)
        picks = choose(per_step, groups)
        found = {}
        for rule, step in picks.items():
            found[rule] = {"step": step, "choice": round(float(per_step[step].mean()), 4),
                           "report": round(report[step], 4) if step in report else None}
        if args.average:
            steps = window(list(per_step), picks["smooth5"], 5)
            out = average_adapters(run, steps, run / "averaged" / "avg5")
            found["avg5"] = {"steps": steps, "adapter": str(out)}
        (run / "selection_rules.json").write_text(json.dumps(found, indent=2) + "\n")
        rows += [{"run": run.name, "rule": r, **v} for r, v in found.items()]
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
