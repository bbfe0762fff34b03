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
pub mod autodiff;
pub mod filters;
pub mod general;
pub mod grad;
pub mod init;
pub mod sweep;

pub use adamw::{AdamW, AdamWConfig};
pub use filters::{Filters, Grokfast};
pub use general::TrainPath;
pub use grad::{check_trainable, loss_and_grads};
pub use init::{init_weights, torch_normal};

use crate::error::{Error, Result};
use crate::model::tabulated::last_logits;
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
    /// The model's architecture (the demo's by default).
    #[serde(default)]
    pub arch: Arch,
    /// Train the biases too (the demo freezes every parameter whose name contains `b_`).
    #[serde(default)]
    pub train_biases: bool,
    /// The loss at the last position.
    #[serde(default)]
    pub loss: crate::backend::LossKind,
    /// A Grokfast gradient filter.
    #[serde(default)]
    pub grokfast: Option<Grokfast>,
    /// ⊥Grad: train with the gradient's component along each weight removed.
    #[serde(default)]
    pub orthograd: bool,
    /// Which gradient computation to use.
    #[serde(default)]
    pub path: TrainPath,
}

/// The architecture of the model a run trains: TL config fields (the demo's by default).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Arch {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Residual stream width.
    pub d_model: usize,
    /// Attention heads per block.
    pub n_heads: usize,
    /// Width of each head.
    pub d_head: usize,
    /// MLP width.
    pub d_mlp: usize,
    /// TL's act_fn (relu, gelu, gelu_new, gelu_fast, gelu_pytorch_tanh, silu).
    pub act_fn: String,
    /// TL's normalization_type: None, LN, LNPre, RMS or RMSPre.
    pub normalization: Option<String>,
    /// Attention-only blocks (no MLP).
    pub attn_only: bool,
    /// causal or bidirectional.
    pub attention_dir: String,
}

impl Default for Arch {
    fn default() -> Self {
        Arch {
            n_layers: 1,
            d_model: 128,
            n_heads: 4,
            d_head: 32,
            d_mlp: 512,
            act_fn: "relu".into(),
            normalization: None,
            attn_only: false,
            attention_dir: "causal".into(),
        }
    }
}

impl Arch {
    /// Check every field (the error names the flag).
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, msg: String| Err(Error::invalid(flag, msg));
        for (flag, v, max) in [
            ("--n-layers", self.n_layers, 64),
            ("--d-model", self.d_model, 8192),
            ("--n-heads", self.n_heads, 256),
            ("--d-head", self.d_head, 8192),
            ("--d-mlp", self.d_mlp, 65536),
        ] {
            if v == 0 || v > max {
                return bad(flag, format!("{v} is not in [1, {max}]"));
            }
        }
        if !self.attn_only
            && ![
                "relu",
                "gelu",
                "gelu_new",
                "gelu_fast",
                "gelu_pytorch_tanh",
                "silu",
            ]
            .contains(&self.act_fn.as_str())
        {
            return bad(
                "--act-fn",
                format!(
                    "'{}' is not one of relu, gelu, gelu_new, gelu_fast, gelu_pytorch_tanh, silu",
                    self.act_fn
                ),
            );
        }
        if let Some(n) = &self.normalization {
            if !["LN", "LNPre", "RMS", "RMSPre"].contains(&n.as_str()) {
                return bad(
                    "--normalization",
                    format!("'{n}' is not one of none, LN, LNPre, RMS, RMSPre"),
                );
            }
        }
        if !["causal", "bidirectional"].contains(&self.attention_dir.as_str()) {
            return bad(
                "--attention-dir",
                format!("'{}' is not causal or bidirectional", self.attention_dir),
            );
        }
        Ok(())
    }

    /// The TL config of this architecture for the task mod p: d_vocab p + 1 (the `=` token),
    /// d_vocab_out p, n_ctx 3, init "gpt2", model seed `seed`.
    pub fn config(&self, p: usize, seed: i64) -> Result<HookedTransformerConfig> {
        self.validate()?;
        HookedTransformerConfig::from_json(serde_json::json!({
            "n_layers": self.n_layers, "n_heads": self.n_heads, "d_model": self.d_model,
            "d_head": self.d_head, "d_mlp": self.d_mlp, "act_fn": self.act_fn,
            "normalization_type": self.normalization, "attn_only": self.attn_only,
            "attention_dir": self.attention_dir,
            "d_vocab": p + 1, "d_vocab_out": p, "n_ctx": 3, "init_weights": true,
            "device": "cpu", "seed": seed
        }))
    }
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
        self.arch.validate()?;
        if !task::Operation::TRAINABLE.contains(&self.op) {
            return bad(
                "--op",
                format!("{} has no labels to train on", self.op.name()),
            );
        }
        if self.p < 3 || self.p.is_multiple_of(2) {
            return bad("--p", format!("{} is not an odd number ≥ 3", self.p));
        }
        if self.op.excludes_b_zero() && !task::is_prime(self.p) {
            return bad(
                "--p",
                format!(
                    "{} needs a prime p (b⁻¹ mod p); {} is not prime",
                    self.op.name(),
                    self.p
                ),
            );
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

    /// Bytes the training needs for this p and architecture, roughly: per input and position
    /// the activations each block keeps for the backward pass (about 24 residual-width, 6
    /// MLP-width and 8 per-head tensors) and the logits with their gradient, checked with
    /// overflow-safe arithmetic.
    pub fn memory_estimate(&self) -> u64 {
        let n = (self.p as u64).saturating_mul(self.p as u64);
        if matches!(self.resolved_path(), Ok(TrainPath::Tabulated)) {
            // Per input: tokens, MLP activations and logits (and their gradients).
            let a = &self.arch;
            let per_input =
                4 * (2 * a.d_mlp as u64 + 2 * (self.p as u64 + 1) + 4 * a.d_model as u64 + 3);
            return n.saturating_mul(per_input);
        }
        let a = &self.arch;
        let per_block = 24u64
            .saturating_mul(a.d_model as u64)
            .saturating_add(6u64.saturating_mul(a.d_mlp as u64))
            .saturating_add(8u64.saturating_mul(a.n_heads as u64).saturating_mul(3))
            .saturating_add(4u64.saturating_mul((a.n_heads * a.d_head) as u64));
        let per_pos = per_block
            .saturating_mul(a.n_layers as u64)
            .saturating_add(4u64.saturating_mul(self.p as u64 + 1));
        n.saturating_mul(per_pos.saturating_mul(3 * 4))
    }
}

impl TrainConfig {
    /// The TL config of the run's model.
    pub fn model_config(&self) -> Result<HookedTransformerConfig> {
        self.arch.config(self.p, self.seed)
    }

    /// The gradient computation this run uses: [`TrainPath::Tabulated`] where it applies
    /// (and `path` is not `general`), else [`TrainPath::General`]; an error for `tabulated`
    /// where it does not apply, saying why.
    pub fn resolved_path(&self) -> Result<TrainPath> {
        let cfg = self.model_config()?;
        let mut why = Vec::new();
        if let Err(e) = check_trainable(&cfg) {
            why.push(e.to_string());
        }
        if self.loss != crate::backend::LossKind::CrossEntropy {
            why.push("the loss is not cross-entropy".into());
        }
        if self.train_biases {
            why.push("biases train".into());
        }
        match (self.path, why.is_empty()) {
            (TrainPath::General, _) | (TrainPath::Auto, false) => Ok(TrainPath::General),
            (_, true) => Ok(TrainPath::Tabulated),
            (TrainPath::Tabulated, false) => Err(Error::invalid(
                "--path tabulated",
                format!("does not apply: {}", why.join("; ")),
            )),
        }
    }

    /// One line saying which path trains and why, for the CLI.
    pub fn path_message(&self) -> Result<String> {
        Ok(match self.resolved_path()? {
            TrainPath::Tabulated => {
                "training path: tabulated (1-layer attention + ReLU MLP without \
                LayerNorm: exact gradients of the tabulated pass)"
                    .into()
            }
            _ if self.path == TrainPath::General => {
                "training path: general (reverse-mode over the hooked forward pass; --path general)"
                    .into()
            }
            _ => "training path: general (reverse-mode over the hooked forward pass; the \
                  tabulated path covers only 1-layer attention + ReLU MLP models without \
                  LayerNorm, cross-entropy, frozen biases)"
                .into(),
        })
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
            arch: Arch::default(),
            train_biases: false,
            loss: crate::backend::LossKind::CrossEntropy,
            grokfast: None,
            orthograd: false,
            path: TrainPath::Auto,
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
    /// The gradient computation in use (tabulated or general).
    pub path: TrainPath,
    /// Grokfast / ⊥Grad and their state.
    pub filters: Filters,
}

/// The dataset rows of pairs `idx` (a·p + b ids; `rows_of` maps them to rows).
fn subset(
    tokens: &Array2<u32>,
    labels: &[u32],
    rows_of: &[Option<usize>],
    idx: &[i64],
) -> (Array2<u32>, Vec<u32>) {
    let rows: Vec<usize> = idx
        .iter()
        .map(|&i| rows_of[i as usize].expect("split ids are dataset pairs"))
        .collect();
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
        settings.validate()?;
        let cfg = settings.model_config()?;
        let params = init_weights(&cfg)?;
        Self::with_params(cfg, params, settings)
    }

    /// Start from given weights (e.g. a PyTorch init) with the demo's loop.
    pub fn with_params(
        cfg: HookedTransformerConfig,
        params: StateDict,
        settings: TrainConfig,
    ) -> Result<Trainer> {
        // Every setting, also those read back from a file for --resume.
        settings.validate()?;
        let path = settings.resolved_path()?;
        match path {
            TrainPath::Tabulated => check_trainable(&cfg)?,
            _ => general::check_general(&cfg)?,
        }
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
        let (p, op) = (settings.p, settings.op);
        let (tokens, labels) = task::dataset_seeded(p, op, Some(settings.data_seed))?;
        let rows_of = task::rows_of(p, op);
        let (train_indices, test_indices) =
            task::split(p, op, settings.frac_train, settings.data_seed);
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
        let train = subset(&tokens, &labels, &rows_of, &sorted(&train_indices));
        let test = subset(
            &tokens,
            &labels,
            &rows_of,
            &banded(&test_indices, settings.p),
        );
        let train_then_test =
            ndarray::concatenate(Axis(0), &[train.0.view(), test.0.view()]).expect("same width");
        Ok(Trainer {
            pool: std::sync::Arc::new(pool),
            train,
            test,
            train_then_test,
            pending: None,
            path,
            filters: Filters::new(settings.grokfast, settings.orthograd),
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
        let logits = last_logits(&model, &self.test.0)?;
        Ok(task::loss_with(
            self.settings.loss,
            logits.view(),
            &self.test.1,
        ))
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
        if self.path != TrainPath::Tabulated {
            return self.step_general();
        }
        let n_train = self.train.1.len();
        let (model, pass) = match self.pending.take() {
            Some((model, pass)) if model.state_dict == self.params => (model, pass),
            _ => {
                let model = HookedTransformer::new(self.cfg.clone(), self.params.clone())?;
                let pass = grad::forward(&model, &self.train.0, &self.train.1)?;
                (model, pass)
            }
        };
        let (loss, mut grads) = grad::backward(&model, pass)?;
        drop(model);
        self.train_losses.push(loss);
        if self.filters.active() {
            self.filters.apply(&mut grads, &self.params)?;
        }
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

    /// The epoch on the general path: differentiate the hooked forward pass over the train
    /// inputs, filter, AdamW, then evaluate the new weights (test loss; accuracies when
    /// tracked), checkpoint.
    fn step_general(&mut self) -> Result<()> {
        let s = &self.settings;
        let (loss, mut grads) = general::loss_and_grads(
            &self.cfg,
            &self.params,
            &self.train.0,
            &self.train.1,
            s.loss,
            s.train_biases,
        )?;
        self.train_losses.push(loss);
        if self.filters.active() {
            self.filters.apply(&mut grads, &self.params)?;
        }
        let lr = self.lr();
        self.opt.step(&mut self.params, &grads, lr)?;
        if self.epoch.is_multiple_of(self.settings.eval_every) {
            let model = HookedTransformer::new(self.cfg.clone(), self.params.clone())?;
            let kind = self.settings.loss;
            let test = if self.test.1.is_empty() {
                None
            } else {
                Some(last_logits(&model, &self.test.0)?)
            };
            self.test_losses.push(match &test {
                Some(l) => task::loss_with(kind, l.view(), &self.test.1),
                None => f64::NAN,
            });
            if self.settings.track_accuracy {
                let train = last_logits(&model, &self.train.0)?;
                self.train_accuracies
                    .push(task::accuracy(train.view(), &self.train.1));
                self.test_accuracies.push(match &test {
                    Some(l) => task::accuracy(l.view(), &self.test.1),
                    None => f64::NAN,
                });
            }
        }
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
        if self.settings.op == task::Operation::Rand {
            cfg.extra.insert(
                "rand_seed".into(),
                serde_json::Value::from(self.settings.data_seed),
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
                grokfast_ema: self.filters.ema_state(),
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
        t.filters.restore(&o.grokfast_ema, o.step as u64)?;
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
