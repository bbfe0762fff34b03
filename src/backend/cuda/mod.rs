//! The CUDA backend (cargo feature `cuda`; cudarc with dynamic loading, so a `cuda` build starts
//! on machines without CUDA).
//!
//! What exists: the kernels ([`kernels`]: every non-matrix operation of the forward and
//! backward passes, the loss, AdamW and Grokfast as CUDA C with their CPU twins named) and,
//! with the `cuda` feature, their NVRTC compilation (`compile_ptx`), which
//! `tests/cuda_kernels.rs` checks for sm_90 on machines without a GPU. What does not exist yet:
//! the `Cuda` type implementing [`Backend`](super::Backend) and
//! [`Differentiable`](super::Differentiable) with cuBLAS products, the CUDA-graph training
//! epoch and many runs at once; `--device cuda` says so ([`super::device`]).

pub mod kernels;

/// The options every kernel is compiled with: no contraction of a·b + c into fused
/// multiply-adds (the CPU twins do not fuse, except where a kernel writes `fmaf` as torch's
/// code does), IEEE division and square roots, no flush-to-zero.
#[cfg(feature = "cuda")]
pub fn compile_options(arch: &'static str) -> cudarc::nvrtc::CompileOptions {
    cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        name: Some("tlens_kernels.cu".into()),
        ..Default::default()
    }
}

/// Whether the NVRTC library can be loaded (it is looked up as `libnvrtc.so.13` etc. on the
/// library path; the PyPI wheel `nvidia-cuda-nvrtc==13.0.88` provides it without a GPU).
#[cfg(feature = "cuda")]
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library and reports whether it loaded.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compile [`kernels::SOURCE`] to PTX for a virtual architecture (`compute_90` for H100/H200).
/// An [`Error::Device`](crate::Error::Device) carries NVRTC's log when compilation fails.
#[cfg(feature = "cuda")]
pub fn compile_ptx(arch: &'static str) -> crate::Result<String> {
    if !nvrtc_present() {
        return Err(crate::Error::Device(
            "the NVRTC library (libnvrtc) was not found".into(),
        ));
    }
    cudarc::nvrtc::compile_ptx_with_opts(kernels::SOURCE, compile_options(arch))
        .map(|ptx| ptx.to_src())
        .map_err(|e| crate::Error::Device(format!("NVRTC: {e:?}")))
}
