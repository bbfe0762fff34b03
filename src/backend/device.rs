//! Where a model runs: `--device auto|cpu|cuda` on every command that runs one.
//!
//! The CPU backend is always built. CUDA sits behind the cargo feature `cuda` (cudarc with
//! `dynamic-loading`: the driver is looked up at run time, so a `cuda` build still starts on a
//! machine without one). `auto` picks the CPU whenever CUDA cannot be used; `cuda` that cannot be
//! honoured is an [`Error::Device`] saying why — never a panic (cudarc panics when a library is
//! missing, so the driver's presence is checked with `is_culib_present()` first).
//!
//! Status: the GPU backend itself (cuBLAS/NVRTC forward, training, sweeps) is not implemented in
//! this version — it could not be verified without a GPU — so `auto` runs on the CPU everywhere
//! and `cuda` reports either why CUDA is unavailable or that the backend is missing. Its
//! kernels exist and are compile-checked with NVRTC ([`super::cuda`]).

use crate::error::{Error, Result};

/// The `--device` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// The GPU when a GPU backend can be used (none in this version), else the CPU.
    #[default]
    Auto,
    /// The CPU (always available).
    Cpu,
    /// An NVIDIA GPU through CUDA (feature `cuda`; not implemented yet: an error saying why).
    Cuda,
}

/// A device a model can run on in this build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend.
    Cpu,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
        }
    }
}

/// The number of CUDA devices, or why CUDA cannot be used here.
pub fn cuda_devices() -> std::result::Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to load the driver library (dlopen) and reports whether it loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda) was not found".into());
        }
        match cudarc::driver::CudaContext::device_count() {
            Ok(n) if n > 0 => Ok(n as usize),
            Ok(_) => Err("the CUDA driver reports no device".into()),
            Err(e) => Err(format!("the CUDA driver failed to initialise: {e:?}")),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(
            "this build has no CUDA support (rebuild with `cargo build --release --features cuda`)"
                .into(),
        )
    }
}

/// Resolve `--device`.
pub fn select(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu | DeviceArg::Auto => Ok(Device::Cpu),
        DeviceArg::Cuda => Err(Error::Device(match cuda_devices() {
            Err(why) => format!("--device cuda: {why}"),
            Ok(n) => format!(
                "--device cuda: {n} CUDA device(s) found, but this version of tlens has no GPU \
                 backend yet (use --device cpu or auto)"
            ),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_run_on_the_cpu_and_cuda_says_why_not() {
        assert_eq!(select(DeviceArg::Cpu).unwrap(), Device::Cpu);
        assert_eq!(select(DeviceArg::Auto).unwrap(), Device::Cpu);
        match select(DeviceArg::Cuda) {
            Err(Error::Device(msg)) => {
                assert!(msg.starts_with("--device cuda: "), "{msg}");
                #[cfg(not(feature = "cuda"))]
                assert!(msg.contains("--features cuda"), "{msg}");
            }
            other => panic!("expected a Device error, got {other:?}"),
        }
    }
}
