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
/// excess is an [`Error::Limit`] naming where in the file it happened. Default 512 MiB (so that the peak stays under 1 GiB with the copies around it); the CLI's
/// `--memory-budget` sets it.
static MEMORY_BUDGET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(512 << 20);

/// The current memory budget in bytes.
pub fn memory_budget() -> u64 {
    MEMORY_BUDGET.load(std::sync::atomic::Ordering::Relaxed)
}

/// Set the memory budget (bytes) for files opened from now on.
pub fn set_memory_budget(bytes: u64) {
    MEMORY_BUDGET.store(bytes, std::sync::atomic::Ordering::Relaxed)
}

/// Files up to this size are read into memory rather than mapped (see [`Source::map`]).
pub const READ_WHOLE: u64 = 64 << 20;

/// The bytes of a file: memory-mapped, or owned (for in-memory input and empty files).
pub enum Source {
    /// A read-only memory map (files over `READ_WHOLE`).
    Mmap(memmap2::Mmap),
    /// Bytes read into memory.
    Bytes(Vec<u8>),
}

impl Source {
    /// Open a file: read into memory when it is at most [`READ_WHOLE`] bytes, else mapped
    /// read-only.
    ///
    /// Why both: a mapped file that another program truncates while tlens reads it kills
    /// tlens with SIGBUS, which no error handling can catch; a file read into memory cannot.
    /// Large runs (hundreds of MB of checkpoints) are mapped so that opening them reads only
    /// what is used; for them the SIGBUS risk remains if the file is rewritten in place
    /// while open (torch.save and tlens itself replace files by rename, which is safe).
    pub fn map(path: &Path) -> Result<Source> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        if len <= READ_WHOLE {
            let mut v = Vec::with_capacity(len as usize);
            f.read_to_end(&mut v)?;
            return Ok(Source::Bytes(v));
        }
        // SAFETY: the map is read-only; tlens never writes through it. A concurrent truncation
        // of the file by another process is the documented remaining risk (see above).
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
    /// torch ≥ 1.6's zip archive.
    TorchZip,
    #[serde(rename = "torch-legacy")]
    /// torch's legacy stream of pickles (before 1.6, or when asked).
    TorchLegacy,
    #[serde(rename = "safetensors")]
    /// A safetensors file.
    Safetensors,
}

impl Format {
    /// The name `inspect` prints.
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

/// Check an output path before any work is done: its extension is one of `exts` (empty: any),
/// its folder exists and is writable, and it is not a symbolic link, device, FIFO or folder
/// (an atomic write would replace the link or node with a regular file). `flag` names the
/// option in the error.
pub fn check_output(path: &Path, exts: &[&str], flag: &str) -> Result<()> {
    let shown = path.display().to_string();
    if let Ok(m) = std::fs::symlink_metadata(path) {
        let kind = m.file_type();
        if kind.is_symlink() {
            return Err(Error::invalid(
                flag,
                format!("'{shown}' is a symbolic link; write to its target instead"),
            ));
        }
        if !kind.is_file() {
            return Err(Error::invalid(
                flag,
                format!("'{shown}' exists and is not a regular file"),
            ));
        }
    }
    if !exts.is_empty() {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !exts.contains(&ext) {
            return Err(Error::invalid(
                flag,
                format!(
                    "'{shown}' has extension '{ext}'; expected {}",
                    exts.iter()
                        .map(|e| format!(".{e}"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            ));
        }
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::invalid(
            flag,
            format!("folder '{}' does not exist", dir.display()),
        ));
    }
    // Writable: create and remove a probe file (permissions alone do not tell, e.g. read-only
    // mounts).
    let probe = dir.join(format!(".tlens-probe{}", std::process::id()));
    std::fs::File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| Error::invalid(flag, format!("cannot write in '{}': {e}", dir.display())))
}

/// Remove temporary files `.NAME.tmp<pid>` left beside `path` by saves whose process is gone
/// (killed mid-write). Only on Linux, where `/proc/<pid>` tells whether the process lives.
fn remove_stale_temps(dir: &Path, name: &str) {
    if !cfg!(target_os = "linux") {
        return;
    }
    let prefix = format!(".{name}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let fname = e.file_name();
        let Some(pid) = fname
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Write `bytes` to `path` atomically: write a temporary sibling, fsync, rename. Stale temporary
/// files of earlier, killed saves of the same target are removed first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(path.display().to_string(), "not a file path"))?;
    remove_stale_temps(dir, &name.to_string_lossy());
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
