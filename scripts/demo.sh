#!/usr/bin/env bash
# The demo: synthetic product → train NF-BMR → calibrate → the inspection station on a folder of
# test parts, its serial signal on a pseudo-terminal pair; prints each line the PLC receives and a
# summary. CPU only; a few minutes on 2 cores, build included.
set -euo pipefail
cd "$(dirname "$0")/.."
models/get-weights.sh
cargo build --release --quiet
target/release/vigil demo --out runs/demo --method-config configs/nf-bmr-demo.toml --seed 1 "$@"
# The model's evaluation report on the same data (ROC, histogram, worst-case overlays).
target/release/vigil eval --model runs/demo/model.safetensors --data runs/demo/data --out runs/demo/report --quiet
echo "report: runs/demo/report/summary.md; station results: runs/demo/results.jsonl; rejected parts: runs/demo/audit"
