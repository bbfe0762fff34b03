//! torch.save files: the zip container (torch ≥ 1.6) and the legacy stream (torch ≤ 1.5 or
//! `_use_new_zipfile_serialization=False`).
//!
//! Opening a file maps it (memmap2), parses the container and the pickle, and records where each
//! storage's bytes are — but reads no tensor data. Tensors are materialised on demand from
//! [`TensorRef`]s, borrowing the mapped bytes when alignment and byte order allow (see
//! [`crate::tensor::view_storage`]); torch aligns zip payloads to 64 bytes, but older writers do
//! not, so alignment is checked, never assumed.

use super::pickle::{unpickle, Limits, Pickler, Value};
use super::{zipdir, Format, Source};
use crate::error::{Error, Result, WithPath};
use crate::tensor::{
    tensor_from_storage, view_storage, DType, Element, StorageRef, Tensor, TensorRef,
};
use ndarray::{CowArray, IxDyn};
use std::collections::HashMap;
use std::io::{Cursor, Write};
use std::ops::Range;
use std::path::Path;

/// Which torch container a file uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TorchContainer {
    /// Zip archive; `prefix` is what precedes `data.pkl` (e.g. `archive/`, `model/`).
    Zip {
        /// What precedes `data.pkl` in the entry names.
        prefix: String,
    },
    /// Consecutive pickles followed by raw storages.
    Legacy,
}

/// Metadata records of a zip-format file (all optional).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ZipRecords {
    /// The `version` record.
    pub version: Option<String>,
    /// The `.format_version` record.
    pub format_version: Option<String>,
    /// The `.storage_alignment` record.
    pub storage_alignment: Option<String>,
    /// The `.data/serialization_id` record.
    pub serialization_id: Option<String>,
    /// The `byteorder` record.
    pub byteorder: Option<String>,
}

/// A parsed torch file: the unpickled object tree plus the location of every storage.
pub struct TorchFile {
    source: Source,
    /// Zip or legacy.
    pub container: TorchContainer,
    /// The unpickled top-level object.
    pub root: Value,
    /// Pickle protocol of the main pickle.
    pub protocol: u8,
    /// Whether the storages are big-endian (`byteorder` = big).
    pub big_endian: bool,
    /// The zip metadata records.
    pub records: ZipRecords,
    storages: HashMap<String, Loc>,
    /// Every global the file's pickles name (`module.name`); nothing was imported or called.
    pub globals: Vec<String>,
    /// Bytes of the memory budget left for tensors expanded beyond what the file stores
    /// (broadcast and overlapping views): the budget less the pickle tree's bytes.
    expansion_left: std::sync::atomic::AtomicU64,
}

/// Where a storage's bytes are.
#[derive(Clone, Debug)]
enum Loc {
    /// A known byte range (legacy files, and zip entries already resolved).
    Range(Range<usize>),
    /// A zip entry whose local header is read only when the storage is (lazy open).
    ZipEntry { header_start: u64, size: u64 },
    /// A deflated zip entry (TorchScript archives may deflate entries), inflated on first use.
    Deflated {
        header_start: u64,
        compressed: u64,
        size: u64,
        bytes: std::sync::OnceLock<Vec<u8>>,
    },
    /// An entry compressed with a method tlens does not read: an error only if it is needed.
    Compressed { method: u16, size: u64 },
}

impl Loc {
    fn len(&self) -> usize {
        match self {
            Loc::Range(r) => r.len(),
            Loc::ZipEntry { size, .. }
            | Loc::Deflated { size, .. }
            | Loc::Compressed { size, .. } => *size as usize,
        }
    }

    fn of(e: &zipdir::Entry) -> Loc {
        match e.method {
            0 => Loc::ZipEntry {
                header_start: e.header_start,
                size: e.compressed_size,
            },
            8 => Loc::Deflated {
                header_start: e.header_start,
                compressed: e.compressed_size,
                size: e.uncompressed_size,
                bytes: std::sync::OnceLock::new(),
            },
            method => Loc::Compressed {
                method,
                size: e.uncompressed_size,
            },
        }
    }

    /// The entry's bytes (inflated if needed).
    fn bytes<'s>(&'s self, source: &'s [u8], name: &str) -> Result<&'s [u8]> {
        match self {
            Loc::Range(r) => Ok(&source[r.clone()]),
            &Loc::ZipEntry { header_start, size } => {
                Ok(&source[zipdir::data_range(source, name, header_start, size)?])
            }
            Loc::Deflated {
                header_start,
                compressed,
                size,
                bytes,
            } => {
                if let Some(b) = bytes.get() {
                    return Ok(b);
                }
                let r = zipdir::data_range(source, name, *header_start, *compressed)?;
                let _ = bytes.set(zipdir::inflate(&source[r], name, *size)?);
                Ok(bytes.get().expect("set above"))
            }
            Loc::Compressed { method, .. } => Err(Error::Zip(format!(
                "entry '{name}' is compressed with method {method}; tlens reads stored and \
                 deflated entries"
            ))),
        }
    }
}

const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

impl TorchFile {
    /// Open and parse a torch file (zip or legacy) without reading tensor data.
    pub fn open(path: impl AsRef<Path>) -> Result<TorchFile> {
        let path = path.as_ref();
        let source = Source::map(path).with_path(path)?;
        Self::parse(source, &Limits::default()).with_path(path)
    }

    /// Parse a torch file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<TorchFile> {
        Self::parse(Source::Bytes(bytes), &Limits::default())
    }

    /// Parse a torch file's bytes under `limits`.
    pub fn parse(source: Source, limits: &Limits) -> Result<TorchFile> {
        match Format::detect(&source)? {
            Format::TorchZip => parse_zip(source, limits),
            Format::TorchLegacy => parse_legacy(source, limits),
            Format::Safetensors => Err(Error::UnknownFormat(
                "a safetensors file, not a torch file (use SafetensorsFile or RunFile)".into(),
            )),
        }
    }

    /// [`Format::TorchZip`] or [`Format::TorchLegacy`].
    pub fn format(&self) -> Format {
        match self.container {
            TorchContainer::Zip { .. } => Format::TorchZip,
            TorchContainer::Legacy => Format::TorchLegacy,
        }
    }

    /// Bytes of all storages the file holds (what it legitimately stores).
    pub fn stored_bytes(&self) -> u64 {
        self.storages.values().map(|l| l.len() as u64).sum()
    }

    /// The bytes of a root storage.
    pub fn storage_bytes(&self, key: &str) -> Result<&[u8]> {
        match self.storages.get(key) {
            Some(loc) => loc.bytes(&self.source, &format!("data/{key}")),
            None => Err(Error::MissingRecord(format!("data/{key}"))),
        }
    }

    /// Charge the bytes a tensor would occupy beyond the storage it spans (a view with zero or
    /// overlapping strides) to the file's memory budget; an excess is [`Error::Limit`] naming
    /// the tensor. Storage-backed bytes are the file's own and cost nothing.
    fn charge_expansion(&self, r: &TensorRef, name: &str) -> Result<()> {
        use std::sync::atomic::Ordering;
        let size = r.dtype().size() as u64;
        let numel = crate::tensor::checked_numel(&r.shape, name)? as u64;
        let bytes = numel
            .checked_mul(size)
            .ok_or_else(|| Error::invalid(name, "tensor size overflows"))?;
        let span = r
            .required_storage(name)?
            .saturating_sub(r.offset)
            .saturating_mul(size);
        let excess = bytes.saturating_sub(span);
        if excess == 0 {
            return Ok(());
        }
        let mut left = self.expansion_left.load(Ordering::Relaxed);
        loop {
            if excess > left {
                return Err(Error::limit(
                    "memory budget for tensors expanded beyond their stored bytes (a broadcast or \
                     overlapping view; raise it with --memory-budget)",
                    left,
                    excess,
                )
                .at(name));
            }
            match self.expansion_left.compare_exchange(
                left,
                left - excess,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => left = now,
            }
        }
    }

    /// Materialise a tensor as an owned typed array (within the memory budget).
    pub fn tensor(&self, r: &TensorRef, name: &str) -> Result<Tensor> {
        self.charge_expansion(r, name)?;
        tensor_from_storage(
            self.storage_bytes(&r.storage.key)?,
            self.big_endian,
            r,
            name,
        )
    }

    /// View a tensor as `T`, borrowing the mapped file where possible (a copy is charged to
    /// the memory budget as [`TorchFile::tensor`] is).
    pub fn view<T: Element>(&self, r: &TensorRef, name: &str) -> Result<CowArray<'_, T, IxDyn>> {
        self.charge_expansion(r, name)?;
        view_storage(
            self.storage_bytes(&r.storage.key)?,
            self.big_endian,
            r,
            name,
        )
    }
}

/// The storage a persistent id names: `('storage', storage_type, key, location, numel[, view])`
/// (`legacy`: the 6-tuple of the pre-zip format, whose last field is view metadata).
pub fn storage_from_pid(pid: Value, pos: usize, legacy: bool) -> Result<StorageRef> {
    let bad = |msg: String| Error::PickleStack {
        pos,
        opcode: "BINPERSID",
        msg,
    };
    let mut items = match pid {
        Value::Tuple(v) | Value::List(v) => v,
        other => {
            return Err(bad(format!(
                "persistent id must be a tuple, found {}",
                other.type_name()
            )))
        }
    };
    if items.first().and_then(Value::as_str) != Some("storage") {
        return Err(bad(format!(
            "unsupported persistent id kind {:?}",
            items.first().map(Value::type_name)
        )));
    }
    let want = if legacy { 6 } else { 5 };
    if items.len() != want {
        return Err(bad(format!(
            "storage persistent id has {} fields, expected {want}",
            items.len()
        )));
    }
    let dtype = match &items[1] {
        Value::StorageType(d) => *d,
        Value::Global { module, name } => {
            return Err(Error::Unsupported(format!("storage type {module}.{name}")))
        }
        v => {
            return Err(bad(format!(
                "storage type must be a global, found {}",
                v.type_name()
            )))
        }
    };
    let key = match std::mem::replace(&mut items[2], Value::None) {
        Value::Str(s) => s,
        Value::Int(i) => i.to_string(),
        v => {
            return Err(bad(format!(
                "storage key must be a string, found {}",
                v.type_name()
            )))
        }
    };
    let location = match std::mem::replace(&mut items[3], Value::None) {
        Value::Str(s) => s,
        _ => "cpu".to_string(),
    };
    let numel = items[4]
        .as_i64()
        .filter(|&n| n >= 0)
        .ok_or_else(|| bad("storage size must be a non-negative int".into()))?
        as u64;
    let mut s = StorageRef {
        key,
        dtype,
        numel,
        view_offset: 0,
        location,
    };
    if legacy {
        if let Some(view) = items[5].as_seq() {
            // (view_key, offset, view_size)
            let off = view.get(1).and_then(Value::as_i64).filter(|&n| n >= 0);
            let size = view.get(2).and_then(Value::as_i64).filter(|&n| n >= 0);
            match (off, size) {
                (Some(o), Some(n)) => {
                    s.view_offset = o as u64;
                    s.numel = n as u64;
                }
                _ => return Err(bad("malformed storage view metadata".into())),
            }
        }
    }
    Ok(s)
}

fn parse_zip(source: Source, limits: &Limits) -> Result<TorchFile> {
    // Central directory only: local headers are read when an entry's data is needed.
    let cd = zipdir::central_directory(&source)?;
    // torch.save stores every entry; TorchScript archives deflate some (code/, *.debug_pkl).
    // Only the entries tlens reads are inflated, when they are read.
    let mut entries: HashMap<String, Loc> = HashMap::with_capacity(cd.len());
    let mut pkl: Option<String> = None;
    for e in cd {
        if e.name == "data.pkl" || e.name.ends_with("/data.pkl") {
            // The archive prefix is whatever precedes data.pkl; prefer the shallowest.
            if pkl.as_ref().is_none_or(|p| e.name.len() < p.len()) {
                pkl = Some(e.name.clone());
            }
        }
        let loc = Loc::of(&e);
        if let Loc::Deflated { size, .. } = loc {
            if size > limits.max_total_bytes as u64 {
                return Err(Error::limit(
                    "inflated size of a deflated zip entry",
                    limits.max_total_bytes as u64,
                    size,
                ));
            }
        }
        entries.insert(e.name, loc);
    }
    let pkl_name = pkl.ok_or_else(|| Error::MissingRecord("data.pkl".into()))?;
    let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
    let record = |n: &str| -> Result<Option<String>> {
        let name = format!("{prefix}{n}");
        match entries.get(&name) {
            Some(loc) => Ok(Some(
                String::from_utf8_lossy(loc.bytes(&source, &name)?)
                    .trim()
                    .to_string(),
            )),
            None => Ok(None),
        }
    };
    let records = ZipRecords {
        version: record("version")?,
        format_version: record(".format_version")?,
        storage_alignment: record(".storage_alignment")?,
        serialization_id: record(".data/serialization_id")?,
        byteorder: record("byteorder")?,
    };
    let big_endian = match records.byteorder.as_deref() {
        None | Some("little") => false,
        Some("big") => true,
        Some(other) => {
            return Err(Error::invalid(
                format!("{prefix}byteorder"),
                format!("expected 'little' or 'big', found '{other}'"),
            ))
        }
    };
    let pkl_loc = entries[&pkl_name].clone();
    let pkl_bytes = pkl_loc.bytes(&source, &pkl_name)?;
    let data_prefix = format!("{prefix}data/");
    let storages: HashMap<String, Loc> = entries
        .into_iter()
        .filter_map(|(name, loc)| {
            let key = name.strip_prefix(&data_prefix)?.to_string();
            Some((key, loc))
        })
        .collect();
    let mut load = |pid: Value, pos: usize| -> Result<Value> {
        let s = storage_from_pid(pid, pos, false)?;
        check_storage_size(&s, storages.get(&s.key).map(Loc::len))?;
        Ok(Value::Storage(std::sync::Arc::new(s)))
    };
    let u = unpickle(pkl_bytes, &mut load, limits)?;
    drop(pkl_loc);
    Ok(TorchFile {
        source,
        container: TorchContainer::Zip { prefix },
        root: u.value,
        protocol: u.protocol,
        big_endian,
        records,
        storages,
        expansion_left: left_after(limits, u.expanded_bytes),
        globals: u.globals,
    })
}

/// A storage named by the pickle must exist and hold at least `numel` elements.
fn check_storage_size(s: &StorageRef, stored_bytes: Option<usize>) -> Result<()> {
    let have = stored_bytes.ok_or_else(|| Error::MissingRecord(format!("data/{}", s.key)))? as u64;
    let need = s
        .view_offset
        .checked_add(s.numel)
        .and_then(|n| n.checked_mul(s.dtype.size() as u64))
        .ok_or_else(|| Error::invalid(format!("storage '{}'", s.key), "size overflows"))?;
    if need > have {
        return Err(Error::Truncated {
            what: format!("storage '{}' ({})", s.key, s.dtype),
            needed: need,
            available: have,
        });
    }
    Ok(())
}

fn parse_legacy(source: Source, limits: &Limits) -> Result<TorchFile> {
    let mut pos = 0usize;
    let mut no_pid = |_: Value, p: usize| -> Result<Value> {
        Err(Error::PickleStack {
            pos: p,
            opcode: "BINPERSID",
            msg: "persistent id outside the main pickle".into(),
        })
    };
    let next = |pos: &mut usize, load: &mut dyn super::pickle::PersistentLoad| -> Result<Value> {
        let u = unpickle(&source[*pos..], load, limits).map_err(|e| shift_pos(e, *pos))?;
        *pos += u.end;
        Ok(u.value)
    };
    let magic = next(&mut pos, &mut no_pid)?;
    if magic != Value::BigInt(LEGACY_MAGIC.to_vec()) {
        return Err(Error::UnknownFormat(
            "pickle without torch's legacy magic number (a plain pickle, not a torch file)".into(),
        ));
    }
    let proto = next(&mut pos, &mut no_pid)?;
    if proto.as_i64() != Some(1001) {
        let found = match proto.as_i64() {
            Some(v) => v.to_string(),
            None => proto.type_name(),
        };
        return Err(Error::Unsupported(format!(
            "legacy torch protocol version {} (expected 1001)",
            crate::error::clip(found)
        )));
    }
    let sys_info = next(&mut pos, &mut no_pid)?;
    let big_endian = sys_info.get("little_endian").and_then(Value::as_bool) == Some(false);

    // Main pickle: collect root storages (key → dtype, numel) from the 6-tuple persistent ids.
    let mut roots: HashMap<String, (DType, u64)> = HashMap::new();
    let mut load = |pid: Value, p: usize| -> Result<Value> {
        let root_numel = pid
            .as_seq()
            .and_then(|t| t.get(4))
            .and_then(Value::as_i64)
            .unwrap_or(0) as u64;
        let s = storage_from_pid(pid, p, true)?;
        roots.insert(s.key.clone(), (s.dtype, root_numel));
        Ok(Value::Storage(std::sync::Arc::new(s)))
    };
    let u = unpickle(&source[pos..], &mut load, limits).map_err(|e| shift_pos(e, pos))?;
    pos += u.end;
    let (root, protocol, tree_bytes, globals) = (u.value, u.protocol, u.expanded_bytes, u.globals);

    let keys = next(&mut pos, &mut no_pid)?;
    let keys = keys
        .as_seq()
        .ok_or_else(|| Error::type_err("legacy storage key list", "list", keys.type_name()))?
        .to_vec();
    let mut storages = HashMap::new();
    for k in keys {
        let key = match &k {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            v => return Err(Error::type_err("legacy storage key", "str", v.type_name())),
        };
        let &(dtype, _) = roots.get(&key).ok_or_else(|| {
            Error::invalid("legacy storage list", format!("key '{key}' is not used"))
        })?;
        let hdr = source.get(pos..pos + 8).ok_or(Error::Truncated {
            what: format!("size of legacy storage '{key}'"),
            needed: 8,
            available: (source.len() - pos) as u64,
        })?;
        let hdr: [u8; 8] = hdr.try_into().expect("8 bytes");
        let numel = if big_endian {
            i64::from_be_bytes(hdr)
        } else {
            i64::from_le_bytes(hdr)
        };
        pos += 8;
        let nbytes = u64::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .ok_or_else(|| {
                Error::invalid(format!("legacy storage '{key}'"), "bad element count")
            })?;
        let available = (source.len() - pos) as u64;
        if nbytes > available {
            return Err(Error::Truncated {
                what: format!("legacy storage '{key}'"),
                needed: nbytes,
                available,
            });
        }
        storages.insert(key, Loc::Range(pos..pos + nbytes as usize));
        pos += nbytes as usize;
    }
    // Every storage the pickle references must be present and large enough.
    for (key, &(dtype, numel)) in &roots {
        let s = StorageRef {
            key: key.clone(),
            dtype,
            numel,
            view_offset: 0,
            location: String::new(),
        };
        check_storage_size(&s, storages.get(key).map(Loc::len))?;
    }
    Ok(TorchFile {
        source,
        container: TorchContainer::Legacy,
        root,
        protocol,
        big_endian,
        records: ZipRecords::default(),
        storages,
        expansion_left: left_after(limits, tree_bytes),
        globals,
    })
}

/// The memory budget left once the pickle's value tree is paid for.
fn left_after(limits: &Limits, tree_bytes: u64) -> std::sync::atomic::AtomicU64 {
    std::sync::atomic::AtomicU64::new((limits.max_expanded_bytes as u64).saturating_sub(tree_bytes))
}

/// Pickle positions are relative to the pickle; report them relative to the file.
fn shift_pos(e: Error, base: usize) -> Error {
    match e {
        Error::PickleEof { pos, what } => Error::PickleEof {
            pos: pos + base,
            what,
        },
        Error::PickleOpcode { pos, opcode } => Error::PickleOpcode {
            pos: pos + base,
            opcode,
        },
        Error::PickleUnsupported { pos, name } => Error::PickleUnsupported {
            pos: pos + base,
            name,
        },
        Error::PickleStack { pos, opcode, msg } => Error::PickleStack {
            pos: pos + base,
            opcode,
            msg,
        },
        Error::PickleMemo { pos, index } => Error::PickleMemo {
            pos: pos + base,
            index,
        },
        e => e,
    }
}

/// Collects tensors for a torch zip file and writes it the way torch.save does.
pub struct TorchWriter {
    storages: Vec<(String, Vec<u8>)>,
    protocol: u8,
}

impl TorchWriter {
    /// `protocol` is the pickle protocol (torch.save's default is 2).
    pub fn new(protocol: u8) -> TorchWriter {
        TorchWriter {
            storages: Vec::new(),
            protocol,
        }
    }

    /// Register a tensor's data as a new storage; returns the value to place in the pickle tree.
    pub fn add(&mut self, t: &Tensor) -> Value {
        let key = self.storages.len().to_string();
        let r = TensorRef::contiguous(key.clone(), t.dtype(), t.shape());
        self.storages.push((key, t.to_le_bytes()));
        Value::Tensor(Box::new(r))
    }

    /// Serialise `root` and the storages into torch's zip layout (prefix `archive/`).
    pub fn to_bytes(&self, root: &Value) -> Result<Vec<u8>> {
        let mut p = Pickler::new(self.protocol);
        p.value(root)?;
        self.to_bytes_with_pickle(&p.finish())
    }

    /// The zip layout around a given `data.pkl` (tests and fuzzing build pickles by hand).
    pub fn to_bytes_with_pickle(&self, pkl: &[u8]) -> Result<Vec<u8>> {
        let mut buf = Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored)
                .with_alignment(64);
            let mut put = |name: &str, data: &[u8]| -> Result<()> {
                let big = data.len() as u64 >= u32::MAX as u64;
                z.start_file(format!("archive/{name}"), opts.large_file(big))
                    .map_err(|e| Error::Zip(e.to_string()))?;
                z.write_all(data)?;
                Ok(())
            };
            put("data.pkl", pkl)?;
            put(".format_version", b"1")?;
            put(".storage_alignment", b"64")?;
            put("byteorder", b"little")?;
            for (key, data) in &self.storages {
                put(&format!("data/{key}"), data)?;
            }
            put("version", b"3\n")?;
            put(".data/serialization_id", serialization_id(pkl).as_bytes())?;
            z.finish().map_err(|e| Error::Zip(e.to_string()))?;
        }
        Ok(buf.into_inner())
    }

    /// Write atomically: a temporary file beside `path`, then rename.
    pub fn write(&self, root: &Value, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.to_bytes(root)?;
        super::write_atomic(path.as_ref(), &bytes)
    }
}

/// torch writes a random 20-digit id; tlens derives it from the pickle so output is reproducible.
fn serialization_id(pkl: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in pkl {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:020}", h % 10u64.pow(19))
}
