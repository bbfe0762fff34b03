//! The CUDA kernels compile with NVRTC to PTX for sm_90 — on machines without a GPU: NVRTC is a
//! host-only library (the PyPI wheel `nvidia-cuda-nvrtc==13.0.88`; point the library path at
//! its `nvidia/cu13/lib`, as `.ci/run` does when Python is available). Skips, saying why, where
//! the library is absent. Runs with `--features cuda`.
#![cfg(feature = "cuda")]

use tlens::backend::cuda::{compile_ptx, kernels, nvrtc_present};

#[test]
fn every_kernel_compiles_to_ptx_for_sm_90() {
    if !nvrtc_present() {
        eprintln!(
            "skipped: libnvrtc not found (pip install nvidia-cuda-nvrtc==13.0.88 and put its \
             nvidia/cu13/lib on LD_LIBRARY_PATH)"
        );
        return;
    }
    let ptx = compile_ptx("compute_90").unwrap();
    assert!(ptx.contains(".target sm_90"), "PTX for sm_90");
    for k in kernels::KERNELS {
        assert!(
            ptx.contains(&format!(".entry {}(", k.name)),
            "kernel {} (twin of {}) is in the PTX",
            k.name,
            k.cpu_twin
        );
    }
    // Every `extern "C" __global__` in the source is listed (and so checked above).
    let defined = kernels::SOURCE.matches("extern \"C\" __global__").count();
    assert_eq!(defined, kernels::KERNELS.len());
    // A driver built for CUDA 13.0 loads PTX ISA ≤ 9.0 (docs/reference.md §13).
    let version = ptx
        .lines()
        .find_map(|l| l.strip_prefix(".version "))
        .expect(".version line");
    println!(
        "PTX ISA {version}, {} bytes, {} kernels",
        ptx.len(),
        defined
    );
    assert!(version.trim() <= "9.0", "PTX ISA {version}");
}
