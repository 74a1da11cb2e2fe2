#!/usr/bin/env bash
# The README's block table: dense vs sparse for three presets, k = P/2 and
# P/4, batch 1 and 32. One JSON line per row.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
for preset in resnext101-conv3 clevr-conv2 ref-256x28; do
  case $preset in clevr*) P=12 ;; *) P=32 ;; esac
  for batch in 1 32; do
    for k in $((P / 2)) $((P / 4)); do
      ./target/release/moevqa bench block --preset "$preset" --batch "$batch" --k "$k" --iters 10 --json
    done
  done
done
