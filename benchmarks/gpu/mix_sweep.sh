#!/usr/bin/env bash
# The CPU recipe's data mix over many training seeds, on the GPU at the CPU demo's budget (configs/smollm2-135m.yaml
# as it is: 150 steps x 8, prompts cut to 192 tokens; the GPU only makes it fast, the learning is the same
# computation). One CPU demo run's score moves by about 0.02 with the seed, so each arm runs SEEDS seeds. Each run:
# train, select on the choice rows (this is what chooses), then the same checkpoints scored on the report rows
# (select with validation_file = the run's report.csv: scored by step only, selected/ keeps the choice rows' step).
#   usage: benchmarks/gpu/mix_sweep.sh OUT_DIR [SEEDS] [JOBS]   (JOBS runs at once, spread over the visible GPUs)
#   results: OUT_DIR/NAME.txt per run; scripts/mix_table.py OUT_DIR turns them into a table
out=${1:-/tmp/mix}; seeds=${2:-8}; jobs=${3:-8}; mkdir -p "$out"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$gpus" -ge 1 ] || { echo "no GPU visible (nvidia-smi -L lists none)"; exit 1; }
arms=(  # name|train.ipynb arguments
  "x1|-r source_weights pedromb-gemma7b-eval:1"
  "x3|-r source_weights pedromb-gemma7b-eval:3"
  "x6|-r source_weights pedromb-gemma7b-eval:6"
  "x10|-r source_weights pedromb-gemma7b-eval:10"
  "x3nogpt|-r source_weights pedromb-gemma7b-eval:3,alexsaavedraa-gpt35:0"
)
one() {  # NAME GPU ARGS...: one run; its summary lands in OUT_DIR/NAME.txt when it is done
  local name=$1 gpu=$2; shift 2
  [ -f "$out/$name.txt" ] && return  # done in an earlier call of a machine still warm
  export CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=3
  make train RUN="$name" CONFIG=configs/smollm2-135m.yaml TRAIN_ARGS="$*" > "$out/$name-train.log" 2>&1 \
    || { echo "$name: train failed"; return; }
  make select RUN="$name" > "$out/$name-choice.log" 2>&1 || { echo "$name: select failed"; return; }
  make select RUN="$name" SELECT_ARGS="-r validation_file runs/$name/report.csv" > "$out/$name-report.log" 2>&1 \
    || { echo "$name: report select failed"; return; }
  local by_step="step [0-9]+: mean SCS [0-9.]+ \(cos [0-9.]+\) on [0-9]+ rows"
  if ! grep -qE "$by_step" "$out/$name-report.log" || ! grep -qE "selected step" "$out/$name-choice.log"; then
    echo "$name: no scores in its select logs"; return
  fi
  { echo "args: $*"; echo "choice rows:"; grep -hoE "$by_step|selected step [0-9]+" "$out/$name-choice.log"
    echo "report rows:"; grep -hoE "$by_step" "$out/$name-report.log"; } > "$out/$name.txt"
  echo "$name done"
}
export -f one; export out
i=0
for ((seed = 0; seed < seeds; seed++)); do
  for arm in "${arms[@]}"; do
    echo "${arm%%|*}-s$seed $((i % gpus)) -p seed $seed ${arm#*|}"; i=$((i + 1))
  done
done | xargs -P "$jobs" -L 1 bash -c 'one "$@"' _
echo "all done"
