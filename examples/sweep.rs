//! A small sweep from the library: weight decay × train fraction on (a + b) mod 23, each run
//! summarised with its memorisation and grokking epochs, and the phase diagram drawn.
//!
//!     cargo run --release --example sweep [-- OUT_DIR [EPOCHS]]
//!
//! The same sweep from the command line, spread over a cluster, is in docs/sweeps.md.

use tlens::train::sweep::{self, Axes, Sweep};
use tlens::train::TrainConfig;

fn main() -> tlens::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map_or("tlens-sweep", String::as_str));
    let epochs = args.get(2).map_or(600, |e| e.parse().expect("epochs"));
    let axes = Axes {
        frac_train: vec![0.5, 0.9],
        weight_decay: vec![0.3, 3.0],
        ..Axes::default()
    };
    let base = TrainConfig {
        p: 23,
        epochs,
        adamw: tlens::train::AdamWConfig {
            lr: 0.01,
            ..Default::default()
        },
        checkpoint_every: 100,
        eval_every: 10,
        ..TrainConfig::default()
    };
    let s = Sweep::new(axes, base);
    // One shard holding every run; `sweep.shard(i, n)` would give a cluster task its part.
    let rows = sweep::run_shard(&s, &dir, (0, 1), |r, what| {
        eprintln!("{} ({what})", r.name())
    })?;
    for r in &rows {
        println!(
            "frac_train {:.1}  weight_decay {:>3}:  memorised at {:>4}  grokked at {}",
            r.frac_train,
            r.weight_decay,
            r.memorization_epoch.map_or("-".into(), |e| e.to_string()),
            r.grokking_epoch.map_or("never".into(), |e| e.to_string())
        );
    }
    sweep::write_summary(&dir, &rows)?;
    let files =
        tlens::analysis::plots::write_phase_diagram(&dir, &rows, "frac_train", "weight_decay")?;
    println!(
        "wrote {}/summary.json, summary.csv and {} figure files",
        dir.display(),
        files.len()
    );
    Ok(())
}
