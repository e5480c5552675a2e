#!/usr/bin/env bash
# The CPU recipe's settings compared on one GPU at the CPU demo's budget (the same examples and prompt lengths the
# 2-core box can afford in its ~7 training minutes; steps scale with 1 / tokens per step), each selected on the
# demo split's choice rows. The GPU only makes the comparison fast; the learning is the same computation.
#   usage: CUDA_VISIBLE_DEVICES=1 benchmarks/gpu/sweep.sh OUT_DIR
out=${1:-runs}; mkdir -p "$out"
run() {  # name, then papermill -p pairs
  local name=$1; shift
  make train RUN="$name" CONFIG=configs/smollm2-135m.yaml TRAIN_ARGS="$*" > "$out/$name-train.log" 2>&1 || { echo "$name: train failed"; return; }
  make select RUN="$name" > "$out/$name-select.log" 2>&1 || { echo "$name: select failed"; return; }
  echo "== $name: $*"; grep -E "step [0-9]+: mean SCS" "$out/$name-select.log" | sed 's/.*INFO //' | cut -c1-70
}
c="-p save_steps 25 -p rows_per_prompt 4"
run s1 $c -p max_steps 150 -p max_prompt_tokens 192 -p learning_rate 0.001
run s2 $c -p max_steps 150 -p max_prompt_tokens 192 -p learning_rate 0.002
run s3 $c -p max_steps 115 -p max_prompt_tokens 256 -p max_seq_length 352 -p learning_rate 0.002
run s4 $c -p max_steps 210 -p max_prompt_tokens 128 -p max_seq_length 224 -p learning_rate 0.002
run s5 $c -p max_steps 150 -p max_prompt_tokens 192 -p learning_rate 0.002 -p lora_r 64 -p lora_alpha 64
run s6 -p save_steps 25 -p rows_per_prompt 1 -p max_steps 150 -p max_prompt_tokens 192 -p learning_rate 0.002
run s7 $c -p max_steps 150 -p max_prompt_tokens 192 -p learning_rate 0.004
run s8 $c -p max_steps 150 -p max_prompt_tokens 192 -p learning_rate 0.002 -p lora_target_modules attention -p lora_r 16
