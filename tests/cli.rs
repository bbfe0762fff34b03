//! The `tlens` binary: inspect/convert/demo outputs and one-line errors.

mod common;

use common::{fixture, manifest};
use serde_json::Value as Json;
use std::process::Command;

fn tlens(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tlens"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn inspect_json(file: &str) -> Json {
    let path = fixture(file);
    let (code, out, err) = tlens(&["inspect", path.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn inspect_json_describes_the_demo_run() {
    let j = inspect_json("demo_p113.pth");
    let m = manifest();
    let d = &m["demo_p113"];
    assert_eq!(j["format"], "torch-zip");
    assert_eq!(j["layout"], "transformer_lens");
    assert_eq!(j["config"]["d_vocab"], 114);
    assert_eq!(j["config"]["d_vocab_out"], 113);
    assert_eq!(j["config"]["act_fn"], "relu");
    assert_eq!(j["config"]["normalization_type"], Json::Null);
    assert_eq!(
        j["n_checkpoints"],
        d["checkpoints"].as_array().unwrap().len()
    );
    assert_eq!(j["checkpoint_epochs"], d["checkpoint_epochs"]);
    assert_eq!(j["n_train_losses"], 300);
    assert_eq!(j["n_test_losses"], 300);
    assert_eq!(j["n_train_indices"], 3830);
    assert_eq!(j["n_test_indices"], 8939);
    let tensors = j["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), d["model"].as_object().unwrap().len());
    for (name, desc) in d["model"].as_object().unwrap() {
        assert_eq!(tensors[name]["shape"], desc["shape"], "{name}");
        assert_eq!(tensors[name]["dtype"], desc["dtype"], "{name}");
    }
}

#[test]
fn inspect_reports_format_and_layout_of_every_kind() {
    for (file, format, layout) in [
        ("demo_small_legacy.pth", "torch-legacy", "transformer_lens"),
        ("demo_small_proto4.pth", "torch-zip", "transformer_lens"),
        ("demo_small.safetensors", "safetensors", "transformer_lens"),
        ("original_small.pth", "torch-zip", "original"),
    ] {
        let j = inspect_json(file);
        assert_eq!(j["format"], format, "{file}");
        assert_eq!(j["layout"], layout, "{file}");
    }
    let j = inspect_json("original_small.pth");
    assert_eq!(
        j["tensors"]["blocks.0.attn.W_O"]["shape"],
        serde_json::json!([32, 32])
    );
    assert_eq!(j["n_test_losses"], 4);
}

#[test]
fn inspect_text_output_names_every_tensor() {
    let path = fixture("demo_small.pth");
    let (code, out, _) = tlens(&["inspect", path.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("format:  torch-zip"), "{out}");
    for name in [
        "embed.W_E",
        "blocks.0.attn.W_Q",
        "blocks.0.attn.IGNORE",
        "unembed.b_U",
    ] {
        assert!(out.contains(name), "{name} in {out}");
    }
    assert!(out.contains("checkpoints: 3 (epochs 99..=299)"), "{out}");
}

#[test]
fn convert_pth_to_safetensors_and_back() {
    let dir = std::env::temp_dir().join(format!("tlens-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let st = dir.join("run.safetensors");
    let back = dir.join("back.pth");
    let src = fixture("demo_small_legacy.pth");
    let (code, _, err) = tlens(&["convert", src.to_str().unwrap(), st.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = tlens(&[
        "convert",
        st.to_str().unwrap(),
        back.to_str().unwrap(),
        "--config-style",
        "dict",
    ]);
    assert_eq!(code, 0, "{err}");
    let a = tlens::RunFile::open(&src).unwrap().load().unwrap();
    let b = tlens::RunFile::open(&back).unwrap().load().unwrap();
    assert_eq!(a, b);
    // The 2022 layout converts to the TL layout.
    let orig = dir.join("orig.pth");
    let (code, _, _) = tlens(&[
        "convert",
        fixture("original_small.pth").to_str().unwrap(),
        orig.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let r = tlens::RunFile::open(&orig).unwrap();
    assert_eq!(r.layout, tlens::Layout::TransformerLens);
    assert_eq!(
        r.model().unwrap().get("embed.W_E").unwrap().shape(),
        &[18, 32]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_are_one_line_and_exit_non_zero() {
    let (code, out, err) = tlens(&["inspect", "no/such/file.pth"]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: no/such/file.pth: I/O error"),
        "{err}"
    );
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let (code, _, err) = tlens(&["inspect", readme.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unrecognised file format") && !err.contains("panicked"),
        "{err}"
    );
    let (code, _, err) = tlens(&[
        "convert",
        fixture("demo_small.pth").to_str().unwrap(),
        "/tmp/x.txt",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown output extension"), "{err}");
    let (code, _, err) = tlens(&[
        "convert",
        fixture("demo_small.pth").to_str().unwrap(),
        "/tmp/x.pth",
        "--config-style",
        "yaml",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--config-style"), "{err}");
}

#[test]
fn demo_runs_on_the_shipped_fixture() {
    let (code, out, err) = tlens(&["demo"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("demo_p113.pth"), "{out}");
    assert!(out.contains("d_vocab 114 d_vocab_out 113"), "{out}");
}
