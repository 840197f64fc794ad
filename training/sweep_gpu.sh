#!/usr/bin/env bash
# Run several train_pii.py recipes at once on one GPU; logs and metrics end up in $OUT/results.tgz.
# usage: OUT=/some/dir training/sweep_gpu.sh "name|options added to BASE" ...
# Needs faker, seqeval and wordfreq importable (here: unpacked wheels in .whl-train/site).
# Nine jobs on one H200 (16 cores) ran at ~44k tokens/s each, ~4.1 min per job end to end.
# With several GPUs the jobs take them in turn (job i on GPU i mod count).
set -u
export PYTHONPATH=$PWD/.whl-train/site:$PWD RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
# run I of training/README.md
BASE="--reserved-words 0 --intermediate 768 --max-vocab 28200 --train-size 170000 --case-rate 0.09"
(while true; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader \
   >> "$OUT/smi.log"; sleep 10; done) &
MON=$!
date -u +%T > "$OUT/start"
GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
pids=()
i=0
for job in "$@"; do
  name=${job%%|*}; opts=${job#*|}
  ( CUDA_VISIBLE_DEVICES=$((i % GPUS)) python3 training/train_pii.py --device cuda --threads 2 \
      --out "$OUT/$name" $BASE $opts > "$OUT/$name.log" 2>&1
    rm -f "$OUT/$name/model.safetensors" "$OUT/$name/tokenizer.json"
    echo "$(date -u +%T) $name done" >> "$OUT/done" ) &
  pids+=($!)
  i=$((i + 1))
done
wait "${pids[@]}"
kill $MON
tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/"
