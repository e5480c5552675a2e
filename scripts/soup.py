"""Average the selected adapters of several runs (training seeds of one recipe) into one adapter, and write a plan
that serves it: `make soup RUN=<name> SOUP_RUNS="runs/a runs/b ..."` (`make seeds` calls it for its seeds).

Usage: python scripts/soup.py runs/OUT runs/RUN1 runs/RUN2 [...]
Writes runs/OUT/selected/ (the adapter and its selection.json), the first run's choice and report rows, and
runs/OUT/plan.yaml (one model, one greedy prediction), for
    make infer TEST=runs/OUT/report.csv INFER_ARGS="-f runs/OUT/plan.yaml -r score_split report"
"""
import sys
from pathlib import Path

from kaggle_utils import artifacts, config, data, export


def main(out: str, runs: list[str]) -> None:
    config.setup_logging()
    selected = export.soup_selections([Path(r) for r in runs], Path(out))
    sel = artifacts.Selection.read(selected)
    plan = selected.parent / "plan.yaml"  # the adapter relative to the checkout, as make infer resolves it
    adapter = export.relative_to_checkout(selected)
    plan.write_text(f"# the selected adapters of {len(runs)} runs averaged into one ({', '.join(runs)})\n"
                    f"models:\n  - {{name: soup, preset: {sel.preset}, adapter: {adapter}}}\n")
    print(f"soup: {selected}\nplan: {plan}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    try:
        main(sys.argv[1], sys.argv[2:])
    except (config.ConfigError, artifacts.ArtifactError, data.DataError) as e:
        sys.exit(str(e))
