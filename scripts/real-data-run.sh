#!/usr/bin/env bash
# Trains and evaluates a method with its CPU config on a real data set, timing the training.
# usage: [METHOD=ocr-gan CONFIG=configs/ocr-gan-cpu.toml VIGIL=path/to/vigil] scripts/real-data-run.sh NAME DATASET [train args ...]
# (default: NF-BMR with configs/nf-bmr-cpu.toml; logs to runs/official/NAME.log)
set -euo pipefail
name=$1; data=$2; shift 2
cd "$(dirname "$0")/.."
mkdir -p runs/official
v=${VIGIL:-target/release/vigil}
{ /usr/bin/time -f "train wall %e s, user %U s, sys %S s, max RSS %M KB" $v train --method "${METHOD:-nf-bmr}" --data "$data" --out runs/official/$name.safetensors --config "${CONFIG:-configs/nf-bmr-cpu.toml}" --quiet "$@"
  $v eval --model runs/official/$name.safetensors --data "$data" --out runs/official/$name-report --quiet; } > runs/official/$name.log 2>&1
