#!/usr/bin/env bash
# Reproduces the README's training results (CPU, about 75 minutes on 2 cores):
# the demo, clevr-2d at k = P, P/2, P/4 and the VQA-v2-layout table at
# k = 32, 16, 8; `soc` is a longer Sort-of-CLEVR run at k = P and P/2 (about
# 90 minutes more, not in the README yet); `soc1k` trains the Relation
# Network on 1,000 Sort-of-CLEVR images for 6 epochs (about 30 minutes) and,
# when $PYTHON has torch and pillow, the same model in PyTorch
# (bench/torch_rn_train.py, about 10 minutes) for the learning curves side by
# side. `socfull` is the full Sort-of-CLEVR pair of the README (issue 3, point
# 5: 196,000 questions an epoch, 20 epochs, k = 12 and 6 side by side on one
# thread each; about 12 hours of both cores on the Xeon, 10 on Zen 5): run
# the step again after an interruption and both runs continue from their
# last checkpoints, at most a tenth of an epoch back. `clevr2dfull` is the
# long clevr-2d table of the README (issue 3, point 5: 20,000 images, 194,571
# questions an epoch, 10 epochs at 64x64 with g and f 128, k = 12, 6 and 3
# side by side on one thread each; about 4 hours of both cores on Zen 4),
# resumable the same way.
# Usage: bench/results.sh [OUT] [STEP...] (steps: demo clevr2d vqa2 soc soc1k
# socfull clevr2dfull; default the first three). Each step writes JSON to OUT.
set -euo pipefail
OUT=${1:-results}
shift || true
STEPS=${*:-demo clevr2d vqa2}
B=${MOEVQA:-target/release/moevqa}
mkdir -p "$OUT"
for step in $STEPS; do
  case $step in
  demo)
    $B demo --out "$OUT/demo" --json > "$OUT/demo.json" ;;
  clevr2d)
    $B generate clevr-2d --out "$OUT/clevr2d-data" --train-images 1000 --val-images 200 --seed 1
    for k in 12 6 3; do
      $B train --data "$OUT/clevr2d-data" --out "$OUT/clevr2d-k$k" --k $k --epochs 6 --batch 64 \
        --image-size 64 --g-dim 128 --f-dim 128 --lr 1e-3
      $B eval --run "$OUT/clevr2d-k$k" --data "$OUT/clevr2d-data" --json > "$OUT/clevr2d-k$k.json"
    done ;;
  vqa2)
    $B demo --dataset vqa2 --out "$OUT/vqa2" --train-images 200 --val-images 60 --epochs 3 \
      --image-size 32 --json > "$OUT/vqa2.json" ;;
  soc)
    $B generate sort-of-clevr --out "$OUT/soc-data" --train-images 2000 --val-images 200 --seed 1
    for k in 12 6; do
      $B train --data "$OUT/soc-data" --out "$OUT/soc-k$k" --k $k --epochs 6 --batch 64 \
        --image-size 64 --g-dim 128 --f-dim 128 --lr 1e-3
      $B eval --run "$OUT/soc-k$k" --data "$OUT/soc-data" --json > "$OUT/soc-k$k.json"
    done ;;
  soc1k)
    $B generate sort-of-clevr --out "$OUT/soc1k-data" --train-images 1000 --val-images 100 --seed 1
    flags="--epochs 6 --batch 64 --image-size 75 --g-dim 128 --f-dim 128 --lr 1e-3 --k 12"
    # shellcheck disable=SC2086
    $B train --data "$OUT/soc1k-data" --out "$OUT/soc1k-moevqa" $flags
    if ${PYTHON:-python3} -c "import torch, PIL" 2>/dev/null; then
      # shellcheck disable=SC2086
      ${PYTHON:-python3} bench/torch_rn_train.py --data "$OUT/soc1k-data" $flags --threads 2 \
        > "$OUT/soc1k-torch.jsonl"
    fi ;;
  socfull)
    [ -d "$OUT/socfull-data" ] ||
      $B generate sort-of-clevr --out "$OUT/socfull-data" --train-images 9800 --val-images 200 --seed 1
    pids=()
    for k in 12 6; do
      RAYON_NUM_THREADS=1 $B train --data "$OUT/socfull-data" --out "$OUT/socfull-k$k" --k $k \
        --epochs 20 --batch 64 --lr 2.5e-4 --image-size 75 --checkpoint-every 19584 --resume \
        >> "$OUT/socfull-k$k.log" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    for k in 12 6; do
      $B eval --run "$OUT/socfull-k$k" --data "$OUT/socfull-data" --json > "$OUT/socfull-k$k.json"
    done
    $B report --run "$OUT/socfull-k12" --run "$OUT/socfull-k6" > "$OUT/socfull-report.md"
    $B plot --run "$OUT/socfull-k12" --run "$OUT/socfull-k6" --out "$OUT/socfull-curves.png" \
      --title "Sort-of-CLEVR, 75x75, batch 64, lr 2.5e-4"
    for k in 12 6; do
      $B plot --run "$OUT/socfull-k$k" --families --out "$OUT/socfull-k$k-families.png" \
        --title "Sort-of-CLEVR, k = $k, val accuracy per question type"
    done ;;
  clevr2dfull)
    [ -d "$OUT/c2d-data" ] ||
      $B generate clevr-2d --out "$OUT/c2d-data" --train-images 20000 --val-images 500 \
        --image-size 80 --seed 1
    pids=()
    for k in 12 6 3; do
      RAYON_NUM_THREADS=1 $B train --data "$OUT/c2d-data" --out "$OUT/c2d64-k$k" --k $k \
        --epochs 10 --batch 64 --lr 2.5e-4 --image-size 64 --g-dim 128 --f-dim 128 \
        --checkpoint-every 19456 --resume >> "$OUT/c2d64-k$k.log" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    for k in 12 6 3; do
      $B eval --run "$OUT/c2d64-k$k" --data "$OUT/c2d-data" --confusion --json \
        > "$OUT/c2d64-k$k.json"
    done
    # The k = 12 model run sparser at inference only.
    $B eval --run "$OUT/c2d64-k12" --data "$OUT/c2d-data" --k 6 --k 3 --json \
      > "$OUT/c2d64-k12-at-k6-k3.json"
    if command -v python3 > /dev/null; then
      python3 bench/family_table.py "$OUT/c2d64-k12.json" "$OUT/c2d64-k6.json" \
        "$OUT/c2d64-k3.json" > "$OUT/c2d64-families.md"
    fi
    $B report --run "$OUT/c2d64-k12" --run "$OUT/c2d64-k6" --run "$OUT/c2d64-k3" \
      > "$OUT/c2d64-report.md"
    $B plot --run "$OUT/c2d64-k12" --run "$OUT/c2d64-k6" --run "$OUT/c2d64-k3" \
      --out "$OUT/c2d64-curves.png" --title "clevr-2d, 64x64, g and f 128, batch 64, lr 2.5e-4"
    for k in 12 6 3; do
      $B plot --run "$OUT/c2d64-k$k" --families --out "$OUT/c2d64-k$k-families.png" \
        --title "clevr-2d, k = $k, val accuracy per question family"
    done ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
