//! Shared helpers for the integration tests: fixture paths and the manifest that
//! fixtures/generate.py recorded with PyTorch/TransformerLens.
#![allow(dead_code)]

use serde_json::Value as Json;
use std::path::PathBuf;
use tlens::{StateDict, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

pub fn manifest() -> Json {
    let text = std::fs::read_to_string(fixture("manifest.json")).expect("fixtures/manifest.json");
    serde_json::from_str(&text).expect("manifest is JSON")
}

/// A manifest number (non-finite values are stored as "inf", "-inf", "nan").
pub fn num(v: &Json) -> f64 {
    match v {
        Json::String(s) => s.parse().unwrap_or_else(|_| panic!("bad number {s}")),
        v => v.as_f64().unwrap(),
    }
}

/// Compare one tensor with its manifest entry: shape, dtype, exact sample elements, and the
/// sum to 1e-9 of the absolute sum (summation order differs from torch's).
pub fn check_tensor(name: &str, t: &Tensor, d: &Json) {
    let shape: Vec<usize> = serde_json::from_value(d["shape"].clone()).unwrap();
    assert_eq!(t.shape(), &shape[..], "{name}: shape");
    assert_eq!(
        t.dtype().torch_name(),
        d["dtype"].as_str().unwrap(),
        "{name}: dtype"
    );
    let vals = t.to_f64_vec();
    for (i, v) in d["elements"].as_object().unwrap() {
        let i: usize = i.parse().unwrap();
        let want = num(v);
        assert!(
            vals[i] == want || (vals[i].is_nan() && want.is_nan()),
            "{name}[{i}]: {} != {want}",
            vals[i]
        );
    }
    let sum: f64 = vals.iter().sum();
    let want = num(&d["sum"]);
    if want.is_finite() {
        let tol = 1e-9 * num(&d["abs_sum"]).max(1.0);
        assert!((sum - want).abs() <= tol, "{name}: sum {sum} != {want}");
    } else {
        assert_eq!(sum, want, "{name}: sum");
    }
}

/// Compare a state dict with a manifest state-dict description (same keys, same order).
pub fn check_state_dict(what: &str, sd: &StateDict, d: &Json) {
    let want: Vec<&String> = d.as_object().unwrap().keys().collect();
    let got: Vec<&str> = sd.names().collect();
    assert_eq!(got, want, "{what}: names/order");
    for (name, desc) in d.as_object().unwrap() {
        check_tensor(&format!("{what}.{name}"), sd.get(name).unwrap(), desc);
    }
}

pub fn f64s(v: &Json) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn i64s(v: &Json) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The keys of `tlens::task::Evaluation` (and of `eval --json`), as TL's values are recorded.
pub const EVAL_KEYS: [&str; 6] = [
    "train_loss",
    "test_loss",
    "full_loss",
    "train_accuracy",
    "test_accuracy",
    "accuracy",
];

/// Run the `tlens` binary: (exit code, stdout, stderr); −1 when it ended by a signal.
pub fn tlens(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tlens"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
