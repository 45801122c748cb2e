//! With the `cuda` feature, compiles vigil's CUDA kernels (src/nn/kernels/cuda/kernels.cu) to PTX
//! with nvcc, which that build needs anyway (candle's kernels); the default build needs nothing.
//! `NVCC` names the compiler (else `$CUDA_ROOT/bin/nvcc`, `$CUDA_PATH/bin/nvcc` or `nvcc` on the
//! PATH); `CUDA_COMPUTE_CAP` (e.g. 87 for a Jetson Orin, 90 for an H100) the virtual
//! architecture, else 70, whose PTX the driver compiles for any newer GPU when it loads it.
use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "src/nn/kernels/cuda/kernels.cu";

fn main() {
    println!("cargo::rerun-if-changed={SOURCE}");
    for var in ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = env::var("NVCC").unwrap_or_else(|_| {
        ["CUDA_ROOT", "CUDA_PATH"]
            .iter()
            .filter_map(|v| env::var(v).ok())
            .map(|root| format!("{root}/bin/nvcc"))
            .find(|path| PathBuf::from(path).exists())
            .unwrap_or_else(|| "nvcc".to_string())
    });
    let cap = env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.trim().replace('.', "").parse::<u32>().ok())
        .unwrap_or(70);
    let out =
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("vigil_kernels.ptx");
    let status = Command::new(&nvcc)
        .args([
            "-ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
            SOURCE,
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} for the cuda feature: {e}"));
    assert!(status.success(), "{nvcc} failed on {SOURCE}: {status}");
}
