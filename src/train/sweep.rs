//! Sweeps: one training run per combination of settings, resumable, shardable across machines,
//! summarised with the memorisation and grokking epochs and drawn as a phase diagram.
//!
//! Why this shape: grokking research is sweeps over seeds, data fractions, weight decay and
//! tasks, usually on a cluster. Each combination has an index in a fixed order (the Cartesian
//! product of the axes below); `--shard I/N` runs the combinations whose index mod N is I, so a
//! Slurm job array (`--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`) or any scheduler
//! spreads a sweep without coordination. Every run writes its own file (named after its
//! settings) and, when finished, a `NAME.summary.json`; a finished run is skipped and an
//! interrupted one resumed when the sweep is started again. [`collect`] and [`write_summary`]
//! merge the summaries of every shard into `summary.json` and `summary.csv`.
//!
//! ```
//! use tlens::train::sweep::{Axes, Sweep};
//! let axes = Axes { seeds: vec![1, 2], weight_decay: vec![1.0, 0.3], ..Axes::default() };
//! let sweep = Sweep::new(axes, tlens::train::TrainConfig { p: 23, epochs: 2, ..Default::default() });
//! assert_eq!(sweep.runs().len(), 4);
//! assert_eq!(sweep.shard(1, 2).len(), 2);                  // indices 1 and 3
//! assert!(sweep.runs()[0].name().starts_with("p23_add_frac0.3_wd1_lr0.001_seed1"));
//! ```

use super::{TrainConfig, Trainer};
use crate::error::{Error, Result};
use crate::run::{ConfigStyle, RunFile};
use crate::task::Operation;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The swept values of each axis (one value = not swept). Empty means "the base setting".
#[derive(Clone, Debug, Default)]
pub struct Axes {
    /// Moduli.
    pub p: Vec<usize>,
    /// Operations.
    pub op: Vec<Operation>,
    /// Train fractions.
    pub frac_train: Vec<f64>,
    /// Weight decays.
    pub weight_decay: Vec<f64>,
    /// Learning rates.
    pub lr: Vec<f64>,
    /// Model seeds.
    pub seeds: Vec<i64>,
    /// Split seeds.
    pub data_seeds: Vec<u64>,
}

/// One combination of a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepRun {
    /// Its index in the sweep's fixed order.
    pub index: usize,
    /// Its settings.
    pub settings: TrainConfig,
}

impl SweepRun {
    /// The run's file stem, from its settings (stable across shards and restarts).
    pub fn name(&self) -> String {
        let s = &self.settings;
        format!(
            "p{}_{}_frac{}_wd{}_lr{}_seed{}_data{}",
            s.p,
            s.op.name(),
            s.frac_train,
            s.adamw.weight_decay,
            s.adamw.lr,
            s.seed,
            s.data_seed
        )
    }
}

/// A sweep: base settings and the axes to vary.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The settings every run starts from.
    pub base: TrainConfig,
    /// The values swept.
    pub axes: Axes,
}

/// What a finished run reports (one row of `summary.csv`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    /// The run's file name.
    pub file: String,
    /// Modulus.
    pub p: usize,
    /// Operation.
    pub op: String,
    /// Train fraction.
    pub frac_train: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Learning rate.
    pub lr: f64,
    /// Model seed.
    pub seed: i64,
    /// Split seed.
    pub data_seed: u64,
    /// Epochs trained.
    pub epochs: usize,
    /// Final train loss.
    pub final_train_loss: f64,
    /// Final test loss.
    pub final_test_loss: f64,
    /// Final train accuracy.
    pub final_train_accuracy: f64,
    /// Final test accuracy.
    pub final_test_accuracy: f64,
    /// First epoch with train accuracy ≥ 99% (None: never).
    pub memorization_epoch: Option<usize>,
    /// First epoch with test accuracy ≥ 99% (None: never).
    pub grokking_epoch: Option<usize>,
}

/// Accuracy that counts as "solved" for the memorisation and grokking epochs.
pub const SOLVED: f64 = 0.99;

impl Sweep {
    /// A sweep over `axes` from `base` (accuracy tracking switched on).
    pub fn new(axes: Axes, base: TrainConfig) -> Sweep {
        Sweep {
            base: TrainConfig {
                track_accuracy: true,
                ..base
            },
            axes,
        }
    }

    /// Every combination, in the fixed order p, op, frac_train, weight_decay, lr, seed,
    /// data_seed (the last axis varies fastest).
    pub fn runs(&self) -> Vec<SweepRun> {
        fn or<T: Clone>(v: &[T], base: T) -> Vec<T> {
            if v.is_empty() {
                vec![base]
            } else {
                v.to_vec()
            }
        }
        let b = &self.base;
        let a = &self.axes;
        let mut out = Vec::new();
        for &p in &or(&a.p, b.p) {
            for &op in &or(&a.op, b.op) {
                for &frac in &or(&a.frac_train, b.frac_train) {
                    for &wd in &or(&a.weight_decay, b.adamw.weight_decay) {
                        for &lr in &or(&a.lr, b.adamw.lr) {
                            for &seed in &or(&a.seeds, b.seed) {
                                for &data_seed in &or(&a.data_seeds, b.data_seed) {
                                    let mut s = b.clone();
                                    s.p = p;
                                    s.op = op;
                                    s.frac_train = frac;
                                    s.adamw.weight_decay = wd;
                                    s.adamw.lr = lr;
                                    s.seed = seed;
                                    s.data_seed = data_seed;
                                    out.push(SweepRun {
                                        index: out.len(),
                                        settings: s,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The combinations of shard `i` of `n` (index mod n = i).
    pub fn shard(&self, i: usize, n: usize) -> Vec<SweepRun> {
        self.runs()
            .into_iter()
            .filter(|r| n > 0 && r.index % n == i)
            .collect()
    }

    /// The axes that vary (more than one value), by name, in sweep order.
    pub fn swept_axes(&self) -> Vec<&'static str> {
        let a = &self.axes;
        [
            ("p", a.p.len()),
            ("op", a.op.len()),
            ("frac_train", a.frac_train.len()),
            ("weight_decay", a.weight_decay.len()),
            ("lr", a.lr.len()),
            ("seed", a.seeds.len()),
            ("data_seed", a.data_seeds.len()),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(name, _)| name)
        .collect()
    }
}

/// The summary of a finished run.
pub fn summarize_run(
    file: &str,
    settings: &TrainConfig,
    run: &crate::run::TrainingRun,
) -> RunSummary {
    let first = |acc: &[f64]| {
        acc.iter()
            .position(|&a| a >= SOLVED)
            .map(|i| i * settings.eval_every)
    };
    let last = |v: &[f64]| {
        v.iter()
            .rev()
            .copied()
            .find(|x| x.is_finite())
            .unwrap_or(f64::NAN)
    };
    RunSummary {
        file: file.to_string(),
        p: settings.p,
        op: settings.op.name().to_string(),
        frac_train: settings.frac_train,
        weight_decay: settings.adamw.weight_decay,
        lr: settings.adamw.lr,
        seed: settings.seed,
        data_seed: settings.data_seed,
        epochs: run.train_losses.len(),
        final_train_loss: last(&run.train_losses),
        final_test_loss: last(&run.test_losses),
        final_train_accuracy: last(&run.train_accuracies),
        final_test_accuracy: last(&run.test_accuracies),
        memorization_epoch: first(&run.train_accuracies),
        grokking_epoch: first(&run.test_accuracies),
    }
}

/// Run (or resume, or skip) every combination of one shard in `dir`; returns the shard's
/// summaries. `progress` is told each run's name and what happened to it.
pub fn run_shard(
    sweep: &Sweep,
    dir: &Path,
    shard: (usize, usize),
    mut progress: impl FnMut(&SweepRun, &str),
) -> Result<Vec<RunSummary>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::from(e).in_file(dir))?;
    let mut out = Vec::new();
    for r in sweep.shard(shard.0, shard.1) {
        r.settings.validate()?;
        let file = dir.join(format!("{}.pth", r.name()));
        let summary_path = summary_path(&file);
        if file.exists() {
            // A file of the same name made with other settings (other epochs, architecture,
            // loss, filters…) would be skipped or continued silently: refuse it.
            same_settings(&file, &r.settings, summary_path.exists())?;
        }
        if summary_path.exists() {
            let s: RunSummary = serde_json::from_slice(
                &std::fs::read(&summary_path).map_err(|e| Error::from(e).in_file(&summary_path))?,
            )?;
            progress(&r, "finished before: skipped");
            out.push(s);
            continue;
        }
        let mut t = if file.exists() {
            progress(&r, "resuming");
            Trainer::resume(RunFile::open(&file)?.load()?)?
        } else {
            progress(&r, "training");
            Trainer::new(r.settings.clone())?
        };
        while t.epoch < r.settings.epochs {
            t.step()?;
        }
        let run = t.to_run();
        run.save_pth(&file, ConfigStyle::Tl2Object)?;
        let s = summarize_run(
            &file.file_name().unwrap_or_default().to_string_lossy(),
            &r.settings,
            &run,
        );
        crate::io::write_atomic(&summary_path, serde_json::to_string_pretty(&s)?.as_bytes())?;
        out.push(s);
    }
    Ok(out)
}

/// The run in `file` was made with `settings` (the epochs may differ for a run to continue,
/// not for a finished one).
fn same_settings(file: &Path, settings: &TrainConfig, finished: bool) -> Result<()> {
    let run = RunFile::open(file)?;
    let stored: TrainConfig = match run.train_settings() {
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::invalid("run['optimizer']['settings']", e.to_string()))?,
        None => {
            return Err(Error::invalid(
                file.display().to_string(),
                "not a `tlens train` run (no settings): use another --out folder",
            ))
        }
    };
    let mut want = settings.clone();
    if !finished {
        want.epochs = stored.epochs;
    }
    if stored != want {
        return Err(Error::invalid(
            file.display().to_string(),
            format!(
                "was trained with other settings ({}); use another --out folder or the same \
                 flags",
                differences(&stored, &want)
            ),
        ));
    }
    Ok(())
}

/// The top-level settings that differ, as `name: stored vs requested`.
fn differences(a: &TrainConfig, b: &TrainConfig) -> String {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return String::new();
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: {v} vs {}", b.get(k).cloned().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn summary_path(run_file: &Path) -> PathBuf {
    run_file.with_extension("summary.json")
}

/// Merge every `*.summary.json` in `dir` (all shards), sorted by file name.
pub fn collect(dir: &Path) -> Result<Vec<RunSummary>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::from(e).in_file(dir))? {
        let path = e?.path();
        if path.to_string_lossy().ends_with(".summary.json") {
            let bytes = std::fs::read(&path).map_err(|e| Error::from(e).in_file(&path))?;
            out.push(
                serde_json::from_slice::<RunSummary>(&bytes)
                    .map_err(|e| Error::from(e).in_file(&path))?,
            );
        }
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

/// Write `summary.json` and `summary.csv` for `rows` in `dir`; returns their paths.
pub fn write_summary(dir: &Path, rows: &[RunSummary]) -> Result<(PathBuf, PathBuf)> {
    let json = dir.join("summary.json");
    crate::io::write_atomic(&json, serde_json::to_string_pretty(rows)?.as_bytes())?;
    let mut csv = String::from(
        "file,p,op,frac_train,weight_decay,lr,seed,data_seed,epochs,final_train_loss,\
         final_test_loss,final_train_accuracy,final_test_accuracy,memorization_epoch,grokking_epoch\n",
    );
    let opt = |v: Option<usize>| v.map_or(String::new(), |e| e.to_string());
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.file,
            r.p,
            r.op,
            r.frac_train,
            r.weight_decay,
            r.lr,
            r.seed,
            r.data_seed,
            r.epochs,
            r.final_train_loss,
            r.final_test_loss,
            r.final_train_accuracy,
            r.final_test_accuracy,
            opt(r.memorization_epoch),
            opt(r.grokking_epoch)
        ));
    }
    let csv_path = dir.join("summary.csv");
    crate::io::write_atomic(&csv_path, csv.as_bytes())?;
    Ok((json, csv_path))
}

/// An axis value of a summary row, by axis name (for the phase diagram).
pub fn axis_value(r: &RunSummary, axis: &str) -> Option<f64> {
    Some(match axis {
        "p" => r.p as f64,
        "frac_train" => r.frac_train,
        "weight_decay" => r.weight_decay,
        "lr" => r.lr,
        "seed" => r.seed as f64,
        "data_seed" => r.data_seed as f64,
        _ => return None,
    })
}

/// The two axes a phase diagram of `rows` should use: those with the most distinct values
/// (ties in sweep order), or an error when fewer than two axes vary.
pub fn diagram_axes(rows: &[RunSummary]) -> Result<(&'static str, &'static str)> {
    let mut counts: Vec<(&'static str, usize)> =
        ["frac_train", "weight_decay", "lr", "p", "seed", "data_seed"]
            .into_iter()
            .map(|a| {
                let mut v: Vec<f64> = rows.iter().filter_map(|r| axis_value(r, a)).collect();
                v.sort_by(f64::total_cmp);
                v.dedup();
                (a, v.len())
            })
            .filter(|(_, n)| *n > 1)
            .collect();
    counts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    match counts.as_slice() {
        [x, y, ..] => Ok((x.0, y.0)),
        _ => Err(Error::invalid(
            "sweep",
            "a phase diagram needs two swept axes with more than one value",
        )),
    }
}
