#!/usr/bin/env bash
# The test command: installs what the tests need (backbone weights), then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests build in the dev profile (dependencies optimised); reuse it for the weights import
# instead of compiling a second, release copy of every dependency.
VIGIL="cargo run --quiet --" models/get-weights.sh
cargo test "$@"
