//! A strict reader of a zip archive's central directory, for torch files.
//!
//! Why not the zip crate for reading: zip 9.4.1 searches several end-of-directory candidates and
//! infers archive offsets heuristically, and rejects a genuine torch 2.15 file
//! (`fixtures/models/attn_only_lnpre_bidir.pth`, "Invalid Central Directory header") that
//! Python's zipfile and torch read. torch's own reader (miniz) reads the end record at the end
//! of the file; so does this one: the end-of-central-directory record (and its zip64 locator and
//! record, which torch always writes), then each central header in turn. Local headers are
//! read only when an entry's data is needed ([`data_range`]), since torch's writer may leave
//! their sizes zero (data-descriptor flag).

use crate::error::{Error, Result};
use std::ops::Range;

/// One central-directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The entry's path in the archive.
    pub name: String,
    /// 0 = stored, 8 = deflated (TorchScript archives deflate their `code/` entries).
    pub method: u16,
    /// Bytes stored (after compression).
    pub compressed_size: u64,
    /// Size once inflated (= `compressed_size` for stored entries).
    pub uncompressed_size: u64,
    /// Offset of the entry's local header.
    pub header_start: u64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn get<'a>(b: &'a [u8], at: u64, len: u64, what: &str) -> Result<&'a [u8]> {
    let end = at
        .checked_add(len)
        .filter(|&e| e <= b.len() as u64)
        .ok_or_else(|| Error::Truncated {
            what: what.to_string(),
            needed: at.saturating_add(len),
            available: b.len() as u64,
        })?;
    Ok(&b[at as usize..end as usize])
}

/// Locate the end record: the last `PK\x05\x06` whose comment reaches exactly the end of file
/// (the last one that fits, if none does).
fn find_eocd(b: &[u8]) -> Result<usize> {
    if b.len() < 22 {
        return Err(Error::Zip(
            "file too short for an end of central directory record".into(),
        ));
    }
    let lowest = b.len().saturating_sub(22 + 65_535);
    let mut fallback = None;
    for i in (lowest..=b.len() - 22).rev() {
        if &b[i..i + 4] == b"PK\x05\x06" {
            let comment = u16_at(b, i + 20) as usize;
            if i + 22 + comment == b.len() {
                return Ok(i);
            }
            if fallback.is_none() && i + 22 + comment <= b.len() {
                fallback = Some(i);
            }
        }
    }
    fallback.ok_or_else(|| Error::Zip("no end of central directory record".into()))
}

/// Read every central-directory entry.
pub fn central_directory(b: &[u8]) -> Result<Vec<Entry>> {
    let eocd = find_eocd(b)?;
    let mut n_entries = u16_at(b, eocd + 10) as u64;
    let mut cd_size = u32_at(b, eocd + 12) as u64;
    let mut cd_offset = u32_at(b, eocd + 16) as u64;
    // zip64: locator just before the end record, pointing at the zip64 end record.
    if eocd >= 20 && &b[eocd - 20..eocd - 16] == b"PK\x06\x07" {
        let rec_at = u64_at(b, eocd - 20 + 8);
        let rec = get(b, rec_at, 56, "zip64 end of central directory record")?;
        if &rec[..4] != b"PK\x06\x06" {
            return Err(Error::Zip(
                "zip64 locator does not point at a zip64 end record".into(),
            ));
        }
        n_entries = u64_at(rec, 32);
        cd_size = u64_at(rec, 40);
        cd_offset = u64_at(rec, 48);
    }
    let cd = get(b, cd_offset, cd_size, "central directory")?;
    // Each header is at least 46 bytes: a count beyond that is a lie, not an allocation.
    if n_entries > cd.len() as u64 / 46 {
        return Err(Error::Zip(format!(
            "{n_entries} entries cannot fit in a {}-byte central directory",
            cd.len()
        )));
    }
    let mut entries = Vec::with_capacity(n_entries as usize);
    let mut pos = 0usize;
    for i in 0..n_entries {
        let h = get(cd, pos as u64, 46, "central directory header")?;
        if &h[..4] != b"PK\x01\x02" {
            return Err(Error::Zip(format!(
                "central directory entry {i}: bad signature"
            )));
        }
        let method = u16_at(h, 10);
        let mut compressed = u32_at(h, 20) as u64;
        let mut uncompressed = u32_at(h, 24) as u64;
        let (name_len, extra_len, comment_len) = (
            u16_at(h, 28) as u64,
            u16_at(h, 30) as u64,
            u16_at(h, 32) as u64,
        );
        let mut header_start = u32_at(h, 42) as u64;
        let name = get(cd, pos as u64 + 46, name_len, "central directory file name")?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| Error::Zip(format!("central directory entry {i}: name is not UTF-8")))?;
        let extra = get(
            cd,
            pos as u64 + 46 + name_len,
            extra_len,
            "central directory extra field",
        )?;
        // zip64 extended information (id 1): the saturated fields, in this order.
        let mut x = 0usize;
        while x + 4 <= extra.len() {
            let (id, size) = (u16_at(extra, x), u16_at(extra, x + 2) as usize);
            let body = extra
                .get(x + 4..x + 4 + size)
                .ok_or_else(|| Error::Zip(format!("entry '{name}': truncated extra field")))?;
            if id == 1 {
                let mut k = 0;
                let mut next = |v: &mut u64| -> Result<()> {
                    if *v == 0xffff_ffff {
                        *v = u64_at(
                            body.get(k..k + 8).ok_or_else(|| {
                                Error::Zip(format!("entry '{name}': short zip64 field"))
                            })?,
                            0,
                        );
                        k += 8;
                    }
                    Ok(())
                };
                next(&mut uncompressed)?;
                next(&mut compressed)?;
                next(&mut header_start)?;
            }
            x += 4 + size;
        }
        entries.push(Entry {
            name,
            method,
            compressed_size: compressed,
            uncompressed_size: uncompressed,
            header_start,
        });
        pos += (46 + name_len + extra_len + comment_len) as usize;
    }
    Ok(entries)
}

/// The data range of a stored entry, from its local header (30 bytes + name + extra field);
/// the size comes from the central directory, since local headers may hold zeros.
pub fn data_range(b: &[u8], name: &str, header_start: u64, size: u64) -> Result<Range<usize>> {
    let hdr = get(
        b,
        header_start,
        30,
        &format!("local header of zip entry '{name}'"),
    )?;
    if &hdr[..4] != b"PK\x03\x04" {
        return Err(Error::Zip(format!(
            "entry '{name}': bad local header signature"
        )));
    }
    let start = header_start + 30 + u16_at(hdr, 26) as u64 + u16_at(hdr, 28) as u64;
    get(b, start, size, &format!("zip entry '{name}'"))?;
    Ok(start as usize..(start + size) as usize)
}

/// Inflate a deflated entry's data (raw DEFLATE, as zip stores it), refusing output larger
/// than the size the central directory declares (which the caller has checked against its
/// budget) — a "zip bomb" cannot grow past it.
pub fn inflate(data: &[u8], name: &str, declared: u64) -> Result<Vec<u8>> {
    let limit = usize::try_from(declared).map_err(|_| {
        Error::Zip(format!(
            "entry '{name}': declared size {declared} too large"
        ))
    })?;
    let out = miniz_oxide::inflate::decompress_to_vec_with_limit(data, limit)
        .map_err(|e| Error::Zip(format!("entry '{name}': deflate data: {e}")))?;
    if out.len() as u64 != declared {
        return Err(Error::Zip(format!(
            "entry '{name}': inflated to {} bytes, the directory says {declared}",
            out.len()
        )));
    }
    Ok(out)
}
