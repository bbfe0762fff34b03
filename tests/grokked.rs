//! The shipped grokked run (fixtures/grokked_p113.pth, trained by `tlens train` with the
//! reference setup and --checkpoint-every 1000), checked on its own terms and against
//! TransformerLens's evaluation of the same file (fixtures/generate.py, section 9).

mod common;

use common::{fixture, manifest};
use tlens::{HookedTransformer, RunFile};

fn open() -> RunFile {
    RunFile::open(fixture("grokked_p113.pth")).unwrap()
}

#[test]
fn shipped_run_groks() {
    let run = open();
    assert_eq!(run.train_losses.len(), 25_000);
    assert_eq!(run.test_losses.len(), 25_000);
    assert_eq!(
        run.checkpoint_epochs,
        (0..25).map(|i| i * 1000 + 999).collect::<Vec<i64>>()
    );
    let memorised = run.train_losses.iter().position(|&l| l < 1e-3).unwrap();
    assert!(
        memorised < 2000,
        "train loss below 1e-3 at epoch {memorised}"
    );
    let final_test = *run.test_losses.last().unwrap();
    assert!(final_test < 0.01, "final test loss {final_test}");
    let model = HookedTransformer::new(run.config.clone().unwrap(), run.model().unwrap()).unwrap();
    let ev = tlens::task::evaluate(
        &model,
        run.train_indices.as_ref().unwrap(),
        run.test_indices.as_ref().unwrap(),
    )
    .unwrap();
    assert_eq!(ev.test_accuracy, 1.0);
    assert_eq!(ev.accuracy, 1.0);
    assert!(
        (ev.test_loss - final_test).abs() <= 1e-6 * final_test,
        "{} vs {final_test}",
        ev.test_loss
    );
    let size = std::fs::metadata(fixture("grokked_p113.pth"))
        .unwrap()
        .len();
    assert!(size <= 30 << 20, "{size} bytes");
}

#[test]
fn transformer_lens_agrees_on_the_shipped_run() {
    let m = manifest();
    let g = &m["grokked"];
    let run = open();
    let (tr, te) = (
        run.train_indices.clone().unwrap(),
        run.test_indices.clone().unwrap(),
    );
    let keys = common::EVAL_KEYS;
    let check = |sd: tlens::StateDict, want: &serde_json::Value, what: &str| {
        let model = HookedTransformer::new(run.config.clone().unwrap(), sd).unwrap();
        let got = serde_json::to_value(tlens::task::evaluate(&model, &tr, &te).unwrap()).unwrap();
        for k in keys {
            let (a, b) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
            // 1e-6 relative; for losses below 1e-3 the loss's relative error *is* the logits'
            // absolute error (loss ≈ Σ exp(−Δlogit)), and float32 logits of magnitude ~30 differ
            // by a few 1e-6 between any two summation orders: 1e-5 there.
            let rel = if b.abs() < 1e-3 { 1e-5 } else { 1e-6 };
            assert!(
                (a - b).abs() <= rel * b.abs().max(1e-12) || (a - b).abs() < 1e-12,
                "{what} {k}: {a} vs {b}"
            );
        }
    };
    check(run.model().unwrap(), &g["final"], "final");
    for i in 0..run.n_checkpoints() {
        check(
            run.checkpoint(i).unwrap(),
            &g["checkpoints"][i],
            &format!("checkpoint {i}"),
        );
    }
    // Predictions equal TL's argmax on every input.
    let model = HookedTransformer::new(run.config.clone().unwrap(), run.model().unwrap()).unwrap();
    let (tokens, labels) = tlens::task::modular_addition(113);
    let logits = tlens::model::tabulated::last_logits(&model, &tokens).unwrap();
    let want = tlens::io::npz::NpzReader::open(fixture("activations/grokked_p113.npz"))
        .unwrap()
        .array::<i64>("argmax")
        .unwrap();
    for (i, row) in logits.outer_iter().enumerate() {
        let a = tlens::task::argmax(row.as_slice().unwrap());
        assert_eq!(a as i64, want[i], "input {i}");
        assert_eq!(a as u32, labels[i], "input {i} is answered correctly");
    }
}

#[test]
fn predict_answers_37_plus_58() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tlens"))
        .args([
            "predict",
            fixture("grokked_p113.pth").to_str().unwrap(),
            "37",
            "58",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("37 + 58 mod 113 = 95 "), "{text}");
}
