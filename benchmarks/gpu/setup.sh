#!/usr/bin/env bash
# On the GPU machine (no network), once benchmarks/gpu/build_payload.sh's pieces are in /tmp (piece-NN) with its
# zstandard wheel: assemble and install everything into /tmp/site (once per machine), then point .venv/bin/python at
# the machine's own Python (which sees /tmp/site first) and register its Jupyter kernel, so `make` runs as on a CPU box.
#   usage (each call, from the repo root): source benchmarks/gpu/setup.sh
set -e
if [ ! -f /tmp/site/.ready ]; then
  t0=$(date +%s)
  rm -rf /tmp/pay /tmp/vpay /tmp/site /tmp/zs && mkdir -p /tmp/pay /tmp/vpay /tmp/site
  cat /tmp/piece-* > /tmp/p.tar && tar -xf /tmp/p.tar -C /tmp/pay && rm /tmp/p.tar
  tar -xf /tmp/pay/vllm-payload.tar -C /tmp/vpay && rm /tmp/pay/vllm-payload.tar
  python3 -m pip install -q --no-index --no-deps --target /tmp/zs /tmp/zstandard-*.whl
  PYTHONPATH=/tmp/zs python3 -c "import zstandard, tarfile; tarfile.open(fileobj=zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(open('/tmp/vpay/vllm.tar.zst', 'rb')), mode='r|').extractall('/tmp/site')"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/vpay/wheels/*.whl \
    /tmp/pay/wheels/*.whl /tmp/pay/models/*.whl
  touch /tmp/site/.ready
  echo "installed into /tmp/site in $(( $(date +%s) - t0 )) s"
fi
# Wheels carried later than the pieces, installed once per set (a job left running in the background may be
# importing them): /tmp/site/.extra lists the set installed.
if [ -d .payload/extra ] && [ -f /tmp/site/.ready ] && ! ls .payload/extra | cmp -s - /tmp/site/.extra; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade .payload/extra/*.whl
  ls .payload/extra > /tmp/site/.extra
fi
# The data: ../shared does not travel with the working tree; a call carries .shared/data (a link to ../shared here).
if [ -d .shared/data ] && [ ! -f ../shared/data/gemma_rewrites.csv ]; then mkdir -p ../shared && cp -r .shared/data ../shared/; fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# The machine's python3 is itself a venv (/opt/torch/.venv), so a venv made from it would lose its packages:
# .venv/bin/python is a wrapper around it instead.
if ! grep -qs "exec $(command -v python3)" .venv/bin/python; then
  rm -rf .venv && mkdir -p .venv/bin
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > .venv/bin/python && chmod +x .venv/bin/python
fi
.venv/bin/python -m ipykernel install --sys-prefix --name python3 > /dev/null
touch .venv/.installed  # the Makefile's setup stamp: the CPU install must not run here
set +e
