//! Format details that the fixtures do not all exercise: config defaults against TL, big-endian
//! storages, every dtype, strided views, parameters and subclass rebuilds, config module paths.

mod common;

use common::{fixture, manifest};
use ndarray::{ArrayD, IxDyn};
use std::sync::Arc;
use tlens::io::pickle::{unpickle, Dict, Limits, Pickler, Value};
use tlens::io::torch::{storage_from_pid, TorchFile, TorchWriter};
use tlens::model::HookedTransformerConfig;
use tlens::tensor::{StorageRef, TensorRef};
use tlens::{DType, Error, StateDict, Tensor};

#[test]
fn config_defaults_and_derived_fields_match_transformer_lens() {
    let m = manifest();
    for case in m["configs"].as_array().unwrap() {
        let cfg = HookedTransformerConfig::from_json(case["input"].clone())
            .unwrap()
            .to_json();
        for (k, want) in case["config"].as_object().unwrap() {
            let got = &cfg[k];
            match (got.as_f64(), want.as_f64()) {
                (Some(g), Some(w)) => assert!(g == w, "{}: {k} {g} != {w}", case["input"]),
                _ => assert_eq!(got, want, "{}: {k}", case["input"]),
            }
        }
    }
}

#[test]
fn config_validation_follows_post_init() {
    let bad = |j: serde_json::Value| match HookedTransformerConfig::from_json(j) {
        Err(Error::Invalid { .. }) => {}
        other => panic!("{other:?}"),
    };
    bad(
        serde_json::json!({"n_layers": 1, "d_model": 8, "n_ctx": 3, "d_head": 2, "act_fn": "tanh"}),
    );
    bad(
        serde_json::json!({"n_layers": 1, "d_model": 8, "n_ctx": 3, "d_head": 2, "num_experts": 2}),
    );
    bad(serde_json::json!({"n_layers": 0, "d_model": 8, "n_ctx": 3, "d_head": 2}));
    bad(serde_json::json!({"n_layers": 1, "d_model": 8, "n_ctx": 3}));
    bad(
        serde_json::json!({"n_layers": 1, "d_model": 8, "n_ctx": 3, "d_head": 2, "use_local_attn": true}),
    );
}

#[test]
fn unknown_config_fields_are_kept_through_every_path() {
    let j = serde_json::json!({"n_layers": 1, "d_model": 8, "n_ctx": 3, "d_head": 2,
        "my_new_field": [1, 2.5, "x"], "another": {"a": null}});
    let cfg = HookedTransformerConfig::from_json(j).unwrap();
    assert_eq!(cfg.extra["my_new_field"], serde_json::json!([1, 2.5, "x"]));
    for class in [None, Some(tlens::model::config::TL2_CONFIG_CLASS)] {
        let back = HookedTransformerConfig::from_pickle(&cfg.to_pickle(class)).unwrap();
        assert_eq!(back, cfg);
    }
    assert_eq!(
        HookedTransformerConfig::from_json_str(&cfg.to_json().to_string()).unwrap(),
        cfg
    );
}

#[test]
fn config_is_read_under_every_tl_module_path() {
    let cfg = HookedTransformerConfig::grokking_demo(113);
    for module in [
        "transformer_lens.HookedTransformerConfig",
        "transformer_lens.config.HookedTransformerConfig",
        "transformer_lens.config.hooked_transformer_config",
    ] {
        let v = cfg.to_pickle(Some((module, "HookedTransformerConfig")));
        assert_eq!(
            HookedTransformerConfig::from_pickle(&v).unwrap(),
            cfg,
            "{module}"
        );
    }
    let v = cfg.to_pickle(Some(("evil.module", "HookedTransformerConfig")));
    assert!(matches!(
        HookedTransformerConfig::from_pickle(&v),
        Err(Error::Type { .. })
    ));
}

#[test]
fn tl_configs_hold_numpy_float64_scalars() {
    // docs/reference.md §6: initializer_range and attn_scale pickle as numpy float64 scalars.
    let f = TorchFile::open(fixture("demo_p113.pth")).unwrap();
    let Value::Object(o) = f.root.get("config").unwrap() else {
        panic!()
    };
    let state = o.state.as_ref().unwrap();
    for k in ["initializer_range", "attn_scale"] {
        match state.get(k).unwrap() {
            Value::NumpyScalar { dtype, value } => {
                assert_eq!(dtype, "f8");
                assert!(matches!(**value, Value::Float(_)));
            }
            other => panic!("{k}: {other:?}"),
        }
    }
    assert_eq!(state.get("dtype"), Some(&Value::Dtype(DType::F32)));
}

fn every_dtype() -> StateDict {
    let mut sd = StateDict::new();
    let v: Vec<f64> = vec![0.0, 1.0, -2.0, 3.5, 100.0, -7.25];
    for d in DType::ALL {
        let t = Tensor::F64(ArrayD::from_shape_vec(IxDyn(&[2, 3]), v.clone()).unwrap()).to_dtype(d);
        sd.insert(format!("t_{}", d.torch_name()), t);
    }
    sd
}

#[test]
fn every_dtype_roundtrips_through_pth_and_safetensors() {
    let run = tlens::TrainingRun::from_model(None, every_dtype());
    for bytes in [
        run.to_pth_bytes(tlens::ConfigStyle::Tl2Object, 2).unwrap(),
        run.to_safetensors_bytes().unwrap(),
    ] {
        let back = tlens::RunFile::from_bytes(bytes).unwrap().model().unwrap();
        for (name, t) in run.model.iter() {
            assert_eq!(back.get(name), Some(t), "{name}");
        }
    }
    // Values survive as numbers: the u8 of -2.0 wraps like a cast, bool is non-zero.
    let sd = every_dtype();
    assert_eq!(
        sd.get("t_bool").unwrap().to_f64_vec(),
        vec![0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    );
    assert_eq!(sd.get("t_bfloat16").unwrap().to_f64_vec()[3], 3.5);
}

/// A torch zip whose storages and `byteorder` record are written by hand.
fn handmade_zip(byteorder: &str, storages: &[(&str, Vec<u8>)], root: &Value) -> Vec<u8> {
    use std::io::Write;
    let mut p = Pickler::new(2);
    p.value(root).unwrap();
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    let o =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("model/data.pkl", o).unwrap();
    z.write_all(&p.finish()).unwrap();
    z.start_file("model/byteorder", o).unwrap();
    z.write_all(byteorder.as_bytes()).unwrap();
    for (k, b) in storages {
        z.start_file(format!("model/data/{k}"), o).unwrap();
        z.write_all(b).unwrap();
    }
    z.finish().unwrap();
    buf.into_inner()
}

fn tref(
    key: &str,
    dtype: DType,
    numel: u64,
    offset: u64,
    shape: &[usize],
    stride: &[usize],
) -> TensorRef {
    TensorRef {
        storage: Arc::new(StorageRef {
            key: key.into(),
            dtype,
            numel,
            view_offset: 0,
            location: "cpu".into(),
        }),
        offset,
        shape: shape.to_vec(),
        stride: stride.to_vec(),
        requires_grad: false,
        is_parameter: false,
    }
}

fn one(name: &str, t: TensorRef) -> Value {
    Value::Dict(Dict {
        ordered: true,
        items: vec![(Value::Str(name.into()), Value::Tensor(Box::new(t)))],
        attrs: None,
    })
}

#[test]
fn big_endian_storages_are_byte_swapped() {
    let vals = [1.5f32, -2.25, 3.0e-7, 65504.0];
    let be: Vec<u8> = vals.iter().flat_map(|v| v.to_be_bytes()).collect();
    let ints = [1i64, -2, 1 << 40];
    let be_i: Vec<u8> = ints.iter().flat_map(|v| v.to_be_bytes()).collect();
    let root = Value::Dict(Dict {
        ordered: false,
        items: vec![
            (
                Value::Str("w".into()),
                Value::Tensor(Box::new(tref("0", DType::F32, 4, 0, &[2, 2], &[2, 1]))),
            ),
            (
                Value::Str("i".into()),
                Value::Tensor(Box::new(tref("1", DType::I64, 3, 0, &[3], &[1]))),
            ),
        ],
        attrs: None,
    });
    let bytes = handmade_zip("big", &[("0", be), ("1", be_i)], &root);
    let f = TorchFile::from_bytes(bytes).unwrap();
    assert!(f.big_endian);
    assert_eq!(
        f.container,
        tlens::io::torch::TorchContainer::Zip {
            prefix: "model/".into()
        }
    );
    let w = f.root.get("w").and_then(Value::as_tensor).unwrap();
    let t = f.tensor(w, "w").unwrap();
    assert_eq!(
        t.array::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vals
    );
    assert!(
        !f.view::<f32>(w, "w").unwrap().is_view(),
        "byte-swapped data is copied"
    );
    let i = f.root.get("i").and_then(Value::as_tensor).unwrap();
    assert_eq!(f.tensor(i, "i").unwrap().to_i64_vec().unwrap(), ints);
    // An unknown byte order is an error, not a guess.
    let bad = handmade_zip("middle", &[], &Value::None);
    assert!(matches!(
        TorchFile::from_bytes(bad),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn strided_and_offset_views_read_the_right_elements() {
    // storage 0..12 as f32; a transposed 3x2 view of rows 1..3 of a 4x3 matrix, offset 3.
    let data: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let t = tref("0", DType::F32, 12, 3, &[3, 2], &[1, 3]);
    let bytes = handmade_zip("little", &[("0", data)], &one("x", t));
    let f = TorchFile::from_bytes(bytes).unwrap();
    let r = f.root.get("x").and_then(Value::as_tensor).unwrap();
    let a = f.tensor(r, "x").unwrap();
    // element [i][j] = storage[3 + i + 3j]
    assert_eq!(a.to_f64_vec(), vec![3.0, 6.0, 4.0, 7.0, 5.0, 8.0]);
    assert_eq!(a.shape(), &[3, 2]);
    // The zip payload here is not 64-byte aligned (plain zip writer): reads still work.
    let v = f.view::<f32>(r, "x").unwrap();
    assert_eq!(
        v.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        a.to_f64_vec()
    );
}

#[test]
fn misaligned_storage_is_copied_not_misread() {
    // Write with an odd-length name so the data start is odd; values must still decode.
    let data: Vec<u8> = [1.0f64, 2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let t = tref("abc", DType::F64, 3, 0, &[3], &[1]);
    let f = TorchFile::from_bytes(handmade_zip("little", &[("abc", data)], &one("x", t))).unwrap();
    let r = f.root.get("x").and_then(Value::as_tensor).unwrap();
    assert_eq!(f.tensor(r, "x").unwrap().to_f64_vec(), vec![1.0, 2.0, 3.0]);
}

fn reread(bytes: &[u8]) -> Value {
    let mut load =
        |pid: Value, pos: usize| Ok(Value::Storage(Arc::new(storage_from_pid(pid, pos, false)?)));
    unpickle(bytes, &mut load, &Limits::default())
        .unwrap()
        .value
}

#[test]
fn parameters_and_tensor_subclass_rebuilds_are_tensors() {
    let mut w = TorchWriter::new(2);
    let Value::Tensor(mut r) = w.add(&Tensor::F32(ArrayD::zeros(IxDyn(&[2])))) else {
        panic!()
    };
    r.is_parameter = true;
    r.requires_grad = true;
    let v = Value::Tensor(r.clone());
    let mut p = Pickler::new(2);
    p.value(&v).unwrap();
    assert_eq!(reread(&p.finish()), v, "_rebuild_parameter round trip");

    // torch._tensor._rebuild_from_type_v2(_rebuild_tensor_v2, SomeSubclass, args, state)
    let p = Pickler::new(2);
    let plain = Value::Tensor(Box::new(TensorRef {
        is_parameter: false,
        requires_grad: false,
        ..(*r).clone()
    }));
    let mut pk = Pickler::new(2);
    pk.value(&plain).unwrap();
    let plain_bytes = pk.finish();
    // Take the argument tuple the plain tensor was written with: everything after the GLOBAL
    // (and its BINPUT) up to the final REDUCE.
    let g = b"ctorch._utils\n_rebuild_tensor_v2\nq\x00";
    let start = plain_bytes.windows(g.len()).position(|w| w == g).unwrap() + g.len();
    let args = &plain_bytes[start..plain_bytes.len() - 2]; // strip REDUCE and STOP
    let mut bytes = vec![0x80, 2];
    bytes.extend_from_slice(b"ctorch._tensor\n_rebuild_from_type_v2\n");
    bytes.extend_from_slice(b"(ctorch._utils\n_rebuild_tensor_v2\nq\x00cmy.module\nMyTensor\n");
    bytes.extend_from_slice(args);
    bytes.extend_from_slice(b"}tR.");
    assert_eq!(reread(&bytes), plain);
    drop(p.finish());
}

#[test]
fn state_dict_separates_buffers_from_parameters() {
    let sd = tlens::RunFile::open(fixture("demo_p113.pth"))
        .unwrap()
        .model()
        .unwrap();
    let buffers: Vec<&str> = sd.buffers().map(|(n, _)| n).collect();
    assert_eq!(buffers, ["blocks.0.attn.mask", "blocks.0.attn.IGNORE"]);
    assert_eq!(sd.parameters().count(), 16);
    let ignore = sd.array::<f32>("blocks.0.attn.IGNORE", Some(&[])).unwrap();
    assert_eq!(
        ignore.iter().next(),
        Some(&f32::NEG_INFINITY),
        "TL >= 1.7 stores -inf"
    );
    match sd.array::<f32>("embed.W_E", Some(&[113, 128])) {
        Err(Error::Shape {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "embed.W_E");
            assert_eq!((expected, found), (vec![113, 128], vec![114, 128]));
        }
        other => panic!("{other:?}"),
    }
}
