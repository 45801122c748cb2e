#!/usr/bin/env bash
# Cross-builds vigil for aarch64 (Jetson Orin) and runs the test suite under qemu-aarch64.
# Installs what it needs: the GNU aarch64 toolchain and qemu-user (apt), the Rust target (rustup).
# Arguments go to `cargo test` (e.g. `--test station`). Not part of CI: a cold build of Candle for
# aarch64 is long, and the tests run several times slower under emulation.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -q
    $sudo_cmd apt-get install -y -q "${need[@]}"
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
# The backbone weights the tests need, imported with a host build.
[ -f models/efficientnet-lite0.safetensors ] || VIGIL="cargo run --quiet --" models/get-weights.sh
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# Tests that start the vigil binary themselves run it under the same emulator.
export VIGIL_TEST_RUNNER="$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER"
# One test at a time: the station's real-time tests (deadlines, ejector delays) need the cores to
# themselves when every instruction is emulated.
export RUST_TEST_THREADS=1
cargo test --target "$target" --no-run "$@"
file "${CARGO_TARGET_DIR:-target}/$target/debug/vigil" 2>/dev/null || true
cargo test --target "$target" "$@"
