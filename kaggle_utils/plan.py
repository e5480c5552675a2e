"""The submission plan: its models, its variants (one Kaggle kernel each) and the file that holds them.

One model of a plan is a :class:`ModelEntry`, with the same fields and defaults wherever it is written: a variant's
``models`` in the plan (``configs/submissions.yaml``), the inference notebook's ``models`` parameter, and
``make infer``'s plans. Only where its weights live differs: in the plan, ``base_model`` is a Kaggle model handle and
``adapter`` a folder of the plan's adapters dataset; in the notebook both are folders (on Kaggle, the mounts the
renderer wrote in: :mod:`kaggle_utils.kernels`).

Entries and plans written with older names (``adapter_path``, ``base_model_path``, ``merged_path``,
``budget_hours``) still load, with a logged note naming the new name (:data:`kaggle_utils.config.RENAMED`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, note_rename, project_root, require, resolve_path, with_new_names
from .models import PRESETS, get_preset

KAGGLE_HOURS = 9.0  # Kaggle stops a competition kernel after 9 hours
DEFAULT_PLAN = "configs/submissions.yaml"
DEFAULT_NOTEBOOK = "notebooks/inference.ipynb"
MERGED_DIR = "merged"  # inside an adapter folder: the adapter merged into its base (the select stage's export_merged)

_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # what Kaggle accepts as a user name
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------- one model


@dataclass
class ModelEntry:
    """One model of the plan: which weights, and how to sample them."""

    name: str  # short, file-name-safe: predictions/<name>.jsonl, the scores table and the logs, e.g. "mistral_v3"
    preset: str  # a kaggle_utils.models preset (chat template, 4-bit choice), e.g. "mistral-7b"
    base_model: str = ""  # the base weights: a Kaggle model handle in the plan, a folder in the notebook; "" = the
    # preset's
    adapter: str = ""  # the LoRA adapter: a folder of the plan's adapters dataset (or owner/dataset/folder) in the
    # plan, a folder in the notebook (e.g. runs/<run>/selected); "" = the base model alone
    use_merged: bool = False  # serve <adapter>/merged/ (its adapter merged into the base by the select stage's
    # export_merged) instead of the base with the adapter
    n: int = 1  # predictions per row
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    forced_start: str = ""  # every answer starts with this text, e.g. "Rewrite"
    greedy_first: bool = False  # the first prediction is greedy, the other n - 1 sampled at temperature

    def __post_init__(self):
        require(bool(_NAME.match(str(self.name))), "name",
                f"must be a short file-name-safe word (letters, digits, '_', '-', '.'), got '{self.name}'")
        require(self.preset in PRESETS, "preset", f"unknown preset '{self.preset}'; known: {', '.join(PRESETS)}")
        require(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require(not (self.temperature == 0 and self.n > 1), "n",
                f"n={self.n} with temperature 0 repeats one greedy answer; set temperature > 0")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(not (self.use_merged and not self.adapter), "use_merged", "use_merged needs an adapter (its merged/)")

    @classmethod
    def from_dict(cls, values: Any, where: str) -> "ModelEntry":
        """Build from one ``models`` entry; older key names are read under the new ones, with a note. A missing
        required key (``name``, ``preset``), an unknown key or a bad value is a :class:`ConfigError` naming
        ``where`` (e.g. "models[0]") and the key; left-out optional keys take the defaults above."""
        keys = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: must be a dict with keys {keys}, got {values!r}")
        values = rename_model_keys(values, where)
        missing = [k for k in ("name", "preset") if k not in values]
        unknown = [k for k in values if k not in keys]
        if missing or unknown:
            raise ConfigError(f"{where}: " + "; ".join(
                ([f"missing key(s) {missing}"] if missing else []) + ([f"unknown key(s) {unknown}"] if unknown else []))
                + f"; the keys are {keys}")
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{where} ({values.get('name')}): {e}") from None

    def to_dict(self) -> dict:
        """The entry as the notebook's ``models`` parameter writes it."""
        return dataclasses.asdict(self)

    @property
    def merged_folder(self) -> str:
        """The folder served in place of base + adapter (``<adapter>/merged``), or "" without ``use_merged``."""
        return str(Path(self.adapter) / MERGED_DIR) if self.use_merged else ""

    @property
    def label(self) -> str:
        """How the scores table names this model."""
        return f"{self.name} {'fine-tuned' if self.adapter else 'base'}"

    def model_source(self) -> str:
        """In the plan: the Kaggle model handle this entry attaches ("" for the embedded default)."""
        return self.base_model or get_preset(self.preset).kaggle_model_source


def rename_model_keys(values: dict, where: str) -> dict:
    """A model entry (or part of one) with older key names under the new ones, each noted in the log. An older
    ``merged_path`` becomes ``use_merged``: the merged folder was always ``<adapter>/merged`` (what checkpoint
    selection exports), so the adapter is that folder's parent when the entry names none."""
    out = with_new_names("ModelEntry", values, where)
    if "merged_path" not in out:
        return out
    merged = str(out.pop("merged_path") or "")
    note_rename(where, "merged_path", "use_merged")
    if not merged:
        out.setdefault("use_merged", False)
        return out
    folder = Path(merged)
    adapter = out.get("adapter") or str(folder.parent)
    require(folder.name == MERGED_DIR and Path(adapter) == folder.parent, "merged_path",
            f"{where}: '{merged}' is not <adapter>/{MERGED_DIR} (adapter '{adapter}'); name the adapter folder and set "
            "use_merged: true")
    out.update(adapter=adapter, use_merged=True)
    return out


# ---------------------------------------------------------------- variants and the plan


@dataclass
class Variant:
    """One planned submission: one Kaggle kernel."""

    slug: str  # the kernel's slug, lowercase-with-hyphens; `make submit VARIANT=<slug>`
    title: str  # the kernel's title on Kaggle; must slugify to `slug` (else Kaggle warns and may rename)
    models: list  # ModelEntry per model, in blend order
    use_mean_prompt: bool  # append the mean prompt to every row's prediction
    deadline_hours: float  # the kernel's own deadline (the notebook's deadline_hours); Kaggle stops the run at 9 h
    mean_prompt: str = ""  # "" = the notebook's default mean prompt
    engine: str = "auto"  # sampling engine: auto | vllm | hf
    params: dict = field(default_factory=dict)  # other inference-notebook parameters, e.g. {"merge_adapters": "off"}

    def __post_init__(self):
        from slugify import slugify  # python-slugify: the kaggle CLI checks titles against ids with it

        require(bool(_SLUG.match(self.slug)) and 5 <= len(self.slug) <= 50, "slug",
                f"'{self.slug}' must be 5-50 characters of lowercase letters, digits and single hyphens")
        require(5 <= len(self.title) <= 50, "title", f"variant '{self.slug}': '{self.title}' must be 5-50 characters")
        require(slugify(self.title) == self.slug, "title",
                f"variant '{self.slug}': title '{self.title}' becomes '{slugify(self.title)}' on Kaggle, not the slug")
        where = f"variant '{self.slug}'"
        self.models = [m if isinstance(m, ModelEntry) else ModelEntry.from_dict(m, f"{where} models[{i}]")
                       for i, m in enumerate(self.models or [])]
        require(len(self.models) >= 1, "models", f"{where}: needs at least one model")
        names = [m.name for m in self.models]
        require(len(set(names)) == len(names), "models", f"{where}: model names repeat: {names}")
        for i, m in enumerate(self.models):
            _check_kaggle_sources(m, f"{where} models[{i}] ({m.name})")
        require(0 < self.deadline_hours < KAGGLE_HOURS, "deadline_hours",
                f"{where}: must be in (0, {KAGGLE_HOURS}) hours (Kaggle's limit), got {self.deadline_hours}")
        require(self.engine in ("auto", "vllm", "hf"), "engine",
                f"{where}: must be auto, vllm or hf, got '{self.engine}'")
        self.params = with_new_names("InferenceConfig", dict(self.params or {}), f"{where} params")
        owned = {"models", "use_mean_prompt", "mean_prompt", "engine", "deadline_hours", *PATH_PARAMETERS}
        clash = sorted(set(self.params) & owned)
        require(not clash, "params", f"{where}: {clash} are set by the plan's own fields")


def _check_kaggle_sources(entry: ModelEntry, where: str) -> None:
    """In the plan, ``base_model`` is a Kaggle model handle and ``adapter`` a dataset folder: checked here, before any
    kernel is rendered."""
    preset = get_preset(entry.preset)
    source = entry.model_source()
    # The embedded default needs no weights; every other preset reads an attached Kaggle model.
    if not source and preset.default_path:
        raise ConfigError(f"{where}: base_model: preset '{entry.preset}' has no Kaggle model; set base_model to "
                          "owner/model/framework/variation/version")
    parts = source.split("/")
    if source and not (len(parts) == 5 and all(parts) and parts[4].isdigit()):
        raise ConfigError(f"{where}: base_model: '{source}' is not a Kaggle model handle "
                          "owner/model/framework/variation/version (version a number)")
    parts = entry.adapter.split("/")
    if entry.adapter and not (len(parts) == 1 or (len(parts) >= 3 and all(parts))):
        raise ConfigError(f"{where}: adapter: '{entry.adapter}' must be a folder of the adapters dataset or "
                          "owner/dataset/folder")


# The inference notebook's parameters that hold paths; the renderer points every one of them at /kaggle.
PATH_PARAMETERS = ("test_file", "submission_path", "run_dir", "scorer_path")


@dataclass
class Plan:
    """The submission plan: the variants plus the Kaggle datasets every kernel attaches."""

    variants: list  # Variant per planned submission
    user: str = ""  # Kaggle user name; "" = KAGGLE_USERNAME or the CLI's kaggle.json
    adapters_dataset: str = "prompt-recovery-adapters"  # your dataset of selected adapters (make push-adapters)
    wheels_dataset: str = "prompt-recovery-wheels"  # your dataset of vLLM wheels for offline install (make wheels)
    library_dataset: str = ""  # the kaggle_utils dataset slug; "" = the one in dataset-metadata.json
    notebook: str = DEFAULT_NOTEBOOK  # the authored notebook every kernel is rendered from

    def __post_init__(self):
        self.variants = [v if isinstance(v, Variant) else build(Variant, v, "variant") for v in (self.variants or [])]
        require(len(self.variants) >= 1, "variants", "the plan has no variants")
        slugs = [v.slug for v in self.variants]
        require(len(set(slugs)) == len(slugs), "variants", f"slugs repeat: {slugs}")
        require(not self.user or bool(USER_NAME.match(self.user)), "user", f"'{self.user}' is not a Kaggle user name")
        if not self.library_dataset:
            self.library_dataset = library_metadata_template()["id"].split("/")[1]
        for name in ("adapters_dataset", "wheels_dataset", "library_dataset"):
            slug = getattr(self, name)
            require(bool(_SLUG.match(slug)) and 6 <= len(slug) <= 50, name,
                    f"'{slug}' must be a dataset slug of 6-50 lowercase letters, digits and hyphens")

    def variant(self, slug: str) -> Variant:
        """The variant called ``slug``; an unknown one is an error listing the planned slugs."""
        for v in self.variants:
            if v.slug == slug:
                return v
        raise ConfigError(f"variant: no variant '{slug}' in the plan; planned: {', '.join(v.slug for v in self.variants)}")

    def select(self, slug: str = "") -> list:
        """All variants, or the one called ``slug``."""
        return [self.variant(slug)] if slug else list(self.variants)


def library_metadata_template() -> dict[str, Any]:
    """The top-level ``dataset-metadata.json``: the library dataset, its owner a placeholder until built."""
    return json.loads((project_root() / "dataset-metadata.json").read_text())


# ---------------------------------------------------------------- reading YAML


def build(cls, values: Any, where: str):
    """Build dataclass ``cls`` from a YAML mapping, renamed keys read under their new names (with a note); unknown
    keys are an error naming ``where`` and the known keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    values = with_new_names(cls.__name__, values, where)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {known}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing keys {missing}")
    return cls(**values)


def read_yaml(cls, path: str | os.PathLike, what: str):
    """Build ``cls`` from a YAML file; a missing file or a bad field is an error naming the file."""
    import yaml

    file = resolve_path(path)
    if not file.exists():
        raise FileNotFoundError(f"{what} not found: {file}")
    try:
        return build(cls, yaml.safe_load(file.read_text()) or {}, what)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def load_plan(path: str | os.PathLike = DEFAULT_PLAN) -> Plan:
    """Read and validate a submission plan; errors name the file and the bad field."""
    return read_yaml(Plan, path, "submission plan")
