//! The `tlens` binary: inspect/convert/demo outputs and one-line errors.

mod common;

use common::{fixture, manifest, tlens};
use serde_json::Value as Json;
use std::process::Command;

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
    let dir = std::env::temp_dir().join(format!("tlens-demo-{}", std::process::id()));
    let (code, out, err) = tlens(&["demo", "--plots", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("grokked_p113.pth"), "{out}");
    assert!(out.contains("37 + 58 mod 113 = 95"), "{out}");
    assert!(
        out.contains("accuracy train 100.00%  test 100.00%"),
        "{out}"
    );
    // What the Python analysis found on this run (fixtures/analysis_grokked_p113.json).
    assert!(
        out.contains("key frequencies (auto): 9, 36, 38, 55"),
        "{out}"
    );
    assert!(
        out.contains("neurons explained > 85% by one frequency: 73.4% of 512"),
        "{out}"
    );
    assert!(
        out.contains("phases: memorisation ends at epoch 1388"),
        "{out}"
    );
    assert!(out.contains("restricted loss (test) 6.85"), "{out}");
    // Every figure as PNG and SVG: 12 for a run with checkpoints.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 24);
    std::fs::remove_dir_all(&dir).ok();
    // Any run: a 2022 single run (no checkpoints: the figures that need none).
    let dir2 = std::env::temp_dir().join(format!("tlens-demo2-{}", std::process::id()));
    let run = common::fixture("saved_runs/run_add.pth");
    let (code, out, err) = tlens(&[
        "demo",
        run.to_str().unwrap(),
        "--plots",
        dir2.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("run_add.pth") && out.contains("mod 23"),
        "{out}"
    );
    assert!(dir2.join("loss_curves.png").exists());
    std::fs::remove_dir_all(&dir2).ok();
}

#[test]
fn analyze_writes_json_npz_and_figures() {
    let dir = std::env::temp_dir().join(format!("tlens-analyze-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, npz, plots) = (dir.join("a.json"), dir.join("a.npz"), dir.join("plots"));
    let run = fixture("grokked_p113.pth");
    let (code, out, err) = tlens(&[
        "analyze",
        run.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--npz",
        npz.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("key frequencies (auto): 9, 36, 38, 55"),
        "{out}"
    );
    let j: Json = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["key_freqs"], serde_json::json!([9, 36, 38, 55]));
    for key in [
        "train_loss",
        "test_loss",
        "restricted_loss",
        "excluded_loss",
        "frac_neurons_explained",
    ] {
        assert!(j["final"][key].is_f64(), "final.{key}");
    }
    for key in ["W_E", "x1", "x2", "W_L"] {
        assert!(j["final"]["key_freq_power_fraction"][key].as_f64().unwrap() > 0.9);
    }
    assert_eq!(j["neurons"].as_array().unwrap().len(), 512);
    for key in ["index", "freq", "frac_explained"] {
        assert!(!j["neurons"][0][key].is_null(), "neurons[0].{key}");
    }
    let cks = j["checkpoints"].as_array().unwrap();
    assert_eq!(cks.len(), 25);
    for key in [
        "epoch",
        "train_loss",
        "test_loss",
        "restricted_loss",
        "excluded_loss",
        "gini_W_E",
        "gini_W_L",
        "sum_sq_weights",
    ] {
        assert!(!cks[3][key].is_null(), "checkpoints[3].{key}");
    }
    assert_eq!(j["phases"]["memorization_end"], 1388);
    assert!(j["phases"]["circuit_formation_end"].as_i64().unwrap() > 1388);
    assert!(
        j["phases"]["cleanup_end"].as_i64().unwrap()
            > j["phases"]["circuit_formation_end"].as_i64().unwrap()
    );
    // The npz: shapes as documented.
    let mut z = tlens::io::npz::NpzReader::open(&npz).unwrap();
    assert_eq!(
        z.array::<f32>("neuron_freq_norm").unwrap().shape(),
        &[56, 512]
    );
    assert_eq!(
        z.array::<f32>("embed_fourier_norms").unwrap().shape(),
        &[113]
    );
    assert_eq!(z.array::<f64>("logit_cos_sim").unwrap().shape(), &[25, 56]);
    assert_eq!(
        z.array::<f32>("attention_patterns").unwrap().shape(),
        &[4, 2, 113, 113]
    );
    // Two example neurons of each of the four clusters, over (a, b).
    assert_eq!(
        z.array::<f32>("neuron_examples").unwrap().shape(),
        &[8, 113, 113]
    );
    for name in ["W_E", "x1", "x2", "W_L"] {
        assert_eq!(
            z.array::<f64>(&format!("spectrum_{name}")).unwrap().shape(),
            &[57]
        );
    }
    // Figures: PNG and SVG of each.
    for fig in [
        "loss_curves",
        "embedding_fourier_norms",
        "neuron_freq_heatmap",
        "neuron_clusters",
        "progress_losses",
        "logit_cos_sim",
        "gini_and_weights",
        "attention_patterns",
        "signal_chain_spectra",
        "embedding_circles",
        "accuracy",
        "neuron_activations",
    ] {
        let png = std::fs::read(plots.join(format!("{fig}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{fig}.png");
        let svg = std::fs::read_to_string(plots.join(format!("{fig}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{fig}.svg"
        );
        assert!(svg.contains("<text"), "{fig}.svg has its labels");
    }
    // Heatmaps are embedded images in the SVG, not one rectangle per cell.
    let svg = std::fs::read_to_string(plots.join("attention_patterns.svg")).unwrap();
    assert_eq!(svg.matches("<image").count(), 8);
    assert!(svg.len() < 2_000_000);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn analyze_with_given_key_freqs_and_bad_ones() {
    let run = fixture("demo_p113.pth");
    let (code, out, err) = tlens(&[
        "analyze",
        run.to_str().unwrap(),
        "--key-freqs",
        "17,25,32,47",
        "--no-checkpoints",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("key frequencies (given): 17, 25, 32, 47"),
        "{out}"
    );
    let (code, _, err) = tlens(&["analyze", run.to_str().unwrap(), "--key-freqs", "17,x"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--key-freqs") && err.lines().count() == 1,
        "{err}"
    );
    let (code, _, err) = tlens(&["analyze", run.to_str().unwrap(), "--key-freqs", "57"]);
    assert_eq!(code, 1);
    assert!(err.contains("57 is not in 1..=56"), "{err}");
    // A model that is not a modular-arithmetic model at all.
    let other = fixture("models/ln_gelu_2l.pth");
    let (code, _, err) = tlens(&["analyze", other.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not a modular-arithmetic model"), "{err}");
}

#[test]
fn predict_prints_pytorchs_argmax() {
    let mut npz =
        tlens::io::npz::NpzReader::open(fixture("activations/demo_p113_full.npz")).unwrap();
    let argmax = npz.array::<i64>("argmax").unwrap();
    let file = fixture("demo_p113.pth");
    for (a, b) in [(37usize, 58usize), (0, 0), (112, 112), (5, 100)] {
        let (code, out, err) = tlens(&[
            "predict",
            file.to_str().unwrap(),
            &a.to_string(),
            &b.to_string(),
        ]);
        assert_eq!(code, 0, "{err}");
        let want = argmax[a * 113 + b];
        assert!(
            out.starts_with(&format!("{a} + {b} mod 113 = {want} ")),
            "{out}"
        );
        assert!(out.contains("(p = 0."), "{out}");
    }
    let (code, _, err) = tlens(&["predict", file.to_str().unwrap(), "1", "113"]);
    assert_eq!(code, 1);
    assert!(err.contains("below p = 113"), "{err}");
    let (code, _, err) = tlens(&[
        "predict",
        file.to_str().unwrap(),
        "1",
        "2",
        "--checkpoint",
        "150",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no checkpoint at epoch 150") && err.contains("[99, 199, 299]"),
        "{err}"
    );
}

#[test]
fn eval_json_matches_transformer_lens() {
    let m = manifest();
    let file = fixture("demo_p113.pth");
    let keys = common::EVAL_KEYS;
    let close = |got: &Json, want: &Json| {
        for k in keys {
            let (g, w) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
            assert!((g - w).abs() <= 1e-6 * w.abs(), "{k}: {g} vs {w}");
        }
    };
    let (code, out, err) = tlens(&["eval", file.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    close(
        &serde_json::from_str(&out).unwrap(),
        &m["forward"]["demo_p113_eval"]["final"],
    );
    let (code, out, _) = tlens(&[
        "eval",
        file.to_str().unwrap(),
        "--all-checkpoints",
        "--json",
    ]);
    assert_eq!(code, 0);
    let list: Vec<Json> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 3);
    for (i, row) in list.iter().enumerate() {
        assert_eq!(row["epoch"], m["demo_p113"]["checkpoint_epochs"][i]);
        close(row, &m["forward"]["demo_p113_eval"]["checkpoints"][i]);
    }
    let (code, out, _) = tlens(&[
        "eval",
        file.to_str().unwrap(),
        "--checkpoint",
        "199",
        "--json",
    ]);
    assert_eq!(code, 0);
    close(
        &serde_json::from_str(&out).unwrap(),
        &m["forward"]["demo_p113_eval"]["checkpoints"][1],
    );
    let (code, out, _) = tlens(&["eval", file.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("train_loss") && out.contains("final"), "{out}");
}

#[test]
fn cache_writes_every_hook_as_npz() {
    let dir = std::env::temp_dir().join(format!("tlens-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("acts.npz");
    let file = fixture("demo_p113.pth");
    let (code, _, err) = tlens(&[
        "cache",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--inputs",
        "37,58; 1,2",
    ]);
    assert_eq!(code, 0, "{err}");
    let mut npz = tlens::io::npz::NpzReader::open(&out).unwrap();
    let names = npz.names();
    let m = manifest();
    let hooks: Vec<String> =
        serde_json::from_value(m["forward"]["demo_p113"]["hook_names"].clone()).unwrap();
    assert_eq!(names[..hooks.len()], hooks[..], "TL names in firing order");
    assert_eq!(npz.array::<f32>("logits").unwrap().shape(), &[2, 3, 113]);
    assert_eq!(
        npz.array::<f32>("blocks.0.attn.hook_pattern")
            .unwrap()
            .shape(),
        &[2, 4, 3, 3]
    );
    let tokens = npz.array::<i64>("tokens").unwrap();
    assert_eq!(
        tokens.iter().copied().collect::<Vec<_>>(),
        vec![37, 58, 113, 1, 2, 113]
    );
    // A names filter keeps only the named hooks (TL shorthand: `post` is every layer's
    // mlp.hook_post, not hook_resid_post).
    let (code, _, _) = tlens(&[
        "cache",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--inputs",
        "3,4",
        "--names",
        "pattern,post",
    ]);
    assert_eq!(code, 0);
    let names = tlens::io::npz::NpzReader::open(&out).unwrap().names();
    assert_eq!(
        names,
        [
            "blocks.0.attn.hook_pattern",
            "blocks.0.mlp.hook_post",
            "logits",
            "tokens"
        ]
    );
    let (code, _, err) = tlens(&[
        "cache",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--inputs",
        "3",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("expected 'a,b'"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn analyze_a_checkpoint_and_unwritable_outputs() {
    let run = fixture("grokked_p113.pth");
    let (code, out, err) = tlens(&[
        "analyze",
        run.to_str().unwrap(),
        "--checkpoint",
        "9999",
        "--no-checkpoints",
        "--key-freqs",
        "9,36,38,55",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("checkpoint at epoch 9999, (a + b) mod 113"),
        "{out}"
    );
    // Mid-grokking: the test loss is still well above the final model's.
    assert!(out.contains("loss  train"), "{out}");
    let (code, _, err) = tlens(&["analyze", run.to_str().unwrap(), "--checkpoint", "123"]);
    assert_eq!(code, 1);
    assert!(err.contains("123"), "{err}");
    // A figure folder that cannot be created: one-line error, exit 1.
    let (code, _, err) = tlens(&["demo", "--plots", "/proc/tlens-cannot-write-here"]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/proc/tlens-cannot-write-here"), "{err}");
}

#[test]
fn every_simd_level_gives_the_same_bits() {
    // TLENS_SIMD caps the kernels at the code CPUs without AVX-512 run (AVX2) or without AVX2
    // (matrixmultiply and plain loops); results must be bit-identical at every level:
    // evaluation, the activation cache, and training. (Levels above the CPU's fall back to
    // its own, so on an AVX2 machine "default" and "avx2" are the same run.)
    let dir = std::env::temp_dir().join(format!("tlens-portable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let levels = ["default", "avx2", "portable"];
    let run = |level: &str, args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tlens"));
        cmd.args(args);
        if level != "default" {
            cmd.env("TLENS_SIMD", level);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let grokked = fixture("grokked_p113.pth");
    let g = grokked.to_str().unwrap();
    let eval = ["eval", g, "--checkpoint", "9999", "--json"];
    let want = run("default", &eval);
    for level in &levels[1..] {
        assert_eq!(run(level, &eval), want, "eval at {level}");
    }
    let mut files = Vec::new();
    for level in levels {
        let acts = dir.join(format!("acts-{level}.npz"));
        let trained = dir.join(format!("run-{level}.pth"));
        run(
            level,
            &[
                "cache",
                g,
                "--out",
                acts.to_str().unwrap(),
                "--inputs",
                "0,0;5,7;112,112;37,58",
            ],
        );
        run(
            level,
            &[
                "train",
                "--out",
                trained.to_str().unwrap(),
                "--p",
                "23",
                "--epochs",
                "12",
                "--checkpoint-every",
                "4",
            ],
        );
        files.push((
            std::fs::read(&acts).unwrap(),
            tlens::RunFile::open(&trained).unwrap().load().unwrap(),
        ));
    }
    for (level, f) in levels.iter().zip(&files).skip(1) {
        assert!(f.0 == files[0].0, "activation caches differ at {level}");
        assert_eq!(f.1, files[0].1, "training runs differ at {level}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
