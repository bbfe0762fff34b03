//! `tlens train`: the demo's training run, written as a TL-demo `.pth` that also carries the
//! optimizer state, so an interrupted run can be resumed.

use crate::error::{Error, Result};
use crate::run::{ConfigStyle, RunFile};
use crate::train::{AdamWConfig, TrainConfig, Trainer};
use std::path::Path;
use std::time::{Duration, Instant};

/// `--device`: the CPU is the only backend in this build.
pub fn check_device(device: &str) -> Result<()> {
    match device {
        "cpu" | "auto" => Ok(()),
        "cuda" => Err(Error::Unsupported(
            "--device cuda: this build of tlens has no CUDA backend (use --device cpu or auto)"
                .into(),
        )),
        other => Err(Error::invalid(
            "--device",
            format!("expected auto, cpu or cuda, found '{other}'"),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn settings(
    epochs: usize,
    p: usize,
    frac_train: f64,
    seed: i64,
    data_seed: u64,
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    checkpoint_every: usize,
    eval_every: usize,
    warmup_epochs: usize,
) -> TrainConfig {
    TrainConfig {
        p,
        frac_train,
        seed,
        data_seed,
        epochs,
        adamw: AdamWConfig {
            lr,
            weight_decay,
            beta1,
            beta2,
            eps: 1e-8,
        },
        checkpoint_every,
        eval_every,
        warmup_epochs,
    }
}

/// Save at a checkpoint boundary when this long has passed since the last save (and at the end):
/// the file always holds a complete run up to some checkpoint, without rewriting a 200 MB file
/// every 100 epochs.
const SAVE_EVERY: Duration = Duration::from_secs(30);

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
        if (at_checkpoint && last_save.elapsed() >= SAVE_EVERY) || t.epoch == total {
            t.to_run().save_pth(out, ConfigStyle::Tl2Object)?;
            last_save = Instant::now();
        }
    }
    bar.finish();
    println!(
        "wrote {} ({} epochs, {} checkpoints; final train loss {:.3e}, test loss {:.3e})",
        out.display(),
        t.epoch,
        t.checkpoints.len(),
        t.train_losses.last().copied().unwrap_or(f64::NAN),
        t.test_losses.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}
