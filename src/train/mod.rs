//! Training like the reference (the TL grokking demo): TL-identical initialisation ([`init`]),
//! exact gradients ([`grad`]), `torch.optim.AdamW` ([`adamw`]), full-batch epochs with the train
//! loss recorded before the step and the test loss after it, checkpoints every 100 epochs.
//!
//! ```
//! use tlens::train::{TrainConfig, Trainer};
//! // The reference setup with a small modulus; a few epochs.
//! let mut t = Trainer::new(TrainConfig { p: 23, epochs: 3, ..TrainConfig::default() })?;
//! for _ in 0..3 {
//!     t.step()?;                        // loss + exact gradients, AdamW, test loss
//! }
//! assert_eq!(t.train_losses.len(), 3);
//! assert!(t.train_losses[2] < t.train_losses[0]);
//! let run = t.to_run();                 // the TL demo's file layout, with optimizer state
//! assert_eq!(run.optimizer.as_ref().unwrap().step, 3);
//! # Ok::<(), tlens::Error>(())
//! ```

pub mod adamw;
pub mod grad;
pub mod init;
pub mod sweep;

pub use adamw::{AdamW, AdamWConfig};
pub use grad::{check_trainable, loss_and_grads};
pub use init::{init_weights, torch_normal};

use crate::error::{Error, Result};
use crate::eval::last_logits_fast;
use crate::model::{HookedTransformer, HookedTransformerConfig, StateDict};
use crate::run::TrainingRun;
use crate::task;
use ndarray::{Array2, Axis};

/// The demo's settings; every field is a `tlens train` flag with this default.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// The modulus.
    pub p: usize,
    /// Fraction of the p² pairs in the train split.
    pub frac_train: f64,
    /// Model seed (TL's `cfg.seed`).
    pub seed: i64,
    /// Seed of the train/test permutation.
    pub data_seed: u64,
    /// Epochs to train.
    pub epochs: usize,
    /// AdamW's hyper-parameters.
    pub adamw: AdamWConfig,
    /// Save a checkpoint every this many epochs.
    pub checkpoint_every: usize,
    /// Evaluate the test loss every this many epochs (1 = every epoch, as the demo).
    pub eval_every: usize,
    /// Linear learning-rate warm-up over this many epochs (0 = none, as the demo).
    pub warmup_epochs: usize,
    /// The operation mod p (the demo's addition by default; recorded in the run file's config
    /// as `operation`).
    #[serde(default = "default_op")]
    pub op: task::Operation,
    /// Record train and test accuracy after every evaluated epoch (sweeps use it for the
    /// memorisation and grokking epochs); off by default, so the demo's epoch costs nothing
    /// more.
    #[serde(default)]
    pub track_accuracy: bool,
}

fn default_op() -> task::Operation {
    task::Operation::Add
}

/// Bytes a run's training may use (inputs, per-input activations, gradients), estimated from
/// its settings before anything is allocated; above this, `validate` refuses the run.
pub const TRAIN_MEMORY_LIMIT: u64 = 16 << 30;

impl TrainConfig {
    /// Check every setting (finite, in range) before anything is allocated; the error names
    /// the flag. p must be odd and ≥ 3 (the analyses' Fourier basis needs odd p), and the
    /// run's estimated memory must stay under [`TRAIN_MEMORY_LIMIT`].
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, msg: String| Err(Error::invalid(flag, msg));
        if self.epochs == 0 {
            return bad("--epochs", "must be at least 1".into());
        }
        if !task::Operation::TRAINABLE.contains(&self.op) {
            return bad(
                "--op",
                format!("{} has no labels to train on", self.op.name()),
            );
        }
        if self.p < 3 || self.p.is_multiple_of(2) {
            return bad("--p", format!("{} is not an odd number ≥ 3", self.p));
        }
        let finite_in = |flag: &str, x: f64, lo: f64, hi: f64, lo_open: bool, hi_open: bool| {
            let ok = x.is_finite()
                && if lo_open { x > lo } else { x >= lo }
                && if hi_open { x < hi } else { x <= hi };
            if ok {
                Ok(())
            } else {
                Err(Error::invalid(
                    flag,
                    format!(
                        "{x} is not in {}{lo}, {}{}",
                        if lo_open { "(" } else { "[" },
                        if hi == f64::MAX {
                            "∞".to_string()
                        } else {
                            hi.to_string()
                        },
                        if hi_open || hi == f64::MAX { ")" } else { "]" }
                    ),
                ))
            }
        };
        finite_in("--frac-train", self.frac_train, 0.0, 1.0, true, true)?;
        finite_in("--lr", self.adamw.lr, 0.0, f64::MAX, true, false)?;
        finite_in(
            "--weight-decay",
            self.adamw.weight_decay,
            0.0,
            f64::MAX,
            false,
            false,
        )?;
        finite_in("--beta1", self.adamw.beta1, 0.0, 1.0, false, true)?;
        finite_in("--beta2", self.adamw.beta2, 0.0, 1.0, false, true)?;
        if self.checkpoint_every == 0 {
            return bad("--checkpoint-every", "must be at least 1".into());
        }
        if self.eval_every == 0 {
            return bad("--eval-every", "must be at least 1".into());
        }
        let need = self.memory_estimate();
        if need > TRAIN_MEMORY_LIMIT {
            return bad(
                "--p",
                format!(
                    "p = {} needs about {} GiB to train (limit {} GiB)",
                    self.p,
                    need >> 30,
                    TRAIN_MEMORY_LIMIT >> 30
                ),
            );
        }
        Ok(())
    }

    /// Bytes the demo model's training needs for this p, roughly: per input the tokens, the
    /// MLP activations and logits (and their gradients), checked with overflow-safe arithmetic.
    pub fn memory_estimate(&self) -> u64 {
        let n = (self.p as u64).saturating_mul(self.p as u64);
        let per_input = 4 * (2 * 512 + 2 * (self.p as u64 + 1) + 4 * 128 + 3);
        n.saturating_mul(per_input)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            p: 113,
            frac_train: 0.3,
            seed: 999,
            data_seed: 598,
            epochs: 25_000,
            adamw: AdamWConfig::default(),
            checkpoint_every: 100,
            eval_every: 1,
            warmup_epochs: 0,
            op: task::Operation::Add,
            track_accuracy: false,
        }
    }
}

/// Flush subnormal floats to zero on this thread (x86-64: MXCSR FTZ and DAZ; elsewhere a no-op).
///
/// Once a run has memorised, tiny gradients and near-zero attention weights make products fall
/// below f32's normal range, and x86 handles subnormals in microcode: measured at epoch 11,000 of
/// the demo run, an epoch took 300 ms with subnormals and 150 ms flushed. The flushed values are
/// below 1.2e-38, far under anything the losses can see.
#[allow(deprecated)] // _mm_getcsr/_mm_setcsr: the MXCSR intrinsics have no replacement yet
pub fn flush_subnormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: setting FTZ (bit 15) and DAZ (bit 6) only changes how this thread rounds subnormals.
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | 0x8040);
    }
}

/// A training run in progress.
pub struct Trainer {
    /// The model's config.
    pub cfg: HookedTransformerConfig,
    /// The run's settings.
    pub settings: TrainConfig,
    /// The current weights.
    pub params: StateDict,
    /// The optimizer and its state.
    pub opt: AdamW,
    /// Epochs completed.
    pub epoch: usize,
    /// Train inputs (indices a·p + b).
    pub train_indices: Vec<i64>,
    /// Test inputs.
    pub test_indices: Vec<i64>,
    train: (Array2<u32>, Vec<u32>),
    test: (Array2<u32>, Vec<u32>),
    /// Train loss per epoch.
    pub train_losses: Vec<f64>,
    /// Test loss per evaluation.
    pub test_losses: Vec<f64>,
    /// Train accuracy after each evaluated epoch's step (with `track_accuracy`).
    pub train_accuracies: Vec<f64>,
    /// Test accuracy after each evaluated epoch's step (with `track_accuracy`).
    pub test_accuracies: Vec<f64>,
    /// Saved checkpoints.
    pub checkpoints: Vec<StateDict>,
    /// The epoch of each checkpoint.
    pub checkpoint_epochs: Vec<i64>,
    /// Worker threads with subnormals flushed (see [`flush_subnormals`]).
    pool: std::sync::Arc<rayon::ThreadPool>,
    /// The train inputs followed by the test inputs (one forward pass evaluates both).
    train_then_test: Array2<u32>,
    /// The forward pass and the model (weights) it was computed with, over the train inputs
    /// (and the test inputs when the test loss was due): the last step's test evaluation,
    /// whose train rows the next step differentiates.
    pending: Option<(HookedTransformer, grad::TrainPass)>,
}

fn subset(tokens: &Array2<u32>, labels: &[u32], idx: &[i64]) -> (Array2<u32>, Vec<u32>) {
    let rows: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
    (
        tokens.select(Axis(0), &rows),
        rows.iter().map(|&i| labels[i]).collect(),
    )
}

fn sorted(idx: &[i64]) -> Vec<i64> {
    let mut v = idx.to_vec();
    v.sort_unstable();
    v
}

/// Inputs a·p + b in bands of [`BAND`] first tokens, each band by second token: within a band,
/// consecutive inputs share their second token's table rows and the band's first-token rows
/// stay in cache (measured with cachegrind on a 2 MB L2: half the misses of the gathers).
fn banded(idx: &[i64], p: usize) -> Vec<i64> {
    let p = p as i64;
    let mut v = idx.to_vec();
    v.sort_unstable_by_key(|&i| (i / p / BAND, i % p, i / p));
    v
}

const BAND: i64 = 32;

impl Trainer {
    /// A fresh run: the demo's model config for `settings.p`, TL's init, the demo split.
    pub fn new(settings: TrainConfig) -> Result<Trainer> {
        let mut cfg = HookedTransformerConfig::grokking_demo(settings.p as i64);
        cfg.seed = Some(settings.seed);
        let params = init_weights(&cfg)?;
        Self::with_params(cfg, params, settings)
    }

    /// Start from given weights (e.g. a PyTorch init) with the demo's loop.
    pub fn with_params(
        cfg: HookedTransformerConfig,
        params: StateDict,
        settings: TrainConfig,
    ) -> Result<Trainer> {
        check_trainable(&cfg)?;
        // Every setting, also those read back from a file for --resume.
        settings.validate()?;
        if settings.p < 2 || settings.p + 1 != cfg.d_vocab() {
            return Err(Error::invalid(
                "p",
                format!("p = {} does not fit d_vocab {}", settings.p, cfg.d_vocab),
            ));
        }
        if !(0.0..=1.0).contains(&settings.frac_train)
            || settings.checkpoint_every == 0
            || settings.eval_every == 0
        {
            return Err(Error::invalid(
                "training settings",
                "frac_train in [0, 1], intervals ≥ 1",
            ));
        }
        let (tokens, labels) = task::dataset(settings.p, settings.op)?;
        let (train_indices, test_indices) =
            task::demo_split(settings.p, settings.frac_train, settings.data_seed);
        if train_indices.is_empty() {
            return Err(Error::invalid("frac_train", "the train split is empty"));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .start_handler(|_| flush_subnormals())
            .build()
            .map_err(|e| Error::invalid("thread pool", e.to_string()))?;
        // The train set in dataset order: consecutive inputs share their first token's table
        // rows, which keeps the tabulated pass's gathers and the gradient sums in cache (the
        // loss is a mean, so the order only moves its last bits; the gradient sums follow it).
        // The test set, only evaluated, in bands (its loss is an f64 mean: the order moves
        // nothing but its last bits).
        let train = subset(&tokens, &labels, &sorted(&train_indices));
        let test = subset(&tokens, &labels, &banded(&test_indices, settings.p));
        let train_then_test =
            ndarray::concatenate(Axis(0), &[train.0.view(), test.0.view()]).expect("same width");
        Ok(Trainer {
            pool: std::sync::Arc::new(pool),
            train,
            test,
            train_then_test,
            pending: None,
            opt: AdamW::new(settings.adamw),
            cfg,
            settings,
            params,
            epoch: 0,
            train_indices,
            test_indices,
            train_losses: Vec::new(),
            test_losses: Vec::new(),
            train_accuracies: Vec::new(),
            test_accuracies: Vec::new(),
            checkpoints: Vec::new(),
            checkpoint_epochs: Vec::new(),
        })
    }

    /// The learning rate of the current epoch (linear warm-up, then constant).
    pub fn lr(&self) -> f64 {
        let w = self.settings.warmup_epochs;
        let lr = self.settings.adamw.lr;
        if w > 0 && self.epoch < w {
            lr * (self.epoch + 1) as f64 / w as f64
        } else {
            lr
        }
    }

    /// Test loss of the current weights.
    pub fn test_loss(&self) -> Result<f64> {
        if self.test.1.is_empty() {
            return Ok(f64::NAN);
        }
        let model = HookedTransformer::new(self.cfg.clone(), self.params.clone())?;
        let logits = last_logits_fast(&model, &self.test.0)?;
        Ok(task::loss(logits.view(), &self.test.1))
    }

    /// One epoch of the demo: train loss and gradients, AdamW step, test loss, checkpoint.
    /// Runs on the trainer's thread pool, with subnormals flushed.
    pub fn step(&mut self) -> Result<()> {
        let pool = self.pool.clone();
        pool.install(|| {
            flush_subnormals();
            self.step_inner()
        })
    }

    /// The epoch, with one forward pass per set of weights: the pass that evaluates the test
    /// loss after the step also holds the next step's train inputs (they come first), and the
    /// next step differentiates it. A pass's values for an input do not depend on the other
    /// inputs in it, so this gives the same numbers as separate passes (tested), and a resumed
    /// run, which starts with a pass over the train inputs alone, stays bit-identical.
    fn step_inner(&mut self) -> Result<()> {
        let n_train = self.train.1.len();
        let (model, pass) = match self.pending.take() {
            Some((model, pass)) if model.state_dict == self.params => (model, pass),
            _ => {
                let model = HookedTransformer::new(self.cfg.clone(), self.params.clone())?;
                let pass = grad::forward(&model, &self.train.0, &self.train.1)?;
                (model, pass)
            }
        };
        let (loss, grads) = grad::backward(&model, pass)?;
        drop(model);
        self.train_losses.push(loss);
        let lr = self.lr();
        self.opt.step(&mut self.params, &grads, lr)?;
        let model = HookedTransformer::new(self.cfg.clone(), self.params.clone())?;
        let test_due =
            self.epoch.is_multiple_of(self.settings.eval_every) && !self.test.1.is_empty();
        let inputs = if test_due {
            &self.train_then_test
        } else {
            &self.train.0
        };
        let pass = grad::forward(&model, inputs, &self.train.1)?;
        if test_due {
            self.test_losses.push(task::loss(
                pass.pass.logits.slice(ndarray::s![n_train.., ..]),
                &self.test.1,
            ));
        } else if self.epoch.is_multiple_of(self.settings.eval_every) {
            self.test_losses.push(f64::NAN);
        }
        if self.settings.track_accuracy && self.epoch.is_multiple_of(self.settings.eval_every) {
            let logits = &pass.pass.logits;
            self.train_accuracies.push(task::accuracy(
                logits.slice(ndarray::s![..n_train, ..]),
                &self.train.1,
            ));
            self.test_accuracies.push(if test_due {
                task::accuracy(logits.slice(ndarray::s![n_train.., ..]), &self.test.1)
            } else {
                f64::NAN
            });
        }
        self.pending = Some((model, pass));
        if (self.epoch + 1).is_multiple_of(self.settings.checkpoint_every) {
            self.checkpoint_epochs.push(self.epoch as i64);
            self.checkpoints.push(self.params.clone());
        }
        self.epoch += 1;
        Ok(())
    }

    /// The run in the TL demo's file layout.
    pub fn to_run(&self) -> TrainingRun {
        let mut cfg = self.cfg.clone();
        if self.settings.op != task::Operation::Add {
            cfg.extra.insert(
                "operation".into(),
                serde_json::Value::from(self.settings.op.name()),
            );
        }
        TrainingRun {
            config: Some(cfg),
            train_accuracies: self.train_accuracies.clone(),
            test_accuracies: self.test_accuracies.clone(),
            model: self.params.clone(),
            checkpoints: self.checkpoints.clone(),
            checkpoint_epochs: self.checkpoint_epochs.clone(),
            train_losses: self.train_losses.clone(),
            test_losses: self.test_losses.clone(),
            train_indices: Some(self.train_indices.clone()),
            test_indices: Some(self.test_indices.clone()),
            optimizer: Some(crate::run::OptimizerState {
                step: self.opt.step as i64,
                exp_avg: self.opt.exp_avg.clone(),
                exp_avg_sq: self.opt.exp_avg_sq.clone(),
                settings: serde_json::to_value(&self.settings).expect("settings serialise"),
            }),
        }
    }

    /// Continue a run saved by [`Trainer::to_run`]: weights, optimizer state, losses, checkpoints
    /// and settings are restored; training goes on exactly as if it had not stopped.
    pub fn resume(run: crate::run::TrainingRun) -> Result<Trainer> {
        let o = run
            .optimizer
            .ok_or_else(|| Error::missing("run", "optimizer (a file written by `tlens train`)"))?;
        let settings: TrainConfig = serde_json::from_value(o.settings.clone())
            .map_err(|e| Error::invalid("run['optimizer']['settings']", e.to_string()))?;
        let cfg = run.config.ok_or_else(|| Error::missing("run", "config"))?;
        let mut t = Self::with_params(cfg, run.model, settings)?;
        if run.train_indices.as_deref() != Some(&t.train_indices[..]) {
            return Err(Error::invalid(
                "run",
                "train indices differ from the settings' split",
            ));
        }
        t.opt.step = o.step as u64;
        t.opt.exp_avg = o.exp_avg;
        t.opt.exp_avg_sq = o.exp_avg_sq;
        t.epoch = o.step as usize;
        t.train_losses = run.train_losses;
        t.test_losses = run.test_losses;
        t.train_accuracies = run.train_accuracies;
        t.test_accuracies = run.test_accuracies;
        t.checkpoints = run.checkpoints;
        t.checkpoint_epochs = run.checkpoint_epochs;
        Ok(t)
    }
}
