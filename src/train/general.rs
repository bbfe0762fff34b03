//! The general training path: the hooked forward pass on [`Autodiff`] over the CPU backend,
//! for every architecture the model supports, any loss kind, frozen or trainable biases.
//! The tabulated path ([`super::grad`]) is the fast special case of it; [`TrainPath`] picks.

use super::autodiff::Autodiff;
use crate::backend::{Activation, Cpu, LossKind};
use crate::error::{Error, Result};
use crate::model::{HookedTransformer, HookedTransformerConfig, StateDict};
use ndarray::Array2;

/// Which gradient computation a run uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainPath {
    /// The tabulated path where it applies (1 layer, attention + ReLU MLP, no LayerNorm,
    /// cross-entropy, frozen biases), the general one otherwise.
    #[default]
    Auto,
    /// The tabulated 1-layer path (an error where it does not apply).
    Tabulated,
    /// Reverse-mode differentiation of the hooked forward pass.
    General,
}

impl TrainPath {
    /// `auto`, `tabulated` or `general`.
    pub fn parse(s: &str) -> Result<TrainPath> {
        Ok(match s.trim() {
            "auto" => TrainPath::Auto,
            "tabulated" | "fast" => TrainPath::Tabulated,
            "general" => TrainPath::General,
            other => {
                return Err(Error::invalid(
                    "--path",
                    format!("'{other}' is not one of auto, tabulated, general"),
                ))
            }
        })
    }
}

/// Check that the general path can train `cfg`: everything the forward pass supports, except
/// activations without a derivative here (SoLU), named in the error.
pub fn check_general(cfg: &HookedTransformerConfig) -> Result<()> {
    crate::model::hooked::check_supported(cfg)?;
    if !cfg.attn_only {
        if let Some(Activation::Solu) = cfg.act_fn.as_deref().and_then(Activation::from_name) {
            return Err(Error::Unsupported(format!(
                "training act_fn {} (supported: relu, gelu, gelu_new, gelu_fast, \
                 gelu_pytorch_tanh, silu)",
                cfg.act_fn.as_deref().unwrap_or("")
            )));
        }
    }
    if cfg.d_vocab_out() == 0 {
        return Err(Error::invalid("config", "d_vocab_out is 0"));
    }
    Ok(())
}

/// Whether a parameter trains: every parameter but the biases (names containing `b_`, as the
/// demo freezes them) unless `train_biases`.
pub fn trainable(name: &str, train_biases: bool) -> bool {
    train_biases || !name.contains("b_")
}

/// The mean loss at the last position and the gradients of the trainable parameters (by TL
/// name), by differentiating the hooked forward pass over `tokens` [N, P] with `labels` `[N]`.
pub fn loss_and_grads(
    cfg: &HookedTransformerConfig,
    params: &StateDict,
    tokens: &Array2<u32>,
    labels: &[u32],
    kind: LossKind,
    train_biases: bool,
) -> Result<(f64, StateDict)> {
    check_general(cfg)?;
    crate::backend::cpu::tune_allocator();
    let backend = Autodiff::new(Cpu, move |n: &str| trainable(n, train_biases));
    let model = HookedTransformer::with_backend(cfg.clone(), params.clone(), backend)?;
    let logits = model.forward_last(tokens)?;
    model.backend().backward(&logits, labels, kind)
}
