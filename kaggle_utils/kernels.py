"""Kaggle delivery, the part that needs no account: rendered kernels, their parameters and sources, the local dry run.

The plan (``configs/submissions.yaml``, read by :mod:`kaggle_utils.plan`) lists the planned submissions ("variants").
Each one becomes a Kaggle kernel: ``notebooks/inference.ipynb`` prepared by papermill (parameters injected, nothing
run) with an install cell put first and its ``kernel-metadata.json``, in ``build/kernels/<slug>/``. The authored
notebook stays free of Kaggle-only logic; rendered kernels are build products (as in Kaggle/learntools).

Kernels read only attached inputs, mounted read-only under ``/kaggle/input``:
  - the competition data: ``/kaggle/input/llm-prompt-recovery/test.csv``;
  - base models (Kaggle models ``owner/model/framework/variation/version``): ``/kaggle/input/model/framework/variation/version``;
  - the library dataset (``kaggle_utils`` wheel + COMMIT stamp), the adapters dataset (one folder per adapter) and the
    wheels dataset (vLLM and its dependencies), each at ``/kaggle/input/<dataset-slug>``;
and write only under ``/kaggle/working``. A local dry run maps those paths to folders on this machine.

Building and pushing the datasets, pushing kernels, submitting, and the credentials all that needs, are
:mod:`kaggle_utils.kaggle_api`'s.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, artifacts, git_commit, wheels
from .config import ConfigError, project_root, require, resolve_path
from .models import get_preset
from .plan import MERGED_DIR, ModelEntry, Plan, Variant, read_yaml, rename_model_keys

logger = logging.getLogger("kaggle_utils")

COMPETITION = "llm-prompt-recovery"
KAGGLE_INPUT = "/kaggle/input"
KAGGLE_WORKING = "/kaggle/working"
TEST_FILE = f"{KAGGLE_INPUT}/{COMPETITION}/test.csv"
SUBMISSION_FILE = f"{KAGGLE_WORKING}/submission.csv"
MACHINE_SHAPE = "NvidiaTeslaT4"  # 2xT4, 15 GB each, fp16 only
PLACEHOLDER_USER = "KAGGLE_USERNAME"  # the owner written into ids when no Kaggle user is known (render only)
USER_TOKEN = "{user}"  # in a plan's sources: the resolved Kaggle user
PACKAGE = "kaggle-utils-prompt-recovery"  # the distribution name of kaggle_utils (pyproject.toml)
CODE_FILE = "inference.ipynb"  # the notebook's name inside a kernel folder
INSTALL_CELL_ID = "kaggle-install"

DEFAULT_LOCAL_SETTINGS = "configs/local-inputs.yaml"
KERNELS_DIR = "build/kernels"
LOCAL_DIR = "build/local"
GPU_WHEELS_TARGET = wheels.DEFAULT_TARGET  # where a kernel installs the GPU wheels


# ---------------------------------------------------------------- sources and kernel parameters


def _with_user(source: str, user: str) -> str:
    return source.replace(USER_TOKEN, user)


def dataset_ref(slug_or_ref: str, user: str) -> str:
    """``owner/slug`` for a dataset given as ``slug`` (yours) or ``owner/slug``."""
    ref = _with_user(slug_or_ref, user)
    return ref if "/" in ref else f"{user}/{ref}"


def dataset_path(ref: str) -> str:
    """Where Kaggle mounts dataset ``owner/slug[/sub/path]``: ``/kaggle/input/slug[/sub/path]``."""
    return "/".join([KAGGLE_INPUT] + ref.split("/")[1:])


def model_path(source: str) -> str:
    """Where Kaggle mounts model ``owner/model/framework/variation/version``: ``/kaggle/input/model/.../version``."""
    return "/".join([KAGGLE_INPUT] + source.split("/")[1:])


def adapter_ref(plan: Plan, entry: ModelEntry, user: str) -> str:
    """``owner/dataset/folder`` of a model's adapter ("" without one)."""
    if not entry.adapter:
        return ""
    if "/" not in entry.adapter:
        return f"{user}/{plan.adapters_dataset}/{entry.adapter}"
    return _with_user(entry.adapter, user)


def dataset_sources(plan: Plan, variant: Variant, user: str) -> list[str]:
    """The datasets a variant's kernel attaches: the library, the wheels, then every adapters dataset it reads."""
    sources = [dataset_ref(plan.library_dataset, user), dataset_ref(plan.wheels_dataset, user)]
    for entry in variant.models:
        ref = adapter_ref(plan, entry, user)
        if ref:
            sources.append("/".join(ref.split("/")[:2]))
    return list(dict.fromkeys(sources))


def model_sources(variant: Variant, user: str) -> list[str]:
    """The Kaggle models (base weights) a variant's kernel attaches."""
    return list(dict.fromkeys(_with_user(m.model_source(), user) for m in variant.models if m.model_source()))


def kernel_params(plan: Plan, variant: Variant) -> dict[str, Any]:
    """The inference notebook's parameters for ``variant`` on Kaggle: every path under /kaggle/input or working."""
    models = []
    for entry in variant.models:
        # Mount paths never contain the owner, so they do not depend on who pushes the kernel.
        adapter = adapter_ref(plan, entry, PLACEHOLDER_USER)
        source = entry.model_source()
        models.append(dataclasses.replace(entry, base_model=model_path(source) if source else "",
                                          adapter=dataset_path(adapter) if adapter else "").to_dict())
    params: dict[str, Any] = {
        "test_file": TEST_FILE,
        "submission_path": SUBMISSION_FILE,
        "run_dir": f"{KAGGLE_WORKING}/inference",
        "scorer_path": "",  # the hidden test set has no answers to score
        "models": models,
        "use_mean_prompt": variant.use_mean_prompt,
        "engine": variant.engine,
        "deadline_hours": variant.deadline_hours,
    }
    if variant.mean_prompt:
        params["mean_prompt"] = variant.mean_prompt
    params.update(variant.params)
    return params


def kernel_metadata(plan: Plan, variant: Variant, user: str) -> dict[str, Any]:
    """``kernel-metadata.json`` for ``variant`` owned by ``user``."""
    return {
        "id": f"{user}/{variant.slug}",
        "title": variant.title,
        "code_file": CODE_FILE,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": True,
        # The competition forbids internet, and the CLI turns it on when the key is absent: always write it.
        "enable_internet": False,
        "machine_shape": MACHINE_SHAPE,
        "competition_sources": [COMPETITION],
        "dataset_sources": dataset_sources(plan, variant, user),
        "kernel_sources": [],
        "model_sources": model_sources(variant, user),
    }


def install_cell_source(plan: Plan) -> str:
    """The first cell of every rendered kernel: offline install of kaggle_utils, then of the GPU wheels (checked,
    with the HF engine on Kaggle's own torch as the fallback: :mod:`kaggle_utils.wheels`), then provenance."""
    library = f"{KAGGLE_INPUT}/{plan.library_dataset}"
    wheels = f"{KAGGLE_INPUT}/{plan.wheels_dataset}"
    return f'''\
# Added by `make render` (kaggle_utils.kernels), not part of notebooks/inference.ipynb: on Kaggle, install the bundle's
# library, then the GPU wheels, fully offline (this competition allows no internet). The GPU wheels go to a folder of
# their own and are used only if vLLM imports and sees the GPUs there; otherwise the log says why and the HF engine
# runs on Kaggle's own torch, so the install can never cost the submission.
# Off Kaggle (`make render-local`) nothing is installed and the checkout's kaggle_utils is used.
import os, subprocess, sys
LIBRARY_DIR = "{library}"  # the kaggle_utils wheel + COMMIT (make push-lib)
WHEELS_DIR = "{wheels}"  # vLLM and its dependencies for Kaggle's Python (make wheels)
if "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check"]
    done = subprocess.run(pip + ["--no-deps", "--force-reinstall", "--find-links", LIBRARY_DIR, "{PACKAGE}"],
                          capture_output=True, text=True)
    if done.returncode != 0:  # a pure-Python wheel imports as a zip archive: the kernel goes on without pip
        import glob
        found = sorted(glob.glob(os.path.join(LIBRARY_DIR, "*.whl"))) or [LIBRARY_DIR]
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"kaggle_utils did not install ({{reason[0][:300]}}): importing it from {{found[-1]}}")
        sys.path.insert(0, found[-1])  # and for child processes (the GPU wheels' check, vLLM's workers):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (found[-1], os.environ.get("PYTHONPATH", "")) if p)
import kaggle_utils
from kaggle_utils import config, wheels
config.setup_logging()
print(f"kaggle_utils {{kaggle_utils.__version__}}, commit {{kaggle_utils.git_commit()}}")
if "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
    print(wheels.summary(wheels.setup_gpu_stack(WHEELS_DIR, "{GPU_WHEELS_TARGET}")))'''


# ---------------------------------------------------------------- notebooks


def notebook_parameters(nb) -> dict[str, Any]:
    """The values a notebook runs with: its ``parameters`` cell, overridden by papermill's injected cell.

    Both cells are flat literal assignments (the bundle's contract), read with ``ast.literal_eval``.
    """
    values: dict[str, Any] = {}
    for tag in ("parameters", "injected-parameters"):
        for cell in nb.cells:
            if cell.cell_type == "code" and tag in cell.metadata.get("tags", []):
                for node in ast.parse(cell.source).body:
                    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                        values[node.targets[0].id] = ast.literal_eval(node.value)
                break
    return values


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def mounted_roots(metadata: dict[str, Any]) -> list[str]:
    """The folders a kernel with ``metadata`` may read: its attached sources' mounts, and the working folder."""
    roots = [f"{KAGGLE_INPUT}/{c}" for c in metadata.get("competition_sources", [])]
    roots += [dataset_path(d) for d in metadata.get("dataset_sources", [])]
    roots += [model_path(m) for m in metadata.get("model_sources", [])]
    return roots + [KAGGLE_WORKING]


def foreign_paths(params: dict[str, Any], metadata: dict[str, Any]) -> list[str]:
    """Path-like parameter values a kernel could not read on Kaggle (outside its attached inputs and working dir)."""
    roots = mounted_roots(metadata)
    bad = []
    for s in _strings(params):
        looks_like_path = "/" in s or s.endswith((".csv", ".json", ".safetensors"))
        if looks_like_path and not any(s == r or s.startswith(r + "/") for r in roots):
            bad.append(s)
    return bad


def _check_notebook(path: Path) -> list[str]:
    """The notebook's parameter names; a missing notebook is an error that says who provides it."""
    import papermill

    if not path.exists():
        raise FileNotFoundError(f"inference notebook not found: {path} (the plan's `notebook`; notebooks/ holds it)")
    return list(papermill.inspect_notebook(str(path)))


def render_variant(plan: Plan, variant: Variant, user: str, out_dir: str | os.PathLike = KERNELS_DIR) -> Path:
    """Write ``out_dir/<slug>/`` for ``variant``: the prepared notebook (install cell first) and kernel-metadata.json.

    The folder is rebuilt from scratch, so a stale file never rides along to Kaggle.
    """
    import nbformat
    import papermill

    source = resolve_path(plan.notebook)
    known = _check_notebook(source)
    params = kernel_params(plan, variant)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"variant '{variant.slug}': {unknown} are not parameters of {plan.notebook}; it has {known}")
    metadata = kernel_metadata(plan, variant, user)

    folder = resolve_path(out_dir) / variant.slug
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    notebook = tmp / CODE_FILE
    papermill.execute_notebook(str(source), str(notebook), parameters=params, prepare_only=True,
                               kernel_name="python3", progress_bar=False, log_output=False)
    nb = nbformat.read(notebook, as_version=4)
    # Every value the kernel runs with, the notebook's own defaults included, must point into what Kaggle mounts.
    bad = foreign_paths(notebook_parameters(nb), metadata)
    if bad:
        shutil.rmtree(tmp)
        raise ConfigError(f"variant '{variant.slug}': {bad} lie outside the kernel's attached inputs "
                          f"({', '.join(mounted_roots(metadata))})")
    # Papermill records absolute local paths; the kernel should carry only names that mean something on Kaggle.
    if "papermill" in nb.metadata:
        inside = source.is_relative_to(project_root())
        nb.metadata.papermill["input_path"] = str(source.relative_to(project_root())) if inside else source.name
        nb.metadata.papermill["output_path"] = CODE_FILE
    for c in nb.cells:  # papermill gives its cell a random id; a fixed one keeps re-renders identical
        if "injected-parameters" in c.metadata.get("tags", []):
            c["id"] = "injected-parameters"
    cell = nbformat.v4.new_code_cell(install_cell_source(plan))
    cell["id"] = INSTALL_CELL_ID
    cell.metadata["tags"] = ["kaggle-install"]
    nb.cells.insert(0, cell)
    nbformat.validate(nb)
    nbformat.write(nb, notebook)
    (tmp / "kernel-metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    # Beside the kernel, what it was built from: the variant as planned, the library version and commit.
    (tmp / "variant.json").write_text(json.dumps({
        "variant": dataclasses.asdict(variant), "parameters": params, "kaggle_utils": __version__,
        "commit": git_commit()}, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def render(plan: Plan, user: str, out_dir: str | os.PathLike = KERNELS_DIR, slug: str = "",
           runs_dir: str | os.PathLike = "runs") -> list[Path]:
    """Render every variant (or the one called ``slug``) into ``out_dir``; returns the kernel folders. Each adapter
    folder of the plan's own dataset that ``runs_dir`` does not hold yet is named, with the commands that make it."""
    if user == PLACEHOLDER_USER:
        logger.warning("no Kaggle user (KAGGLE_USERNAME, ~/.kaggle/kaggle.json or the plan's `user`): ids read "
                       "'%s/...'; `make push` renders again with yours", PLACEHOLDER_USER)
    folders = [render_variant(plan, v, user, out_dir) for v in plan.select(slug)]
    for f in folders:
        logger.info("rendered %s", f)
    missing = missing_adapters(plan, slug, runs_dir)
    if missing:  # the kernels are rendered; their adapters dataset cannot be built here until these exist
        logger.warning("adapter folders not in runs/ yet (`make push-adapters` needs each):\n  %s",
                       "\n  ".join(missing))
    return folders


# ---------------------------------------------------------------- the local dry run


@dataclass
class LocalSettings:
    """How `make render-local` runs a rendered kernel on this machine (``configs/local-inputs.yaml``)."""

    paths: dict  # /kaggle/... prefix -> local path (relative = from the checkout; "{slug}" = the variant's slug)
    model: dict = field(default_factory=dict)  # replaces every planned model's fields (e.g. the demo's); {} = keep
    max_n: int = 0  # cap on predictions per model and row (CPU time); 0 = as planned
    params: dict = field(default_factory=dict)  # other notebook parameters for the dry run, e.g. {"max_rows": 8}

    def __post_init__(self):
        require(isinstance(self.paths, dict) and bool(self.paths), "paths", "map at least /kaggle/working")
        for prefix in self.paths:
            require(str(prefix).startswith("/kaggle/"), "paths", f"'{prefix}' is not a /kaggle/ path")
        self.model = rename_model_keys(dict(self.model or {}), "model")
        allowed = {f.name for f in dataclasses.fields(ModelEntry)} - {"name", "n"}
        extra = sorted(set(self.model) - allowed)
        require(not extra, "model", f"{extra} cannot be replaced; allowed: {sorted(allowed)}")
        require(self.max_n >= 0, "max_n", f"must be >= 0, got {self.max_n}")


def load_local_settings(path: str | os.PathLike = DEFAULT_LOCAL_SETTINGS) -> LocalSettings:
    """Read the dry-run settings file."""
    return read_yaml(LocalSettings, path, "local settings")


def _map_path(value: str, paths: dict[str, str], slug: str) -> str:
    if not value.startswith("/kaggle/"):
        return value
    for prefix in sorted(paths, key=len, reverse=True):  # the most specific mapping wins
        root = prefix.rstrip("/")
        if value == root or value.startswith(root + "/"):
            local = resolve_path(str(paths[prefix]).replace("{slug}", slug))
            rest = value[len(root):].lstrip("/")
            return str(local / rest) if rest else str(local)
    raise ConfigError(f"paths: no local folder for '{value}'; add its prefix to the local settings file")


def localize_params(params: dict[str, Any], settings: LocalSettings, slug: str) -> dict[str, Any]:
    """A kernel's parameters for this machine: models replaced as the settings say, /kaggle paths mapped."""
    local = json.loads(json.dumps(params))  # a deep copy of plain data
    override = {k: str(resolve_path(v)) if k in ("adapter", "base_model") and v else v
                for k, v in settings.model.items()}
    for m in local.get("models", []):
        m.update(override)
        if settings.max_n:
            m["n"] = min(m["n"], settings.max_n)
            if m.get("temperature", 0) == 0:
                m["n"] = 1
    local.update(settings.params)

    def walk(value):
        if isinstance(value, str):
            return _map_path(value, settings.paths, slug)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return walk(local)


def check_submission(path: str | os.PathLike, test_file: str | os.PathLike, max_rows: int = 0):
    """Read a submission and check it: columns id,rewrite_prompt, one row per test id, no blank prompt.

    ``max_rows`` > 0: the run covered only the test file's first rows (the notebook's quick-check parameter).
    """
    import pandas as pd

    sub = pd.read_csv(path, keep_default_na=False)
    test = pd.read_csv(test_file)
    if max_rows:
        test = test.head(max_rows)
    if list(sub.columns) != ["id", "rewrite_prompt"]:
        raise ValueError(f"{path}: columns are {list(sub.columns)}, expected ['id', 'rewrite_prompt']")
    if sorted(sub["id"].astype(str)) != sorted(test["id"].astype(str)):
        raise ValueError(f"{path}: ids differ from {test_file}'s")
    blank = sub["rewrite_prompt"].astype(str).str.strip() == ""
    if blank.any():
        raise ValueError(f"{path}: {int(blank.sum())} blank prompts (Kaggle rejects them)")
    return sub


def run_local(plan: Plan, slug: str, settings: LocalSettings, kernels_dir: str | os.PathLike = KERNELS_DIR,
              out_dir: str | os.PathLike = LOCAL_DIR, user: str = PLACEHOLDER_USER) -> Path:
    """Render ``slug``'s kernel (its ids owned by ``user``), then execute it headless here with /kaggle paths mapped;
    returns the submission.

    The rendered kernel itself runs (its install cell only reports off Kaggle); papermill swaps its injected
    parameters for the local ones. The executed notebook lands in ``out_dir/<slug>/``.
    """
    import nbformat
    import papermill

    variant = plan.variant(slug)
    folder = render_variant(plan, variant, user, kernels_dir)
    params = localize_params(notebook_parameters(nbformat.read(folder / CODE_FILE, as_version=4)), settings, slug)
    # Fail here, with the fix, rather than deep inside the executed notebook.
    entries = [ModelEntry.from_dict(m, f"models[{i}]") for i, m in enumerate(params["models"])]
    needed = [params["test_file"]] + [p for m in entries for p in (m.base_model, m.adapter, m.merged_folder) if p]
    missing = [p for p in needed if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"the dry run of '{slug}' needs {missing}: run `make demo` for the demo's "
                                "validation.csv and selected adapter, or map other folders in the local settings")
    run = resolve_path(out_dir) / slug
    run.mkdir(parents=True, exist_ok=True)
    Path(params["submission_path"]).parent.mkdir(parents=True, exist_ok=True)
    (run / "parameters.json").write_text(json.dumps(params, indent=2) + "\n")
    logger.info("dry run of %s: executing %s -> %s", slug, folder / CODE_FILE, run / CODE_FILE)
    papermill.execute_notebook(str(folder / CODE_FILE), str(run / CODE_FILE), parameters=params,
                               kernel_name="python3", cwd=str(project_root()), progress_bar=False, log_output=True)
    sub = check_submission(params["submission_path"], params["test_file"], params.get("max_rows", 0))
    logger.info("dry run of %s: %d rows in %s", slug, len(sub), params["submission_path"])
    return Path(params["submission_path"])


# ---------------------------------------------------------------- the plan's datasets


def own_adapters(plan: Plan, slug: str = "") -> dict[str, bool]:
    """The adapter folders the plan (or its variant ``slug``) reads from its own adapters dataset -> whether any
    model serves merged/."""
    wanted: dict[str, bool] = {}
    for v in plan.select(slug):
        for m in v.models:
            if m.adapter and "/" not in m.adapter:
                wanted[m.adapter] = wanted.get(m.adapter, False) or m.use_merged
    return wanted


def train_commands(preset: str, run: str) -> str:
    """The two make commands that leave ``runs/<run>/selected/``: train the preset as that run, then select."""
    return f"`make {get_preset(preset).make_target} RUN={run}`, then `make select RUN={run}`"


def missing_adapters(plan: Plan, slug: str = "", runs_dir: str | os.PathLike = "runs") -> list[str]:
    """One line for each adapter folder the plan (or its variant ``slug``) reads from its own adapters dataset that
    ``runs_dir/<adapter>/selected/`` does not hold yet: the folder, the variants that need it and the commands that
    make it. Empty when `make push-adapters` has everything."""
    runs = resolve_path(runs_dir)
    merged = own_adapters(plan, slug)
    needed: dict[str, list[str]] = {name: [] for name in merged}
    presets: dict[str, str] = {}
    for v in plan.select(slug):
        for m in v.models:
            if m.adapter in needed:
                needed[m.adapter].append(v.slug)
                presets.setdefault(m.adapter, m.preset)
    lines = []
    for name, slugs in needed.items():
        sel = runs / name / artifacts.SELECTED_DIR
        who = ", ".join(dict.fromkeys(slugs))
        if not artifacts.has_adapter(sel):
            lines.append(f"{sel} (needed by {who}): {train_commands(presets[name], name)}")
        elif merged[name] and not (sel / MERGED_DIR / "config.json").exists():
            lines.append(f"{sel / MERGED_DIR} (needed by {who}: a model serves use_merged): export the merged weights "
                         f"with `make select RUN={name} SELECT_ARGS=\"-p export_merged True\"`")
    return lines
