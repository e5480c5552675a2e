"""The documents against their sources: every relative link resolves, and the README's score table says what the
results files it cites say. Run: `.venv/bin/python -m pytest -q tests/test_documents.py`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *REPO.glob("research/*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title)))
    return out


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    text = doc.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto: ... are not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(REPO)}: {broken}"


def _half_up(value: float) -> str:
    """A score as the documents print it: 3 decimals, a tie rounded up (0.2005 -> 0.201), as people round."""
    from decimal import ROUND_HALF_UP, Decimal

    return str(Decimal(repr(round(float(value), 6))).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP))


def _table(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first table under ``heading``, each a list of its cells."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start + 2:end]]


def test_the_readme_scores_are_the_ones_their_results_files_hold():
    """Every score in the README's "What to expect" table is a value of the rows of the file and recipe its source
    cell names (a row's scs, scs_lo or scs_hi, or the mean of their scs), rounded to 3 decimals."""
    readme = (REPO / "README.md").read_text()
    rows = _table(readme, "## What to expect")
    assert len(rows) >= 4
    for cells in rows:
        source = cells[-1]
        link, recipe = re.search(r"\]\(([^)]+\.csv)\)", source), re.search(r"recipe `([^`]+)`", source)
        assert link and recipe, f"README row {cells[0]!r}: its source cell names no CSV and recipe"
        table = pd.read_csv(REPO / link.group(1))
        runs = table[table["recipe"] == recipe.group(1)]
        assert len(runs), f"{link.group(1)} has no recipe {recipe.group(1)!r}"
        known = {_half_up(v) for col in ("scs", "scs_lo", "scs_hi") for v in runs[col]}
        known.add(_half_up(runs["scs"].mean()))
        shown = re.findall(r"\b0\.\d{3}\b", cells[3])
        assert shown, f"README row {cells[0]!r}: no score"
        assert set(shown) <= known, (f"README row {cells[0]!r} shows {sorted(set(shown) - known)}, which "
                                     f"{link.group(1)} ({recipe.group(1)}) does not hold: {sorted(known)}")


def test_the_results_headline_agrees_with_the_readme():
    """RESULTS.md's headline table states the same numbers for the same files (one source, two readers)."""
    results = (REPO / "RESULTS.md").read_text()
    for cells in _table((REPO / "README.md").read_text(), "## What to expect"):
        for number in re.findall(r"\b0\.\d{3}\b", cells[3]):
            assert number in results, f"README's {number} ({cells[0]}) is not in RESULTS.md"
