"""Minutes per stage of a run, read from its executed notebooks (papermill records each notebook's duration).

Usage: python scripts/stage_times.py runs/demo
"""
import json
import sys
from pathlib import Path


def main(run: str) -> None:
    total = 0.0
    for nb in sorted(Path(run).rglob("*.ipynb"), key=lambda p: json.loads(p.read_text())["metadata"].get(
            "papermill", {}).get("start_time") or ""):
        meta = json.loads(nb.read_text())["metadata"].get("papermill", {})
        seconds = float(meta.get("duration") or 0)
        total += seconds
        print(f"{nb.relative_to(run)!s:40} {seconds / 60:6.2f} min  (started {meta.get('start_time', '?')})")
    print(f"{'all notebooks':40} {total / 60:6.2f} min")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
