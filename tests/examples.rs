//! The example gallery runs on the shipped fixtures, with the results a researcher would expect
//! from the grokked model (the examples are built by `cargo test`; this runs them).

use std::path::PathBuf;
use std::process::Command;

/// target/<profile>/examples/<name>, next to this test's own binary in target/<profile>/deps.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(example(name)).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The numbers after `label` on each line that has it.
fn numbers_after(out: &str, label: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.split(label).nth(1))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches([',', '%', ')'])
                .parse::<f64>()
                .unwrap()
        })
        .collect()
}

#[test]
fn ablating_any_head_breaks_the_grokked_model() {
    let out = run("ablate_head", &[]);
    let clean = numbers_after(&out, "test loss");
    assert_eq!(clean.len(), 5, "{out}");
    assert!(clean[0] < 1e-5, "{out}");
    assert!(clean[1..].iter().all(|&l| l > 1.0), "{out}");
}

#[test]
fn patching_the_last_position_restores_the_clean_answer() {
    let out = run("patch_activations", &[]);
    // The five patched points.
    assert_eq!(out.matches("restored)").count(), 5, "{out}");
    assert!(
        out.contains("hook_embed") && out.contains("(  0.0% restored)"),
        "{out}"
    );
    let resid_post = out.lines().find(|l| l.contains("hook_resid_post")).unwrap();
    assert!(resid_post.contains("(100.0% restored)"), "{out}");
}

#[test]
fn progress_measures_and_restricted_loss_sweep_over_checkpoints() {
    let out = run("progress_measures", &[]);
    assert!(
        out.contains("phases: memorisation ends Some(1388), circuit formed Some(8857), clean-up ends Some(11489)"),
        "{out}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.trim_start().starts_with("24999"))
            .count(),
        1
    );
    let dir = std::env::temp_dir().join(format!("tlens-sweep-ex-{}", std::process::id()));
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/grokked_p113.pth");
    let out = run(
        "restricted_loss_sweep",
        &[fixture, "9,36,38,55", dir.to_str().unwrap()],
    );
    assert!(out.contains("24999"), "{out}");
    assert!(std::fs::read_dir(&dir).unwrap().count() >= 2);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_small_sweep_finds_where_the_model_groks() {
    let dir = std::env::temp_dir().join(format!("tlens-sweep-example-{}", std::process::id()));
    let out = run("sweep", &[dir.to_str().unwrap(), "300"]);
    assert_eq!(out.matches("memorised at").count(), 4, "{out}");
    // With 90% of the pairs to train on and weight decay 3, the model groks within 300 epochs.
    let line = out
        .lines()
        .find(|l| l.contains("frac_train 0.9  weight_decay   3"))
        .unwrap();
    assert!(!line.contains("never"), "{out}");
    for f in [
        "summary.json",
        "summary.csv",
        "phase_diagram.png",
        "phase_diagram.svg",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn keeping_a_clusters_frequency_keeps_the_loss() {
    let out = run("ablate_cluster", &[]);
    let losses = numbers_after(&out, "loss");
    assert_eq!(losses.len(), 2, "{out}");
    assert!(losses[0] < 1e-5 && losses[1] > 1.0, "{out}");
}
