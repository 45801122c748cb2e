#!/usr/bin/env bash
# The demo: synthetic product → train NF-BMR → evaluate → calibrate → score, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
models/get-weights.sh
cargo build --release --quiet
vigil=target/release/vigil
out=runs/demo
rm -rf "$out" && mkdir -p "$out"
$vigil synth --out "$out/data" --seed 1
$vigil train --method nf-bmr --data "$out/data" --out "$out/model.safetensors" --seed 1 --config configs/nf-bmr-demo.toml
$vigil eval --model "$out/model.safetensors" --data "$out/data" --out "$out/report"
$vigil calibrate --model "$out/model.safetensors" --good "$out/data/test/good" --defect "$out/data/test/crack" \
  --target-frr 0.05 --out "$out/calibration.toml"
$vigil score --model "$out/model.safetensors" --calibration "$out/calibration.toml" --heatmap "$out/heatmaps" \
  "$out"/data/test/good/000.png "$out"/data/test/scratch/000.png "$out"/data/test/spot/000.png || true
echo "report: $out/report/summary.md (ROC, histogram, worst-case overlays beside it)"
