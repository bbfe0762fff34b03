//! Every fixture written by PyTorch/TransformerLens loads into the values the manifest recorded.

mod common;

use common::*;
use serde_json::Value as Json;
use tlens::io::pickle::Value;
use tlens::io::torch::TorchFile;
use tlens::{Layout, RunFile};

/// Check a TL-layout run file against its manifest entry.
fn check_tl_run(file: &str, entry: &str, format: &str) {
    let m = manifest();
    let d = &m[entry];
    let run = RunFile::open(fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(run.format_name(), format, "{file}: format");
    assert_eq!(run.layout, Layout::TransformerLens);

    // Config: every field TL pickled has the same value in tlens's struct.
    let cfg = run.config.as_ref().expect("config").to_json();
    for (k, want) in d["config"].as_object().unwrap() {
        let got = &cfg[k];
        match (got.as_f64(), want.as_f64()) {
            (Some(g), Some(w)) => assert!(
                (g - w).abs() <= 1e-15 * w.abs(),
                "{file}: config.{k} {g} != {w}"
            ),
            _ => assert_eq!(got, want, "{file}: config.{k}"),
        }
    }
    if format != "safetensors" {
        let (module, name) = run.config_class.clone().unwrap();
        assert_eq!(
            format!("{module}.{name}"),
            d["config_class"].as_str().unwrap()
        );
    }

    check_state_dict(&format!("{file}:model"), &run.model().unwrap(), &d["model"]);
    let ckpts = d["checkpoints"].as_array().unwrap();
    assert_eq!(run.n_checkpoints(), ckpts.len());
    for (i, c) in ckpts.iter().enumerate() {
        check_state_dict(
            &format!("{file}:checkpoint{i}"),
            &run.checkpoint(i).unwrap(),
            c,
        );
    }
    assert_eq!(run.checkpoint_epochs, i64s(&d["checkpoint_epochs"]));
    assert_eq!(
        run.train_losses,
        f64s(&d["train_losses"]),
        "{file}: train losses bit-exact"
    );
    assert_eq!(
        run.test_losses,
        f64s(&d["test_losses"]),
        "{file}: test losses bit-exact"
    );
    let (tr, te) = (
        run.train_indices.as_ref().unwrap(),
        run.test_indices.as_ref().unwrap(),
    );
    assert_eq!(tr.len() as i64, d["n_train_indices"].as_i64().unwrap());
    assert_eq!(te.len() as i64, d["n_test_indices"].as_i64().unwrap());
    if d.get("train_indices").is_some() {
        assert_eq!(tr, &i64s(&d["train_indices"]));
        assert_eq!(te, &i64s(&d["test_indices"]));
    } else {
        assert_eq!(tr[..50], i64s(&d["train_indices_head"])[..]);
        assert_eq!(te[..50], i64s(&d["test_indices_head"])[..]);
        assert_eq!(
            tr.iter().sum::<i64>(),
            d["train_indices_sum"].as_i64().unwrap()
        );
        assert_eq!(
            te.iter().sum::<i64>(),
            d["test_indices_sum"].as_i64().unwrap()
        );
    }
}

#[test]
fn demo_small_zip_protocol2() {
    check_tl_run("demo_small.pth", "demo_small", "torch-zip");
}

#[test]
fn demo_small_legacy_format() {
    check_tl_run("demo_small_legacy.pth", "demo_small", "torch-legacy");
}

#[test]
fn demo_small_pickle_protocol4() {
    check_tl_run("demo_small_proto4.pth", "demo_small", "torch-zip");
    let f = TorchFile::open(fixture("demo_small_proto4.pth")).unwrap();
    assert_eq!(f.protocol, 4);
    assert_eq!(
        TorchFile::open(fixture("demo_small.pth")).unwrap().protocol,
        2
    );
}

#[test]
fn demo_small_safetensors_written_by_python() {
    check_tl_run("demo_small.safetensors", "demo_small", "safetensors");
}

#[test]
fn demo_small_saved_by_transformer_lens_3() {
    check_tl_run("demo_small_tl3.pth", "demo_small_tl3", "torch-zip");
    let run = RunFile::open(fixture("demo_small_tl3.pth")).unwrap();
    // TL >= 3.5 stores an empty (0, 0) mask buffer; numpy 2 pickles scalars under numpy._core.
    let sd = run.model().unwrap();
    assert_eq!(sd.get("blocks.0.attn.mask").unwrap().shape(), &[0, 0]);
    let m = manifest();
    assert_eq!(
        m["demo_small_tl3"]["tl3_info"]["mask"],
        serde_json::json!([0, 0])
    );
    assert!(m["demo_small_tl3"]["tl3_info"]["numpy"]
        .as_str()
        .unwrap()
        .starts_with('2'));
    let cfg = run.config.unwrap();
    assert_eq!(cfg.uses_rms_norm, Some(false), "3.x-only fields are read");
}

#[test]
fn demo_p113_full_size() {
    check_tl_run("demo_p113.pth", "demo_p113", "torch-zip");
    let run = RunFile::open(fixture("demo_p113.pth")).unwrap();
    let cfg = run.config.unwrap();
    // The TL demo config, derived fields as __post_init__ computes them.
    assert_eq!(
        (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head),
        (1, 4, 128, 32)
    );
    assert_eq!(
        (cfg.d_mlp, cfg.d_vocab, cfg.d_vocab_out, cfg.n_ctx),
        (Some(512), 114, 113, 3)
    );
    assert_eq!(cfg.n_params, Some(196_608));
    assert_eq!(cfg.attn_scale, (32f64).sqrt());
    assert_eq!(cfg.initializer_range, 0.8 / (128f64).sqrt());
    assert_eq!(cfg.normalization_type, None);
    assert_eq!(run.train_indices.as_ref().unwrap().len(), 3830);
    assert_eq!(run.test_indices.as_ref().unwrap().len(), 12769 - 3830);
}

#[test]
fn train_and_test_indices_share_one_storage() {
    let f = TorchFile::open(fixture("demo_p113.pth")).unwrap();
    let tr = f
        .root
        .get("train_indices")
        .and_then(Value::as_tensor)
        .unwrap();
    let te = f
        .root
        .get("test_indices")
        .and_then(Value::as_tensor)
        .unwrap();
    assert_eq!(tr.storage.key, te.storage.key, "two views of one storage");
    assert_eq!(tr.offset, 0);
    assert_eq!(
        te.offset, 3830,
        "docs/reference.md §6: test view starts at 3830"
    );
    assert_eq!(tr.storage.numel, 12769);
}

#[test]
fn tensors_are_borrowed_from_the_mapped_file() {
    let f = TorchFile::open(fixture("demo_p113.pth")).unwrap();
    let model = f.root.get("model").unwrap().as_dict().unwrap();
    let w_e = model.get("embed.W_E").and_then(Value::as_tensor).unwrap();
    let v = f.view::<f32>(w_e, "embed.W_E").unwrap();
    assert!(v.is_view(), "64-byte aligned f32 storage is read in place");
    assert_eq!(v.shape(), &[114, 128]);
    // Asking for the wrong dtype is a typed error, not a reinterpretation.
    match f.view::<f64>(w_e, "embed.W_E") {
        Err(tlens::Error::Type { .. }) => {}
        other => panic!("expected a type error, got {other:?}"),
    }
}

#[test]
fn original_2022_layout_is_converted_like_python() {
    let m = manifest();
    let d = &m["original_small"];
    let run = RunFile::open(fixture("original_small.pth")).unwrap();
    assert_eq!(run.layout, Layout::Original);
    assert_eq!(run.format_name(), "torch-zip");
    // Stored layout as Python saved it.
    let stored: Vec<(String, Vec<usize>)> = run
        .model_entries()
        .unwrap()
        .entries()
        .map(|(n, s, _)| (n.to_string(), s.to_vec()))
        .collect();
    let want: Vec<(String, Vec<usize>)> = d["model"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(n, x)| {
            (
                n.clone(),
                serde_json::from_value(x["shape"].clone()).unwrap(),
            )
        })
        .collect();
    assert_eq!(stored, want);
    // Converted weights equal, bit for bit, the conversion done in Python — which was checked
    // there by running a TransformerLens model against the original model
    // (max logit difference recorded in the manifest).
    assert!(m["original_conversion_max_logit_diff"].as_f64().unwrap() < 1e-4);
    let converted = run.model().unwrap();
    let python = RunFile::open(fixture("original_small_tl.safetensors"))
        .unwrap()
        .model()
        .unwrap();
    for (name, t) in python.iter() {
        assert_eq!(converted.get(name), Some(t), "{name}");
    }
    check_state_dict_subset(&converted, &m["original_small_tl"]);
    // TL buffers are added for the converted model.
    assert_eq!(
        converted.get("blocks.0.attn.mask").unwrap().shape(),
        &[3, 3]
    );
    // Run data.
    assert_eq!(run.checkpoint_epochs, i64s(&d["checkpoint_epochs"]));
    assert_eq!(
        run.n_checkpoints(),
        d["checkpoints"].as_array().unwrap().len()
    );
    assert_eq!(run.train_losses, f64s(&d["train_losses"]));
    assert_eq!(run.test_losses, f64s(&d["test_losses"]));
    assert_eq!(run.train_losses.len(), 40);
    assert_eq!(
        run.test_losses.len(),
        4,
        "the 2022 code logged test loss every 10 epochs"
    );
    let cfg = run.config.clone().unwrap();
    assert_eq!(
        (cfg.d_vocab, cfg.d_vocab_out, cfg.n_heads, cfg.d_head),
        (18, 18, 4, 8)
    );
    assert_eq!(cfg.extra["original_config"]["p"], Json::from(17));
    // Checkpoints are converted too.
    let c0 = run.checkpoint(0).unwrap();
    assert_eq!(c0.get("embed.W_E").unwrap().shape(), &[18, 32]);
}

fn check_state_dict_subset(sd: &tlens::StateDict, d: &Json) {
    for (name, desc) in d.as_object().unwrap() {
        check_tensor(name, sd.get(name).unwrap(), desc);
    }
}

#[test]
fn lazy_checkpoints_load_one_at_a_time() {
    let run = RunFile::open(fixture("demo_small.pth")).unwrap();
    assert_eq!(run.n_checkpoints(), 3);
    assert_eq!(run.checkpoint_index(199).unwrap(), 1);
    assert!(run.checkpoint(3).is_err());
    assert!(run.checkpoint_index(150).is_err());
}
