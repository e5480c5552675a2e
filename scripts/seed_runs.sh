#!/usr/bin/env bash
# Several training seeds of one recipe, each trained and selected, and a submission plan that joins them: one model
# per seed, each with its own greedy prediction (the "combine models" plan with one base model); and the seeds' selected
# adapters averaged into one (make soup: one model at inference).
#   usage: scripts/seed_runs.sh RUN CONFIG SEEDS [TRAIN_ARGS...]
#   runs:  runs/RUN-s0 ... runs/RUN-s<SEEDS-1>; the plan: runs/RUN-seeds/plan.yaml, for
#          make infer TEST=<csv> INFER_ARGS="-f runs/RUN-seeds/plan.yaml"; the soup: runs/RUN-soup/selected and
#          runs/RUN-soup/plan.yaml
# An interrupted call resumes: training restarts from each run's last checkpoint, selection from its cache.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n '2,9p' "$0"; exit 2; }
run=$1; config=$2; seeds=$3; shift 3
[ -f "$config" ] || { echo "no recipe $config" >&2; exit 2; }
preset=$(sed -nE 's/^preset: *([A-Za-z0-9_.-]+).*/\1/p' "$config")
[ -n "$preset" ] || { echo "$config names no preset" >&2; exit 2; }
models=(); runs=()
for ((s = 0; s < seeds; s++)); do
  make --no-print-directory train RUN="$run-s$s" CONFIG="$config" TRAIN_ARGS="-p seed $s $*"
  make --no-print-directory select RUN="$run-s$s"
  models+=("  - {name: s$s, preset: $preset, adapter: runs/$run-s$s/selected}"); runs+=("runs/$run-s$s")
done
mkdir -p "runs/$run-seeds"
{ echo "# $seeds training seeds of $config, one greedy prediction each, joined in this order."
  echo "models:"; printf '%s\n' "${models[@]}"; } > "runs/$run-seeds/plan.yaml"
echo "plan: runs/$run-seeds/plan.yaml"
# The same seeds as one model: their selected adapters averaged (runs/RUN-soup/selected, runs/RUN-soup/plan.yaml)
# (a refusal, e.g. a seed whose base model won its selection, leaves the joined plan as the result)
[ "$seeds" -lt 2 ] || make --no-print-directory soup RUN="$run-soup" SOUP_RUNS="${runs[*]}" \
  || echo "no soup of the seeds (above: why); the joined plan stands" >&2
