//! The measured fp32 peak (`vigil::bench::fma_peak_gflops`, which every "% of peak" uses) against
//! hand-written assembly loops on the same CPU: 24 independent `vfmadd213ps` chains on zmm
//! registers (AVX-512) and 12 on ymm registers (AVX2), the two alternating round by round so
//! that both see the same machine.
//!
//! `cargo bench --bench fma_peak -- [threads 2] [rounds 9]`: prints the CPU, then per instruction
//! set the median GFLOP/s of each and their ratio (the acceptance of issue 20: within 10%).
use vigil::bench::{fma_chains, fma_peak_gflops, BenchArgs};
use vigil::nn::kernels::Kernels;

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let field = |name: &str| {
                info.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|v| v.trim().to_string())
            };
            Some(format!(
                "{} (family {}, model {})",
                field("model name")?,
                field("cpu family")?,
                field("model")?
            ))
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = BenchArgs::from_env();
    let (threads, rounds) = (args.number(0, 2).max(1), args.number(1, 9).max(1));
    println!(
        "{}, {threads} threads, median of {rounds} alternating rounds of 0.5 s; the kernels use {}",
        cpu_model(),
        Kernels::detect().isa().name()
    );
    let mut compared = 0;
    for kernels in Kernels::available() {
        let isa = kernels.isa();
        let Some(reference) = reference::loop_for(isa) else {
            continue;
        };
        compared += 1;
        let (mut ours, mut asm) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            ours.push(fma_peak_gflops(isa, threads, 0.5));
            asm.push(reference::gflops(reference, threads, 0.5));
        }
        let (lanes, chains) = fma_chains(isa);
        let (ours, asm) = (median(ours), median(asm));
        println!(
            "{:<8} fma_peak_gflops {ours:6.1} GFLOP/s ({lanes} lanes x {chains} chains)  \
             assembly {asm:6.1} GFLOP/s ({} chains)  ratio {:.3}",
            isa.name(),
            reference.chains,
            ours / asm
        );
    }
    if compared == 0 {
        println!("no hand-written reference loop for this CPU (x86-64 with AVX2 or AVX-512 only)");
    }
}

#[cfg(target_arch = "x86_64")]
mod reference {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::time::Instant;

    use vigil::nn::kernels::Isa;

    /// One hand-written loop: `iterations` rounds of `chains` vector FMAs of `lanes` floats.
    #[derive(Clone, Copy)]
    pub struct Reference {
        pub chains: usize,
        lanes: usize,
        run: unsafe fn(u64),
    }

    pub fn loop_for(isa: Isa) -> Option<Reference> {
        match isa {
            Isa::Avx512 => Some(Reference {
                chains: 24,
                lanes: 16,
                run: avx512,
            }),
            Isa::Avx2Fma => Some(Reference {
                chains: 12,
                lanes: 8,
                run: avx2,
            }),
            _ => None,
        }
    }

    /// GFLOP/s of `r` on `threads` threads for about `seconds`.
    pub fn gflops(r: Reference, threads: usize, seconds: f64) -> f64 {
        let mut iterations = 1u64 << 16;
        loop {
            let start = Instant::now();
            // SAFETY: `loop_for` gives a loop only for an instruction set the kernels detected.
            unsafe { (r.run)(iterations) };
            let elapsed = start.elapsed().as_secs_f64();
            if elapsed > seconds / 4.0 {
                iterations = (iterations as f64 * seconds / elapsed) as u64;
                break;
            }
            iterations *= 2;
        }
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                // SAFETY: as above.
                s.spawn(|| unsafe { (r.run)(iterations) });
            }
        });
        let flops = (threads as u64 * iterations) as f64 * (r.chains * r.lanes * 2) as f64;
        flops / start.elapsed().as_secs_f64() / 1e9
    }

    /// 24 chains `zmm_i = zmm_i · m + c` (zmm0–zmm23), the constants in two more registers.
    ///
    /// # Safety
    /// Needs AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(iterations: u64) {
        let (m, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        asm!(
            "vmovaps zmm0, {c}", "vmovaps zmm1, {c}", "vmovaps zmm2, {c}", "vmovaps zmm3, {c}",
            "vmovaps zmm4, {c}", "vmovaps zmm5, {c}", "vmovaps zmm6, {c}", "vmovaps zmm7, {c}",
            "vmovaps zmm8, {c}", "vmovaps zmm9, {c}", "vmovaps zmm10, {c}", "vmovaps zmm11, {c}",
            "vmovaps zmm12, {c}", "vmovaps zmm13, {c}", "vmovaps zmm14, {c}", "vmovaps zmm15, {c}",
            "vmovaps zmm16, {c}", "vmovaps zmm17, {c}", "vmovaps zmm18, {c}", "vmovaps zmm19, {c}",
            "vmovaps zmm20, {c}", "vmovaps zmm21, {c}", "vmovaps zmm22, {c}", "vmovaps zmm23, {c}",
            "2:",
            "vfmadd213ps zmm0, {m}, {c}", "vfmadd213ps zmm1, {m}, {c}",
            "vfmadd213ps zmm2, {m}, {c}", "vfmadd213ps zmm3, {m}, {c}",
            "vfmadd213ps zmm4, {m}, {c}", "vfmadd213ps zmm5, {m}, {c}",
            "vfmadd213ps zmm6, {m}, {c}", "vfmadd213ps zmm7, {m}, {c}",
            "vfmadd213ps zmm8, {m}, {c}", "vfmadd213ps zmm9, {m}, {c}",
            "vfmadd213ps zmm10, {m}, {c}", "vfmadd213ps zmm11, {m}, {c}",
            "vfmadd213ps zmm12, {m}, {c}", "vfmadd213ps zmm13, {m}, {c}",
            "vfmadd213ps zmm14, {m}, {c}", "vfmadd213ps zmm15, {m}, {c}",
            "vfmadd213ps zmm16, {m}, {c}", "vfmadd213ps zmm17, {m}, {c}",
            "vfmadd213ps zmm18, {m}, {c}", "vfmadd213ps zmm19, {m}, {c}",
            "vfmadd213ps zmm20, {m}, {c}", "vfmadd213ps zmm21, {m}, {c}",
            "vfmadd213ps zmm22, {m}, {c}", "vfmadd213ps zmm23, {m}, {c}",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iterations => _,
            m = in(zmm_reg) m,
            c = in(zmm_reg) c,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
            out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _,
            out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _, out("zmm14") _,
            out("zmm15") _, out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            options(nostack, nomem),
        );
    }

    /// 12 chains on ymm0–ymm11, the constants in two of the remaining four registers.
    ///
    /// # Safety
    /// Needs AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(iterations: u64) {
        let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        asm!(
            "vmovaps ymm0, {c}", "vmovaps ymm1, {c}", "vmovaps ymm2, {c}", "vmovaps ymm3, {c}",
            "vmovaps ymm4, {c}", "vmovaps ymm5, {c}", "vmovaps ymm6, {c}", "vmovaps ymm7, {c}",
            "vmovaps ymm8, {c}", "vmovaps ymm9, {c}", "vmovaps ymm10, {c}", "vmovaps ymm11, {c}",
            "2:",
            "vfmadd213ps ymm0, {m}, {c}", "vfmadd213ps ymm1, {m}, {c}",
            "vfmadd213ps ymm2, {m}, {c}", "vfmadd213ps ymm3, {m}, {c}",
            "vfmadd213ps ymm4, {m}, {c}", "vfmadd213ps ymm5, {m}, {c}",
            "vfmadd213ps ymm6, {m}, {c}", "vfmadd213ps ymm7, {m}, {c}",
            "vfmadd213ps ymm8, {m}, {c}", "vfmadd213ps ymm9, {m}, {c}",
            "vfmadd213ps ymm10, {m}, {c}", "vfmadd213ps ymm11, {m}, {c}",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iterations => _,
            m = in(ymm_reg) m,
            c = in(ymm_reg) c,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _,
            out("ymm5") _, out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _,
            out("ymm10") _, out("ymm11") _,
            options(nostack, nomem),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod reference {
    use vigil::nn::kernels::Isa;

    #[derive(Clone, Copy)]
    pub struct Reference {
        pub chains: usize,
    }

    pub fn loop_for(_: Isa) -> Option<Reference> {
        None
    }

    pub fn gflops(_: Reference, _: usize, _: f64) -> f64 {
        0.0
    }
}
