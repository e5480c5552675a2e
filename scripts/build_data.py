"""Build data/ from the public upstream files (pinned commits, sha256 checked): `make data`.

Usage:
    python scripts/build_data.py                 # into data/ (downloads kept in data/upstream/)
    python scripts/build_data.py --out /path     # another folder

With no network it names each file's URL and the path to put it at by hand; run it again afterwards.
"""
from __future__ import annotations

import argparse
import sys

from kaggle_utils import config, sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=config.DATA_DIR, help="the folder to write (relative: from the checkout)")
    parser.add_argument("--base-url", default=sources.GITHUB_RAW, help="where <repo>/<commit>/<path> is served")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per connection")
    args = parser.parse_args(argv)
    config.setup_logging()
    try:
        written = sources.build_data(args.out, base_url=args.base_url, timeout=args.timeout)
    except sources.SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("data ready: " + ", ".join(str(p) for p in written.values()))
    used = config.data_dir()
    if used != written[sources.OUTPUTS[0]].parent.resolve():
        print(f"note: runs read data/... from {used}, which takes precedence (unset it or remove it to use these)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
