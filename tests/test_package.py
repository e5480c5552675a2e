"""The package itself: its module map names every module, once. Run: `pytest tests/test_package.py`."""
from __future__ import annotations

import re
from pathlib import Path

import kaggle_utils


def test_the_module_map_names_every_module_once():
    modules = sorted(p.stem for p in Path(kaggle_utils.__file__).parent.glob("*.py") if p.stem != "__init__")
    listed = re.findall(r"^    ``(\w+)``  ", kaggle_utils.__doc__, flags=re.MULTILINE)
    assert sorted(listed) == modules, set(modules) ^ set(listed)
