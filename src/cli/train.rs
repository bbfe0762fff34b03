//! `tlens train`: the demo's training run, written as a TL-demo `.pth` that also carries the
//! optimizer state, so an interrupted run can be resumed.

use crate::backend::DeviceArg;
use crate::error::{Error, Result};
use crate::run::ConfigStyle;
use crate::train::{AdamWConfig, TrainConfig, Trainer};
use std::path::Path;
use std::time::{Duration, Instant};

/// `tlens train` flags; the defaults are the reference setup. The run's settings are options
/// so that `--resume` can tell a flag given on the command line (which must agree with the
/// run's) from a default.
#[derive(clap::Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    /// The run file to write (.pth, or .safetensors).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Epochs in all (default 25000; with --resume, may extend the run).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// The modulus, an odd number ≥ 3 (default 113).
    #[arg(long)]
    pub p: Option<usize>,
    /// Fraction of the p² pairs in the train split, in (0, 1) (default 0.3).
    #[arg(long)]
    pub frac_train: Option<f64>,
    /// Model seed (TL's cfg.seed; default 999).
    #[arg(long)]
    pub seed: Option<i64>,
    /// Seed of torch.randperm for the split (default 598).
    #[arg(long)]
    pub data_seed: Option<u64>,
    /// AdamW learning rate, > 0 (default 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// AdamW weight decay, ≥ 0 (default 1.0).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW β1 in [0, 1) (default 0.9).
    #[arg(long)]
    pub beta1: Option<f64>,
    /// AdamW β2 in [0, 1) (default 0.98).
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Save a checkpoint every this many epochs (default 100).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Evaluate the test loss every this many epochs (default 1).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Linear learning-rate warm-up over this many epochs (default 0 = none, as the demo).
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// The operation mod p: add (default), sub, mul, x2y2, x2xyy2, x2xyy2x, x3xy, x3xy2y.
    #[arg(long)]
    pub op: Option<String>,
    /// Record train and test accuracy after every evaluated epoch (saved in the run file).
    #[arg(long)]
    pub track_accuracy: bool,
    /// Continue the run in --out (written by an earlier, interrupted `tlens train`).
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    /// Where to run: auto, cpu or cuda.
    pub device: DeviceArg,
}

impl TrainArgs {
    /// The settings: the flags given, the reference setup's defaults for the others.
    pub fn settings(&self) -> Result<TrainConfig> {
        self.settings_over(&TrainConfig::default())
    }

    /// The flags given over `base` (a resumed run's settings, or the defaults).
    fn settings_over(&self, base: &TrainConfig) -> Result<TrainConfig> {
        let op = match &self.op {
            Some(name) => parse_op(name)?,
            None => base.op,
        };
        Ok(TrainConfig {
            op,
            track_accuracy: self.track_accuracy || base.track_accuracy,
            p: self.p.unwrap_or(base.p),
            frac_train: self.frac_train.unwrap_or(base.frac_train),
            seed: self.seed.unwrap_or(base.seed),
            data_seed: self.data_seed.unwrap_or(base.data_seed),
            epochs: self.epochs.unwrap_or(base.epochs),
            adamw: AdamWConfig {
                lr: self.lr.unwrap_or(base.adamw.lr),
                weight_decay: self.weight_decay.unwrap_or(base.adamw.weight_decay),
                beta1: self.beta1.unwrap_or(base.adamw.beta1),
                beta2: self.beta2.unwrap_or(base.adamw.beta2),
                eps: base.adamw.eps,
            },
            checkpoint_every: self.checkpoint_every.unwrap_or(base.checkpoint_every),
            eval_every: self.eval_every.unwrap_or(base.eval_every),
            warmup_epochs: self.warmup_epochs.unwrap_or(base.warmup_epochs),
        })
    }

    /// With `--resume`: flags that contradict the run's settings are an error (all of them
    /// named), except `--epochs`, which may extend the run.
    pub fn check_resume(&self, run: &TrainConfig) -> Result<()> {
        let given = self.settings_over(run)?;
        let (g, r) = (&given, run);
        let pairs = [
            ("--p", g.p.to_string(), r.p.to_string()),
            (
                "--frac-train",
                g.frac_train.to_string(),
                r.frac_train.to_string(),
            ),
            ("--seed", g.seed.to_string(), r.seed.to_string()),
            (
                "--data-seed",
                g.data_seed.to_string(),
                r.data_seed.to_string(),
            ),
            ("--lr", g.adamw.lr.to_string(), r.adamw.lr.to_string()),
            (
                "--weight-decay",
                g.adamw.weight_decay.to_string(),
                r.adamw.weight_decay.to_string(),
            ),
            (
                "--beta1",
                g.adamw.beta1.to_string(),
                r.adamw.beta1.to_string(),
            ),
            (
                "--beta2",
                g.adamw.beta2.to_string(),
                r.adamw.beta2.to_string(),
            ),
            (
                "--checkpoint-every",
                g.checkpoint_every.to_string(),
                r.checkpoint_every.to_string(),
            ),
            (
                "--eval-every",
                g.eval_every.to_string(),
                r.eval_every.to_string(),
            ),
            ("--op", g.op.name().to_string(), r.op.name().to_string()),
            (
                "--warmup-epochs",
                g.warmup_epochs.to_string(),
                r.warmup_epochs.to_string(),
            ),
        ];
        let diffs: Vec<String> = pairs
            .into_iter()
            .filter(|(_, a, b)| a != b)
            .map(|(flag, a, b)| format!("{flag} {a} (the run has {b})"))
            .collect();
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid(
                "--resume",
                format!(
                    "conflicting settings: {}; drop these flags or start a new run",
                    diffs.join(", ")
                ),
            ))
        }
    }
}

/// Save at a checkpoint boundary when this long has passed since the last save (and at the end):
/// the file always holds a complete run up to some checkpoint, without rewriting a 200 MB file
/// every 100 epochs.
const SAVE_EVERY: Duration = Duration::from_secs(30);

/// Write the run: a tlens safetensors run for `*.safetensors`, else the TL-demo `.pth`. Both
/// carry the optimizer state, so either resumes.
fn save(run: &crate::run::TrainingRun, out: &Path) -> Result<()> {
    if out.extension().is_some_and(|e| e == "safetensors") {
        run.save_safetensors(out)
    } else {
        run.save_pth(out, ConfigStyle::Tl2Object)
    }
}

/// `tlens train`: run (or resume) a training run and write it.
pub fn run(args: &TrainArgs) -> Result<()> {
    let out = args.out.as_path();
    crate::io::check_output(out, &["pth", "pt", "safetensors"], "--out")?;
    let mut t = if args.resume {
        let run = crate::cli::open_run(out)?;
        let mut t = Trainer::resume(run.load()?)?;
        args.check_resume(&t.settings)?;
        // --epochs may extend the run.
        if let Some(e) = args.epochs {
            if e < t.epoch {
                return Err(Error::invalid(
                    "--epochs",
                    format!("{e} is below the {} epochs the run has done", t.epoch),
                ));
            }
            t.settings.epochs = e;
        }
        t
    } else {
        let settings = args.settings()?;
        settings.validate()?;
        Trainer::new(settings)?
    };
    let total = t.settings.epochs;
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} epoch {pos}/{len} {msg} [{elapsed_precise}, ETA {eta_precise}]",
        )
        .expect("valid template"),
    );
    bar.set_position(t.epoch as u64);
    let mut last_save = Instant::now();
    // The interval also stays ≥ 100× the last save's duration, so that rewriting the growing
    // file (0.5–1 s at 230 MB) costs at most 1% of the run.
    let mut interval = SAVE_EVERY;
    while t.epoch < total {
        t.step()?;
        bar.set_position(t.epoch as u64);
        if t.epoch % 10 == 0 || t.epoch == total {
            let test = t.test_losses.last().copied().unwrap_or(f64::NAN);
            bar.set_message(format!(
                "train {:.3e} test {:.3e}",
                t.train_losses.last().unwrap(),
                test
            ));
        }
        let at_checkpoint = t.epoch.is_multiple_of(t.settings.checkpoint_every);
        if (at_checkpoint && last_save.elapsed() >= interval) || t.epoch == total {
            let started = Instant::now();
            save(&t.to_run(), out)?;
            last_save = Instant::now();
            interval = SAVE_EVERY.max(100 * (last_save - started));
        }
    }
    bar.finish();
    outln!(
        "wrote {} ({} epochs, {} checkpoints; final train loss {:.3e}, test loss {:.3e})",
        out.display(),
        t.epoch,
        t.checkpoints.len(),
        t.train_losses.last().copied().unwrap_or(f64::NAN),
        t.test_losses.last().copied().unwrap_or(f64::NAN)
    )?;
    Ok(())
}

/// `--op`: one of [`crate::task::Operation::TRAINABLE`] by name.
pub fn parse_op(name: &str) -> Result<crate::task::Operation> {
    crate::task::Operation::from_2022_name(name.trim())
        .filter(|op| crate::task::Operation::TRAINABLE.contains(op))
        .ok_or_else(|| {
            Error::invalid(
                "--op",
                format!(
                    "'{name}' is not one of {}",
                    crate::task::Operation::TRAINABLE
                        .iter()
                        .map(|o| o.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
}
