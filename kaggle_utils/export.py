"""What the select stage writes to ``runs/<run>/selected/``: the chosen checkpoints as one adapter (the exact mean of
their updates when there are several, :func:`average_adapters`), ``selection.json``, the merged copy with
``export_merged``, and the plot and table of the choice.

The steps were scored and chosen by :mod:`kaggle_utils.checkpoints`; the inference stage reads the folder this module
writes (:class:`kaggle_utils.artifacts.Selection`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from . import adapters, artifacts, checkpoints, data, models
from .config import ConfigError, project_root, read_json_object, require, resolve_path

logger = logging.getLogger("kaggle_utils")

ADAPTER_FILES = artifacts.ADAPTER_FILES


# ---------------------------------------------------------------- one adapter from several checkpoints


def average_adapters(folders: list[Path], out: Path) -> Path:
    """One LoRA adapter in ``out`` whose weight update is exactly the mean of the updates of the adapters in
    ``folders``: their factors concatenated along the rank (the A matrices stacked, the B matrices side by side and
    divided by their count) with ``r`` and ``lora_alpha`` multiplied by the count, so the scaling alpha / r stays.
    Merged, it costs what one adapter costs; unmerged, its rank is the count times the rank.

    Any count works (an odd one is the window rule's, :func:`kaggle_utils.checkpoints.choose_window`; a soup of two
    seeds' best steps is two). Refused, naming the folder: per-module ranks or alphas, rsLoRA, DoRA, adapters of
    another ``r`` or ``lora_alpha`` than the first, and adapters whose tensors differ in name or shape."""
    import torch
    from safetensors.torch import load_file, save_file

    k = len(folders)
    configs = [read_json_object(Path(f) / ADAPTER_FILES[0]) for f in folders]
    for f, c in zip(folders, configs):
        require(not c.get("rank_pattern") and not c.get("alpha_pattern") and not c.get("use_rslora")
                and not c.get("use_dora"), "average_checkpoints",
                f"{f}: per-module ranks, rsLoRA scaling or DoRA cannot be averaged this way")
        # the factors are joined under the first adapter's scaling: another r or alpha would weigh its update wrongly
        require((c.get("r"), c.get("lora_alpha")) == (configs[0].get("r"), configs[0].get("lora_alpha")),
                "average_checkpoints", f"{f} has r={c.get('r')}, lora_alpha={c.get('lora_alpha')}; {folders[0]} has "
                f"r={configs[0].get('r')}, lora_alpha={configs[0].get('lora_alpha')}")
    tensors = []
    for f in folders:
        try:
            tensors.append(load_file(str(Path(f) / ADAPTER_FILES[1])))
        except Exception as e:  # safetensors' own error type, or an OSError
            raise ConfigError(f"average_checkpoints: {Path(f) / ADAPTER_FILES[1]}: not readable as safetensors "
                              f"({e})") from None
    names = set(tensors[0])
    for f, t in zip(folders, tensors):
        require(set(t) == names, "average_checkpoints", f"{f} holds other LoRA tensors than {folders[0]}")
        for n in sorted(names):
            require(t[n].shape == tensors[0][n].shape, "average_checkpoints",
                    f"{f}: {n} has shape {tuple(t[n].shape)}, in {folders[0]} {tuple(tensors[0][n].shape)}")
    averaged = {}
    for name in tensors[0]:
        parts = [t[name] for t in tensors]
        if ".lora_A." in name or ".lora_embedding_A" in name:  # (rank, in)
            averaged[name] = torch.cat(parts, dim=0).contiguous()
        elif ".lora_B." in name or ".lora_embedding_B" in name:  # (out, rank)
            averaged[name] = (torch.cat(parts, dim=1) / k).contiguous()
        else:  # anything else trained beside the factors (modules_to_save, biases): their plain mean
            averaged[name] = torch.stack(parts).mean(0)
    config = dict(configs[0])
    config.update(r=config["r"] * k, lora_alpha=config["lora_alpha"] * k)
    out.mkdir(parents=True, exist_ok=True)
    save_file(averaged, str(out / ADAPTER_FILES[1]))
    (out / ADAPTER_FILES[0]).write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- several runs in one adapter


def _row_ids(path: Path) -> set[str]:
    """The ids of a run's rows file (:func:`kaggle_utils.data.read_rewrites`: an unreadable file, or one without
    ids, is a ``DataError`` naming it)."""
    return set(data.read_rewrites(path, require_id=True)["id"])


def relative_to_checkout(path: Path) -> str:
    """``path`` relative to the checkout where it is inside it (what a plan or a pushed selection.json should hold)."""
    try:
        return str(path.relative_to(project_root()))
    except ValueError:
        return str(path)


def soup_selections(runs: list[Path], out: Path) -> Path:
    """The selected adapters of several runs of one recipe (training seeds: ``make seeds``) averaged into one
    adapter in ``out/selected/`` (:func:`average_adapters`: the exact mean of their updates, "a model soup"), one
    model at inference where a plan joining them runs each. ``out`` also gets the first run's choice and report rows,
    so ``make infer TEST=<out>/report.csv`` scores the soup on rows none of the runs trained on.

    Refused, naming the run or file: fewer than two runs, a run given twice or ``out`` among them, a run without
    ``selected/selection.json`` or without an exported adapter (the base model won), runs of other presets, base
    weights or prompt limits than the first, and runs that held out other rows (another ``split_seed``: one run's
    choice rows would be another's training rows). A soup that cannot be averaged leaves an earlier one in ``out``
    as it was. Returns ``out/selected``."""
    runs, out = [resolve_path(r) for r in runs], resolve_path(out)
    require(len(runs) >= 2, "soup", f"needs two runs or more, got {len(runs)}")
    require(len(set(runs)) == len(runs), "soup", f"a run is given twice: {', '.join(map(str, runs))}")
    require(out not in runs, "soup", f"{out} is one of the runs; write the soup to a folder of its own")
    selections = []
    for run in runs:
        folder = run / checkpoints.SELECTED_DIR
        sel = artifacts.Selection.find(folder)
        require(sel is not None, "soup", f"{run}: no {checkpoints.SELECTED_DIR}/{artifacts.SELECTION_FILE} "
                f"(make select RUN={run.name} first)")
        require(not sel.base_model_won, "soup", f"{run}: its selection exported no adapter (the base model won), "
                "so it has nothing to average")
        require(all((folder / name).exists() for name in ADAPTER_FILES), "soup",
                f"{folder}: no {' + '.join(ADAPTER_FILES)} to average")
        selections.append(sel)
    first, first_sel = runs[0], selections[0]
    require((first / artifacts.VALIDATION_FILE).exists(), "soup",
            f"{first / artifacts.VALIDATION_FILE} does not exist: the runs' held-out rows cannot be compared")
    first_ids = {rows: _row_ids(first / rows) for rows in (artifacts.VALIDATION_FILE, artifacts.REPORT_FILE)
                 if (first / rows).exists()}
    for run, sel in zip(runs[1:], selections[1:]):
        for what in ("preset", "base_model_path", "max_prompt_tokens"):
            require(getattr(sel, what) == getattr(first_sel, what), "soup",
                    f"{run} has {what} {getattr(sel, what)!r}, {first} {getattr(first_sel, what)!r}")
        for rows in (artifacts.VALIDATION_FILE, artifacts.REPORT_FILE):
            here, there = rows in first_ids, (run / rows).exists()
            require(here == there, "soup", f"{(first if here else run) / rows} exists, {(run if here else first) / rows}"
                    " does not: the runs held out other rows")
            require(not here or first_ids[rows] == _row_ids(run / rows), "soup", f"{run / rows} holds other "
                    f"rows than {first / rows}: the runs were split differently (split_seed), so each trained on rows "
                    "another one holds out")
    selected, fresh = out / checkpoints.SELECTED_DIR, out / f"{checkpoints.SELECTED_DIR}.new"
    shutil.rmtree(fresh, ignore_errors=True)
    average_adapters([r / checkpoints.SELECTED_DIR for r in runs], fresh)  # refused here: an earlier soup stays
    selected.mkdir(parents=True, exist_ok=True)
    _clear_export(selected)
    for name in ADAPTER_FILES:
        (fresh / name).replace(selected / name)
    fresh.rmdir()
    for rows in (artifacts.VALIDATION_FILE, artifacts.REPORT_FILE):  # an earlier soup's rows never outlive it
        (out / rows).unlink(missing_ok=True)
        if rows in first_ids:
            shutil.copy2(first / rows, out / rows)

    artifacts.Selection(
        run=out.name, preset=first_sel.preset, base_model_path=first_sel.base_model_path, step=first_sel.step,
        adapter=ADAPTER_FILES[1],
        rule=f"the selected adapters of {len(runs)} runs averaged into one "
             f"({'; '.join(f'{r.name}: {s.chosen()}' for r, s in zip(runs, selections))})",
        scorer=first_sel.scorer, validation_file=relative_to_checkout(out / artifacts.VALIDATION_FILE),
        max_new_tokens=first_sel.max_new_tokens, max_prompt_tokens=first_sel.max_prompt_tokens,
        created=datetime.datetime.now().isoformat(timespec="seconds"),
        souped=[{"run": relative_to_checkout(r), "selected_scs": s.selected_scs if s.selected_scs is not None
                 else s.scores.get(str(s.step))} for r, s in zip(runs, selections)],
    ).write(selected)
    logger.info("averaged the selected adapters of %s into %s", ", ".join(r.name for r in runs), selected)
    return selected


# ---------------------------------------------------------------- the export


def _clear_export(out: Path) -> None:
    """Remove a previous selection's adapter and merged weights, so the folder never mixes two selections."""
    for name in ADAPTER_FILES + (artifacts.SELECTION_FILE,):
        (out / name).unlink(missing_ok=True)
    if (out / "merged").exists():
        shutil.rmtree(out / "merged")


def _rule(cfg: checkpoints.SelectConfig, scores, window: list[int], best_ckpt: int | None) -> str:
    """How ``window`` was chosen, in words, for ``selection.json``: the rule of :func:`checkpoints.choose_window` that
    gives it, else "as given" (a step passed by hand)."""
    if cfg.forced:
        return f"forced by force_step={window[0]}"
    if len(window) > 1:
        return (f"the mean of the {len(window)} checkpoints around the peak of the {len(window)}-checkpoint moving "
                "average of mean SCS")
    step = window[0]
    if step == checkpoints.choose_step(scores):
        return "highest mean SCS; the earlier step on ties"
    if checkpoints.choose_window(scores, cfg.average_checkpoints) == window:  # its one single step that is not the best
        return (f"the latest checkpoint within one paired standard error of the best (step {best_ckpt}): too few "
                "checkpoints to average, a curve still rising")
    return f"step {step} as given to export_selection (the best checkpoint is step {best_ckpt})"


def export_selection(cfg: checkpoints.SelectConfig, scores: pd.DataFrame, step: int | list[int],
                     validation: pd.DataFrame | None = None, run_cfg: dict | None = None) -> Path:
    """Write ``selected/``: the chosen adapter, ``selection.json`` and (with ``export_merged``) ``merged/``.

    ``step`` is one step, or the steps of :func:`kaggle_utils.checkpoints.choose_window`: several are averaged into
    one adapter (:func:`average_adapters`), and ``selection.json`` names the middle one as its ``step`` and all of
    them as ``averaged_steps``. When step 0 (the base model) wins, no adapter is exported: fine-tuning made the model
    worse on validation, and shipping an adapter anyway would cost score silently. ``selection.json`` then says
    ``"adapter": null`` and names the best checkpoint, which ``force_step`` can still select. Returns the
    ``selected/`` folder.
    """
    table = checkpoints.as_scores(scores)
    window = [int(x) for x in step] if isinstance(step, (list, tuple)) else [int(step)]
    step = window[len(window) // 2]
    for s_ in window:
        require(s_ in table, "step", f"{s_} was not scored; scored: {sorted(table)}")
    out = cfg.run_dir / checkpoints.SELECTED_DIR
    per_step = scores.sort_values("step").to_dict(orient="records") if isinstance(scores, pd.DataFrame) else [
        {"step": s, "scs": v} for s, v in sorted(table.items())]
    rounded = {str(r["step"]): round(float(r["scs"]), 4) for r in per_step}
    if checkpoints.scores_report_rows(cfg):  # the report rows choose nothing: their scores kept, selected/ left alone
        artifacts.write_json(cfg.run_dir / f"{checkpoints.REPORT_BY_STEP}.json", {
            "run": cfg.run_name, "validation_file": str(cfg.run_dir / artifacts.REPORT_FILE), "scores": rounded,
            "per_step": per_step, "created": datetime.datetime.now().isoformat(timespec="seconds")})
        logger.info("report rows scored by step -> %s; they choose nothing, so %s keeps the step the choice rows "
                    "chose", cfg.run_dir / f"{checkpoints.REPORT_BY_STEP}.json", out)
        return out
    run_cfg = run_cfg if run_cfg is not None else checkpoints.read_run_config(cfg.run_dir)
    ckpts = checkpoints.run_checkpoints(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_export(out)
    best_ckpt = checkpoints.choose_step({s: v for s, v in table.items() if s > 0}) if len(table) > 1 else None
    base_won = step == 0
    if base_won:
        logger.warning("step 0 (the base model, no adapter) scored best (%.4f vs %.4f at step %s): no adapter is "
                       "exported. Train longer or differently, or set force_step=%s to export that checkpoint anyway",
                       table[0], table.get(best_ckpt, float("nan")), best_ckpt, best_ckpt)
    elif len(window) > 1:
        average_adapters([ckpts[w] for w in window], out)
        logger.info("exported the mean of the adapters of steps %s (the peak of the %d-checkpoint moving average)",
                    ", ".join(map(str, window)), len(window))
    else:
        for name in ADAPTER_FILES:
            shutil.copy2(ckpts[step] / name, out / name)
    merged = None
    if cfg.export_merged:  # the merge loads another copy of the base: the scoring model goes first
        checkpoints.free_held_model(cfg)
    if cfg.export_merged and not base_won:
        merged = export_merged(cfg, run_cfg, out if len(window) > 1 else ckpts[step], out / "merged")
    elif cfg.export_merged:
        logger.warning("export_merged: step 0 won, so there is nothing to merge (the base model is unchanged)")
    losses = checkpoints.checkpoint_metrics(cfg.run_dir).set_index("step")["eval_loss"].to_dict()
    for r in per_step:
        r["eval_loss"] = None if losses.get(r["step"]) is None or pd.isna(losses.get(r["step"])) else \
            float(losses[r["step"]])
    scorer = per_step[0].get("scorer", "unknown")
    own = cfg.run_dir / artifacts.VALIDATION_FILE
    artifacts.Selection(
        run=cfg.run_name,
        preset=run_cfg.get("preset"),
        base_model_path=checkpoints.base_model_path(cfg, run_cfg),
        step=step,
        adapter=None if base_won else ADAPTER_FILES[1],
        base_model_won=base_won,
        forced=bool(cfg.forced),
        averaged_steps=window if len(window) > 1 else [],
        rule=_rule(cfg, scores, window, best_ckpt),
        best_checkpoint_step=best_ckpt,
        scores=rounded,
        per_step=per_step,
        scorer=scorer,
        scorer_precision=per_step[0].get("precision"),
        validation_file=str(resolve_path(cfg.validation_file) if cfg.validation_file else own),
        val_rows=cfg.rows_per_step,
        rows_scored=int(per_step[0].get("rows", len(validation) if validation is not None else 0)),
        prompt_groups=int(checkpoints.group_keys(validation).nunique()) if validation is not None else None,
        max_new_tokens=cfg.max_new_tokens,
        max_prompt_tokens=checkpoints.prompt_token_limit(cfg, run_cfg),
        merged="merged" if merged else None,
        checkpoint=str(ckpts[step]) if not base_won and len(window) == 1 else None,
        created=datetime.datetime.now().isoformat(timespec="seconds"),
        config=dataclasses.asdict(cfg),
    ).write(out)
    base = table.get(0)
    logger.info("selected step %d of %s%s: mean SCS %.4f vs %s at step 0 (base model), scorer %s -> %s", step,
                cfg.run_name, f" (averaged over steps {window[0]}-{window[-1]})" if len(window) > 1 else "",
                table[step], f"{base:.4f}" if base is not None else "n/a", scorer, out)
    return out


def export_merged(cfg: checkpoints.SelectConfig, run_cfg: dict, checkpoint: Path, out: Path) -> Path:
    """Merge the adapter into the base weights and save fp16 weights + tokenizer as a full HF folder
    (:func:`kaggle_utils.adapters.merge_adapter`): faster to serve with vLLM, which then needs no LoRA kernels."""
    preset = run_cfg.get("preset", models.DEFAULT_PRESET)
    adapters.merge_adapter(preset, checkpoints.base_model_path(cfg, run_cfg), str(checkpoint), out)
    logger.info("merged fp16 weights of %s -> %s", checkpoint.name, out)
    return out


# ---------------------------------------------------------------- what chose it, drawn


def _window(chosen: int | list[int] | None, scores, cfg: checkpoints.SelectConfig) -> list[int]:
    """The exported steps: as given, else as the rule chooses them. On the report rows, which choose nothing, the
    steps the choice rows exported (``selection.json``), whatever was given."""
    if checkpoints.scores_report_rows(cfg):
        sel = artifacts.Selection.find(cfg.run_dir / checkpoints.SELECTED_DIR)
        return (sel.averaged_steps or [sel.step]) if sel is not None else []
    if chosen is None:
        return checkpoints.choose_window(scores, cfg.average_checkpoints, cfg.force_step)
    return [int(c) for c in chosen] if isinstance(chosen, (list, tuple)) else [int(chosen)]


def _selected_score(cfg: checkpoints.SelectConfig) -> float | None:
    """The exported adapter's score that :func:`kaggle_utils.checkpoints.score_selected` recorded for these rows, if
    any."""
    if checkpoints.scores_report_rows(cfg):
        path = cfg.run_dir / f"{checkpoints.REPORT_BY_STEP}.json"
        if not path.exists():
            return None
        return read_json_object(path, checkpoints.SelectionError).get("selected", {}).get("scs")
    sel = artifacts.Selection.find(cfg.run_dir / checkpoints.SELECTED_DIR)
    return sel.selected_scs if sel is not None else None


def plot_scores(cfg: checkpoints.SelectConfig, scores: pd.DataFrame, chosen: int | list[int] | None = None) -> Path:
    """Mean SCS against step (step 0 = base model) with the eval loss on a second axis, as ``selected/scores.png``.

    The chosen step is starred; checkpoints averaged into the export are shaded, with the averaged adapter's own
    score (a diamond) once :func:`kaggle_utils.checkpoints.score_selected` has it. The best-scoring step is where
    training stopped helping on these rows: the steps after it are shaded, so a curve that is still rising at the last
    step (train longer) reads differently from one that peaked early (over-fitting, or a learning rate too high).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = scores.sort_values("step")
    report = checkpoints.scores_report_rows(cfg)
    window = _window(chosen, scores, cfg)
    chosen = checkpoints.choose_step(scores) if report or not window else window[len(window) // 2]
    best = checkpoints.choose_step(scores)
    last = int(scores["step"].max())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(scores["step"], scores["scs"], "o-", label="mean SCS (left axis)")
    base = scores.loc[scores["step"] == 0, "scs"]
    if len(base):
        ax.axhline(float(base.iloc[0]), color="grey", ls="--", lw=1, label="step 0 (base model)")
    if best < last:
        ax.axvspan(best, last, color="tab:orange", alpha=0.12,
                   label=f"after step {best}: no better score (training stopped helping)")
    else:
        ax.annotate("still rising at the last step:\ntraining longer may help", (best, float(scores["scs"].max())),
                    textcoords="offset points", xytext=(-150, -40), fontsize=8,
                    arrowprops=dict(arrowstyle="->", color="grey"))
    pick = scores.loc[scores["step"] == chosen]
    if len(window) > 1:
        ax.axvspan(window[0], window[-1], color="tab:purple", alpha=0.15,
                   label=f"averaged into the export: steps {window[0]}-{window[-1]}")
        averaged = _selected_score(cfg)
        if averaged is not None:
            ax.plot([window[len(window) // 2]], [averaged], "D", ms=9, color="tab:purple",
                    label=f"the averaged adapter: {averaged:.4f}")
    ax.plot(pick["step"], pick["scs"], "*", ms=16, color="tab:red",
            label=f"highest here: step {chosen} (not exported)" if report else
            f"chosen: step {chosen}" + (" (forced)" if cfg.forced else ""))
    losses = checkpoints.checkpoint_metrics(cfg.run_dir).dropna(subset=["eval_loss"])
    if len(losses):
        twin = ax.twinx()
        twin.plot(losses["step"], losses["eval_loss"], "s:", color="tab:green", alpha=0.7, ms=4)
        twin.set_ylabel("eval loss (dotted, right axis)", color="tab:green")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean sharpened cosine (cos³)")
    rows = "report rows (they chose nothing)" if report else "choice rows"
    ax.set_title(f"{cfg.run_name}: SCS on {int(scores['rows'].iloc[0])} {rows}\nscorer: "
                 f"{scores['scorer'].iloc[0]}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path = (cfg.run_dir / f"{checkpoints.REPORT_BY_STEP}.png" if report
            else cfg.run_dir / checkpoints.SELECTED_DIR / "scores.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def score_table(cfg: checkpoints.SelectConfig, scores: pd.DataFrame, chosen: int | list[int]) -> pd.DataFrame:
    """Scores per step beside the losses, the exported step(s) marked: the notebook's summary table."""
    losses = checkpoints.checkpoint_metrics(cfg.run_dir)
    table = scores.merge(losses, on="step", how="left")
    table["chosen"] = table["step"].isin(_window(chosen, scores, cfg))
    cols = ["step", "scs", "cos", "eval_loss", "train_loss", "rows", "fallbacks", "seconds", "scorer", "chosen"]
    if "paired_se" in table:  # what tells the steps apart on these rows (checkpoints.latest_within_se)
        cols.insert(2, "paired_se")
    return table[cols].round({"scs": 4, "cos": 4, "eval_loss": 4, "train_loss": 4, "paired_se": 4})
