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
    /// The operation mod p: add (default), sub, mul, div, x2y2, x2xyy2, x2xyy2x, x3xy, x3xy2y,
    /// mix1, rand (div and mix1 need a prime p).
    #[arg(long)]
    pub op: Option<String>,
    /// Record train and test accuracy after every evaluated epoch (saved in the run file).
    #[arg(long)]
    pub track_accuracy: bool,
    /// Architecture, loss, filters and path.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Continue the run in --out (written by an earlier, interrupted `tlens train`).
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    /// Where to run: auto, cpu or cuda.
    pub device: DeviceArg,
}

/// The model, loss and gradient-filter flags `train` and `sweep` share.
#[derive(clap::Args, Debug, Default)]
pub struct ModelArgs {
    /// Transformer blocks (default 1).
    #[arg(long)]
    pub n_layers: Option<usize>,
    /// Residual stream width (default 128).
    #[arg(long)]
    pub d_model: Option<usize>,
    /// Attention heads per block (default 4).
    #[arg(long)]
    pub n_heads: Option<usize>,
    /// Width of each head (default 32).
    #[arg(long)]
    pub d_head: Option<usize>,
    /// MLP width (default 512).
    #[arg(long)]
    pub d_mlp: Option<usize>,
    /// Activation: relu (default), gelu, gelu_new, gelu_fast, gelu_pytorch_tanh, silu.
    #[arg(long)]
    pub act_fn: Option<String>,
    /// Normalization: none (default), LN, LNPre, RMS, RMSPre.
    #[arg(long)]
    pub normalization: Option<String>,
    /// Attention-only blocks (no MLP).
    #[arg(long)]
    pub attn_only: bool,
    /// Attention direction: causal (default) or bidirectional.
    #[arg(long)]
    pub attention_dir: Option<String>,
    /// Train the biases too (the demo freezes every parameter whose name contains `b_`).
    #[arg(long)]
    pub train_biases: bool,
    /// The loss: cross-entropy (default) or stablemax (Prieto et al. 2025).
    #[arg(long)]
    pub loss: Option<String>,
    /// Grokfast EMA filter ALPHA,LAMBDA (Lee et al. 2024; the authors use 0.98,2.0).
    #[arg(long, value_name = "ALPHA,LAMBDA", conflicts_with = "grokfast_ma")]
    pub grokfast_ema: Option<String>,
    /// Grokfast moving-average filter WINDOW,LAMBDA (the authors use 100,5.0).
    #[arg(long, value_name = "WINDOW,LAMBDA")]
    pub grokfast_ma: Option<String>,
    /// ⊥Grad: remove each gradient's component along its weight (Prieto et al. 2025).
    #[arg(long)]
    pub orthograd: bool,
    /// Gradient computation: auto (default: tabulated where it applies), tabulated, general.
    #[arg(long)]
    pub path: Option<String>,
}

impl ModelArgs {
    /// These flags over `base` (a run's settings, or the defaults).
    pub fn apply(&self, base: &TrainConfig) -> Result<TrainConfig> {
        let arch = crate::train::Arch {
            n_layers: self.n_layers.unwrap_or(base.arch.n_layers),
            d_model: self.d_model.unwrap_or(base.arch.d_model),
            n_heads: self.n_heads.unwrap_or(base.arch.n_heads),
            d_head: self.d_head.unwrap_or(base.arch.d_head),
            d_mlp: self.d_mlp.unwrap_or(base.arch.d_mlp),
            act_fn: self.act_fn.clone().unwrap_or(base.arch.act_fn.clone()),
            normalization: match self.normalization.as_deref() {
                None => base.arch.normalization.clone(),
                Some("none" | "None") => None,
                Some(n) => Some(n.to_string()),
            },
            attn_only: self.attn_only || base.arch.attn_only,
            attention_dir: self
                .attention_dir
                .clone()
                .unwrap_or(base.arch.attention_dir.clone()),
        };
        let loss = match self.loss.as_deref() {
            None => base.loss,
            Some("cross-entropy" | "cross_entropy" | "crossentropy" | "ce") => {
                crate::backend::LossKind::CrossEntropy
            }
            Some("stablemax") => crate::backend::LossKind::StableMax,
            Some(other) => {
                return Err(Error::invalid(
                    "--loss",
                    format!("'{other}' is not cross-entropy or stablemax"),
                ))
            }
        };
        let grokfast = match (&self.grokfast_ema, &self.grokfast_ma) {
            (Some(e), _) => Some(crate::train::Grokfast::parse("--grokfast-ema", e)?),
            (None, Some(m)) => Some(crate::train::Grokfast::parse("--grokfast-ma", m)?),
            (None, None) => base.grokfast,
        };
        let path = match &self.path {
            Some(p) => crate::train::TrainPath::parse(p)?,
            None => base.path,
        };
        Ok(TrainConfig {
            arch,
            loss,
            grokfast,
            path,
            train_biases: self.train_biases || base.train_biases,
            orthograd: self.orthograd || base.orthograd,
            ..base.clone()
        })
    }
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
        let base = &self.model.apply(base)?;
        Ok(TrainConfig {
            arch: base.arch.clone(),
            loss: base.loss,
            grokfast: base.grokfast,
            path: base.path,
            train_biases: base.train_biases,
            orthograd: base.orthograd,
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
            (
                "architecture",
                format!("{:?}", g.arch),
                format!("{:?}", r.arch),
            ),
            (
                "--train-biases",
                g.train_biases.to_string(),
                r.train_biases.to_string(),
            ),
            ("--loss", format!("{:?}", g.loss), format!("{:?}", r.loss)),
            (
                "--orthograd",
                g.orthograd.to_string(),
                r.orthograd.to_string(),
            ),
            ("--path", format!("{:?}", g.path), format!("{:?}", r.path)),
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
    eprintln!("{}", t.settings.path_message()?);
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
