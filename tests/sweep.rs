//! Sweeps: sharded runs in separate processes, resumed or skipped when restarted, merged into
//! summary.json / summary.csv with memorisation and grokking epochs, and a phase diagram.

mod common;

use common::tlens;

use std::path::Path;
use std::process::Command;
use tlens::RunFile;

const SWEEP: [&str; 12] = [
    "--p",
    "23",
    "--epochs",
    "200",
    "--lr",
    "0.01",
    "--frac-train",
    "0.5,0.8",
    "--weight-decay",
    "1,0.3",
    "--checkpoint-every",
    "50",
];

#[test]
fn a_sharded_sweep_merges_into_a_summary_and_a_phase_diagram() {
    let dir = std::env::temp_dir().join(format!("tlens-sweep-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    // Two shards, as two separate processes (as two Slurm array tasks would run).
    let shards: Vec<_> = ["0/2", "1/2"]
        .iter()
        .map(|s| {
            let mut args = vec!["sweep", "--out", d, "--shard", s];
            args.extend(SWEEP);
            Command::new(env!("CARGO_BIN_EXE_tlens"))
                .args(&args)
                .output()
                .unwrap()
        })
        .collect();
    for o in &shards {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(dir.join("summary.shard-0-of-2.json").exists());
    // Restarted: every run is finished, nothing is trained again.
    let mut args = vec!["sweep", "--out", d, "--shard", "1/2"];
    args.extend(SWEEP);
    let (code, _, err) = tlens(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.matches("skipped").count(), 2, "{err}");
    // Restarted with another architecture or other intervals: the runs of the same name were
    // made with other settings, which is an error naming them, never a silent skip.
    for extra in [&["--n-layers", "2"][..], &["--eval-every", "5"][..]] {
        let mut args = vec!["sweep", "--out", d, "--shard", "1/2"];
        args.extend(SWEEP);
        args.extend(extra);
        let (code, _, err) = tlens(&args);
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert!(err.contains("other settings"), "{extra:?}: {err}");
        assert!(
            err.contains(if extra[0] == "--n-layers" {
                "n_layers"
            } else {
                "eval_every"
            }),
            "{err}"
        );
    }
    // Merged.
    let (code, out, err) = tlens(&["sweep", "--summarize", d]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("merged 4 runs"), "{out}");
    let rows: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.starts_with("file,p,op,frac_train,weight_decay"));
    for f in ["phase_diagram.png", "phase_diagram.svg"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    // Each row's epochs are the first epochs at ≥ 99% accuracy in the run file's own record.
    for r in rows {
        let run = RunFile::open(dir.join(r["file"].as_str().unwrap())).unwrap();
        assert_eq!(run.train_losses.len(), 200);
        let first = |acc: &[f64]| acc.iter().position(|&a| a >= 0.99).map(|i| i * 10);
        assert_eq!(
            r["memorization_epoch"].as_u64().map(|e| e as usize),
            first(&run.train_accuracies)
        );
        assert_eq!(
            r["grokking_epoch"].as_u64().map(|e| e as usize),
            first(&run.test_accuracies)
        );
        assert!(r["memorization_epoch"].as_u64().is_some(), "{r}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tracked_accuracy_equals_evaluating_the_checkpoint() {
    let dir = std::env::temp_dir().join(format!("tlens-acc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("r.pth");
    let (code, _, err) = tlens(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--p",
        "23",
        "--epochs",
        "40",
        "--lr",
        "0.01",
        "--checkpoint-every",
        "10",
        "--track-accuracy",
        "--op",
        "sub",
    ]);
    assert_eq!(code, 0, "{err}");
    let run = RunFile::open(&out).unwrap();
    assert_eq!(run.operation().unwrap(), tlens::task::Operation::Subtract);
    assert_eq!(run.train_accuracies.len(), 40);
    let split = run.split(23, tlens::run::SplitChoice::Auto).unwrap();
    for (i, &epoch) in run.checkpoint_epochs.iter().enumerate() {
        let model =
            tlens::HookedTransformer::new(run.config.clone().unwrap(), run.checkpoint(i).unwrap())
                .unwrap();
        let ev = tlens::task::evaluate_op(
            &model,
            tlens::task::Operation::Subtract,
            None,
            &split.train,
            &split.test,
        )
        .unwrap();
        let e = epoch as usize;
        assert!(
            (ev.train_accuracy - run.train_accuracies[e]).abs() <= 1.0 / split.train.len() as f64,
            "epoch {e}"
        );
        assert!(
            (ev.test_accuracy - run.test_accuracies[e]).abs() <= 1.0 / split.test.len() as f64,
            "epoch {e}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sweep_flags_are_checked() {
    for (args, why) in [
        (vec!["--shard", "2/2"], "--shard"),
        (vec!["--op", "nothing"], "--op"),
        (vec!["--frac-train", "0.5,x"], "--frac-train"),
        (vec!["--weight-decay", "-1"], "--weight-decay"),
    ] {
        let mut a = vec!["sweep", "--out", "/tmp/never-written"];
        a.extend(args.iter());
        let (code, _, err) = tlens(&a);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(!Path::new("/tmp/never-written").exists());
    }
}
