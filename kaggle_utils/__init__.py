"""kaggle_utils: the support library of the LLM Prompt Recovery notebook bundle.

Modules (one job each): ``models`` presets, ``data`` CSVs and splits, ``prompts`` templates, ``training`` LoRA
fine-tuning, ``checkpoints`` step selection, ``sampling`` engines, ``budget`` the deadline, ``blending`` the final
string, ``metric`` SCS, ``kernels`` Kaggle delivery. Importing the package is cheap: heavy libraries load inside the
modules that need them.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

__version__ = "0.1.0"


def git_commit() -> str:
    """The bundle's git commit: from a checkout, or from the ``COMMIT`` file a built dataset carries; else "unknown"."""
    here = Path(__file__).resolve().parent
    stamp = here / "COMMIT"
    if stamp.exists():
        return stamp.read_text().strip()
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
