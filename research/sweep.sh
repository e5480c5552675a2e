#!/usr/bin/env bash
# Compare training recipes over several training seeds: every arm of ARMS x SEEDS seeds is one run of CONFIG with
# the arm's train.ipynb arguments and `-p seed N`. Each run trains, selects its step on the choice rows (what
# chooses), then scores the same checkpoints on its report rows (`make select` with validation_file = the run's
# report.csv: scored by step only; selected/ keeps the choice rows' step). One run's score moves with the seed, so
# compare arms paired by seed: research/sweep_table.py OUT_DIR.
#
#   usage: research/sweep.sh CONFIG ARMS OUT_DIR [SEEDS] [JOBS]
#     CONFIG  a training recipe, e.g. configs/smollm2-135m.yaml
#     ARMS    a file of lines NAME|train.ipynb arguments (research/arms/cpu_mix.txt); # starts a comment
#     OUT_DIR per run NAME-sSEED/ (its selection.json and report_by_step.json) and the stage logs; a finished
#             run is skipped, so an interrupted sweep resumes; the runs train in runs/<OUT_DIR's name>-NAME-sSEED
#     SEEDS   training seeds 0..SEEDS-1 (default 4); JOBS runs at once (default: 1, or 6 per visible GPU),
#             spread over the visible GPUs
#
# On one H200, six SmolLM2 runs at the CPU budget shared the card at about 4 minutes a run. On a 2-core CPU run one
# job at a time: two torch processes there slow each other about 5x.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n '2,15p' "$0"; exit 2; }
config=$1; arms_file=$2; out=$3; seeds=${4:-4}
[ -f "$config" ] || { echo "no recipe $config"; exit 2; }
[ -f "$arms_file" ] || { echo "no arms file $arms_file"; exit 2; }
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
jobs=${5:-$([ "$gpus" -ge 1 ] && echo $((6 * gpus)) || echo 1)}
mkdir -p "$out"
one() {  # NAME GPU ARGS...: one run; its select stage's files land in OUT_DIR/NAME/ when it is done
  local name=$1 gpu=$2; shift 2
  local run; run="$(basename "$out")-$name"  # one sweep's runs never resume another's checkpoints
  [ -f "$out/$name/report_by_step.json" ] && return
  if [ "$gpu" -ge 0 ]; then export CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=3; fi
  make train RUN="$run" CONFIG="$config" TRAIN_ARGS="$*" > "$out/$name-train.log" 2>&1 \
    || { echo "$name: train failed (log: $out/$name-train.log)"; return; }
  make select RUN="$run" > "$out/$name-choice.log" 2>&1 || { echo "$name: select failed"; return; }
  make select RUN="$run" SELECT_ARGS="-r validation_file runs/$run/report.csv" > "$out/$name-report.log" 2>&1 \
    || { echo "$name: select on the report rows failed"; return; }
  mkdir -p "$out/$name" && echo "$*" > "$out/$name/args.txt"
  cp "runs/$run/selected/selection.json" "$out/$name/" && cp "runs/$run/report_by_step.json" "$out/$name/" \
    && echo "$name done"
}
export -f one; export out config
i=0
for ((seed = 0; seed < seeds; seed++)); do
  while IFS= read -r arm; do
    case "$arm" in ''|'#'*) continue ;; esac
    gpu=$([ "$gpus" -ge 1 ] && echo $((i % gpus)) || echo -1)
    # no trailing blank: xargs -L would join the next line to this one (an arm with no arguments, e.g. "base|")
    line="${arm%%|*}-s$seed $gpu -p seed $seed ${arm#*|}"; echo "${line%"${line##*[! ]}"}"; i=$((i + 1))
  done < "$arms_file"
done | xargs -P "$jobs" -L 1 bash -c 'one "$@"' _
echo "sweep done: python research/sweep_table.py $out"
