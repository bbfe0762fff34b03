//! Reading and writing checkpoint files: torch's zip and legacy formats, and safetensors.
//!
//! Data flows one way: bytes → container ([`torch::TorchFile`], [`safetensors::SafetensorsFile`])
//! → typed run ([`crate::run::RunFile`]). This module knows about containers and pickles only;
//! what the keys *mean* (TL demo layout, 2022 layout) is decided in [`crate::run`].

pub mod npz;
pub mod pickle;
pub mod safetensors;
pub mod torch;
pub mod tree;
pub mod zipdir;

use crate::error::{Error, Result};
use std::ops::Deref;
use std::path::Path;

/// The memory budget: how many bytes reading one file may allocate beyond the bytes it stores
/// (the pickle's value tree, broadcast tensors expanded, deflated entries inflated). Every
/// excess is an [`Error::Limit`] naming where in the file it happened. Default 1 GiB; the CLI's
/// `--memory-budget` sets it.
static MEMORY_BUDGET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 30);

/// The current memory budget in bytes.
pub fn memory_budget() -> u64 {
    MEMORY_BUDGET.load(std::sync::atomic::Ordering::Relaxed)
}

/// Set the memory budget (bytes) for files opened from now on.
pub fn set_memory_budget(bytes: u64) {
    MEMORY_BUDGET.store(bytes, std::sync::atomic::Ordering::Relaxed)
}

/// The bytes of a file: memory-mapped, or owned (for in-memory input and empty files).
pub enum Source {
    Mmap(memmap2::Mmap),
    Bytes(Vec<u8>),
}

impl Source {
    /// Map a file read-only.
    pub fn map(path: &Path) -> Result<Source> {
        let f = std::fs::File::open(path)?;
        if f.metadata()?.len() == 0 {
            return Ok(Source::Bytes(Vec::new()));
        }
        // SAFETY: the map is read-only; tlens never writes through it. As with any mmap, a
        // concurrent truncation of the file by another process is outside what we can guard.
        let m = unsafe { memmap2::Mmap::map(&f)? };
        Ok(Source::Mmap(m))
    }
}

impl Deref for Source {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Source::Mmap(m) => m,
            Source::Bytes(b) => b,
        }
    }
}

/// File formats tlens reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Format {
    #[serde(rename = "torch-zip")]
    TorchZip,
    #[serde(rename = "torch-legacy")]
    TorchLegacy,
    #[serde(rename = "safetensors")]
    Safetensors,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::TorchZip => "torch-zip",
            Format::TorchLegacy => "torch-legacy",
            Format::Safetensors => "safetensors",
        }
    }

    /// Detect the format from the first bytes.
    pub fn detect(bytes: &[u8]) -> Result<Format> {
        if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            return Ok(Format::TorchZip);
        }
        // safetensors: u64 little-endian header length (which may start with any byte, 0x80
        // included), then a JSON object that fits in the file.
        if bytes.len() >= 9 && bytes[8] == b'{' {
            let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
            if n.checked_add(8)
                .is_some_and(|end| end <= bytes.len() as u64)
            {
                return Ok(Format::Safetensors);
            }
        }
        // Legacy torch: a pickle whose first value is torch's magic number. Protocols 2–5 write
        // it as LONG1 (10 bytes) after PROTO, and 4–5 put a FRAME (opcode + u64 length) between;
        // protocols 0–1 have no PROTO and write it as a decimal LONG literal.
        let long1 = |b: &[u8]| b.starts_with(&[0x8a, 0x0a]);
        if bytes.len() >= 4 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]) {
            if long1(&bytes[2..]) {
                return Ok(Format::TorchLegacy);
            }
            if bytes[1] >= 4 && bytes[2] == 0x95 && bytes.len() >= 13 && long1(&bytes[11..]) {
                return Ok(Format::TorchLegacy);
            }
        }
        if bytes.starts_with(LEGACY_MAGIC_DECIMAL) {
            return Ok(Format::TorchLegacy);
        }
        Err(Error::UnknownFormat(format!(
            "first bytes {:02x?} are not a torch zip, legacy torch pickle or safetensors header",
            &bytes[..bytes.len().min(9)]
        )))
    }
}

/// torch's legacy magic number 0x1950a86a20f9469cfc6c as protocol 0/1's LONG opcode writes it.
const LEGACY_MAGIC_DECIMAL: &[u8] = b"L119547037146038801333356L\n";

/// Write `bytes` to `path` atomically: write a temporary sibling, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(path.display().to_string(), "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| e.in_file(path))
}
