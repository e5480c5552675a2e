"""Write or clean the bundle's notebooks.

Usage:
    python scripts/nbtool.py clean notebooks/*.ipynb   # strip outputs and execution counts, generic python3 kernel

Notebooks are committed clean: no outputs, null execution counts, kernelspec "python3".
"""
from __future__ import annotations

import sys

import nbformat

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def clean(path: str) -> bool:
    """Strip outputs/execution counts in place; True if the file changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
    nb.metadata.pop("papermill", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    after = nbformat.writes(nb)
    if after != before:
        nbformat.write(nb, path)
    return after != before


def build(path: str, cells: list[tuple[str, str]]) -> None:
    """Write a notebook from (kind, source) pairs; kind is "md", "code" or "parameters"."""
    nb = nbformat.v4.new_notebook()
    for kind, src in cells:
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(src.strip("\n")))
        else:
            c = nbformat.v4.new_code_cell(src.strip("\n"))
            if kind == "parameters":
                c.metadata["tags"] = ["parameters"]
            nb.cells.append(c)
    for i, cell in enumerate(nb.cells):  # stable ids keep diffs quiet
        cell["id"] = f"cell-{i:02d}"
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, path)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "clean":
        sys.exit(__doc__)
    changed = [p for p in sys.argv[2:] if clean(p)]
    print(f"cleaned {len(changed)} notebook(s)" + (f": {', '.join(changed)}" if changed else ""))
