//! Hostile input: every malformed file gives a typed error — never a panic, never zero-filling.

#[path = "support/fuzz.rs"]
#[allow(dead_code)]
mod fuzz;

mod common;

use common::fixture;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tlens::io::pickle::{unpickle, Limits, Value};
use tlens::{Error, RunFile};

/// Open and fully read bytes; a panic fails the test, an error is returned.
fn try_load(bytes: Vec<u8>) -> Result<(), Error> {
    catch_unwind(AssertUnwindSafe(|| {
        RunFile::from_bytes(bytes).and_then(|r| r.load().map(|_| ()))
    }))
    .unwrap_or_else(|_| panic!("panicked"))
}

fn pickle(bytes: &[u8]) -> Result<Value, Error> {
    let mut no = |_: Value, pos: usize| -> tlens::Result<Value> {
        Err(Error::PickleUnsupported {
            pos,
            name: "persistent id",
        })
    };
    unpickle(bytes, &mut no, &Limits::default()).map(|u| u.value)
}

/// Offsets of zip record signatures: local headers, central directory entries, end record.
fn zip_boundaries(b: &[u8]) -> Vec<usize> {
    let sigs: [&[u8]; 3] = [b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"];
    let mut out = Vec::new();
    for i in 0..b.len().saturating_sub(4) {
        if sigs.iter().any(|s| &b[i..i + 4] == *s) {
            out.extend([i, i + 1, i + 30, i + 46]);
        }
    }
    out.retain(|&i| i < b.len());
    out
}

#[test]
fn truncation_at_every_zip_record_boundary_is_a_typed_error() {
    let b = std::fs::read(fixture("demo_small.pth")).unwrap();
    let cuts = zip_boundaries(&b);
    assert!(cuts.len() > 100, "{} boundaries", cuts.len());
    for &cut in &cuts {
        let err = try_load(b[..cut].to_vec()).expect_err("truncated file must not load");
        assert!(
            matches!(
                err.root(),
                Error::Zip(_)
                    | Error::UnknownFormat(_)
                    | Error::Truncated { .. }
                    | Error::MissingRecord(_)
            ),
            "cut at {cut}: {err}"
        );
    }
    // And at every 997th byte.
    for cut in (0..b.len()).step_by(997) {
        assert!(try_load(b[..cut].to_vec()).is_err(), "cut at {cut}");
    }
}

#[test]
fn truncation_at_every_legacy_section_boundary_is_a_typed_error() {
    let b = std::fs::read(fixture("demo_small_legacy.pth")).unwrap();
    // Section boundaries: the end of each of the four pickles, then each storage's header/data.
    let mut cuts = vec![0, 1, 2];
    let mut pos = 0;
    let mut storage = |pid: Value, p: usize| {
        Ok(Value::Storage(std::sync::Arc::new(
            tlens::io::torch::storage_from_pid(pid, p, true)?,
        )))
    };
    for _ in 0..5 {
        let u = unpickle(&b[pos..], &mut storage, &Limits::default()).unwrap();
        pos += u.end;
        cuts.extend([pos - 1, pos, pos + 1]);
    }
    // Storage headers are 8-byte counts followed by data; cut inside a few of them.
    for k in 0..40 {
        cuts.push(pos + k * 37);
    }
    cuts.push(b.len() - 1);
    let mut kinds = std::collections::BTreeSet::new();
    for &cut in &cuts {
        let err = try_load(b[..cut].to_vec()).expect_err("truncated legacy file must not load");
        kinds.insert(format!("{:?}", std::mem::discriminant(err.root())));
        assert!(
            matches!(
                err.root(),
                Error::PickleEof { .. }
                    | Error::Truncated { .. }
                    | Error::UnknownFormat(_)
                    | Error::MissingRecord(_)
            ),
            "cut at {cut}: {err}"
        );
    }
    assert!(
        kinds.len() >= 2,
        "both pickle and storage truncations are seen"
    );
}

#[test]
fn flipped_bytes_never_panic() {
    for file in [
        "demo_small.pth",
        "demo_small_legacy.pth",
        "demo_small.safetensors",
    ] {
        let b = std::fs::read(fixture(file)).unwrap();
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut errors = 0;
        for _ in 0..300 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut m = b.clone();
            let i = (state % m.len() as u64) as usize;
            m[i] ^= 1 << (state >> 60 & 7);
            if try_load(m).is_err() {
                errors += 1;
            }
        }
        // Most flips land in tensor data (still a valid file); some must be caught.
        assert!(errors > 0, "{file}: no flip detected");
    }
}

#[test]
fn storage_smaller_than_its_tensors_is_an_error_not_zero_fill() {
    // Take a real file and shrink one storage entry by rewriting the numel in the pickle: build
    // a pickle whose persistent id claims more elements than the record holds.
    let run = RunFile::open(fixture("demo_small.pth"))
        .unwrap()
        .load()
        .unwrap();
    let mut w = tlens::io::torch::TorchWriter::new(2);
    let t = tlens::Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[4])));
    let Value::Tensor(mut r) = w.add(&t) else {
        unreachable!()
    };
    std::sync::Arc::make_mut(&mut r.storage).numel = 1000; // claims 4000 bytes, 16 stored
    r.shape = vec![1000];
    let root = Value::Dict(tlens::io::pickle::Dict {
        ordered: false,
        items: vec![(Value::Str("x".into()), Value::Tensor(r.clone()))],
        attrs: None,
    });
    let err = try_load(w.to_bytes(&root).unwrap()).unwrap_err();
    assert!(
        matches!(
            err.root(),
            Error::Truncated {
                needed: 4000,
                available: 16,
                ..
            }
        ),
        "{err}"
    );

    // A view reaching past its storage (offset + extent > numel).
    let mut w = tlens::io::torch::TorchWriter::new(2);
    let Value::Tensor(mut r) = w.add(&t) else {
        unreachable!()
    };
    r.offset = 2;
    r.shape = vec![3];
    let root = Value::Dict(tlens::io::pickle::Dict {
        ordered: false,
        items: vec![(Value::Str("x".into()), Value::Tensor(r))],
        attrs: None,
    });
    let err = try_load(w.to_bytes(&root).unwrap()).unwrap_err();
    assert!(
        matches!(
            err.root(),
            Error::StorageBounds {
                needed: 5,
                available: 4,
                ..
            }
        ),
        "{err}"
    );
    drop(run);
}

#[test]
fn deep_nesting_is_a_limit_error() {
    let n = 100_000;
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', n));
    p.extend(std::iter::repeat_n(b'a', n - 1));
    p.push(b'.');
    match pickle(&p) {
        Err(Error::Limit { what, .. }) => assert!(what.contains("nesting"), "{what}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn exponential_sharing_is_a_limit_error() {
    // l0 = [0]; l_{k+1} = [l_k, l_k] (memoised) — 2^60 leaves if expanded naively.
    let mut p = vec![0x80, 2, b']', b'K', 0, b'a', b'q', 0];
    for k in 0..60u8 {
        p.extend([b'(', b'h', k, b'h', k, b'l', b'q', k + 1]);
    }
    p.push(b'.');
    let limits = Limits {
        max_values: 100_000,
        ..Limits::default()
    };
    let mut no = |_: Value, pos: usize| -> tlens::Result<Value> {
        Err(Error::PickleUnsupported { pos, name: "pid" })
    };
    match unpickle(&p, &mut no, &limits) {
        Err(Error::Limit { what, .. }) => assert!(what.contains("expanding"), "{what}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn huge_length_fields_are_rejected_before_allocating() {
    // BINUNICODE claiming 4 GiB − 16 bytes.
    match pickle(b"\x80\x02X\xf0\xff\xff\xff") {
        Err(Error::Limit { what, found, .. }) => {
            assert_eq!(what, "string/bytes length");
            assert_eq!(found, 0xffff_fff0);
        }
        other => panic!("{other:?}"),
    }
    // BINBYTES8 claiming 2^63.
    match pickle(b"\x80\x04\x8e\x00\x00\x00\x00\x00\x00\x00\x80") {
        Err(Error::Limit { .. }) => {}
        other => panic!("{other:?}"),
    }
    // Within the limit but past the end of the data.
    match pickle(b"\x80\x02X\x10\x00\x00\x00abc") {
        Err(Error::PickleEof { pos: 7, .. }) => {}
        other => panic!("{other:?}"),
    }
    // A memo index far beyond anything sensible.
    match pickle(b"\x80\x02Nr\xff\xff\xff\xff.") {
        Err(Error::Limit {
            what: "pickle memo index",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_opcodes_give_typed_errors() {
    assert!(matches!(
        pickle(b"\x80\x02\xff."),
        Err(Error::PickleOpcode {
            pos: 2,
            opcode: 0xff
        })
    ));
    assert!(matches!(
        pickle(b"\x80\x02a."),
        Err(Error::PickleStack {
            opcode: "APPEND",
            ..
        })
    ));
    assert!(matches!(
        pickle(b"\x80\x02h\x05."),
        Err(Error::PickleMemo { index: 5, .. })
    ));
    assert!(matches!(pickle(b"\x80\x02N"), Err(Error::PickleEof { .. })));
    assert!(matches!(
        pickle(b"\x80\x02e."),
        Err(Error::PickleStack { .. })
    ));
    assert!(matches!(
        pickle(b"\x80\x09N."),
        Err(Error::PickleStack {
            opcode: "PROTO",
            ..
        })
    ));
    assert!(matches!(
        pickle(b"\x80\x05\x97."),
        Err(Error::PickleUnsupported {
            name: "NEXT_BUFFER",
            ..
        })
    ));
    assert!(matches!(
        pickle(b"\x80\x02\x82\x01."),
        Err(Error::PickleUnsupported { name: "EXT1", .. })
    ));
    // REDUCE of a tensor rebuild with a non-storage argument.
    let p = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x01K\x00)) \x89t R.";
    let p: Vec<u8> = p.iter().copied().filter(|&c| c != b' ').collect();
    match pickle(&p) {
        Err(Error::PickleStack {
            opcode: "REDUCE",
            msg,
            ..
        }) => assert!(msg.contains("storage"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn nothing_is_imported_or_called() {
    // The classic exploit: os.system('echo pwned'). tlens keeps it as an inert object.
    let p = b"\x80\x02cos\nsystem\nX\x0a\x00\x00\x00echo pwned\x85R.";
    match pickle(p).unwrap() {
        Value::Object(o) => {
            assert_eq!(o.class(), "os.system");
            assert_eq!(o.args, vec![Value::Str("echo pwned".into())]);
        }
        other => panic!("{other:?}"),
    }
    // As a run file it is rejected as not a run (typed error, nothing executed).
    let err = tlens::io::torch::TorchFile::from_bytes(p.to_vec())
        .err()
        .unwrap();
    assert!(matches!(err, Error::UnknownFormat(_)), "{err}");
}

#[test]
fn unknown_file_kinds_are_rejected() {
    for bytes in [b"".to_vec(), b"hello world".to_vec(), vec![0u8; 64]] {
        let err = try_load(bytes).unwrap_err();
        assert!(matches!(err, Error::UnknownFormat(_)), "{err}");
    }
    let err = RunFile::open(fixture("does-not-exist.pth")).err().unwrap();
    assert!(err.to_string().contains("does-not-exist.pth"));
    assert!(matches!(err.root(), Error::Io(_)));
}

#[test]
fn compressed_zip_entries_are_inflated_checked_or_rejected() {
    // torch.save stores every entry; TorchScript archives deflate some (tests/saved_runs.rs
    // reads a real one). An entry tlens needs is inflated when it is deflated, checked against
    // its declared size; any other method is an error naming it.
    let run = RunFile::open(fixture("demo_small.pth"))
        .unwrap()
        .load()
        .unwrap();
    let good = run.to_pth_bytes(tlens::ConfigStyle::Tl2Object, 2).unwrap();
    let mark = |method: u8| {
        let mut b = good.clone();
        for i in 0..b.len() - 4 {
            if &b[i..i + 4] == b"PK\x01\x02" {
                b[i + 10] = method;
            }
            if &b[i..i + 4] == b"PK\x03\x04" {
                b[i + 8] = method;
            }
        }
        b
    };
    // Stored bytes falsely marked as deflated: not valid deflate data.
    let err = try_load(mark(8)).unwrap_err();
    assert!(matches!(err.root(), Error::Zip(_)), "{err}");
    assert!(err.to_string().contains("deflate data"), "{err}");
    // Another method (12 = bzip2) on the pickle: refused by name.
    let err = try_load(mark(12)).unwrap_err();
    assert!(matches!(err.root(), Error::Zip(_)), "{err}");
    assert!(err.to_string().contains("method 12"), "{err}");
    // A deflated entry that declares a size over the budget is refused before inflating.
    let mut b = mark(8);
    for i in 0..b.len() - 4 {
        if &b[i..i + 4] == b"PK\x01\x02" {
            b[i + 24..i + 28].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        }
    }
    let err = try_load(b).unwrap_err();
    assert!(matches!(err.root(), Error::Limit { .. }), "{err}");
}

#[test]
fn fuzz_smoke_pass_finds_no_panic() {
    use fuzz::{fuzz, pickles_of, Target};
    let files: Vec<Vec<u8>> = [
        "demo_small.pth",
        "demo_small_legacy.pth",
        "original_small.pth",
    ]
    .iter()
    .map(|n| std::fs::read(fixture(n)).unwrap())
    .collect();
    let pickles = pickles_of(&files);
    assert_eq!(pickles.len(), 2, "two zip files");
    let r = fuzz(Target::Pickle, &pickles, 3000, 7);
    assert_eq!(r.inputs, 3000);
    assert!(r.panics.is_empty(), "{} panics", r.panics.len());
    assert!(r.errors > 0);
    let r = fuzz(Target::File, &files, 150, 7);
    assert!(r.panics.is_empty(), "{} panics", r.panics.len());
}
