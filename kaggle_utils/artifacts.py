"""What a training run leaves for the later stages: its checkpoint folders and the selected adapter with
``selection.json``, read and written here; and the one meaning of ``max_prompt_tokens``.

The files the stages hand each other, and the one module that reads and writes each:

    runs/<run>/config.json         a stage's resolved config: config.save_config / config.saved_config
    runs/<run>/validation.csv      the choice rows, report.csv the report rows: written by training, named here
    runs/<run>/metrics.jsonl       the trainer's log (training writes it): read_metrics, eval_losses, plot_losses (here)
    runs/<run>/checkpoint-N/       the trainer's adapters by step: find_checkpoints (here)
    runs/<run>/selected/           the chosen adapter and selection.json: Selection (here)
    runs/<run>/blend.json          the final string's recipe: blending.Blend
    <run_dir>/predictions/*.jsonl  each model's predictions: sampling.PredictionStore, sampling.read_predictions
    scores.csv                     the scores table every stage adds rows to: blending.write_scores

``max_prompt_tokens``
    The longest prompt, in tokens, a model is shown: the chat template with the instruction, both texts and the
    forced start. A longer prompt is cut by :func:`kaggle_utils.prompts.generation_ids`, which keeps the instruction
    and trims both texts. The train, select and infer stages each have this field, with this one meaning, so that a
    model is shown prompts cut as they were when it was trained and its step was chosen. In every stage 0 means "not
    set here: the limit the stage before recorded":

    - train: no stage before, so nothing is cut; rows longer than ``max_seq_length`` are dropped instead, and
      ``max_seq_length`` is the run's limit. ``config.json`` records both fields.
    - select: the run's limit from its ``config.json`` (``max_prompt_tokens``, else ``max_seq_length``). The limit
      used is written to ``selection.json``, never 0.
    - infer: each model's limit from its adapter's ``selection.json``; without one (a base model, an adapter from
      elsewhere, a ``selection.json`` older than the field) :data:`kaggle_utils.prompts.DEFAULT_PROMPT_TOKENS`.

    :func:`prompt_token_limit` resolves the chain; the resolved value is never 0.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .config import read_json_object, resolve_path
from .prompts import DEFAULT_PROMPT_TOKENS

logger = logging.getLogger("kaggle_utils")

# The run folder's layout: what the stages name its files and folders.
VALIDATION_FILE = "validation.csv"  # the *choice* rows: eval loss, checkpoint step, blend and mean prompt
REPORT_FILE = "report.csv"  # the *report* rows: held out from training and from every choice; scores only
METRICS_FILE = "metrics.jsonl"  # every logged train and eval loss, by step
BUDGET_FILE = "budget.json"  # what the training time budget measured and chose (time_budget_minutes)
STEP_PROFILE_FILE = "step_profile_rank{rank}.json"  # per training process: where its steps' time went (profile_steps)
SELECTED_DIR = "selected"  # the export of checkpoint selection, inside the run folder
SELECTION_FILE = "selection.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what a complete PEFT adapter folder holds
CHECKPOINT_PREFIX = "checkpoint-"


class ArtifactError(ValueError):
    """A file one stage left for the next cannot be read; the message names the file and the field."""


# ---------------------------------------------------------------- max_prompt_tokens


def prompt_token_limit(setting: int, *recorded: int | None) -> int:
    """The prompt-token limit a stage uses: its own ``setting``, else the first non-zero limit ``recorded`` by the
    stages before (nearest first), else :data:`DEFAULT_PROMPT_TOKENS`. Never 0 (see the module docstring)."""
    for value in (setting, *recorded):
        if value:
            return int(value)
    return DEFAULT_PROMPT_TOKENS


def run_prompt_token_limit(run_config: Mapping, setting: int = 0) -> int:
    """The limit the selection stage uses for a training run whose ``config.json`` is ``run_config``: ``setting``,
    else the run's ``max_prompt_tokens``, else its ``max_seq_length`` (the run dropped longer rows)."""
    return prompt_token_limit(setting, run_config.get("max_prompt_tokens"), run_config.get("max_seq_length"))


# ---------------------------------------------------------------- checkpoint folders


def has_adapter(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a PEFT adapter: ``adapter_config.json`` and its weights (safetensors, or an older
    adapter's ``adapter_model.bin``)."""
    folder = Path(folder)
    return (folder / ADAPTER_FILES[0]).exists() and (
        (folder / ADAPTER_FILES[1]).exists() or (folder / "adapter_model.bin").exists())


def find_checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """Step -> folder of every ``checkpoint-N`` of a run that holds a complete adapter (:data:`ADAPTER_FILES`), in
    numeric step order; {} for a folder without any (or no folder).

    A checkpoint folder without its adapter was interrupted while saving; it is logged and left out.
    """
    run_dir = Path(run_dir)
    folders = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*")
               if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    folders.sort(key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    complete = {int(p.name[len(CHECKPOINT_PREFIX):]): p for p in folders
                if all((p / f).exists() for f in ADAPTER_FILES)}
    partial = [p.name for p in folders if p not in complete.values()]
    if partial:
        logger.warning("%s: ignoring checkpoint folder(s) without %s: %s", run_dir.name, " + ".join(ADAPTER_FILES),
                       ", ".join(partial))
    return complete


# ---------------------------------------------------------------- the metrics log


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The run's metrics log as a table (step, loss, eval_loss, ...); on a resumed run the latest value per step wins."""
    import pandas as pd  # here, not at the top: the engines import this module inside a kernel before pandas is needed

    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics log (has the run trained?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    out = []
    for col in ("loss", "eval_loss", "learning_rate", "grad_norm"):
        if col in df:
            out.append(df.dropna(subset=[col]).groupby("step")[col].last())
    return pd.concat(out, axis=1).reset_index().sort_values("step").reset_index(drop=True)


def eval_losses(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """(step, eval_loss) pairs in step order."""
    m = read_metrics(run_dir)
    if "eval_loss" not in m:
        return []
    m = m.dropna(subset=["eval_loss"])
    return [(int(s), float(v)) for s, v in zip(m["step"], m["eval_loss"])]


def plot_losses(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Train and eval loss against step, as a PNG (``loss.png`` in the run folder unless ``path`` says where)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    m = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    if "loss" in m:
        t = m.dropna(subset=["loss"])
        ax.plot(t["step"], t["loss"], label="train loss", alpha=0.7)
    if "eval_loss" in m:
        e = m.dropna(subset=["eval_loss"])
        ax.plot(e["step"], e["eval_loss"], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens only)")
    ax.set_title(f"{run_dir.name}: loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(path) if path else run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- selection.json


# The fields whose type later stages rely on; a file with another type there is refused, naming the field.
_SELECTION_TYPES = {"run": (str,), "preset": (str, type(None)), "base_model_path": (str,), "step": (int,),
                    "adapter": (str, type(None)), "base_model_won": (bool,), "forced": (bool,),
                    "max_prompt_tokens": (int,), "merged": (str, type(None)), "scores": (dict,),
                    "per_step": (list,), "config": (dict,), "averaged_steps": (list,), "souped": (list,)}


# Written only when set: a single step's selection reads and writes as it did before averaging existed.
_OPTIONAL_FIELDS = ("averaged_steps", "selected_scs", "souped")


@dataclass
class Selection:
    """``selected/selection.json``: the checkpoint step chosen for a run, what chose it, and how prompts were cut.

    The fields are the file's keys in the order they are written. Every field has a default, so a file that lacks
    some (hand-written, or from an adapter made elsewhere) still reads; keys this version does not know are kept in
    ``extra`` and written back.
    """

    run: str = ""  # the training run's folder name
    preset: str | None = None  # the preset the run trained; an adapter is refused for another preset
    base_model_path: str = ""  # the base weights the run trained on ("" = the preset's default)
    step: int = 0  # the chosen step; 0 = the base model without an adapter
    adapter: str | None = None  # the adapter weights file beside this one; None when none was exported
    base_model_won: bool = False  # step 0 scored best: no adapter was exported, the base model runs as it is
    forced: bool = False  # the step was forced (force_step) rather than chosen by score
    rule: str = ""  # how the step was chosen, in words
    best_checkpoint_step: int | None = None  # the best step with an adapter (what force_step could still export)
    scores: dict = field(default_factory=dict)  # step (as text) -> mean SCS, rounded
    per_step: list = field(default_factory=list)  # one record per scored step: scs, cos, rows, eval loss, ...
    scorer: str = ""  # the scorer's name
    scorer_precision: str | None = None  # float32 | bfloat16: how the scorer embedded
    validation_file: str = ""  # the rows that chose the step
    val_rows: int = 0  # SelectConfig.rows_per_step (0 = all the choice rows), under the key older files have
    rows_scored: int = 0  # rows scored per step
    prompt_groups: int | None = None  # distinct prompts among them
    max_new_tokens: int = 0  # greedy tokens per prediction
    max_prompt_tokens: int = 0  # the prompt-token limit the step was chosen at (module docstring); 0 = not recorded
    merged: str | None = None  # "merged" when selected/merged/ holds fp16 weights with the adapter merged in
    checkpoint: str | None = None  # the checkpoint folder the adapter was copied from
    created: str = ""  # when the file was written (ISO time)
    config: dict = field(default_factory=dict)  # the SelectConfig that chose
    averaged_steps: list = field(default_factory=list)  # the checkpoints averaged into the adapter ([] = one step's)
    selected_scs: float | None = None  # the exported adapter's mean SCS on the same rows (an average is scored anew)
    souped: list = field(default_factory=list)  # runs whose selected adapters were averaged into this one (make soup)
    extra: dict = field(default_factory=dict)  # keys this version does not know, written back as read

    @classmethod
    def record(cls, folder: str | os.PathLike) -> dict | None:
        """The ``selection.json`` in ``folder`` (or the file itself) as written, its key types checked; None when
        there is none. An unreadable file, or a known key of another type, is an :class:`ArtifactError` naming the
        file and the key."""
        file = resolve_path(folder)
        if file.is_dir() or file.name != SELECTION_FILE:
            file = file / SELECTION_FILE
        if not file.exists():
            return None
        values = read_json_object(file, ArtifactError)
        for key, types in _SELECTION_TYPES.items():
            value = values.get(key)
            if key in values and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
                raise ArtifactError(f"{file}: field '{key}' must be {' or '.join(t.__name__ for t in types)}, got "
                                    f"{value!r}")
        return values

    @classmethod
    def find(cls, folder: str | os.PathLike) -> "Selection | None":
        """The selection in ``folder`` (an exported ``selected/``, or the file), or None when it has none."""
        values = cls.record(folder)
        if values is None:
            return None
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in values.items() if k in known},
                   extra={k: v for k, v in values.items() if k not in known})

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Selection":
        """The selection in ``folder``; a missing file is an :class:`ArtifactError` naming it."""
        found = cls.find(folder)
        if found is None:
            raise ArtifactError(f"{resolve_path(folder)}: no {SELECTION_FILE} (choose a step first: make select)")
        return found

    def chosen(self) -> str:
        """The checkpoints in the adapter, in words: "step 40", or "steps 30-50" for an average."""
        return f"steps {self.averaged_steps[0]}-{self.averaged_steps[-1]}" if self.averaged_steps else \
            f"step {self.step}"

    def to_dict(self) -> dict:
        """The file's content: every field in order (the optional ones only when set), then the keys this version
        does not know."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"
               and not (f.name in _OPTIONAL_FIELDS and getattr(self, f.name) in (None, []))}
        return {**out, **self.extra}

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``selection.json`` into ``folder`` atomically (an interrupted write never leaves half a file);
        returns the file."""
        return write_json(Path(folder) / SELECTION_FILE, self.to_dict())


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as JSON atomically (an interrupted write never leaves half a file; numpy scalars become
    numbers); returns the file."""
    file = Path(path)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")
    tmp.replace(file)
    return file


def _jsonable(value):
    """numpy scalars (from pandas tables) as Python numbers."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
