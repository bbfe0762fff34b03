//! The analyses of Nanda et al. 2023 and the TransformerLens Grokking demo: Fourier structure of
//! the embedding, neurons and logits, attention spectra, restricted and excluded loss, and the
//! progress measures over every checkpoint of a run, with the phase boundaries.
//!
//! Every definition is the demo's (`docs/reference.md` §8; `fixtures/demo_analysis.py` runs
//! the Python side), and `tests/analysis.rs` checks every scalar and array against it. What
//! differs is how they are computed: activations come from the tabulated last-position pass
//! ([`crate::model::tabulated::last_position`]) instead of a full cached forward, per-frequency power from
//! FFTs ([`fourier`]), and the restricted/excluded logits from a rank-(1 + 2·|keys|)
//! factorisation ([`ablation`]) — which is why all progress measures of a 250-checkpoint run
//! take seconds.
//!
//! These analyses are defined for the demo's model family: one layer with attention and MLP,
//! no LayerNorm, inputs `[a, b, =]` with d_vocab = p + 1 and d_vocab_out = p, odd p. Other
//! models get [`Error::Unsupported`] (or [`Error::NotModularArithmetic`]).
//!
//! Every analysis of a run's final model and its progress measures over the checkpoints:
//!
//! ```
//! use tlens::analysis::{analyze_run, Options};
//! let run = tlens::RunFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_small.pth"))?;
//! let (a, arrays) = analyze_run(&run, &Options::default())?;
//! assert_eq!(a.p, 23);
//! assert_eq!(a.checkpoints.len(), 3);                 // epochs 99, 199, 299
//! assert!(a.final_.restricted_loss.is_finite() && a.final_.excluded_loss.is_finite());
//! assert_eq!(arrays.neuron_freq_norm.shape(), &[11, 128]); // [p // 2, d_mlp]
//! # Ok::<(), tlens::Error>(())
//! ```

pub mod ablation;
pub mod fourier;
pub mod logits;
pub mod neurons;
pub mod plots;
pub mod progress;

use crate::error::{Error, Result};
use crate::io::npz::NpzWriter;
use crate::model::tabulated::{fast_path_applies, last_position, LastPosition};
use crate::run::RunFile;
use crate::{task, HookedTransformer};
use fourier::{power_from_components, power_spectrum_1d, power_spectrum_2d, FourierBasis};
use ndarray::{s, Array1, Array2, Array4, Axis};
use neurons::{Cluster, NeuronFreq};
use progress::{CheckpointMeasures, Phases};
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;

/// The modular-arithmetic task of a run: all p² inputs (a-major), labels of its operation and
/// the split.
#[derive(Clone, Debug)]
pub struct Task {
    /// The modulus: inputs are `[a, b, =]` with a, b < p and `=` = token p.
    pub p: usize,
    /// The operation whose value mod p is the label.
    pub op: task::Operation,
    /// All p² inputs `[a, b, p]`, a-major (row a·p + b; for subtraction row a·p + b′ holds
    /// [a, −b′ mod p, p], so that labels are (a + b′) mod p).
    pub tokens: Array2<u32>,
    /// The label of each input, `op(a, b) mod p`.
    pub labels: Vec<u32>,
    /// Train inputs, as row indices into `tokens`.
    pub train: Vec<i64>,
    /// Test inputs, as row indices into `tokens`.
    pub test: Vec<i64>,
}

/// The analyses whose definitions project onto cos/sin of k(a + b) (of k(a − b) for
/// subtraction): skipped (NaN in the report) for other operations.
pub const ADDITION_ONLY: [&str; 4] = [
    "restricted loss",
    "excluded loss",
    "logit periodicity (cos k(a+b-c))",
    "key-frequency logits loss",
];

impl Task {
    /// The (a + b) mod p task with the given split (indices into the a-major dataset).
    pub fn new(p: usize, train: Vec<i64>, test: Vec<i64>) -> Result<Task> {
        Self::with_op(p, task::Operation::Add, train, test)
    }

    /// The task of operation `op` with the given split.
    pub fn with_op(p: usize, op: task::Operation, train: Vec<i64>, test: Vec<i64>) -> Result<Task> {
        let n = (p * p) as i64;
        if let Some(&i) = train.iter().chain(&test).find(|&&i| i < 0 || i >= n) {
            return Err(Error::invalid(
                "train/test indices",
                format!("index {i} outside 0..{n} (p = {p})"),
            ));
        }
        if op.excludes_b_zero() {
            return Err(Error::Unsupported(format!(
                "the analyses of {} runs: they read all p² pairs as [a, b] grids, and {} \
                 excludes b = 0 (`tlens eval` evaluates such runs)",
                op.name(),
                op.name()
            )));
        }
        let (mut tokens, mut labels) = task::dataset(p, op)?;
        let (mut train, mut test) = (train, test);
        if op == task::Operation::Subtract {
            // (a − b) mod p = (a + b′) mod p with b′ = −b mod p: the subtraction task in
            // (a, b′) coordinates is the addition task, so every analysis defined through
            // cos/sin k(a + b) reads cos/sin k(a − b). Row a·p + b′ holds the input [a, b, =].
            let neg = |b: usize| (p - b) % p;
            let (all, _) = task::modular_addition(p);
            tokens = Array2::from_shape_fn((p * p, 3), |(i, j)| match j {
                1 => neg(i % p) as u32,
                _ => all[[i, j]],
            });
            labels = (0..p * p).map(|i| ((i / p + i % p) % p) as u32).collect();
            let flip = |v: &mut Vec<i64>| {
                for i in v.iter_mut() {
                    let (a, b) = (*i as usize / p, *i as usize % p);
                    *i = (a * p + neg(b)) as i64;
                }
            };
            flip(&mut train);
            flip(&mut test);
        }
        Ok(Task {
            p,
            op,
            tokens,
            labels,
            train,
            test,
        })
    }

    /// The task of a run: its operation and its split ([`RunFile::split`]: stored indices,
    /// the 2022 code's rule for its runs, or the rule `split` names).
    pub fn for_run(run: &RunFile) -> Result<Task> {
        Self::for_run_with(run, crate::run::SplitChoice::Auto)
    }

    /// [`Task::for_run`] with the split rule named.
    pub fn for_run_with(run: &RunFile, split: crate::run::SplitChoice) -> Result<Task> {
        let cfg = run
            .config
            .as_ref()
            .ok_or_else(|| Error::missing("run", "config (needed for the analyses)"))?;
        let p = run.modular_p()?;
        check_model_family(cfg)?;
        let s = run.split(p, split)?;
        let op = run.operation()?;
        if op == task::Operation::Rand {
            let (tokens, labels) = task::dataset_seeded(p, op, run.rand_seed())?;
            return Ok(Task {
                p,
                op,
                tokens,
                labels,
                train: s.train,
                test: s.test,
            });
        }
        Task::with_op(p, op, s.train, s.test)
    }

    /// Whether the addition-specific analyses ([`ADDITION_ONLY`]) are defined for this task:
    /// addition, and subtraction, whose task is held in (a, −b) coordinates
    /// ([`Task::with_op`]), where they read cos/sin k(a − b).
    pub fn is_addition(&self) -> bool {
        matches!(self.op, task::Operation::Add | task::Operation::Subtract)
    }
}

/// Everything an analysis of one weight set starts from, in one call: the model, the task (its
/// inputs `[a, b, =]` and labels in the paper's a-major order, index a·p + b, and the split)
/// and the last-position activations as `[p², d]` arrays named as TL names their hooks.
///
/// ```
/// let run = tlens::RunFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_small.pth"))?;
/// let acts = tlens::analysis::Activations::of_run(&run, None)?;      // or Some(epoch)
/// let p = acts.task.p;                                                 // 23
/// assert_eq!(acts.mlp_post.shape(), &[p * p, 128]);                  // blocks.0.mlp.hook_post
/// assert_eq!(acts.logits.shape(), &[p * p, p]);
/// let neuron_7 = acts.neuron(7);                                       // [a, b] grid
/// assert_eq!(neuron_7[[3, 5]], acts.mlp_post[[3 * p + 5, 7]]);
/// assert_eq!(acts.task.labels[3 * p + 5], 8);                          // (3 + 5) mod 23
/// # Ok::<(), tlens::Error>(())
/// ```
pub struct Activations {
    /// The model (the run's final weights, or a checkpoint's).
    pub model: HookedTransformer,
    /// Inputs, labels and split of the run's task.
    pub task: Task,
    /// `blocks.0.hook_resid_mid` at the last position, [p², d_model].
    pub resid_mid: Array2<f32>,
    /// `blocks.0.mlp.hook_post` at the last position, [p², d_mlp].
    pub mlp_post: Array2<f32>,
    /// `blocks.0.hook_resid_post` at the last position, [p², d_model].
    pub resid_post: Array2<f32>,
    /// Logits at the last position over the p answers, [p², p] (a 2022 model's extra logit
    /// for `=` dropped, as the paper's `test_logits`).
    pub logits: Array2<f32>,
    /// Attention of the last position (`=`) to each position, [p², n_heads, n_ctx].
    pub pattern: ndarray::Array3<f32>,
}

impl Activations {
    /// The activations of a run's final model (`checkpoint: None`) or of the checkpoint saved
    /// at an epoch, over all p² inputs.
    pub fn of_run(run: &RunFile, checkpoint: Option<i64>) -> Result<Activations> {
        let task = Task::for_run(run)?;
        let cfg = run.config.clone().expect("checked by Task::for_run");
        let sd = match checkpoint {
            Some(epoch) => run.checkpoint(run.checkpoint_index(epoch)?)?,
            None => run.model()?,
        };
        let model = HookedTransformer::new(cfg, sd)?;
        let last = activations(&model, &task, true)?;
        Ok(Activations {
            resid_mid: last.resid_mid.expect("asked for"),
            mlp_post: last.mlp_post.expect("checked"),
            resid_post: last.resid_post.expect("asked for"),
            logits: last.logits,
            pattern: last.pattern,
            model,
            task,
        })
    }

    /// One neuron's activation as a [p (a), p (b)] grid.
    pub fn neuron(&self, n: usize) -> Array2<f32> {
        let p = self.task.p;
        Array2::from_shape_fn((p, p), |(a, b)| self.mlp_post[[a * p + b, n]])
    }
}

/// Check that a config is in the family the analyses are defined for; returns p. Inputs are
/// `[a, b, =]`, so p = d_vocab − 1; the output has p logits (TL demo) or p + 1 (the 2022
/// original also has one for `=`, which the analyses drop, as the paper's `test_logits` does).
pub fn check_model_family(cfg: &crate::HookedTransformerConfig) -> Result<usize> {
    let p = cfg.d_vocab().saturating_sub(1);
    let why = if cfg.n_layers() != 1 {
        Some(format!(
            "{} layers (the analyses read one layer)",
            cfg.n_layers()
        ))
    } else if cfg.attn_only {
        Some("an attention-only model (no MLP neurons)".to_string())
    } else if cfg.normalization_type.is_some() {
        Some("LayerNorm (the restricted/excluded loss skip normalisation, as the demo)".into())
    } else if cfg.d_vocab_out() != p && cfg.d_vocab_out() != p + 1 {
        Some(format!(
            "d_vocab_out {} is neither d_vocab − 1 = {p} nor d_vocab (inputs must be [a, b, =])",
            cfg.d_vocab_out(),
        ))
    } else if cfg.n_ctx() < 3 {
        Some(format!("n_ctx {} < 3", cfg.n_ctx()))
    } else {
        None
    };
    match why {
        Some(w) => Err(Error::Unsupported(format!(
            "the grokking analyses need the demo's model family; this model has {w}"
        ))),
        None => Ok(p),
    }
}

/// The weights the analyses read, in f64 where they are multiplied further.
#[derive(Clone, Debug)]
pub struct Weights {
    /// `W_E[:-1]` [p, d_model] (the `=` token dropped, as the demo).
    pub w_e: Array2<f32>,
    /// W_L = W_out · W_U [d_mlp, p] — the neuron-to-logit map.
    pub w_l: Array2<f64>,
    /// b_U + b_out · W_U `[p]` (zero in the demo, whose biases are frozen at zero).
    pub bias_logit: Array1<f64>,
}

impl Weights {
    /// The weights of a demo-family model (W_E without `=`, W_L, the logit bias).
    pub fn new(model: &HookedTransformer) -> Result<Weights> {
        let sd = &model.state_dict;
        let get = |name: &str| -> Result<Array2<f64>> {
            let a = sd.array::<f32>(name, None)?;
            a.view()
                .into_dimensionality::<ndarray::Ix2>()
                .map(|a| a.mapv(|x| x as f64))
                .map_err(|_| {
                    Error::invalid(name, format!("expected 2 dims, found {:?}", a.shape()))
                })
        };
        let vec = |name: &str| -> Result<Array1<f64>> {
            let a = sd.array::<f32>(name, None)?;
            Ok(Array1::from_iter(a.iter().map(|&x| x as f64)))
        };
        let p = check_model_family(&model.cfg)?;
        let w_e = sd.array::<f32>("embed.W_E", None)?;
        let w_e = w_e
            .slice_each_axis(|ax| match ax.axis.index() {
                0 => ndarray::Slice::from(0..p),
                _ => ndarray::Slice::from(..),
            })
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|_| Error::invalid("embed.W_E", "expected 2 dims"))?
            .to_owned();
        let w_out = get("blocks.0.mlp.W_out")?;
        // Only the p answer logits (a 2022 model's logit for `=` is dropped).
        let w_u = get("unembed.W_U")?.slice(s![.., ..p]).to_owned();
        let w_l = w_out.dot(&w_u);
        let b_u = vec("unembed.b_U")?.slice(s![..p]).to_owned();
        let bias_logit = b_u + vec("blocks.0.mlp.b_out")?.dot(&w_u);
        Ok(Weights {
            w_e,
            w_l,
            bias_logit,
        })
    }

    /// W_Lᵀ [p, d_mlp] as f32: W_L indexed by the output token c along axis 0.
    fn w_l_t(&self) -> Array2<f32> {
        self.w_l.t().mapv(|x| x as f32)
    }
}

/// The activations the analyses read, for one weight set (checked to include the MLP's).
fn activations(model: &HookedTransformer, task: &Task, with_resid: bool) -> Result<LastPosition> {
    if !fast_path_applies(model) {
        return Err(Error::Unsupported(
            "the analyses need the tabulated 1-layer pass".into(),
        ));
    }
    let mut last = last_position(model, &task.tokens, with_resid)?;
    if last.mlp_post.is_none() {
        return Err(Error::Unsupported("a model without MLP".into()));
    }
    if last.logits.ncols() > task.p {
        last.logits = last.logits.slice(s![.., ..task.p]).to_owned();
    }
    Ok(last)
}

fn rows_accuracy(logits: &Array2<f32>, idx: &[i64], labels: &[u32]) -> f64 {
    let rows: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
    let ys: Vec<u32> = rows.iter().map(|&i| labels[i]).collect();
    task::accuracy(logits.select(Axis(0), &rows).view(), &ys)
}

fn rows_loss(logits: &Array2<f32>, idx: &[i64], labels: &[u32]) -> f64 {
    let rows = logits.select(
        Axis(0),
        &idx.iter().map(|&i| i as usize).collect::<Vec<_>>(),
    );
    let ys: Vec<u32> = idx.iter().map(|&i| labels[i as usize]).collect();
    task::loss(rows.view(), &ys)
}

/// All progress measures of one weight set (one checkpoint); also returns the logits' cosine
/// similarity with every frequency's cos cube (p//2 values).
pub fn checkpoint_measures(
    model: &HookedTransformer,
    task: &Task,
    basis: &FourierBasis,
    keys: &[usize],
    epoch: i64,
) -> Result<(CheckpointMeasures, Vec<f64>)> {
    let last = activations(model, task, false)?;
    let w = Weights::new(model)?;
    measures_of(model, &last, &w, task, basis, keys, epoch)
}

/// [`checkpoint_measures`] from activations and weights already at hand.
fn measures_of(
    model: &HookedTransformer,
    last: &LastPosition,
    w: &Weights,
    task: &Task,
    basis: &FourierBasis,
    keys: &[usize],
    epoch: i64,
) -> Result<(CheckpointMeasures, Vec<f64>)> {
    let acts = last.mlp_post.as_ref().expect("checked");
    let p = task.p;
    let periodicity = logits::LogitPeriodicity::new(last.logits.view(), p);
    let cos_sim = periodicity.cos_sim();
    let proj = ablation::Projection::new(acts.view(), w, p, keys);
    // Defined through cos/sin of k(a+b): not computed for other operations.
    let add_only = |x: f64| if task.is_addition() { x } else { f64::NAN };
    let cos_sim: Vec<f64> = cos_sim.into_iter().map(add_only).collect();
    let m = CheckpointMeasures {
        epoch,
        train_loss: rows_loss(&last.logits, &task.train, &task.labels),
        test_loss: rows_loss(&last.logits, &task.test, &task.labels),
        train_accuracy: rows_accuracy(&last.logits, &task.train, &task.labels),
        test_accuracy: rows_accuracy(&last.logits, &task.test, &task.labels),
        restricted_loss: if task.is_addition() {
            proj.restricted_loss(last.logits.view(), &task.test, &task.labels)
        } else {
            f64::NAN
        },
        excluded_loss: if task.is_addition() {
            proj.excluded_loss(last.logits.view(), &task.train, &task.labels)
        } else {
            f64::NAN
        },
        gini_w_e: progress::gini(&basis.component_norms(w.w_e.view())?),
        gini_w_l: progress::gini(&basis.component_norms(w.w_l_t().view())?),
        sum_sq_weights: model.state_dict.sum_of_squares(),
        logit_cos_sim_key: keys.iter().map(|&k| cos_sim[k - 1]).collect(),
    };
    Ok((m, cos_sim))
}

/// Fraction of power in the key frequencies at each stage of the signal chain.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SignalChain {
    /// The embedding W_E[:-1], along the token axis.
    #[serde(rename = "W_E")]
    pub w_e: f64,
    /// The residual stream after attention (`resid_mid`, last position), over (a, b).
    pub x1: f64,
    /// The residual stream after the MLP (`resid_post`, last position), over (a, b).
    pub x2: f64,
    /// W_L = W_out·W_U, along the output token axis.
    #[serde(rename = "W_L")]
    pub w_l: f64,
}

/// The analysed model's measures (the JSON's `final`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FinalMeasures {
    /// Loss on the train split (last position, f64 log-softmax over the p answers).
    pub train_loss: f64,
    /// Loss on the test split.
    pub test_loss: f64,
    /// Restricted loss (test split): logits rebuilt from the key frequencies only.
    pub restricted_loss: f64,
    /// Excluded loss (train split): logits with the key frequencies removed.
    pub excluded_loss: f64,
    /// Share of train inputs answered correctly.
    pub train_accuracy: f64,
    /// Share of test inputs answered correctly.
    pub test_accuracy: f64,
    /// Share of all p² inputs answered correctly.
    pub accuracy: f64,
    /// Share of neurons with more than 85% of their variance in one frequency.
    pub frac_neurons_explained: f64,
    /// Fraction of power in the key frequencies at each stage of the signal chain.
    pub key_freq_power_fraction: SignalChain,
    #[serde(rename = "gini_W_E")]
    /// Gini coefficient of W_E's Fourier-component norms (sparsity in frequency).
    pub gini_w_e: f64,
    #[serde(rename = "gini_W_L")]
    /// Gini coefficient of W_L's Fourier-component norms.
    pub gini_w_l: f64,
    /// Sum of squared parameters (what weight decay shrinks).
    pub sum_sq_weights: f64,
    /// ‖logits − Σ_key coeff·cos cube‖ / ‖logits‖.
    pub logit_residual_fraction_key: f64,
    /// The same with every frequency (the demo's `get_residual_cos_sim`).
    pub logit_residual_fraction_all: f64,
    /// Loss (all inputs) of the logits rebuilt from the key frequencies' cos cubes alone.
    pub key_freq_logits_loss: f64,
}

/// The embedding's principal components (SVD of W_E[:-1], as the demo's `torch.svd(W_E)`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EmbeddingSvd {
    /// Singular values of W_E[:-1], largest first.
    pub singular_values: Vec<f64>,
    /// Dominant frequency of each of the first principal components (0 = constant).
    pub pc_freq: Vec<usize>,
    /// Fraction of that component's norm² in its dominant frequency.
    pub pc_freq_frac: Vec<f64>,
    /// The first principal components [p, n] (U[:, :n]).
    #[serde(skip)]
    pub pcs: Array2<f32>,
}

/// Number of principal components reported.
pub const N_PCS: usize = 8;

/// SVD of the embedding with faer (f64); the frequency of each principal component.
pub fn embedding_svd(w_e: &Array2<f32>, basis: &FourierBasis) -> Result<EmbeddingSvd> {
    let (rows, cols) = w_e.dim();
    let m = faer::Mat::<f64>::from_fn(rows, cols, |i, j| w_e[[i, j]] as f64);
    let svd = m
        .thin_svd()
        .map_err(|e| Error::invalid("SVD of W_E", format!("{e:?}")))?;
    let s = svd.S().column_vector();
    let u = svd.U();
    let n = N_PCS.min(u.ncols());
    let pcs = Array2::from_shape_fn((rows, n), |(i, j)| u[(i, j)] as f32);
    let mut pc_freq = Vec::new();
    let mut pc_freq_frac = Vec::new();
    for j in 0..n {
        let comps: Vec<f32> = basis
            .transform(pcs.slice(s![.., j..j + 1]))?
            .iter()
            .map(|v| v.abs())
            .collect();
        let pw = power_from_components(&comps);
        let (best, _) =
            pw.iter().enumerate().fold(
                (0, f64::MIN),
                |acc, (k, &v)| if v > acc.1 { (k, v) } else { acc },
            );
        pc_freq.push(best);
        pc_freq_frac.push(pw[best] / pw.iter().sum::<f64>());
    }
    Ok(EmbeddingSvd {
        singular_values: (0..s.nrows()).map(|i| s[i]).collect(),
        pc_freq,
        pc_freq_frac,
        pcs,
    })
}

/// Each token's embedding projected on the (unit) directions of W_E's cos k and sin k Fourier
/// components, for each key frequency: `[n_keys, p, 2]`. In a grokked model the tokens lie on a
/// circle in the order of k·a mod p (the paper's Figure 3).
pub fn key_circles(
    w_e: &Array2<f32>,
    basis: &FourierBasis,
    keys: &[usize],
) -> Result<ndarray::Array3<f32>> {
    let fe = basis.transform(w_e.view())?; // [p components, d_model]
    let p = w_e.nrows();
    let mut out = ndarray::Array3::<f32>::zeros((keys.len(), p, 2));
    for (i, &k) in keys.iter().enumerate() {
        for (c, row) in [2 * k, 2 * k - 1].into_iter().enumerate() {
            let u = fe.row(row);
            let norm = u.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-30);
            for a in 0..p {
                out[[i, a, c]] = w_e.row(a).dot(&u) / norm;
            }
        }
    }
    Ok(out)
}

/// The whole analysis of a run (what `tlens analyze --json` writes).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Analysis {
    /// The modulus.
    pub p: usize,
    /// The run's operation (the labels of every loss and accuracy).
    pub operation: task::Operation,
    /// Analyses not computed because they assume addition (their values are NaN / null).
    pub skipped: Vec<&'static str>,
    /// The epoch of the analysed checkpoint; None for the run's final model.
    pub epoch: Option<i64>,
    /// The key frequencies the measures use.
    pub key_freqs: Vec<usize>,
    /// "auto" (found by [`neurons::key_freqs_auto`]) or "given".
    pub key_freqs_source: &'static str,
    #[serde(rename = "final")]
    /// The measures of the analysed model.
    pub final_: FinalMeasures,
    /// Each MLP neuron's dominant frequency and how much of its variance it explains.
    pub neurons: Vec<NeuronFreq>,
    /// Neurons explained > 85% by one frequency, grouped by that frequency.
    pub clusters: Vec<Cluster>,
    /// The embedding's principal components and their frequencies.
    pub embedding: EmbeddingSvd,
    /// Cosine similarity of the final logits with each key frequency's cos cube.
    pub logit_cos_sim_key: Vec<f64>,
    /// The progress measures at every checkpoint (empty with `skip_checkpoints`).
    pub checkpoints: Vec<CheckpointMeasures>,
    /// The phase boundaries read off the run's test loss.
    pub phases: Phases,
}

/// The arrays of an analysis (what `--npz` writes).
#[derive(Clone, Debug)]
pub struct AnalysisArrays {
    /// The demo's Fourier basis [p, p].
    pub fourier_basis: Array2<f32>,
    /// Norm of each Fourier component of `W_E[:-1]`, `[p]`.
    pub embed_fourier_norms: Array1<f32>,
    /// Norm of each Fourier component of W_L along the output token, `[p]`.
    pub w_l_fourier_norms: Array1<f32>,
    /// Fraction of each neuron's variance per frequency, [p // 2, d_mlp].
    pub neuron_freq_norm: Array2<f32>,
    /// Last-position attention to a (index 0) and b (index 1), per head: [n_heads, 2, p, p].
    pub attention_patterns: Array4<f32>,
    /// Their 2-D Fourier transforms F · pattern · Fᵀ.
    pub attention_fourier: Array4<f32>,
    /// The final logits' coefficient on each frequency's cos cube, [p // 2].
    pub logit_cos_coeffs: Array1<f64>,
    /// The final logits' cosine similarity with each frequency's cos cube, [p // 2].
    pub logit_cos_sim_final: Array1<f64>,
    /// [n_checkpoints, p//2].
    pub logit_cos_sim: Array2<f64>,
    /// Singular values of W_E[:-1].
    pub embed_singular_values: Array1<f64>,
    /// The first principal components of W_E[:-1], [p, 8].
    pub embed_pcs: Array2<f32>,
    /// The circles: each token's embedding on the directions of W_E's cos k and sin k
    /// components, for each key frequency k: [n_keys, p, 2].
    pub embed_key_circles: ndarray::Array3<f32>,
    /// The frequency of each circle: the key frequencies, or (when none is found yet) the four
    /// with the most embedding power.
    pub embed_circle_freqs: Vec<usize>,
    /// Power per frequency (index 0: constant / mean term) at each stage of the signal chain.
    pub spectra: Vec<(&'static str, Array1<f64>)>,
    /// The epoch of each row of `logit_cos_sim`.
    pub checkpoint_epochs: Array1<i64>,
    /// Example neurons of the largest clusters: their last-position activation over (a, b),
    /// [n_examples, p (a), p (b)].
    pub neuron_examples: ndarray::Array3<f32>,
    /// (neuron index, cluster frequency) of each example.
    pub neuron_example_ids: Vec<(usize, usize)>,
}

impl AnalysisArrays {
    /// Write every array to an `.npz` (names as the fields; atomic).
    pub fn write_npz(&self, path: &Path) -> Result<()> {
        let mut w = NpzWriter::new();
        w.add("fourier_basis", &self.fourier_basis)?;
        w.add("embed_fourier_norms", &self.embed_fourier_norms)?;
        w.add("W_L_fourier_norms", &self.w_l_fourier_norms)?;
        w.add("neuron_freq_norm", &self.neuron_freq_norm)?;
        w.add("attention_patterns", &self.attention_patterns)?;
        w.add("attention_fourier", &self.attention_fourier)?;
        w.add("logit_cos_coeffs", &self.logit_cos_coeffs)?;
        w.add("logit_cos_sim_final", &self.logit_cos_sim_final)?;
        w.add("logit_cos_sim", &self.logit_cos_sim)?;
        w.add("embed_singular_values", &self.embed_singular_values)?;
        w.add("embed_pcs", &self.embed_pcs)?;
        w.add("embed_key_circles", &self.embed_key_circles)?;
        w.add("checkpoint_epochs", &self.checkpoint_epochs)?;
        w.add("neuron_examples", &self.neuron_examples)?;
        let ids = Array2::from_shape_fn((self.neuron_example_ids.len(), 2), |(i, j)| {
            let (n, k) = self.neuron_example_ids[i];
            [n, k][j] as i64
        });
        w.add("neuron_example_ids", &ids)?;
        for (name, spec) in &self.spectra {
            w.add(&format!("spectrum_{name}"), spec)?;
        }
        w.write(path).map_err(|e| e.in_file(path))
    }
}

/// What to analyse.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Analyse the checkpoint saved at this epoch instead of the final model.
    pub checkpoint: Option<i64>,
    /// Key frequencies; None finds them ([`neurons::key_freqs_auto`]).
    pub key_freqs: Option<Vec<usize>>,
    /// Skip the progress measures over the checkpoints.
    pub skip_checkpoints: bool,
    /// Which train/test split ([`crate::run::SplitChoice::Auto`]: what the file says).
    pub split: crate::run::SplitChoice,
}

/// Analyse one model (the final one, or a checkpoint) and, unless skipped, every checkpoint.
pub fn analyze_run(run: &RunFile, opts: &Options) -> Result<(Analysis, AnalysisArrays)> {
    let task = Task::for_run_with(run, opts.split)?;
    let cfg = run.config.clone().expect("checked by Task::for_run");
    let sd = match opts.checkpoint {
        Some(epoch) => run.checkpoint(run.checkpoint_index(epoch)?)?,
        None => run.model()?,
    };
    let model = HookedTransformer::new(cfg.clone(), sd)?;
    let basis = FourierBasis::new(task.p)?;
    if let Some(keys) = &opts.key_freqs {
        if let Some(&k) = keys.iter().find(|&&k| k == 0 || k > task.p / 2) {
            return Err(Error::invalid(
                "key frequencies",
                format!("{k} is not in 1..={}", task.p / 2),
            ));
        }
    }
    let (mut analysis, mut arrays) = analyze_model(&model, &task, &basis, opts.key_freqs.clone())?;
    analysis.epoch = opts.checkpoint;
    if !opts.skip_checkpoints && run.n_checkpoints() > 0 {
        let keys = analysis.key_freqs.clone();
        let results: Vec<(CheckpointMeasures, Vec<f64>)> = (0..run.n_checkpoints())
            .into_par_iter()
            .map(|i| {
                let m = HookedTransformer::new(cfg.clone(), run.checkpoint(i)?)?;
                let epoch = run.checkpoint_epochs.get(i).copied().unwrap_or(i as i64);
                checkpoint_measures(&m, &task, &basis, &keys, epoch)
            })
            .collect::<Result<_>>()?;
        let n = results.len();
        arrays.logit_cos_sim = Array2::from_shape_fn((n, task.p / 2), |(i, k)| results[i].1[k]);
        arrays.checkpoint_epochs = results.iter().map(|r| r.0.epoch).collect();
        analysis.checkpoints = results.into_iter().map(|r| r.0).collect();
    }
    // Phases need the test loss of every epoch (index = epoch); a 2022 run may log it more
    // sparsely than the train loss, and then no phase is given.
    if run.test_losses.len() == run.train_losses.len() {
        analysis.phases = progress::phases(&run.test_losses);
    }
    Ok((analysis, arrays))
}

/// Every analysis of one model. The progress-measure fields that need a run (checkpoints,
/// phases) are left empty.
pub fn analyze_model(
    model: &HookedTransformer,
    task: &Task,
    basis: &FourierBasis,
    key_freqs: Option<Vec<usize>>,
) -> Result<(Analysis, AnalysisArrays)> {
    check_model_family(&model.cfg)?;
    let p = task.p;
    let last = activations(model, task, true)?;
    let acts = last.mlp_post.as_ref().expect("checked");
    let w = Weights::new(model)?;
    let (resid_mid, resid_post) = match (&last.resid_mid, &last.resid_post) {
        (Some(m), Some(p)) => (m, p),
        _ => unreachable!("asked for"),
    };

    let nfn = neurons::neuron_freq_norm(acts.view(), p);
    let neuron_list = neurons::dominant_freqs(nfn.view());
    let embed_norms = basis.component_norms(w.w_e.view())?;
    let embed_power = power_from_components(&embed_norms);
    let (keys, source) = match key_freqs {
        Some(k) => (k, "given"),
        None => (neurons::key_freqs_auto(&neuron_list, &embed_power), "auto"),
    };
    let (measures, cos_sim) = measures_of(model, &last, &w, task, basis, &keys, -1)?;

    // Signal chain.
    let d_model = w.w_e.ncols();
    let grid = |x: &Array2<f32>| {
        x.view()
            .into_shape_with_order((p, p, d_model))
            .expect("[p², d] is [p, p, d]")
            .to_owned()
    };
    let w_l_t = w.w_l_t();
    let spec_w_e = power_spectrum_1d(w.w_e.view());
    let spec_w_l = power_spectrum_1d(w_l_t.view());
    let (spec_x1, total_x1) = power_spectrum_2d(grid(resid_mid).view());
    let (spec_x2, total_x2) = power_spectrum_2d(grid(resid_post).view());
    // (`0.0 +`: an empty sum is −0.0.)
    let key_share_1d =
        |s: &[f64]| 0.0 + keys.iter().map(|&k| s[k]).sum::<f64>() / s[1..].iter().sum::<f64>();
    let key_share_2d =
        |s: &[f64], total: f64| 0.0 + keys.iter().map(|&k| s[k]).sum::<f64>() / (total - s[0]);
    let chain = SignalChain {
        w_e: key_share_1d(&spec_w_e),
        x1: key_share_2d(&spec_x1, total_x1),
        x2: key_share_2d(&spec_x2, total_x2),
        w_l: key_share_1d(&spec_w_l),
    };

    // Logit periodicity.
    let periodicity = logits::LogitPeriodicity::new(last.logits.view(), p);
    let add_only = |x: f64| if task.is_addition() { x } else { f64::NAN };
    let all_freqs: Vec<usize> = (1..=p / 2).collect();

    // Attention from `=` to a and b.
    let n_heads = last.pattern.dim().1;
    let attention_patterns = Array4::from_shape_fn((n_heads, 2, p, p), |(h, j, a, b)| {
        last.pattern[[a * p + b, h, j]]
    });
    let mut attention_fourier = Array4::<f32>::zeros((n_heads, 2, p, p));
    for h in 0..n_heads {
        for j in 0..2 {
            let t = basis.transform_2d(attention_patterns.slice(s![h, j, .., ..]))?;
            attention_fourier.slice_mut(s![h, j, .., ..]).assign(&t);
        }
    }

    let explained = neuron_list
        .iter()
        .filter(|n| n.frac_explained > neurons::EXPLAINED)
        .count();
    let train_idx: Vec<usize> = task.train.iter().map(|&i| i as usize).collect();
    let test_idx: Vec<usize> = task.test.iter().map(|&i| i as usize).collect();
    let acc = |idx: &[usize]| {
        let ys: Vec<u32> = idx.iter().map(|&i| task.labels[i]).collect();
        task::accuracy(last.logits.select(Axis(0), idx).view(), &ys)
    };
    let final_ = FinalMeasures {
        train_loss: measures.train_loss,
        test_loss: measures.test_loss,
        restricted_loss: measures.restricted_loss,
        excluded_loss: measures.excluded_loss,
        train_accuracy: acc(&train_idx),
        test_accuracy: acc(&test_idx),
        accuracy: task::accuracy(last.logits.view(), &task.labels),
        frac_neurons_explained: explained as f64 / neuron_list.len() as f64,
        key_freq_power_fraction: chain,
        gini_w_e: measures.gini_w_e,
        gini_w_l: measures.gini_w_l,
        sum_sq_weights: measures.sum_sq_weights,
        logit_residual_fraction_key: add_only(periodicity.residual_fraction(&keys)),
        logit_residual_fraction_all: add_only(periodicity.residual_fraction(&all_freqs)),
        key_freq_logits_loss: add_only(periodicity.rebuilt_loss(&keys)),
    };
    let embedding = embedding_svd(&w.w_e, basis)?;
    // Two neurons (the best explained) of each of the four largest clusters; before there are
    // clusters, the eight best-explained neurons with their dominant frequencies.
    let clusters = neurons::clusters(&neuron_list);
    let mut by_size: Vec<&Cluster> = clusters.iter().collect();
    by_size.sort_by_key(|c| std::cmp::Reverse(c.neurons.len()));
    let best_first = |ns: &mut Vec<usize>| {
        ns.sort_by(|&x, &y| {
            neuron_list[y]
                .frac_explained
                .total_cmp(&neuron_list[x].frac_explained)
        })
    };
    let mut example_ids = Vec::new();
    for c in by_size.iter().take(4) {
        let mut ns = c.neurons.clone();
        best_first(&mut ns);
        example_ids.extend(ns.iter().take(2).map(|&n| (n, c.freq)));
    }
    if example_ids.is_empty() {
        let mut ns: Vec<usize> = (0..neuron_list.len()).collect();
        best_first(&mut ns);
        example_ids.extend(ns.iter().take(8).map(|&n| (n, neuron_list[n].freq)));
    }
    // The circles of the key frequencies; before any are found (early in training), of the
    // four frequencies with the most embedding power, so that the figure still shows what the
    // embedding looks like.
    let circle_freqs: Vec<usize> = if keys.is_empty() {
        let mut by_power: Vec<usize> = (1..embed_power.len()).collect();
        by_power.sort_by(|&x, &y| embed_power[y].total_cmp(&embed_power[x]));
        by_power.into_iter().take(4).collect()
    } else {
        keys.clone()
    };
    let embed_key_circles = key_circles(&w.w_e, basis, &circle_freqs)?;
    let arrays = AnalysisArrays {
        fourier_basis: basis.basis.clone(),
        embed_fourier_norms: Array1::from(embed_norms),
        w_l_fourier_norms: Array1::from(basis.component_norms(w_l_t.view())?),
        neuron_freq_norm: nfn,
        attention_patterns,
        attention_fourier,
        logit_cos_coeffs: Array1::from(periodicity.coeffs.clone()),
        logit_cos_sim_final: Array1::from(cos_sim.clone()),
        logit_cos_sim: Array2::zeros((0, p / 2)),
        embed_singular_values: Array1::from(embedding.singular_values.clone()),
        embed_pcs: embedding.pcs.clone(),
        embed_key_circles,
        embed_circle_freqs: circle_freqs,
        spectra: vec![
            ("W_E", Array1::from(spec_w_e)),
            ("x1", Array1::from(spec_x1)),
            ("x2", Array1::from(spec_x2)),
            ("W_L", Array1::from(spec_w_l)),
        ],
        checkpoint_epochs: Array1::zeros(0),
        neuron_example_ids: example_ids.clone(),
        neuron_examples: ndarray::Array3::from_shape_fn((example_ids.len(), p, p), |(i, a, b)| {
            acts[[a * p + b, example_ids[i].0]]
        }),
    };
    let analysis = Analysis {
        p,
        operation: task.op,
        skipped: if task.is_addition() {
            Vec::new()
        } else {
            ADDITION_ONLY.to_vec()
        },
        epoch: None,
        logit_cos_sim_key: keys.iter().map(|&k| cos_sim[k - 1]).collect(),
        key_freqs: keys,
        key_freqs_source: source,
        final_,
        clusters: neurons::clusters(&neuron_list),
        neurons: neuron_list,
        embedding,
        checkpoints: Vec::new(),
        phases: progress::phases(&[]),
    };
    Ok((analysis, arrays))
}
