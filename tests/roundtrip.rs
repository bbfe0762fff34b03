//! Writing is the inverse of reading: run → .pth / safetensors → run is the identity, for every
//! fixture and every config style; and pickles tlens writes decode to the same value tree.

mod common;

use common::fixture;
use tlens::io::pickle::{unpickle, Limits, Pickler, Value};
use tlens::io::torch::{storage_from_pid, TorchFile};
use tlens::{ConfigStyle, RunFile};

const FILES: [&str; 7] = [
    "demo_small.pth",
    "demo_small_legacy.pth",
    "demo_small_proto4.pth",
    "demo_small.safetensors",
    "demo_small_tl3.pth",
    "original_small.pth",
    "demo_p113.pth",
];

#[test]
fn pth_roundtrip_is_identity_for_every_fixture_and_style() {
    for file in FILES {
        let run = RunFile::open(fixture(file)).unwrap().load().unwrap();
        for style in [
            ConfigStyle::Tl2Object,
            ConfigStyle::Tl3Object,
            ConfigStyle::Dict,
        ] {
            for protocol in [2, 4] {
                let bytes = run.to_pth_bytes(style, protocol).unwrap();
                let back = RunFile::from_bytes(bytes).unwrap();
                assert_eq!(back.format_name(), "torch-zip");
                let back_run = back.load().unwrap();
                assert_eq!(back_run, run, "{file} via {style:?}, protocol {protocol}");
                if style != ConfigStyle::Dict {
                    let (module, _) = back.config_class.clone().unwrap();
                    let want = if style == ConfigStyle::Tl2Object {
                        "transformer_lens.HookedTransformerConfig"
                    } else {
                        "transformer_lens.config.hooked_transformer_config"
                    };
                    assert_eq!(module, want);
                } else {
                    assert!(
                        back.config_class.is_none(),
                        "dict config for weights_only loading"
                    );
                }
            }
        }
    }
}

#[test]
fn safetensors_roundtrip_is_identity_for_every_fixture() {
    for file in FILES {
        let run = RunFile::open(fixture(file)).unwrap().load().unwrap();
        let bytes = run.to_safetensors_bytes().unwrap();
        let back = RunFile::from_bytes(bytes).unwrap();
        assert_eq!(back.format_name(), "safetensors");
        assert_eq!(back.load().unwrap(), run, "{file}");
    }
}

#[test]
fn legacy_zip_protocol4_and_safetensors_hold_the_same_run() {
    let zip = RunFile::open(fixture("demo_small.pth"))
        .unwrap()
        .load()
        .unwrap();
    for other in [
        "demo_small_legacy.pth",
        "demo_small_proto4.pth",
        "demo_small.safetensors",
    ] {
        assert_eq!(
            RunFile::open(fixture(other)).unwrap().load().unwrap(),
            zip,
            "{other}"
        );
    }
}

fn reread(bytes: &[u8]) -> Value {
    let mut load = |pid: Value, pos: usize| {
        Ok(Value::Storage(std::sync::Arc::new(storage_from_pid(
            pid, pos, false,
        )?)))
    };
    unpickle(bytes, &mut load, &Limits::default())
        .unwrap()
        .value
}

#[test]
fn pickle_value_tree_roundtrips() {
    for file in [
        "demo_small.pth",
        "demo_small_proto4.pth",
        "demo_small_tl3.pth",
        "original_small.pth",
    ] {
        let f = TorchFile::open(fixture(file)).unwrap();
        for protocol in [2, 3, 4, 5] {
            let mut p = Pickler::new(protocol);
            p.value(&f.root).unwrap();
            let back = reread(&p.finish());
            assert_eq!(back, f.root, "{file}, protocol {protocol}");
        }
    }
}

#[test]
fn pickled_values_of_every_kind_roundtrip() {
    let cfg = RunFile::open(fixture("demo_small.pth"))
        .unwrap()
        .config
        .unwrap();
    let v = Value::List(vec![
        Value::None,
        Value::Bool(true),
        Value::Int(0),
        Value::Int(255),
        Value::Int(65_535),
        Value::Int(-1),
        Value::Int(i32::MIN as i64),
        Value::Int(i64::MAX),
        Value::Int(i64::MIN),
        Value::Int(1 << 40),
        Value::Float(-0.0),
        Value::Float(f64::INFINITY),
        Value::Str("héllo \n ☃".into()),
        Value::Bytes((0..=255).collect()),
        Value::Tuple(vec![]),
        Value::Tuple(vec![Value::Int(1); 5]),
        Value::Set(vec![Value::Int(3)]),
        cfg.to_pickle(Some(tlens::model::config::TL2_CONFIG_CLASS)),
        cfg.to_pickle(None),
        Value::NumpyScalar {
            dtype: "f8".into(),
            value: Box::new(Value::Float(0.1)),
        },
        Value::NumpyScalar {
            dtype: "i8".into(),
            value: Box::new(Value::Int(-7)),
        },
        Value::Dtype(tlens::DType::BF16),
    ]);
    for protocol in [2, 4] {
        let mut p = Pickler::new(protocol);
        p.value(&v).unwrap();
        assert_eq!(reread(&p.finish()), v, "protocol {protocol}");
    }
}

#[test]
fn writes_are_atomic_and_replace_existing_files() {
    let dir = std::env::temp_dir().join(format!("tlens-atomic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("run.pth");
    std::fs::write(&out, b"old contents").unwrap();
    let run = RunFile::open(fixture("demo_small.pth"))
        .unwrap()
        .load()
        .unwrap();
    run.save_pth(&out, ConfigStyle::Tl2Object).unwrap();
    assert_eq!(RunFile::open(&out).unwrap().load().unwrap(), run);
    let st = dir.join("run.safetensors");
    run.save_safetensors(&st).unwrap();
    assert_eq!(RunFile::open(&st).unwrap().load().unwrap(), run);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no temporary files left behind: {names:?}");
    // A write into a missing directory fails with an error naming the file.
    let bad = dir.join("missing").join("x.pth");
    let err = run.save_pth(&bad, ConfigStyle::Tl2Object).unwrap_err();
    assert!(err.to_string().contains("x.pth"), "{err}");
    assert!(matches!(err.root(), tlens::Error::Io(_)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn zip_entries_are_stored_and_64_byte_aligned_like_torch() {
    let run = RunFile::open(fixture("demo_small.pth"))
        .unwrap()
        .load()
        .unwrap();
    let bytes = run.to_pth_bytes(ConfigStyle::Tl2Object, 2).unwrap();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(&bytes[..])).unwrap();
    let mut names = Vec::new();
    for i in 0..z.len() {
        let f = z.by_index_raw(i).unwrap();
        assert_eq!(f.compression(), zip::CompressionMethod::Stored);
        let name = f.name().unwrap().to_string();
        if name.starts_with("archive/data/") {
            assert_eq!(f.data_start().unwrap() % 64, 0, "{name} aligned");
        }
        names.push(name);
    }
    assert_eq!(names[0], "archive/data.pkl");
    assert!(names.contains(&"archive/byteorder".to_string()));
    assert!(names.contains(&"archive/version".to_string()));
    assert!(names.contains(&"archive/.data/serialization_id".to_string()));
}
