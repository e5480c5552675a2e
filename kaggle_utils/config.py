"""Stage configs: building them from notebook parameters or YAML, resolving paths, saving them.

Every stage (train, select, infer, ...) has one ``@dataclass`` config in its module. The notebook's
``parameters`` cell holds exactly that dataclass's fields; ``from_params(globals())`` builds it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("kaggle_utils")

_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_FILE = "config.json"  # every stage's resolved config, written into its output folder before any work


class ConfigError(ValueError):
    """A stage config has a value that cannot work; the message names the field."""


def project_root() -> Path:
    """The folder relative paths are resolved against.

    Inside a checkout of the bundle (the package sits next to the Makefile) it is the checkout, so a notebook opened
    in Jupyter from ``notebooks/`` finds ``../shared/data`` exactly as ``make`` does. Elsewhere (Kaggle, an installed
    wheel) it is the current working directory. ``KAGGLE_UTILS_ROOT`` overrides both.
    """
    if os.environ.get("KAGGLE_UTILS_ROOT"):
        return Path(os.environ["KAGGLE_UTILS_ROOT"]).resolve()
    checkout = _PACKAGE_DIR.parent
    if (checkout / "Makefile").exists() and (checkout / "notebooks").is_dir():
        return checkout
    return Path.cwd()


# The data folder: relative paths under "data/" (every default data file) are looked up in data_dir().
DATA_DIR = "data"
SHARED_DATA = "../shared/data"  # a read-only copy beside the checkout wins over a built data/ when it exists


def data_dir() -> Path:
    """Where ``data/...`` paths point: ``KAGGLE_UTILS_DATA`` when set, else ``../shared/data`` beside the checkout
    when that folder exists, else the checkout's own ``data/`` (what `make data` builds)."""
    if os.environ.get("KAGGLE_UTILS_DATA"):
        return Path(os.environ["KAGGLE_UTILS_DATA"]).expanduser().resolve()
    shared = (project_root() / SHARED_DATA).resolve()
    return shared if shared.is_dir() else project_root() / DATA_DIR


def resolve_path(path: str | os.PathLike) -> Path:
    """An absolute path for ``path``; relative ones are taken from :func:`project_root`, and those under ``data/``
    from :func:`data_dir` (so ``data/gemma_rewrites.csv`` reads ``../shared/data`` where it exists)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if p.parts and p.parts[0] == DATA_DIR:
        return (data_dir() / Path(*p.parts[1:])).resolve()
    return (project_root() / p).resolve()


def config_fields(cls) -> list[str]:
    """Names of a config dataclass's fields, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


# ---------------------------------------------------------------- renamed parameters

# Notebook parameters, YAML keys and plan keys that were renamed, by the dataclass that reads them: an older notebook,
# recipe, plan or command line still loads, and a logged note names the new name. docs/pipeline.md lists them.
RENAMED = {
    "SelectConfig": {"val_rows": "rows_per_step", "batch_size": "generation_batch_size"},
    "InferenceConfig": {"batch_size": "generation_batch_size", "scores_path": "scores_file"},
    "MeanPromptConfig": {"batch_size": "embedding_batch_size"},
    "Variant": {"budget_hours": "deadline_hours"},
    # merged_path (a folder) became use_merged (serve <adapter>/merged/): plan.ModelEntry.from_dict converts it
    "ModelEntry": {"adapter_path": "adapter", "base_model_path": "base_model"},
}


def note_rename(where: str, old: str, new: str) -> None:
    """Log that ``old`` is read as ``new`` (the old name keeps working; the new one is what to write)."""
    logger.warning("%s: '%s' is now called '%s'; read as '%s' (write the new name to silence this note)", where, old,
                   new, new)


def with_new_names(kind: str, values: dict, where: str) -> dict:
    """``values`` with each old key of ``kind`` (a dataclass name in :data:`RENAMED`) under its new name, noted in the
    log; both names at once is a :class:`ConfigError` naming them."""
    out = dict(values)
    for old, new in RENAMED.get(kind, {}).items():
        if old in out:
            if new in out:
                raise ConfigError(f"{where}: both '{old}' and its new name '{new}' are set; keep '{new}'")
            note_rename(where, old, new)
            out[new] = out.pop(old)
    return out


def from_params(cls, namespace: dict[str, Any]):
    """Build ``cls`` from a notebook namespace (``globals()``), taking exactly the dataclass's fields.

    A field missing from the namespace keeps its default, so an older notebook still runs. An old parameter name
    (:data:`RENAMED`) in the namespace was injected (the parameters cell defines only the new names), so its value
    wins over the new name's default, with a note.
    """
    values = {name: namespace[name] for name in config_fields(cls) if name in namespace}
    for old, new in RENAMED.get(cls.__name__, {}).items():
        if old in namespace:
            note_rename("notebook parameter", old, new)
            values[new] = namespace[old]
    return cls(**values)


def load_yaml(cls, path: str | os.PathLike, **overrides):
    """Build ``cls`` from a YAML recipe; keyword overrides win. Unknown keys are an error naming the file; renamed
    keys (:data:`RENAMED`) are read under their new names, with a note."""
    import yaml

    file = resolve_path(path)
    if not file.exists():
        raise FileNotFoundError(f"config file not found: {file}")
    values = with_new_names(cls.__name__, yaml.safe_load(file.read_text()) or {}, str(file))
    unknown = sorted(set(values) - set(config_fields(cls)))
    if unknown:
        raise ConfigError(f"{file}: unknown keys {unknown} for {cls.__name__}; known: {config_fields(cls)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def save_config(cfg, folder: str | os.PathLike, name: str = CONFIG_FILE) -> Path:
    """Write the resolved config as JSON into ``folder`` (created if needed), before the stage works."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    return path


def saved_config(folder: str | os.PathLike, name: str = CONFIG_FILE) -> dict | None:
    """The config a stage saved in ``folder`` (:func:`save_config`) as a dict of its fields, or None when there is
    none. Later stages read a run's settings this way (a training run's preset, train files, prompt-token limit),
    without rebuilding the dataclass, whose checks (a base model present here) need not hold where they read it. A
    file that is not a JSON object is a :class:`ConfigError` naming it."""
    path = Path(folder) / name
    return read_json_object(path, ConfigError) if path.exists() else None


def read_json_object(path: Path, error: type[Exception] = ConfigError) -> dict:
    """The JSON object in ``path``; a file that is not JSON, or JSON but not an object, is ``error`` naming it (each
    stage's file raises its own error type)."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise error(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(values, dict):
        raise error(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Send the library's log lines to stdout once, so they show in notebooks and papermill logs."""
    if not any(getattr(h, "_kaggle_utils", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._kaggle_utils = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def error_summary(error, lines: int = 3, limit: int = 400) -> str:
    """One log-line of an exception or an error text: its first non-empty lines joined. The reason can sit below the
    first line (pydantic: "1 validation error for VllmConfig" / "Total number of attention heads (9) must be
    divisible by tensor parallel size (2)"), so one line is not enough."""
    kept = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()][:lines]
    return " | ".join(kept)[:limit]


def require(condition: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")
