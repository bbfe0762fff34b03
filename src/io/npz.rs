//! numpy `.npz` archives (a zip of `.npy` files): written by `tlens cache` / `analyze`, read by
//! tests that compare with arrays numpy saved. Entries are stored uncompressed, as `np.savez`.

use crate::error::{Error, Result};
use ndarray::{ArrayBase, ArrayD, Data, Dimension};
use ndarray_npy::{ReadNpyExt, ReadableElement, WritableElement, WriteNpyExt};
use std::io::{Cursor, Read, Write};
use std::path::Path;

/// Builds an `.npz` in memory.
pub struct NpzWriter {
    zip: zip::ZipWriter<Cursor<Vec<u8>>>,
}

impl Default for NpzWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl NpzWriter {
    /// An empty archive.
    pub fn new() -> NpzWriter {
        NpzWriter {
            zip: zip::ZipWriter::new(Cursor::new(Vec::new())),
        }
    }

    /// Add `name.npy` (numpy loads it as `npz[name]`).
    pub fn add<A, S, D>(&mut self, name: &str, a: &ArrayBase<S, D>) -> Result<()>
    where
        A: WritableElement,
        S: Data<Elem = A>,
        D: Dimension,
    {
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(a.len() * std::mem::size_of::<A>() >= u32::MAX as usize / 2);
        self.zip
            .start_file(format!("{name}.npy"), opts)
            .map_err(|e| Error::Zip(e.to_string()))?;
        let mut buf = Vec::new();
        a.write_npy(&mut buf)
            .map_err(|e| Error::invalid(name, e.to_string()))?;
        self.zip.write_all(&buf)?;
        Ok(())
    }

    /// The archive's bytes.
    pub fn finish(self) -> Result<Vec<u8>> {
        Ok(self
            .zip
            .finish()
            .map_err(|e| Error::Zip(e.to_string()))?
            .into_inner())
    }

    /// Write atomically.
    pub fn write(self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.finish()?;
        super::write_atomic(path.as_ref(), &bytes)
    }
}

/// Reads arrays from an `.npz`.
pub struct NpzReader {
    zip: zip::ZipArchive<Cursor<Vec<u8>>>,
}

impl NpzReader {
    /// Open an `.npz` file.
    pub fn open(path: impl AsRef<Path>) -> Result<NpzReader> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::from(e).in_file(path))?;
        Self::from_bytes(bytes)
    }

    /// Parse an `.npz` held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<NpzReader> {
        let zip =
            zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| Error::Zip(e.to_string()))?;
        Ok(NpzReader { zip })
    }

    /// Array names (without `.npy`), in archive order.
    pub fn names(&self) -> Vec<String> {
        self.zip
            .file_names()
            .filter_map(|n| n.ok())
            .map(|n| n.strip_suffix(".npy").unwrap_or(&n).to_string())
            .collect()
    }

    /// The array `name` with element type `T`.
    pub fn array<T: ReadableElement>(&mut self, name: &str) -> Result<ArrayD<T>> {
        let mut f = self
            .zip
            .by_name(&format!("{name}.npy"))
            .map_err(|_| Error::missing("npz", name))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        ArrayD::<T>::read_npy(&buf[..])
            .map_err(|e| Error::invalid(format!("npz['{name}']"), e.to_string()))
    }
}
