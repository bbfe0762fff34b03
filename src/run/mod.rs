//! Typed training runs: what a checkpoint file *means*.
//!
//! [`RunFile`] opens any supported file lazily — the container and pickle are parsed, tensors are
//! not read — and recognises the layout:
//! - `transformer_lens`: the TL grokking demo's `torch.save({model, config, checkpoints,
//!   checkpoint_epochs, train_losses, test_losses, train_indices, test_indices})`, a bare TL state
//!   dict, or a tlens safetensors run;
//! - `original`: the 2022 `full_run_data.pth` (`model`, `state_dicts`, `epochs`, `train_losses`,
//!   `test_losses`, `config` dict), converted to TL layout as it is read ([`original`]).
//!
//! Checkpoints load one at a time ([`RunFile::checkpoint`]); [`RunFile::load`] materialises the
//! whole run as a [`TrainingRun`], which can be written back as a TL-demo `.pth` (TL config
//! object or `weights_only`-safe dict) or as a safetensors run.
//!
//! What a run is and which split it was trained on:
//!
//! ```
//! use tlens::run::{SplitChoice, SplitRule};
//! let run = tlens::RunFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_small.pth"))?;
//! assert_eq!(run.layout.name(), "transformer_lens");
//! let p = run.modular_p()?;                              // 23: inputs [a, b, =]
//! let split = run.split(p, SplitChoice::Auto)?;          // the indices stored in the file
//! assert_eq!(split.rule, SplitRule::Stored);
//! assert_eq!(split.train.len() + split.test.len(), p * p);
//! # Ok::<(), tlens::Error>(())
//! ```
//!
//! A run saved by the 2022 code (`{model, optimizer, scheduler, …}`): its operation and the split
//! its own `random.shuffle` made, never the TL demo's:
//!
//! ```
//! use tlens::run::{SplitChoice, SplitRule};
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/saved_runs/run_subtract.pth");
//! let run = tlens::RunFile::open(path)?;
//! assert!(run.is_2022());
//! assert_eq!(run.operation()?, tlens::task::Operation::Subtract);
//! let split = run.split(23, SplitChoice::Auto)?;
//! assert!(matches!(split.rule, SplitRule::Python2022 { seed: 1, .. }));
//! # Ok::<(), tlens::Error>(())
//! ```
//!
//! Converting: everything in memory, then written as a one-file safetensors run and read back:
//!
//! ```
//! let run = tlens::RunFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_small.pth"))?
//!     .load()?;
//! let out = std::env::temp_dir().join(format!("doc-{}.safetensors", std::process::id()));
//! run.save_safetensors(&out)?;
//! let back = tlens::RunFile::open(&out)?.load()?;
//! assert_eq!(back.model, run.model);
//! assert_eq!(back.checkpoints.len(), 3);
//! # std::fs::remove_file(&out).ok();
//! # Ok::<(), tlens::Error>(())
//! ```

pub mod original;

use crate::error::{Error, Result, WithPath};
use crate::io::pickle::{Dict, Value};
use crate::io::safetensors::SafetensorsFile;
use crate::io::torch::{TorchFile, TorchWriter};
use crate::io::{Format, Source};
use crate::model::config::{HookedTransformerConfig, TL2_CONFIG_CLASS, TL3_CONFIG_CLASS};
use crate::model::StateDict;
use crate::task::Operation;
use crate::tensor::{Tensor, TensorRef};
use ndarray::Array1;
use original::OriginalShapes;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which train/test split to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SplitChoice {
    /// What the file says: stored indices, or the 2022 code's rule for its runs; else an error.
    #[default]
    Auto,
    /// The TL demo's rule: `torch.manual_seed(598); torch.randperm(p²)`, first 30% train.
    Demo,
    /// The 2022 code's rule with its defaults: `random.seed(0); random.shuffle(pairs)`, 30%.
    Original2022,
}

impl std::str::FromStr for SplitChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<SplitChoice> {
        match s {
            "auto" => Ok(SplitChoice::Auto),
            "demo" => Ok(SplitChoice::Demo),
            "2022" => Ok(SplitChoice::Original2022),
            other => Err(Error::invalid(
                "--split",
                format!("expected auto, demo or 2022, found '{other}'"),
            )),
        }
    }
}

/// How a split was obtained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SplitRule {
    /// `train_indices` / `test_indices` stored in the file.
    Stored,
    /// The 2022 code's `gen_train_test`; `from_defaults` when the run's config lacked the seed
    /// or fraction and the `Config` defaults were used.
    Python2022 {
        /// The seed passed to `random.seed`.
        seed: u64,
        /// Fraction of pairs in the train split.
        frac_train: f64,
        /// Whether the Config defaults stood in for a missing seed or fraction.
        from_defaults: bool,
    },
    /// `torch.manual_seed(seed); torch.randperm(p²)`, as the TL demo.
    TorchRandperm {
        /// The seed passed to `torch.manual_seed`.
        seed: u64,
        /// Fraction of pairs in the train split.
        frac_train: f64,
    },
}

impl std::fmt::Display for SplitRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SplitRule::Stored => write!(f, "stored in the file"),
            SplitRule::Python2022 {
                seed,
                frac_train,
                from_defaults,
            } => write!(
                f,
                "the 2022 code's random.shuffle (seed {seed}, frac_train {frac_train}{})",
                if *from_defaults {
                    ", Config defaults"
                } else {
                    ""
                }
            ),
            SplitRule::TorchRandperm { seed, frac_train } => write!(
                f,
                "torch.randperm as the TL demo (seed {seed}, frac_train {frac_train})"
            ),
        }
    }
}

/// A train/test split: indices into the a-major dataset of p² inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// Train inputs (indices a·p + b).
    pub train: Vec<i64>,
    /// Test inputs.
    pub test: Vec<i64>,
    /// How they were obtained.
    pub rule: SplitRule,
}

/// How the keys and weights of a file are arranged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// TransformerLens names and shapes.
    TransformerLens,
    /// The 2022 code's names and shapes (converted as read).
    Original,
}

impl Layout {
    /// The name `inspect` prints.
    pub fn name(self) -> &'static str {
        match self {
            Layout::TransformerLens => "transformer_lens",
            Layout::Original => "original",
        }
    }
}

enum Container {
    Torch(TorchFile),
    Safetensors(SafetensorsFile),
}

/// Where one state-dict entry's data is.
#[derive(Clone, Debug)]
enum Src {
    Torch(TensorRef),
    Safetensors(String),
}

/// A state dict not yet read: names, shapes and dtypes only.
#[derive(Clone, Debug, Default)]
pub struct StateDictRef {
    entries: Vec<(String, Src, Vec<usize>, crate::tensor::DType)>,
}

impl StateDictRef {
    /// (name, shape, dtype) of each entry, in order (as stored, before any layout conversion).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[usize], crate::tensor::DType)> {
        self.entries
            .iter()
            .map(|(n, _, s, d)| (n.as_str(), s.as_slice(), *d))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, _, s, _)| s.as_slice())
    }

    /// Rename entries starting with `from` to start with `to`; whether any was renamed.
    fn rename_prefix(&mut self, from: &str, to: &str) -> bool {
        let mut any = false;
        for (n, ..) in &mut self.entries {
            if let Some(rest) = n.strip_prefix(from) {
                *n = format!("{to}{rest}");
                any = true;
            }
        }
        any
    }

    fn n_layers(&self) -> usize {
        self.entries
            .iter()
            .filter_map(|(n, ..)| {
                n.strip_prefix("blocks.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .map(|l| l + 1)
            .max()
            .unwrap_or(0)
    }
}

/// A run file opened lazily.
pub struct RunFile {
    /// The file's path (None for bytes in memory).
    pub path: Option<PathBuf>,
    container: Container,
    /// The container format.
    pub format: Format,
    /// How keys and weights are arranged.
    pub layout: Layout,
    /// The TL config (for original-layout files: the equivalent TL config).
    pub config: Option<HookedTransformerConfig>,
    /// Module path of the pickled config class, when it was a TL object.
    pub config_class: Option<(String, String)>,
    model: Option<StateDictRef>,
    checkpoints: Vec<StateDictRef>,
    /// The epoch of each checkpoint.
    pub checkpoint_epochs: Vec<i64>,
    /// Train loss per epoch.
    pub train_losses: Vec<f64>,
    /// Test losses as logged (see `test_every`).
    pub test_losses: Vec<f64>,
    /// Train accuracy per evaluated epoch (tlens runs trained with accuracy tracking).
    pub train_accuracies: Vec<f64>,
    /// Test accuracy per evaluated epoch.
    pub test_accuracies: Vec<f64>,
    /// Train indices stored in the file.
    pub train_indices: Option<Vec<i64>>,
    /// Test indices stored in the file.
    pub test_indices: Option<Vec<i64>>,
    original: Option<OriginalShapes>,
    /// (step, exp_avg, exp_avg_sq, settings, Grokfast EMA state).
    optimizer: Option<(
        i64,
        StateDictRef,
        StateDictRef,
        serde_json::Value,
        StateDictRef,
    )>,
    /// What kind of file this is, in words (`inspect` prints it).
    pub description: String,
    /// A torch `Optimizer.state_dict()` saved with the run (2022 runs), summarised; tlens
    /// does not resume from it.
    pub torch_optimizer: Option<serde_json::Value>,
    /// An LR scheduler's state dict saved with the run (2022 runs: `LambdaLR`), summarised.
    pub scheduler: Option<serde_json::Value>,
    /// `train_loss` / `test_loss` as stored at the top level (2022 single runs; NaN if only
    /// one is present).
    pub final_losses: Option<(f64, f64)>,
    /// `epoch` as stored (2022 single runs).
    pub epoch: Option<i64>,
    /// Tensors that could not be read (a dtype tlens does not support): name and reason.
    pub unreadable: Vec<(String, String)>,
    /// What tlens changed while reading (renamed keys, …), for `inspect`.
    pub notes: Vec<String>,
    /// Callables the file references (`os.system`, a user's class, …) that tlens did not run
    /// ([`crate::io::pickle::foreign_globals`]); the CLI warns about them.
    pub foreign_globals: Vec<String>,
}

/// A fully loaded run (TL layout).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingRun {
    /// The TL config.
    pub config: Option<HookedTransformerConfig>,
    /// The final weights.
    pub model: StateDict,
    /// The checkpoints' weights.
    pub checkpoints: Vec<StateDict>,
    /// The epoch of each checkpoint.
    pub checkpoint_epochs: Vec<i64>,
    /// Train loss per epoch.
    pub train_losses: Vec<f64>,
    /// Test losses as logged.
    pub test_losses: Vec<f64>,
    /// Train indices.
    pub train_indices: Option<Vec<i64>>,
    /// Test indices.
    pub test_indices: Option<Vec<i64>>,
    /// Train accuracy after each evaluated epoch (runs trained with `track_accuracy`; saved
    /// under the extra top-level key `train_accuracies`, which TL and torch.load ignore).
    pub train_accuracies: Vec<f64>,
    /// Test accuracy after each evaluated epoch (key `test_accuracies`).
    pub test_accuracies: Vec<f64>,
    /// Optimizer state, for resuming training (tlens writes it under the extra top-level key
    /// `optimizer`, which TransformerLens and torch.load simply carry along).
    pub optimizer: Option<OptimizerState>,
}

/// AdamW state saved with a run.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    /// AdamW steps taken (= epochs completed).
    pub step: i64,
    /// AdamW's first moments by parameter name.
    pub exp_avg: StateDict,
    /// AdamW's second moments by parameter name.
    pub exp_avg_sq: StateDict,
    /// The training settings (`tlens::train::TrainConfig` as JSON).
    pub settings: serde_json::Value,
    /// The Grokfast EMA filter's state by parameter name (empty without the filter; written
    /// under `grokfast_ema`, so a Grokfast run resumes exactly).
    pub grokfast_ema: StateDict,
}

/// How to pickle the config when writing a `.pth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigStyle {
    /// The TL 2.x object (`transformer_lens.HookedTransformerConfig`): what the demo writes.
    Tl2Object,
    /// The TL ≥ 3.3 object (`transformer_lens.config.hooked_transformer_config`).
    Tl3Object,
    /// A plain dict: loadable with `torch.load(weights_only=True)`.
    Dict,
}

fn ctx_key(key: &str) -> String {
    format!("run['{key}']")
}

impl RunFile {
    /// Open any supported file (format detected from its first bytes).
    pub fn open(path: impl AsRef<Path>) -> Result<RunFile> {
        let path = path.as_ref();
        let source = Source::map(path).with_path(path)?;
        let mut r = Self::from_source(source).with_path(path)?;
        r.path = Some(path.to_path_buf());
        Ok(r)
    }

    /// Parse a file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<RunFile> {
        Self::from_source(Source::Bytes(bytes))
    }

    fn from_source(source: Source) -> Result<RunFile> {
        Self::from_file(crate::io::tree::AnyFile::from_source(source)?)
    }

    /// Interpret a parsed container as a run ([`Error::NotARun`] when it holds none).
    pub fn from_file(file: crate::io::tree::AnyFile) -> Result<RunFile> {
        match file {
            crate::io::tree::AnyFile::Safetensors(f) => Self::from_safetensors(f),
            crate::io::tree::AnyFile::Torch(f) => {
                let format = f.format();
                Self::from_torch(f, format)
            }
        }
    }

    fn empty(container: Container, format: Format) -> RunFile {
        RunFile {
            path: None,
            container,
            format,
            layout: Layout::TransformerLens,
            config: None,
            config_class: None,
            model: None,
            checkpoints: Vec::new(),
            checkpoint_epochs: Vec::new(),
            train_losses: Vec::new(),
            test_losses: Vec::new(),
            train_accuracies: Vec::new(),
            test_accuracies: Vec::new(),
            train_indices: None,
            test_indices: None,
            original: None,
            optimizer: None,
            description: String::new(),
            torch_optimizer: None,
            scheduler: None,
            final_losses: None,
            epoch: None,
            unreadable: Vec::new(),
            notes: Vec::new(),
            foreign_globals: Vec::new(),
        }
    }

    fn from_torch(mut f: TorchFile, format: Format) -> Result<RunFile> {
        // The run keeps typed references, moved out of the value tree (which is then dropped).
        let root = std::mem::replace(&mut f.root, Value::None);
        let foreign = crate::io::pickle::foreign_globals(&f.globals);
        let Value::Dict(mut dict) = root else {
            return Err(Error::NotARun(not_a_run(&root)));
        };
        let mut run = RunFile::empty(Container::Torch(f), format);
        run.foreign_globals = foreign;
        let is_state_dict = !dict.items.is_empty()
            && dict
                .items
                .iter()
                .all(|(_, v)| matches!(v, Value::Tensor(_)));
        if is_state_dict {
            run.model = Some(sd_ref(Value::Dict(dict), "state dict")?);
            run.description = "a state dict".into();
        } else if dict.get("state_dicts").is_some() || dict.get("epochs").is_some() {
            // 2022 original layout
            run.layout = Layout::Original;
            run.description = "2022 full run (model, state_dicts, epochs, losses, config)".into();
            let model =
                take(&mut dict, "model").ok_or_else(|| Error::missing("original run", "model"))?;
            run.model = Some(sd_ref(model, &ctx_key("model"))?);
            if let Some(sds) = take(&mut dict, "state_dicts") {
                run.checkpoints = sd_refs(sds, "state_dicts")?;
            }
            if let Some(e) = dict.get("epochs") {
                run.checkpoint_epochs = ints(e, &ctx_key("epochs"))?;
            }
            run.train_losses = floats_opt(dict.get("train_losses"), "train_losses")?;
            run.test_losses = floats_opt(dict.get("test_losses"), "test_losses")?;
            let cfg_json = match dict.get("config") {
                Some(c) => Some(crate::model::config::pickle_to_json(c, "run['config']")?),
                None => None,
            };
            let m = run.model.as_ref().expect("set above");
            let shapes = OriginalShapes::infer(|n| m.shape(n), m.n_layers())?;
            run.config = Some(shapes.config(cfg_json.as_ref(), None)?);
            run.original = Some(shapes);
        } else {
            // TL demo layout (or a subset of it), a tlens run, or a 2022 single run
            // ({model, optimizer, scheduler, train_loss, test_loss, train_losses, test_losses,
            // epoch[, config]}) — told apart by what the keys hold, not by their names alone.
            let keys: Vec<String> = dict.keys().map(str::to_string).collect();
            match take(&mut dict, "model") {
                Some(m @ Value::Dict(_)) => {
                    let mut m = sd_ref(m, &ctx_key("model"))?;
                    // The 2022 code's attention-only models (induction heads) name their
                    // blocks `attn_blocks`; TL names them `blocks`.
                    if m.rename_prefix("attn_blocks.", "blocks.") {
                        run.notes
                            .push("renamed attn_blocks.* to blocks.* (TL layout)".into());
                    }
                    run.model = Some(m);
                }
                Some(other) => {
                    return Err(Error::NotARun(format!(
                        "its 'model' is a {}, not a state dict",
                        other.type_name()
                    )))
                }
                None => {}
            }
            let mut original_config = None;
            if let Some(c) = dict.get("config") {
                if config_kind(c) == ConfigKind::Tl {
                    run.config = Some(HookedTransformerConfig::from_pickle(c).map_err(
                        |e| match e {
                            Error::Invalid { msg, .. } => Error::invalid(ctx_key("config"), msg),
                            e => e,
                        },
                    )?);
                    if let Value::Object(o) = c {
                        run.config_class = Some((o.module.clone(), o.name.clone()));
                    }
                } else {
                    // The 2022 code's `Config` as a dict (or another task's config dict).
                    original_config =
                        Some(crate::model::config::pickle_to_json(c, "run['config']")?);
                }
            }
            let model_config = match dict.get("model_config") {
                Some(c) => Some(crate::model::config::pickle_to_json(
                    c,
                    "run['model_config']",
                )?),
                None => None,
            };
            if let Some(cs) = take(&mut dict, "checkpoints") {
                run.checkpoints = sd_refs(cs, "checkpoints")?;
            }
            match take(&mut dict, "optimizer") {
                Some(Value::Dict(o))
                    if o.get("state").is_some() && o.get("param_groups").is_some() =>
                {
                    run.torch_optimizer = Some(torch_optimizer_summary(&o)?);
                }
                Some(Value::Dict(mut o)) => {
                    let step = o
                        .get("step")
                        .and_then(Value::as_i64)
                        .ok_or_else(|| Error::missing(ctx_key("optimizer"), "step"))?;
                    let settings = match o.get("settings") {
                        Some(s) => {
                            crate::model::config::pickle_to_json(s, "run['optimizer']['settings']")?
                        }
                        None => serde_json::Value::Null,
                    };
                    let ema = match take(&mut o, "grokfast_ema") {
                        Some(v) => sd_ref(v, "run['optimizer']['grokfast_ema']")?,
                        None => StateDictRef::default(),
                    };
                    let mut sd = |k: &str| -> Result<StateDictRef> {
                        let v = take(&mut o, k)
                            .ok_or_else(|| Error::missing(ctx_key("optimizer"), k))?;
                        sd_ref(v, &format!("run['optimizer']['{k}']"))
                    };
                    run.optimizer = Some((step, sd("exp_avg")?, sd("exp_avg_sq")?, settings, ema));
                }
                Some(other) => {
                    return Err(Error::type_err(
                        ctx_key("optimizer"),
                        "optimizer state dict",
                        other.type_name(),
                    ))
                }
                None => {}
            }
            if let Some(Value::Dict(sch)) = dict.get("scheduler") {
                run.scheduler = Some(scheduler_summary(sch));
            }
            for (key, slot) in [("train_loss", 0), ("test_loss", 1)] {
                if let Some(v) = dict.get(key) {
                    let x = run.scalar(v, key)?;
                    let fl = run.final_losses.get_or_insert((f64::NAN, f64::NAN));
                    if slot == 0 {
                        fl.0 = x;
                    } else {
                        fl.1 = x;
                    }
                }
            }
            if let Some(e) = dict.get("epoch") {
                run.epoch = Some(
                    e.as_i64()
                        .ok_or_else(|| Error::type_err(ctx_key("epoch"), "int", e.type_name()))?,
                );
            }
            if let Some(e) = dict.get("checkpoint_epochs") {
                run.checkpoint_epochs = ints(e, &ctx_key("checkpoint_epochs"))?;
            }
            run.train_losses = floats_opt(dict.get("train_losses"), "train_losses")?;
            run.test_losses = floats_opt(dict.get("test_losses"), "test_losses")?;
            run.train_accuracies = floats_opt(dict.get("train_accuracies"), "train_accuracies")?;
            run.test_accuracies = floats_opt(dict.get("test_accuracies"), "test_accuracies")?;
            run.train_indices = run.index_tensor(dict.get("train_indices"), "train_indices")?;
            run.test_indices = run.index_tensor(dict.get("test_indices"), "test_indices")?;
            if run.model.is_none() && run.checkpoints.is_empty() {
                return Err(Error::NotARun(format!(
                    "a dict with keys [{}] and no 'model' state dict or 'checkpoints'{}",
                    keys.join(", "),
                    if dict.get("train_losses").is_some() || dict.get("losses").is_some() {
                        " (losses only)"
                    } else {
                        ""
                    }
                )));
            }
            run.description = if run.torch_optimizer.is_some() || run.scheduler.is_some() {
                "2022 single run (model, optimizer, scheduler, losses)".into()
            } else if run.optimizer.is_some() {
                "tlens training run (TL demo layout + AdamW state)".into()
            } else if run.config_class.is_some() || !run.checkpoints.is_empty() {
                "TL grokking demo run".into()
            } else {
                format!("a dict of [{}]", keys.join(", "))
            };
            if let Some(m) = &run.model {
                // A model in the 2022 layout (2-D W_O) is converted to TL layout as it is read.
                if m.shape("blocks.0.attn.W_O").is_some_and(|s| s.len() == 2) {
                    run.layout = Layout::Original;
                    let shapes = OriginalShapes::infer(|n| m.shape(n), m.n_layers())?;
                    if run.config.is_none() {
                        run.config =
                            Some(shapes.config(original_config.as_ref(), model_config.as_ref())?);
                    }
                    run.original = Some(shapes);
                } else if original_config.is_some() || model_config.is_some() {
                    return Err(Error::Unsupported(
                        "a 2022-style config dict with a model that is not in the 2022 layout"
                            .into(),
                    ));
                }
            }
        }
        if !run.checkpoint_epochs.is_empty() && run.checkpoint_epochs.len() != run.checkpoints.len()
        {
            return Err(Error::invalid(
                "run",
                format!(
                    "{} checkpoint epochs for {} checkpoints",
                    run.checkpoint_epochs.len(),
                    run.checkpoints.len()
                ),
            ));
        }
        Ok(run)
    }

    /// A number stored as a float, an int or a 0-d tensor (the 2022 runs' `train_loss`).
    fn scalar(&self, v: &Value, key: &str) -> Result<f64> {
        match v {
            Value::Tensor(r) if r.shape.iter().product::<usize>() == 1 => {
                let t = self.load_src(&Src::Torch((**r).clone()), key)?;
                Ok(t.to_f64_vec()[0])
            }
            other => other
                .as_f64()
                .ok_or_else(|| Error::type_err(ctx_key(key), "number", other.type_name())),
        }
    }

    fn index_tensor(&self, v: Option<&Value>, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = v else { return Ok(None) };
        match v {
            Value::Tensor(r) => {
                let t = self.load_src(&Src::Torch((**r).clone()), key)?;
                let idx = t.to_i64_vec().ok_or_else(|| {
                    Error::type_err(ctx_key(key), "integer tensor", t.dtype().to_string())
                })?;
                Ok(Some(idx))
            }
            Value::List(_) | Value::Tuple(_) => Ok(Some(ints(v, &ctx_key(key))?)),
            other => Err(Error::type_err(
                ctx_key(key),
                "tensor or list of ints",
                other.type_name(),
            )),
        }
    }

    fn from_safetensors(f: SafetensorsFile) -> Result<RunFile> {
        let meta = f.metadata();
        let names = f.names();
        let mut model = StateDictRef::default();
        let mut ckpts: Vec<StateDictRef> = Vec::new();
        let mut run_tensors: HashMap<String, String> = HashMap::new();
        let (mut exp_avg, mut exp_avg_sq) = (StateDictRef::default(), StateDictRef::default());
        let mut ema = StateDictRef::default();
        let mut unreadable = Vec::new();
        for name in &names {
            let (dtype, shape) = match f.info(name) {
                Ok(x) => x,
                Err(e @ Error::Unsupported(_)) => {
                    unreadable.push((name.clone(), e.to_string()));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let opt = [
                ("optimizer.exp_avg_sq.", &mut exp_avg_sq),
                ("optimizer.exp_avg.", &mut exp_avg),
                ("optimizer.grokfast_ema.", &mut ema),
            ]
            .into_iter()
            .find_map(|(prefix, sd)| name.strip_prefix(prefix).map(|p| (p, sd)));
            if let Some((pname, sd)) = opt {
                sd.entries.push((
                    pname.to_string(),
                    Src::Safetensors(name.clone()),
                    shape,
                    dtype,
                ));
            } else if let Some(rest) = name.strip_prefix("checkpoints.") {
                let (i, pname) = rest
                    .split_once('.')
                    .and_then(|(i, p)| Some((i.parse::<usize>().ok()?, p)))
                    .ok_or_else(|| Error::invalid(name, "expected checkpoints.<index>.<name>"))?;
                if i >= names.len() {
                    return Err(Error::invalid(name, "checkpoint index out of range"));
                }
                if ckpts.len() <= i {
                    ckpts.resize_with(i + 1, Default::default);
                }
                ckpts[i].entries.push((
                    pname.to_string(),
                    Src::Safetensors(name.clone()),
                    shape,
                    dtype,
                ));
            } else if RUN_TENSORS.contains(&name.as_str()) {
                run_tensors.insert(name.clone(), name.clone());
            } else {
                model
                    .entries
                    .push((name.clone(), Src::Safetensors(name.clone()), shape, dtype));
            }
        }
        // safetensors sorts tensors by dtype and name: restore TL's order.
        let by_tl_order = |r: &mut StateDictRef| {
            r.entries
                .sort_by_key(|(n, ..)| crate::model::tl_order_key(n));
        };
        by_tl_order(&mut model);
        ckpts.iter_mut().for_each(by_tl_order);
        by_tl_order(&mut exp_avg);
        by_tl_order(&mut exp_avg_sq);
        by_tl_order(&mut ema);
        let optimizer = match meta.get("optimizer_step") {
            Some(step) => {
                let step = step.parse::<i64>().map_err(|_| {
                    Error::invalid(
                        "metadata optimizer_step",
                        format!("not an integer: {step:?}"),
                    )
                })?;
                let settings = match meta.get("optimizer_settings") {
                    Some(s) => serde_json::from_str(s)?,
                    None => serde_json::Value::Null,
                };
                if exp_avg.is_empty() || exp_avg_sq.is_empty() {
                    return Err(Error::missing(
                        "safetensors run with optimizer_step",
                        "optimizer.exp_avg.* and optimizer.exp_avg_sq.* tensors",
                    ));
                }
                Some((step, exp_avg, exp_avg_sq, settings, ema))
            }
            None if !exp_avg.is_empty() || !exp_avg_sq.is_empty() => {
                return Err(Error::missing(
                    "safetensors run with optimizer tensors",
                    "metadata optimizer_step",
                ))
            }
            None => None,
        };
        let mut run = RunFile::empty(Container::Safetensors(f), Format::Safetensors);
        run.unreadable = unreadable;
        run.description = if meta.get("format").map(String::as_str) == Some("tlens-run") {
            "tlens safetensors run".into()
        } else {
            "a safetensors state dict".into()
        };
        if !model.is_empty() {
            run.model = Some(model);
        }
        run.checkpoints = ckpts;
        run.optimizer = optimizer;
        if let Some(c) = meta.get("config") {
            run.config = Some(HookedTransformerConfig::from_json_str(c)?);
        }
        let vec_of = |run: &RunFile, key: &str| -> Result<Option<Tensor>> {
            match run_tensors.get(key) {
                Some(n) => Ok(Some(run.load_src(&Src::Safetensors(n.clone()), key)?)),
                None => Ok(None),
            }
        };
        if let Some(t) = vec_of(&run, "train_losses")? {
            run.train_losses = t.to_f64_vec();
        }
        if let Some(t) = vec_of(&run, "test_losses")? {
            run.test_losses = t.to_f64_vec();
        }
        if let Some(t) = vec_of(&run, "train_accuracies")? {
            run.train_accuracies = t.to_f64_vec();
        }
        if let Some(t) = vec_of(&run, "test_accuracies")? {
            run.test_accuracies = t.to_f64_vec();
        }
        if let Some(t) = vec_of(&run, "checkpoint_epochs")? {
            run.checkpoint_epochs = t.to_i64_vec().ok_or_else(|| {
                Error::type_err("checkpoint_epochs", "integer tensor", t.dtype().to_string())
            })?;
        }
        for key in ["train_indices", "test_indices"] {
            if let Some(t) = vec_of(&run, key)? {
                let v = t
                    .to_i64_vec()
                    .ok_or_else(|| Error::type_err(key, "integer tensor", t.dtype().to_string()))?;
                if key == "train_indices" {
                    run.train_indices = Some(v);
                } else {
                    run.test_indices = Some(v);
                }
            }
        }
        if let Some(m) = &run.model {
            if m.shape("blocks.0.attn.W_O").is_some_and(|s| s.len() == 2) {
                run.layout = Layout::Original;
                let shapes = OriginalShapes::infer(|n| m.shape(n), m.n_layers())?;
                if run.config.is_none() {
                    run.config = Some(shapes.config(None, None)?);
                }
                run.original = Some(shapes);
            }
        }
        Ok(run)
    }

    fn load_src(&self, src: &Src, name: &str) -> Result<Tensor> {
        match (&self.container, src) {
            (Container::Torch(f), Src::Torch(r)) => f.tensor(r, name),
            (Container::Safetensors(f), Src::Safetensors(n)) => f.tensor(n),
            _ => unreachable!("sources always come from their own container"),
        }
    }

    fn load_sd(&self, r: &StateDictRef) -> Result<StateDict> {
        let mut sd = StateDict::new();
        for (name, src, ..) in &r.entries {
            sd.insert(name.clone(), self.load_src(src, name)?);
        }
        match &self.original {
            Some(shapes) => original::to_transformer_lens(&sd, shapes),
            None => Ok(sd),
        }
    }

    fn with_path<T>(&self, r: Result<T>) -> Result<T> {
        match &self.path {
            Some(p) => r.with_path(p),
            None => r,
        }
    }

    /// Format name as `inspect` prints it.
    pub fn format_name(&self) -> &'static str {
        self.format.name()
    }

    /// The final model, read now, in TL layout.
    pub fn model(&self) -> Result<StateDict> {
        let r = self
            .model
            .as_ref()
            .ok_or_else(|| Error::missing("run", "model"));
        self.with_path(r.and_then(|r| self.load_sd(r)))
    }

    /// Whether the file holds a final model.
    pub fn has_model(&self) -> bool {
        self.model.is_some()
    }

    /// The stored (unconverted) layout of the final model: name, shape, dtype.
    pub fn model_entries(&self) -> Option<&StateDictRef> {
        self.model.as_ref()
    }

    /// Number of checkpoints.
    pub fn n_checkpoints(&self) -> usize {
        self.checkpoints.len()
    }

    /// Checkpoint `i`, read now, in TL layout.
    pub fn checkpoint(&self, i: usize) -> Result<StateDict> {
        let r = self.checkpoints.get(i).ok_or_else(|| {
            Error::invalid(
                "checkpoints",
                format!(
                    "index {i} out of range ({} checkpoints)",
                    self.checkpoints.len()
                ),
            )
        });
        self.with_path(r.and_then(|r| self.load_sd(r)))
    }

    /// Index of the checkpoint saved at `epoch`.
    pub fn checkpoint_index(&self, epoch: i64) -> Result<usize> {
        self.checkpoint_epochs
            .iter()
            .position(|&e| e == epoch)
            .ok_or_else(|| {
                Error::invalid(
                    "checkpoint_epochs",
                    format!("no checkpoint at epoch {epoch}"),
                )
            })
    }

    /// Bytes that reading every state dict of the run (model, checkpoints, optimizer) would
    /// allocate; a file that references one storage from many tensors (one checkpoint repeated
    /// 100,000 times) costs each reference.
    pub fn load_bytes(&self) -> u64 {
        let sd = |r: &StateDictRef| -> u64 {
            r.entries
                .iter()
                .map(|(_, _, shape, dtype)| {
                    shape
                        .iter()
                        .fold(dtype.size() as u64, |a, &d| a.saturating_mul(d as u64))
                })
                .fold(0u64, u64::saturating_add)
        };
        let mut total = self.model.as_ref().map_or(0, sd);
        for c in &self.checkpoints {
            total = total.saturating_add(sd(c));
        }
        if let Some((_, m, v, _, ema)) = &self.optimizer {
            total = total
                .saturating_add(sd(m))
                .saturating_add(sd(v))
                .saturating_add(sd(ema));
        }
        total
    }

    /// Read everything. Refused up front ([`Error::Limit`]) when that would allocate more
    /// than the file stores plus the memory budget ([`crate::io::memory_budget`]).
    pub fn load(&self) -> Result<TrainingRun> {
        let stored = match &self.container {
            Container::Torch(f) => f.stored_bytes(),
            Container::Safetensors(f) => f.stored_bytes(),
        };
        let allowed = stored.saturating_add(crate::io::memory_budget());
        let need = self.load_bytes();
        if need > allowed {
            return self.with_path(Err(Error::limit(
                "bytes to read every state dict (tensors referencing the same storage count \
                 each time; raise the budget with --memory-budget)",
                allowed,
                need,
            )
            .at("model and checkpoints")));
        }
        let model = if self.model.is_some() {
            self.model()?
        } else {
            // A run that only has checkpoints: the last one is the model.
            self.checkpoint(self.checkpoints.len() - 1)?
        };
        // Checkpoints are independent: read them on all cores.
        let checkpoints = (0..self.checkpoints.len())
            .into_par_iter()
            .map(|i| self.checkpoint(i))
            .collect::<Result<Vec<_>>>()?;
        Ok(TrainingRun {
            config: self.config.clone(),
            model,
            checkpoints,
            checkpoint_epochs: self.checkpoint_epochs.clone(),
            train_losses: self.train_losses.clone(),
            test_losses: self.test_losses.clone(),
            train_accuracies: self.train_accuracies.clone(),
            test_accuracies: self.test_accuracies.clone(),
            train_indices: self.train_indices.clone(),
            test_indices: self.test_indices.clone(),
            optimizer: match &self.optimizer {
                Some((step, m, v, settings, ema)) => Some(OptimizerState {
                    step: *step,
                    exp_avg: self.load_sd(m)?,
                    exp_avg_sq: self.load_sd(v)?,
                    settings: settings.clone(),
                    grokfast_ema: self.load_sd(ema)?,
                }),
                None => None,
            },
        })
    }

    /// The 2022 `Config` dict this run was trained with (2022-code runs), if the file has one.
    pub fn original_config(&self) -> Option<&serde_json::Value> {
        self.config
            .as_ref()
            .and_then(|c| c.extra.get("original_config"))
    }

    /// Whether the run was written by the 2022 code (its model is in the 2022 layout).
    pub fn is_2022(&self) -> bool {
        self.layout == Layout::Original
    }

    /// The modulus p of a modular-arithmetic run, after checking that the model is one: inputs
    /// `[a, b, =]` (n_ctx 3, `=` = token p = d_vocab − 1), p or p + 1 outputs, and (for 2022
    /// runs) a config whose `fn_name` is a modular operation and whose `p` agrees.
    pub fn modular_p(&self) -> Result<usize> {
        let cfg = self.config.as_ref().ok_or_else(|| {
            Error::NotModularArithmetic("the file has no config and no model to infer one".into())
        })?;
        let why = |m: String| Err(Error::NotModularArithmetic(m));
        if let Some(mc) = cfg.extra.get("model_config") {
            return why(format!(
                "a 2022-code model of another task (model_config {mc}); `inspect` and `convert` read it"
            ));
        }
        let p = cfg.d_vocab().saturating_sub(1);
        if cfg.n_ctx() != 3 {
            return why(format!(
                "n_ctx is {} but the task's inputs are [a, b, =] (n_ctx 3)",
                cfg.n_ctx()
            ));
        }
        if p < 2 || (cfg.d_vocab_out() != p && cfg.d_vocab_out() != p + 1) {
            return why(format!(
                "d_vocab {} and d_vocab_out {}: the task needs d_vocab = p + 1 and p or p + 1 outputs",
                cfg.d_vocab(),
                cfg.d_vocab_out()
            ));
        }
        if let Some(oc) = self.original_config() {
            if let Some(cp) = oc.get("p").and_then(serde_json::Value::as_u64) {
                if cp as usize != p {
                    return why(format!(
                        "config p = {cp} but the model's vocabulary gives p = {p}"
                    ));
                }
            }
        }
        self.operation()?;
        Ok(p)
    }

    /// The run's operation: the 2022 config's `fn_name` (the 2022 `Config` default `add` when
    /// the run has no config), else a tlens/TL run's `operation` config field, else addition
    /// (the TL demo's task).
    pub fn operation(&self) -> Result<Operation> {
        let cfg = self.config.as_ref();
        let name = match (
            self.original_config(),
            cfg.and_then(|c| c.extra.get("operation")),
        ) {
            (Some(oc), _) => oc.get("fn_name").and_then(serde_json::Value::as_str),
            (None, Some(op)) => op.as_str(),
            (None, None) => None,
        };
        match name {
            None => Ok(Operation::Add),
            Some(n) => Operation::from_2022_name(n).ok_or_else(|| {
                Error::NotModularArithmetic(format!(
                    "fn_name '{n}' is not one of the 2022 code's modular operations (add, subtract, x2xyy2, rand)"
                ))
            }),
        }
    }

    /// The seed of a tlens `rand` run's table (`rand_seed` in its config), if recorded.
    pub fn rand_seed(&self) -> Option<u64> {
        self.config
            .as_ref()
            .and_then(|c| c.extra.get("rand_seed"))
            .and_then(serde_json::Value::as_u64)
    }

    /// The run's train/test split as indices into the a-major dataset of p² inputs, and the
    /// rule that gave it ([`SplitChoice::Auto`]): the indices stored in the file; else, for a
    /// run of the 2022 code, the split its `gen_train_test` made (`random.seed(seed);
    /// random.shuffle(pairs)`, with the run's `seed`/`frac_train` or the `Config` defaults 0 and
    /// 0.3); else the split cannot be known — [`Error::UnknownData`], never a guess. The other
    /// choices apply a rule the user names.
    pub fn split(&self, p: usize, choice: SplitChoice) -> Result<Split> {
        let n = p * p;
        let rule = match choice {
            SplitChoice::Demo => SplitRule::TorchRandperm {
                seed: 598,
                frac_train: 0.3,
            },
            SplitChoice::Original2022 => SplitRule::Python2022 {
                seed: 0,
                frac_train: 0.3,
                from_defaults: true,
            },
            SplitChoice::Auto => {
                if let (Some(tr), Some(te)) = (&self.train_indices, &self.test_indices) {
                    return Ok(Split {
                        train: tr.clone(),
                        test: te.clone(),
                        rule: SplitRule::Stored,
                    });
                }
                if !self.is_2022() {
                    return Err(Error::UnknownData(
                        "the file stores no train/test indices and is not a run of the 2022 \
                         code; name a rule with --split demo (torch.randperm, seed 598, 30%) \
                         or --split 2022 (random.shuffle, seed 0, 30%)"
                            .into(),
                    ));
                }
                let oc = self.original_config();
                let seed = oc.and_then(|o| o.get("seed"));
                let frac = oc.and_then(|o| o.get("frac_train"));
                SplitRule::Python2022 {
                    seed: match seed {
                        Some(s) => s.as_u64().ok_or_else(|| {
                            Error::invalid("config seed", format!("{s} is not a non-negative int"))
                        })?,
                        None => 0,
                    },
                    frac_train: match frac {
                        Some(f) => {
                            f.as_f64()
                                .filter(|f| (0.0..=1.0).contains(f))
                                .ok_or_else(|| {
                                    Error::invalid(
                                        "config frac_train",
                                        format!("{f} is not in [0, 1]"),
                                    )
                                })?
                        }
                        None => 0.3,
                    },
                    from_defaults: seed.is_none() || frac.is_none(),
                }
            }
        };
        let (train, test) = match rule {
            SplitRule::TorchRandperm { seed, frac_train } => {
                crate::task::demo_split(p, frac_train, seed)
            }
            SplitRule::Python2022 {
                seed, frac_train, ..
            } => crate::task::python_shuffle_split(p, frac_train, seed),
            SplitRule::Stored => unreachable!("returned above"),
        };
        debug_assert_eq!(train.len() + test.len(), n);
        Ok(Split { train, test, rule })
    }

    /// Epochs between two logged test losses: 1 when there is one per train loss, the
    /// `eval_every` a tlens run recorded, 10 for a 2022 run that logged every 10 epochs; `None`
    /// when the file does not say (test loss i is then not known to be at any epoch).
    pub fn test_every(&self) -> Option<usize> {
        let (n_train, n_test) = (self.train_losses.len(), self.test_losses.len());
        if n_test == 0 {
            return None;
        }
        if n_test == n_train {
            return Some(1);
        }
        if let Some((_, _, _, settings, _)) = &self.optimizer {
            if let Some(k) = settings
                .get("eval_every")
                .and_then(serde_json::Value::as_u64)
            {
                return (k > 0 && n_test == n_train.div_ceil(k as usize)).then_some(k as usize);
            }
        }
        (self.is_2022() && n_test == n_train.div_ceil(10)).then_some(10)
    }

    /// Whether the file carries optimizer state (a resumable tlens training run).
    pub fn has_optimizer_state(&self) -> bool {
        self.optimizer.is_some()
    }

    /// The training settings a `tlens train` run was made with (JSON of
    /// `tlens::train::TrainConfig`), read without loading any tensor.
    pub fn train_settings(&self) -> Option<&serde_json::Value> {
        self.optimizer
            .as_ref()
            .map(|(_, _, _, settings, _)| settings)
    }
}

/// Which kind of config a `config` entry holds.
#[derive(PartialEq, Eq)]
enum ConfigKind {
    /// A TL `HookedTransformerConfig` object, or a dict of its fields (`n_layers`, `d_model`, …).
    Tl,
    /// Any other dict: the 2022 code's `Config` (lr, p, fn_name, frac_train, seed, …) or
    /// another task's config.
    Other,
}

fn config_kind(c: &Value) -> ConfigKind {
    match c {
        Value::Object(_) => ConfigKind::Tl,
        Value::Dict(d) if d.get("n_layers").is_some() && d.get("d_model").is_some() => {
            ConfigKind::Tl
        }
        _ => ConfigKind::Other,
    }
}

/// Why a file's top-level object is not a run, in a user's words.
fn not_a_run(root: &Value) -> String {
    let is_run = |v: &Value| v.get("model").is_some_and(|m| m.as_dict().is_some());
    match root {
        Value::List(items) | Value::Tuple(items)
            if !items.is_empty() && items.iter().all(is_run) =>
        {
            format!("a list of {} training runs (a sweep)", items.len())
        }
        Value::List(items) | Value::Tuple(items)
            if !items.is_empty() && items.iter().all(|x| x.as_f64().is_some()) =>
        {
            format!("a list of {} numbers (losses?)", items.len())
        }
        Value::Tensor(t) => format!("a single tensor {:?} {}", t.shape, t.dtype()),
        Value::Object(o) if o.module == "__torch__" || o.module.starts_with("__torch__.") => {
            format!(
                "a TorchScript module ({}): tlens reads its weights (`inspect`, `convert`), never its code",
                o.class()
            )
        }
        Value::Object(o) if crate::io::tree::numpy_array(o).is_some() => "a numpy array".into(),
        other => format!("the top-level object is a {}", other.type_name()),
    }
}

/// What a torch optimizer state dict holds (`Optimizer.state_dict()`: per-parameter state
/// indexed in `model.parameters()` order, and the param groups' hyper-parameters).
fn torch_optimizer_summary(o: &Dict) -> Result<serde_json::Value> {
    let state = o.get("state").and_then(Value::as_dict);
    let n_params = state.map_or(0, |s| s.items.len());
    let step = state
        .and_then(|s| s.items.first())
        .and_then(|(_, v)| v.get("step"))
        .map(|s| match s {
            Value::Tensor(_) => serde_json::json!("tensor"),
            other => serde_json::json!(other.as_f64()),
        });
    let mut groups = Vec::new();
    if let Some(gs) = o.get("param_groups").and_then(Value::as_seq) {
        for g in gs {
            let mut m = serde_json::Map::new();
            if let Some(d) = g.as_dict() {
                for (k, v) in &d.items {
                    let (Some(k), false) = (k.as_str(), matches!(v, Value::Tensor(_))) else {
                        continue;
                    };
                    if let Ok(j) = crate::model::config::pickle_to_json(v, k) {
                        m.insert(k.to_string(), j);
                    }
                }
            }
            groups.push(serde_json::Value::Object(m));
        }
    }
    Ok(serde_json::json!({"n_params_with_state": n_params, "step": step, "param_groups": groups}))
}

/// The plain fields of an LR scheduler's state dict (`LambdaLR`: base_lrs, last_epoch, …).
fn scheduler_summary(d: &Dict) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in &d.items {
        if let (Some(k), Ok(j)) = (k.as_str(), crate::model::config::pickle_to_json(v, "")) {
            m.insert(k.to_string(), j);
        }
    }
    serde_json::Value::Object(m)
}

/// Names of run-level tensors in a tlens safetensors run.
const RUN_TENSORS: [&str; 7] = [
    "train_losses",
    "test_losses",
    "train_accuracies",
    "test_accuracies",
    "checkpoint_epochs",
    "train_indices",
    "test_indices",
];

fn seq<'a>(v: &'a Value, ctx: &str) -> Result<&'a [Value]> {
    v.as_seq()
        .ok_or_else(|| Error::type_err(ctx, "list", v.type_name()))
}

fn ints(v: &Value, ctx: &str) -> Result<Vec<i64>> {
    seq(v, ctx)?
        .iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_i64()
                .ok_or_else(|| Error::type_err(format!("{ctx}[{i}]"), "int", x.type_name()))
        })
        .collect()
}

fn floats_opt(v: Option<&Value>, key: &str) -> Result<Vec<f64>> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let ctx = ctx_key(key);
    seq(v, &ctx)?
        .iter()
        .enumerate()
        .map(|(i, x)| match x {
            // `loss.item()` gives floats; tolerate 0-d tensors only as an explicit error.
            Value::Float(_) | Value::Int(_) | Value::NumpyScalar { .. } => x
                .as_f64()
                .ok_or_else(|| Error::type_err(format!("{ctx}[{i}]"), "float", x.type_name())),
            other => Err(Error::type_err(
                format!("{ctx}[{i}]"),
                "float",
                other.type_name(),
            )),
        })
        .collect()
}

/// Remove and return the value under a string key.
fn take(d: &mut Dict, key: &str) -> Option<Value> {
    let i = d.items.iter().position(|(k, _)| k.as_str() == Some(key))?;
    Some(d.items.remove(i).1)
}

/// A state dict's tensor references, moved out of its pickled value.
fn sd_ref(v: Value, ctx: &str) -> Result<StateDictRef> {
    let Value::Dict(d) = v else {
        return Err(Error::type_err(ctx, "state dict", v.type_name()));
    };
    let mut out = StateDictRef::default();
    out.entries.reserve(d.items.len());
    for (k, x) in d.items {
        let Value::Str(name) = k else {
            return Err(Error::type_err(format!("{ctx} key"), "str", k.type_name()));
        };
        let Value::Tensor(r) = x else {
            return Err(Error::type_err(
                format!("{ctx}['{name}']"),
                "tensor",
                x.type_name(),
            ));
        };
        let (shape, dtype) = (r.shape.clone(), r.dtype());
        out.entries.push((name, Src::Torch(*r), shape, dtype));
    }
    Ok(out)
}

/// A list of state dicts (checkpoints).
fn sd_refs(v: Value, key: &str) -> Result<Vec<StateDictRef>> {
    let (Value::List(items) | Value::Tuple(items)) = v else {
        return Err(Error::type_err(ctx_key(key), "list", v.type_name()));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, x)| sd_ref(x, &format!("run['{key}'][{i}]")))
        .collect()
}

impl TrainingRun {
    /// A run of a single model (no checkpoints or losses).
    pub fn from_model(config: Option<HookedTransformerConfig>, model: StateDict) -> TrainingRun {
        TrainingRun {
            config,
            model,
            checkpoints: Vec::new(),
            checkpoint_epochs: Vec::new(),
            train_losses: Vec::new(),
            test_losses: Vec::new(),
            train_accuracies: Vec::new(),
            test_accuracies: Vec::new(),
            train_indices: None,
            test_indices: None,
            optimizer: None,
        }
    }

    /// The pickle tree of the TL demo file, registering tensors with `w`.
    pub fn to_pickle(&self, w: &mut TorchWriter, style: ConfigStyle) -> Value {
        let sd = |w: &mut TorchWriter, sd: &StateDict| {
            Value::Dict(Dict {
                ordered: true,
                items: sd
                    .iter()
                    .map(|(n, t)| (Value::Str(n.into()), w.add(t)))
                    .collect(),
                attrs: None,
            })
        };
        let mut items = vec![(Value::Str("model".into()), sd(w, &self.model))];
        if let Some(c) = &self.config {
            let class = match style {
                ConfigStyle::Tl2Object => Some(TL2_CONFIG_CLASS),
                ConfigStyle::Tl3Object => Some(TL3_CONFIG_CLASS),
                ConfigStyle::Dict => None,
            };
            items.push((Value::Str("config".into()), c.to_pickle(class)));
        }
        let ckpts = self.checkpoints.iter().map(|c| sd(w, c)).collect();
        items.push((Value::Str("checkpoints".into()), Value::List(ckpts)));
        let ints = |v: &[i64]| Value::List(v.iter().map(|&x| Value::Int(x)).collect());
        let floats = |v: &[f64]| Value::List(v.iter().map(|&x| Value::Float(x)).collect());
        items.push((
            Value::Str("checkpoint_epochs".into()),
            ints(&self.checkpoint_epochs),
        ));
        items.push((Value::Str("test_losses".into()), floats(&self.test_losses)));
        items.push((
            Value::Str("train_losses".into()),
            floats(&self.train_losses),
        ));
        for (key, v) in [
            ("train_accuracies", &self.train_accuracies),
            ("test_accuracies", &self.test_accuracies),
        ] {
            if !v.is_empty() {
                items.push((Value::Str(key.into()), floats(v)));
            }
        }
        for (key, idx) in [
            ("train_indices", &self.train_indices),
            ("test_indices", &self.test_indices),
        ] {
            if let Some(idx) = idx {
                let t = Tensor::I64(Array1::from(idx.clone()).into_dyn());
                items.push((Value::Str(key.into()), w.add(&t)));
            }
        }
        if let Some(o) = &self.optimizer {
            let opt = Dict {
                ordered: false,
                items: vec![
                    (Value::Str("step".into()), Value::Int(o.step)),
                    (Value::Str("exp_avg".into()), sd(w, &o.exp_avg)),
                    (Value::Str("exp_avg_sq".into()), sd(w, &o.exp_avg_sq)),
                    (
                        Value::Str("settings".into()),
                        crate::model::config::json_to_pickle(&o.settings),
                    ),
                ]
                .into_iter()
                .chain(
                    (!o.grokfast_ema.is_empty())
                        .then(|| (Value::Str("grokfast_ema".into()), sd(w, &o.grokfast_ema))),
                )
                .collect(),
                attrs: None,
            };
            items.push((Value::Str("optimizer".into()), Value::Dict(opt)));
        }
        Value::Dict(Dict {
            ordered: false,
            items,
            attrs: None,
        })
    }

    /// Write as a TL-demo `.pth` (atomically).
    pub fn save_pth(&self, path: impl AsRef<Path>, style: ConfigStyle) -> Result<()> {
        let path = path.as_ref();
        let mut w = TorchWriter::new(2);
        let root = self.to_pickle(&mut w, style);
        w.write(&root, path).with_path(path)
    }

    /// The bytes of the TL-demo `.pth`.
    pub fn to_pth_bytes(&self, style: ConfigStyle, protocol: u8) -> Result<Vec<u8>> {
        let mut w = TorchWriter::new(protocol);
        let root = self.to_pickle(&mut w, style);
        w.to_bytes(&root)
    }

    fn safetensors_parts(&self) -> (Vec<(String, Tensor)>, HashMap<String, String>) {
        let mut tensors: Vec<(String, Tensor)> = self
            .model
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        for (i, c) in self.checkpoints.iter().enumerate() {
            tensors.extend(
                c.iter()
                    .map(|(n, t)| (format!("checkpoints.{i}.{n}"), t.clone())),
            );
        }
        let vec_f64 = |v: &[f64]| Tensor::F64(Array1::from(v.to_vec()).into_dyn());
        let vec_i64 = |v: &[i64]| Tensor::I64(Array1::from(v.to_vec()).into_dyn());
        // Run-level tensors only where the run has them: a bare state dict converts to a
        // plain safetensors state dict.
        if !self.train_losses.is_empty() {
            tensors.push(("train_losses".into(), vec_f64(&self.train_losses)));
        }
        if !self.test_losses.is_empty() {
            tensors.push(("test_losses".into(), vec_f64(&self.test_losses)));
        }
        if !self.checkpoint_epochs.is_empty() {
            tensors.push(("checkpoint_epochs".into(), vec_i64(&self.checkpoint_epochs)));
        }
        for (key, v) in [
            ("train_accuracies", &self.train_accuracies),
            ("test_accuracies", &self.test_accuracies),
        ] {
            if !v.is_empty() {
                tensors.push((key.into(), vec_f64(v)));
            }
        }
        if let Some(v) = &self.train_indices {
            tensors.push(("train_indices".into(), vec_i64(v)));
        }
        if let Some(v) = &self.test_indices {
            tensors.push(("test_indices".into(), vec_i64(v)));
        }
        let mut meta = HashMap::new();
        meta.insert("format".into(), "tlens-run".into());
        if let Some(o) = &self.optimizer {
            for (prefix, sd) in [
                ("optimizer.exp_avg_sq.", &o.exp_avg_sq),
                ("optimizer.exp_avg.", &o.exp_avg),
                ("optimizer.grokfast_ema.", &o.grokfast_ema),
            ] {
                tensors.extend(sd.iter().map(|(n, t)| (format!("{prefix}{n}"), t.clone())));
            }
            meta.insert("optimizer_step".into(), o.step.to_string());
            meta.insert("optimizer_settings".into(), o.settings.to_string());
        }
        if let Some(c) = &self.config {
            meta.insert("config".into(), c.to_json().to_string());
        }
        (tensors, meta)
    }

    /// The bytes of a tlens safetensors run (layout in [`crate::io::safetensors`]).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let (tensors, meta) = self.safetensors_parts();
        let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        crate::io::safetensors::to_bytes(&refs, meta)
    }

    /// Write as a tlens safetensors run (atomically).
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors_bytes()?;
        crate::io::write_atomic(path, &bytes)
    }
}
