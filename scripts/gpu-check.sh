#!/usr/bin/env bash
# The GPU checks of issue 20 (CUDA custom kernels), in two steps that may run on two machines:
#
#   scripts/gpu-check.sh build   Builds, with `--features cuda`, the GPU tests (tests/kernels_cuda.rs)
#                                and the CUDA benchmark (benches/cuda_methods.rs) into
#                                target/gpu-check/ (stripped, ~40 MB with the weights). Needs nvcc:
#                                on the PATH, or $CUDA_ROOT, else it unpacks NVIDIA's PyPI wheels
#                                (CUDA 13.0) into $VIGIL_CUDA_TOOLKIT (default ../cuda-toolkit, outside
#                                the project) with a link-time libcuda stub for a machine without a
#                                driver. CUDA_COMPUTE_CAP (default 90, an H100; 87 for a Jetson Orin)
#                                picks the PTX target.
#   scripts/gpu-check.sh run     On the GPU machine, from the repository root, with target/gpu-check
#                                and models/efficientnet-lite0.safetensors present: the GPU tests
#                                (custom ops and Lite0 on CUDA against the CPU reference, within 1e-4),
#                                then the table of candle's ops against the custom kernels per layer
#                                and per method stage at 256², and NF-BMR against the targets
#                                (>= 1000 images/s at batch 8, <= 2 ms at batch 1). Finds the CUDA 13
#                                libraries (cudart, cublas, curand, nvrtc) on the machine, e.g. in a
#                                Python environment's nvidia/cu13/lib.
#   scripts/gpu-check.sh         Both, on a GPU machine that can build.
#
# With the device tool: `scripts/gpu-check.sh build` here, then run `bash scripts/gpu-check.sh run`
# there with carry ["target/gpu-check", "models/efficientnet-lite0.safetensors"].
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/gpu-check
step=${1:-all}

toolkit() {
    if command -v nvcc >/dev/null; then return; fi
    if [ -n "${CUDA_ROOT:-}" ] && [ -x "$CUDA_ROOT/bin/nvcc" ]; then
        export PATH="$CUDA_ROOT/bin:$PATH"
        return
    fi
    local dir=${VIGIL_CUDA_TOOLKIT:-$(cd .. && pwd)/cuda-toolkit}
    local root=$dir/unpacked/nvidia/cu13
    if [ ! -x "$root/bin/nvcc" ]; then
        echo "installing nvcc and the CUDA 13.0 libraries from PyPI into $dir"
        mkdir -p "$dir/wheels" "$dir/unpacked"
        python3 -m pip download --quiet --no-deps -d "$dir/wheels" "nvidia-cuda-nvcc==13.0.88" \
            "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" \
            "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cublas==13.0.*" \
            "nvidia-curand==10.4.0.*"
        for wheel in "$dir"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$dir/unpacked/"; done
        chmod +x "$root"/bin/* "$root"/nvvm/bin/*
        for lib in "$root"/lib/lib{cublas,cublasLt,cudart,curand,nvrtc}.so.*; do
            case $lib in *.so.[0-9]*) ln -sf "$(basename "$lib")" "${lib%%.so*}.so" ;; esac
        done
        ln -sfn lib "$root/lib64"
    fi
    export PATH="$root/bin:$PATH" CUDA_ROOT="$root" CUDA_PATH="$root"
    export LIBRARY_PATH="$root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
    if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
        # No driver here: a stub that links (every entry answers "no device").
        local stub=$dir/stub
        if [ ! -f "$stub/libcuda.so" ]; then
            mkdir -p "$stub"
            cargo fetch --quiet
            local sys
            sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | tail -1)
            grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$sys" | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/\1/' |
                sort -u | sed 's/.*/int &(void) { return 100; }/' >"$stub/stub.c"
            cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/stub.c"
        fi
        export LIBRARY_PATH="$stub:$LIBRARY_PATH"
    fi
}

# The executable cargo built for `$@` (a --test or --bench target).
executable() {
    cargo "$@" --no-run --message-format=json 2>/dev/null | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        path = m["executable"]
print(path)'
}

build() {
    toolkit
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
    cargo build --release --features cuda --test kernels_cuda --bench cuda_methods
    mkdir -p "$OUT"
    cp "$(executable test --release --features cuda --test kernels_cuda)" "$OUT/kernels_cuda"
    cp "$(executable bench --features cuda --bench cuda_methods)" "$OUT/cuda_methods"
    strip "$OUT/kernels_cuda" "$OUT/cuda_methods"
    [ -f models/efficientnet-lite0.safetensors ] || VIGIL="cargo run --quiet --" models/get-weights.sh
    ls -la "$OUT"
}

run() {
    # The CUDA 13 libraries the binaries link, wherever this machine has them.
    local dirs
    dirs=$(find / -xdev \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' -o -name 'libcurand.so.10' \
        -o -name 'libnvrtc.so.13' \) -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -)
    export LD_LIBRARY_PATH="${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    echo "== GPU tests (custom ops and Lite0 on CUDA against the CPU reference, tolerance 1e-4)"
    "$OUT/kernels_cuda" --nocapture --test-threads=1
    echo "== candle's ops against the custom kernels"
    "$OUT/cuda_methods" models/efficientnet-lite0.safetensors 256 5 20
}

case $step in
build) build ;;
run) run ;;
all) build && run ;;
*)
    echo "usage: $0 [build|run]" >&2
    exit 2
    ;;
esac
