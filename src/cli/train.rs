//! `tlens train`: the demo's training run, written as a TL-demo `.pth` that also carries the
//! optimizer state, so an interrupted run can be resumed.

use crate::backend::DeviceArg;
use crate::error::Result;
use crate::run::{ConfigStyle, RunFile};
use crate::train::{AdamWConfig, TrainConfig, Trainer};
use std::path::Path;
use std::time::{Duration, Instant};

/// `tlens train` flags; the defaults are the reference setup.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[arg(long)]
    pub out: std::path::PathBuf,
    #[arg(long, default_value_t = 25_000)]
    pub epochs: usize,
    #[arg(long, default_value_t = 113)]
    pub p: usize,
    #[arg(long, default_value_t = 0.3)]
    pub frac_train: f64,
    /// Model seed (TL's cfg.seed).
    #[arg(long, default_value_t = 999)]
    pub seed: i64,
    #[arg(long, default_value_t = 598)]
    pub data_seed: u64,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.98)]
    pub beta2: f64,
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 1)]
    pub eval_every: usize,
    /// Linear learning-rate warm-up over this many epochs (0 = none, as the demo).
    #[arg(long, default_value_t = 0)]
    pub warmup_epochs: usize,
    /// Continue the run in --out (written by an earlier, interrupted `tlens train`).
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
}

impl TrainArgs {
    pub fn settings(&self) -> TrainConfig {
        TrainConfig {
            p: self.p,
            frac_train: self.frac_train,
            seed: self.seed,
            data_seed: self.data_seed,
            epochs: self.epochs,
            adamw: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: 1e-8,
            },
            checkpoint_every: self.checkpoint_every,
            eval_every: self.eval_every,
            warmup_epochs: self.warmup_epochs,
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

pub fn run(out: &Path, settings: TrainConfig, resume: bool) -> Result<()> {
    let mut t = if resume {
        let run = RunFile::open(out)?;
        let mut t = Trainer::resume(run.load()?)?;
        // Flags given on the command line may extend the run.
        t.settings.epochs = settings.epochs.max(t.epoch);
        t
    } else {
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
