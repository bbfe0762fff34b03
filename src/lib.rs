//! tlens: TransformerLens for Nanda-style grokking models, in Rust.
//!
//! Data flows one way: file ([`io`]) → typed run ([`run`]) → model ([`model`]) → activations →
//! analyses → report. This crate's foundation reads real torch checkpoints (`.pth`, zip or
//! legacy) and safetensors into typed tensors **without executing anything**: the pickle reader
//! is a restricted VM that interprets a fixed list of torch/numpy globals by name and keeps
//! everything else as opaque data.
//!
//! Opening a run (a small TL-demo run shipped in `fixtures/`, p = 23):
//!
//! ```
//! let run = tlens::RunFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_small.pth"))?;
//! let cfg = run.config.as_ref().unwrap();
//! assert_eq!((cfg.n_layers, cfg.d_model, cfg.d_vocab), (1, 32, 24));
//! let model = run.model()?;                 // final weights, TL layout
//! let w_e = model.array::<f32>("embed.W_E", Some(&[24, 32]))?;
//! let first = run.checkpoint(0)?;           // checkpoints load one at a time
//! assert_eq!(run.checkpoint_epochs, [99, 199, 299]);
//! assert_eq!(first.get("embed.W_E").unwrap().shape(), w_e.shape());
//! # Ok::<(), tlens::Error>(())
//! ```

pub mod analysis;
pub mod backend;
pub mod cli;
pub mod error;
pub mod io;
pub mod model;
pub mod run;
pub mod task;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use model::{ActivationCache, Hook, HookedTransformer, HookedTransformerConfig, StateDict};
pub use run::{ConfigStyle, Layout, RunFile, TrainingRun};
pub use tensor::{DType, Tensor};
