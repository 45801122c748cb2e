#!/usr/bin/env bash
# Trains and evaluates NF-BMR with the CPU config on a real data set, timing the training.
# usage: scripts/real-data-run.sh NAME DATASET [--set k=v ...]  (logs to runs/official/NAME.log)
set -euo pipefail
name=$1; data=$2; shift 2
cd "$(dirname "$0")/.."
mkdir -p runs/official
v=target/release/vigil
{ /usr/bin/time -f "train wall %e s, user %U s, sys %S s, max RSS %M KB" $v train --data "$data" --out runs/official/$name.safetensors --config configs/nf-bmr-cpu.toml --quiet "$@"
  $v eval --model runs/official/$name.safetensors --data "$data" --out runs/official/$name-report --quiet; } > runs/official/$name.log 2>&1
