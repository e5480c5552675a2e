"""Kaggle delivery, the part that talks to Kaggle: credentials, the three datasets (built and pushed), kernel pushes,
status and submissions, through the kaggle CLI.

Credentials are the kaggle CLI's own (``~/.kaggle/kaggle.json`` or ``KAGGLE_USERNAME``/``KAGGLE_KEY``): this module
only checks that they exist and reads the user name; it never copies, prints or writes a key. What is pushed comes
from :mod:`kaggle_utils.kernels` (the plan and its rendered kernels).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import artifacts, git_commit, kernels, wheels
from .config import project_root, require, resolve_path
from .plan import USER_NAME, Plan, library_metadata_template

logger = logging.getLogger("kaggle_utils")

DATASETS_DIR = "build/datasets"
WHEELS_DIR = "build/wheels"
GPU_REQUIREMENTS = wheels.REQUIREMENTS  # beside the wheels in their dataset


class CredentialsError(RuntimeError):
    """No Kaggle credentials were found; the message says where they may come from."""


class KaggleCommandError(RuntimeError):
    """A kaggle CLI command failed; the message holds the command line and the CLI's own words."""


# ---------------------------------------------------------------- user and credentials


@dataclass(frozen=True)
class Credentials:
    """Where the kaggle CLI will find its credentials; holds the user name, never the key."""

    username: str  # the Kaggle user name ("" when only an access token was found)
    source: str  # where they come from, for messages: "environment" or a file path


def _config_dirs() -> list[Path]:
    """The folders the kaggle CLI reads kaggle.json from, in its order."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return [Path(os.environ["KAGGLE_CONFIG_DIR"]).expanduser()]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    return [Path.home() / ".kaggle", xdg]


def find_credentials() -> Credentials | None:
    """The kaggle CLI's credentials if any exist: KAGGLE_USERNAME + KAGGLE_KEY, kaggle.json, or an access token."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return Credentials(os.environ["KAGGLE_USERNAME"], "environment (KAGGLE_USERNAME, KAGGLE_KEY)")
    for folder in _config_dirs():
        file = folder / "kaggle.json"
        if file.is_file():
            try:
                data = json.loads(file.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                continue
            if data.get("username") and data.get("key"):
                return Credentials(str(data["username"]), str(file))
    # The CLI's newer access tokens carry no user name: KAGGLE_USERNAME or the plan's `user` must supply it.
    if os.environ.get("KAGGLE_API_TOKEN"):
        return Credentials(os.environ.get("KAGGLE_USERNAME", ""), "environment (KAGGLE_API_TOKEN)")
    for folder in _config_dirs():
        if (folder / "access_token").is_file():
            return Credentials(os.environ.get("KAGGLE_USERNAME", ""), str(folder / "access_token"))
    return None


def require_credentials(action: str) -> Credentials:
    """The credentials, or :class:`CredentialsError` saying how to provide them; call before writing anything."""
    creds = find_credentials()
    if creds is None:
        raise CredentialsError(
            f"{action} needs Kaggle credentials and found none, so nothing was written. Either put your API token "
            f"file at ~/.kaggle/kaggle.json (chmod 600; Kaggle > Settings > API > Create New Token), or export "
            f"KAGGLE_USERNAME and KAGGLE_KEY. They stay where you put them: this bundle never copies them.")
    return creds


def resolve_user(plan: Plan | None = None, required: bool = False) -> str:
    """The Kaggle user for ids: the plan's ``user``, else the credentials' user, else the placeholder.

    ``required`` (push, status, submit) refuses the placeholder.
    """
    if plan is not None and plan.user:
        return plan.user
    creds = find_credentials()
    user = os.environ.get("KAGGLE_USERNAME") or (creds.username if creds else "")
    if user:
        require(bool(USER_NAME.match(user)), "user", f"'{user}' is not a Kaggle user name")
        return user
    if required:
        raise CredentialsError("no Kaggle user name: set `user:` in the plan or export KAGGLE_USERNAME")
    return kernels.PLACEHOLDER_USER


# ---------------------------------------------------------------- datasets


def dataset_metadata(ref: str, title: str) -> dict[str, Any]:
    """A Kaggle dataset-metadata.json for ``owner/slug``."""
    slug = ref.split("/")[1]
    require(6 <= len(title) <= 50, "title", f"dataset title '{title}' must be 6-50 characters")
    require(6 <= len(slug) <= 50, "id", f"dataset slug '{slug}' must be 6-50 characters")
    return {"title": title, "id": ref, "licenses": [{"name": "CC0-1.0"}]}


def commit_stamp() -> str:
    """The checkout's commit, with "+dirty" when the library's files differ from it."""
    commit = git_commit()
    try:
        out = subprocess.run(["git", "-C", str(project_root()), "status", "--porcelain", "--", "kaggle_utils",
                              "pyproject.toml"], capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if out.returncode == 0 and out.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return commit


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def build_library_dataset(user: str, out: str | os.PathLike = f"{DATASETS_DIR}/library") -> Path:
    """``out/``: the kaggle_utils wheel (with a COMMIT stamp inside), COMMIT, and dataset-metadata.json for ``user``.

    The wheel is built from a copy of the source, so the checkout never gets a COMMIT file that would go stale.
    """
    root = project_root()
    folder = _fresh(resolve_path(out))
    stamp = commit_stamp()
    src = _fresh(folder.parent / (folder.name + ".src"))
    shutil.copy2(root / "pyproject.toml", src / "pyproject.toml")
    shutil.copytree(root / "kaggle_utils", src / "kaggle_utils",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "COMMIT"))
    (src / "kaggle_utils" / "COMMIT").write_text(stamp + "\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-q", "-w", str(folder), str(src)], check=True)
    shutil.rmtree(src)
    (folder / "COMMIT").write_text(stamp + "\n")
    template = library_metadata_template()
    ref = f"{user}/{template['id'].split('/')[1]}"
    (folder / "dataset-metadata.json").write_text(json.dumps(dataset_metadata(ref, template["title"]), indent=2) + "\n")
    logger.info("library dataset %s: %s", ref, ", ".join(sorted(p.name for p in folder.iterdir())))
    return folder


def build_adapters_dataset(plan: Plan, user: str, runs_dir: str | os.PathLike = "runs",
                           out: str | os.PathLike = f"{DATASETS_DIR}/adapters", slug: str = "") -> Path:
    """``out/<folder>/`` for every adapter the plan (or its variant ``slug``) names, copied from
    ``runs_dir/<folder>/selected/``.

    Every named adapter must exist locally: a new dataset version replaces the old one whole, so with ``slug`` the
    pushed dataset holds that variant's adapters only.
    """
    wanted = kernels.own_adapters(plan, slug)
    where = f"variant '{slug}'" if slug else "the plan"
    require(bool(wanted), "adapter", f"{where} reads no adapter from its own adapters dataset")
    runs = resolve_path(runs_dir)
    missing = kernels.missing_adapters(plan, slug, runs_dir)
    if missing:
        hint = "" if slug else " (VARIANT=<slug> pushes one variant's adapters only)"
        raise FileNotFoundError(f"adapters {where} needs are missing{hint}:\n  " + "\n  ".join(missing))
    folder = _fresh(resolve_path(out))
    manifest = {}
    for name, merged in wanted.items():
        sel = runs / name / artifacts.SELECTED_DIR
        shutil.copytree(sel, folder / name, ignore=None if merged else shutil.ignore_patterns("merged"))
        manifest[name] = artifacts.Selection.record(sel) or {}  # what each selection.json says, as written
    (folder / "adapters.json").write_text(json.dumps({"commit": commit_stamp(), "adapters": manifest}, indent=2) + "\n")
    ref = kernels.dataset_ref(plan.adapters_dataset, user)
    (folder / "dataset-metadata.json").write_text(
        json.dumps(dataset_metadata(ref, "Prompt recovery LoRA adapters"), indent=2) + "\n")
    logger.info("adapters dataset %s: %s", ref, ", ".join(wanted))
    return folder


def wheels_download_command(out: str | os.PathLike = WHEELS_DIR, python_version: str = "3.12",
                            requirements: str = GPU_REQUIREMENTS) -> list[str]:
    """``pip download`` of the GPU requirements as wheels for Kaggle's Python on x86-64 Linux (glibc 2.35).

    Binary wheels only: Kaggle cannot build anything offline. Every manylinux tag up to glibc 2.35, since pip takes
    only the platforms it is given.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-r", str(resolve_path(requirements)),
           "-d", str(resolve_path(out)), "--only-binary=:all:", "--python-version", python_version,
           "--implementation", "cp"]
    # pip matches platform tags exactly, and the wheels use many (torch's CUDA libraries: manylinux_2_27; others
    # 2_17, 2_28, 2_34...): every glibc from 2.17 up to Kaggle's 2.35, newest first.
    for platform in [f"manylinux_2_{n}_x86_64" for n in range(35, 16, -1)] + ["manylinux2014_x86_64"]:
        cmd += ["--platform", platform]
    return cmd


def write_wheels_metadata(plan: Plan, user: str, out: str | os.PathLike = WHEELS_DIR) -> Path:
    """Put the requirements file and dataset-metadata.json beside the downloaded wheels."""
    folder = resolve_path(out)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(resolve_path(GPU_REQUIREMENTS), folder / GPU_REQUIREMENTS)
    ref = kernels.dataset_ref(plan.wheels_dataset, user)
    (folder / "dataset-metadata.json").write_text(
        json.dumps(dataset_metadata(ref, "Prompt recovery GPU wheels"), indent=2) + "\n")
    return folder


def set_dataset_owner(folder: str | os.PathLike, user: str) -> str:
    """Rewrite a built dataset's metadata id for ``user`` (a build without credentials wrote the placeholder)."""
    file = Path(folder) / "dataset-metadata.json"
    meta = json.loads(file.read_text())
    meta["id"] = f"{user}/{meta['id'].split('/')[1]}"
    file.write_text(json.dumps(meta, indent=2) + "\n")
    return meta["id"]


# ---------------------------------------------------------------- the kaggle CLI


def kaggle_cli() -> list[str]:
    """The kaggle CLI of this environment (next to its Python), else the one on PATH."""
    beside = Path(sys.executable).with_name("kaggle")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("kaggle")
    if found:
        return [found]
    return [sys.executable, "-m", "kaggle"]


def run_kaggle(*args: str, timeout: float | None = None) -> str:
    """Run ``kaggle <args>`` and return its output; a failure raises with the command and the CLI's words.

    The CLI finds the credentials itself (kaggle.json or the environment); they never appear in the command line.
    """
    cmd = kaggle_cli() + list(args)
    logger.info("$ kaggle %s", " ".join(args))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = (proc.stdout or "") + (proc.stderr or "")
    if out.strip():
        print(out.rstrip())
    if proc.returncode != 0:
        raise KaggleCommandError(f"`kaggle {' '.join(args)}` failed ({proc.returncode}): {out.strip()[-800:]}")
    return out


def push_kernel(folder: str | os.PathLike) -> int | None:
    """``kaggle kernels push -p folder``; records and returns the new version number."""
    out = run_kaggle("kernels", "push", "-p", str(folder), timeout=600)
    # The CLI prints a server-side refusal but still exits 0.
    if "Kernel push error" in out:
        raise KaggleCommandError(f"`kaggle kernels push -p {folder}`: {out.strip()}")
    match = re.search(r"Kernel version (\d+) successfully", out)
    version = int(match.group(1)) if match else None
    url = re.search(r"(https?://\S+)\s*$", out.strip())
    (Path(folder) / "push.json").write_text(json.dumps({
        "version": version, "url": url.group(1) if url else "", "commit": git_commit()}, indent=2) + "\n")
    return version


def push_dataset(folder: str | os.PathLike, message: str) -> str:
    """A new version of the dataset in ``folder`` (``create`` the first time); sub-folders travel zipped."""
    ref = json.loads((Path(folder) / "dataset-metadata.json").read_text())["id"]
    try:
        run_kaggle("datasets", "status", ref, timeout=120)
        exists = True
    except KaggleCommandError:
        exists = False
    if exists:
        args = ["datasets", "version", "-p", str(folder), "-m", message, "-r", "zip"]
    else:
        logger.info("dataset %s not found: creating it (private)", ref)
        args = ["datasets", "create", "-p", str(folder), "-r", "zip"]
    out = run_kaggle(*args)
    # As with kernels, the CLI prints a server-side refusal but exits 0.
    if "creation error" in out:
        raise KaggleCommandError(f"`kaggle {' '.join(args)}`: {out.strip()}")
    return ref


def kernel_status(ref: str) -> str:
    """``kaggle kernels status owner/slug``."""
    return run_kaggle("kernels", "status", ref, timeout=120)


def submit_kernel(ref: str, version: int, message: str) -> str:
    """Submit version ``version`` of kernel ``ref`` to the competition (a code submission)."""
    return run_kaggle("competitions", "submit", kernels.COMPETITION, "-k", ref, "-v", str(version),
                      "-f", Path(kernels.SUBMISSION_FILE).name, "-m", message, timeout=300)


def pushed_version(slug: str, kernels_dir: str | os.PathLike = kernels.KERNELS_DIR) -> int | None:
    """The version the last `make push` recorded for ``slug``, if any."""
    record = resolve_path(kernels_dir) / slug / "push.json"
    if not record.exists():
        return None
    return json.loads(record.read_text()).get("version")
