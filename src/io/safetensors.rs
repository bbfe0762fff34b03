//! safetensors files, read zero-copy through the mapped file and written with the safetensors crate.
//!
//! A tlens *run* in safetensors is one file: the final model under its TL names, checkpoint `i`
//! under `checkpoints.{i}.{name}`, and `train_losses`/`test_losses` (f64), `train_indices`/
//! `test_indices` (i64) and `checkpoint_epochs` (i64) as tensors. The config is JSON in the
//! header metadata under `config` (TL field names); `format` is `tlens-run`. A run written by
//! `tlens train` also carries its AdamW state: `optimizer.exp_avg.{name}`,
//! `optimizer.exp_avg_sq.{name}` and metadata `optimizer_step`, `optimizer_settings` (JSON). One
//! file keeps the run atomic and lazily readable (the header indexes every tensor).

use super::Source;
use crate::error::{Error, Result, WithPath};
use crate::tensor::{view_storage, with_dtype, DType, Element, Tensor, TensorRef};
use ndarray::{CowArray, IxDyn};
use safetensors::tensor::{Dtype as StDtype, Metadata, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// A parsed safetensors file (header only; tensor data read on demand).
pub struct SafetensorsFile {
    source: Source,
    data_start: usize,
    meta: Metadata,
}

fn st_err(e: safetensors::SafeTensorError) -> Error {
    Error::Safetensors(e.to_string())
}

fn dtype_from_st(d: StDtype, name: &str) -> Result<DType> {
    Ok(match d {
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::I64 => DType::I64,
        StDtype::I32 => DType::I32,
        StDtype::I16 => DType::I16,
        StDtype::I8 => DType::I8,
        StDtype::U8 => DType::U8,
        StDtype::U16 => DType::U16,
        StDtype::U32 => DType::U32,
        StDtype::U64 => DType::U64,
        StDtype::BOOL => DType::Bool,
        other => {
            return Err(Error::Unsupported(format!(
                "safetensors dtype {other:?} of tensor '{name}'"
            )))
        }
    })
}

fn dtype_to_st(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::I64 => StDtype::I64,
        DType::I32 => StDtype::I32,
        DType::I16 => StDtype::I16,
        DType::I8 => StDtype::I8,
        DType::U8 => StDtype::U8,
        DType::U16 => StDtype::U16,
        DType::U32 => StDtype::U32,
        DType::U64 => StDtype::U64,
        DType::Bool => StDtype::BOOL,
    }
}

impl SafetensorsFile {
    /// Open and parse a safetensors file (header only).
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref();
        let source = Source::map(path).with_path(path)?;
        Self::from_source(source).with_path(path)
    }

    /// Parse a safetensors file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<SafetensorsFile> {
        Self::from_source(Source::Bytes(bytes))
    }

    pub(crate) fn from_source(source: Source) -> Result<SafetensorsFile> {
        // A tensor of a dtype tlens does not read (F8_E4M3, C64, …) does not hide the others:
        // it is an error only when that tensor is read ([`SafetensorsFile::info`]).
        let (n, meta) = safetensors::SafeTensors::read_metadata(&source).map_err(st_err)?;
        Ok(SafetensorsFile {
            source,
            data_start: 8 + n,
            meta,
        })
    }

    /// Tensor names in storage order.
    pub fn names(&self) -> Vec<String> {
        self.meta.offset_keys()
    }

    /// Bytes of tensor data the file holds.
    pub fn stored_bytes(&self) -> u64 {
        (self.source.len() - self.data_start) as u64
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> HashMap<String, String> {
        self.meta.metadata().clone().unwrap_or_default()
    }

    /// (dtype, shape) of a tensor.
    pub fn info(&self, name: &str) -> Result<(DType, Vec<usize>)> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| Error::missing("safetensors file", name))?;
        Ok((dtype_from_st(info.dtype, name)?, info.shape.clone()))
    }

    /// (dtype as safetensors names it, shape) of a tensor, whether or not tlens reads its dtype.
    pub fn raw_info(&self, name: &str) -> Result<(String, Vec<usize>)> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| Error::missing("safetensors file", name))?;
        Ok((format!("{:?}", info.dtype), info.shape.clone()))
    }

    fn bytes_and_ref(&self, name: &str) -> Result<(&[u8], TensorRef)> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| Error::missing("safetensors file", name))?;
        let dtype = dtype_from_st(info.dtype, name)?;
        let (a, b) = info.data_offsets;
        let bytes = &self.source[self.data_start + a..self.data_start + b];
        let r = TensorRef::contiguous(name.to_string(), dtype, &info.shape);
        Ok((bytes, r))
    }

    /// Read one tensor (owned).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (bytes, r) = self.bytes_and_ref(name)?;
        with_dtype!(r.dtype(), T => {
            let a = view_storage::<T>(bytes, false, &r, name)?;
            Ok(T::wrap(a.into_owned()))
        })
    }

    /// View a tensor as `T`, borrowing the mapped file where alignment allows.
    pub fn view<T: Element>(&self, name: &str) -> Result<CowArray<'_, T, IxDyn>> {
        let (bytes, r) = self.bytes_and_ref(name)?;
        view_storage::<T>(bytes, false, &r, name)
    }
}

struct TensorBytes<'a>(&'a Tensor, Vec<u8>);

impl View for &TensorBytes<'_> {
    fn dtype(&self) -> StDtype {
        dtype_to_st(self.0.dtype())
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.1)
    }
    fn data_len(&self) -> usize {
        self.1.len()
    }
}

/// Serialise named tensors (and string metadata) as safetensors bytes.
pub fn to_bytes(
    tensors: &[(String, &Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let owned: Vec<(String, TensorBytes)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), TensorBytes(t, t.to_le_bytes())))
        .collect();
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata)
    };
    safetensors::serialize(owned.iter().map(|(n, t)| (n.as_str(), t)), meta).map_err(st_err)
}

/// Write named tensors atomically as a safetensors file.
pub fn write(
    path: impl AsRef<Path>,
    tensors: &[(String, &Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes = to_bytes(tensors, metadata)?;
    super::write_atomic(path.as_ref(), &bytes)
}
