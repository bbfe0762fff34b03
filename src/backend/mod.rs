//! The numeric backend a model runs on.
//!
//! [`crate::model::HookedTransformer`] is written once against this trait; each backend (the
//! CPU/ndarray one here, CUDA later) implements the small set of operations a TransformerLens
//! forward pass needs. Operations are named by what they compute in TL's terms and take TL's
//! shapes, so a backend can fuse or reorder internally while the model code stays readable.
//! Hooks see activations on the host: a backend whose tensors live elsewhere copies them out
//! and back only at hook points that are actually used.

pub mod cpu;
pub mod cpu_backward;
pub mod cuda;
pub mod device;
pub mod gemm;
pub mod simd;

use crate::error::Result;
use ndarray::{Array2, ArrayD};
use std::sync::Arc;

pub use cpu::Cpu;
pub use device::{Device, DeviceArg};

/// Element-wise activation functions of TL's `SUPPORTED_ACTIVATIONS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// max(x, 0).
    Relu,
    /// GELU with the exact erf.
    Gelu,
    /// GELU, tanh approximation (GPT-2's `gelu_new`).
    GeluNew,
    /// GELU, TL's `gelu_fast` approximation.
    GeluFast,
    /// GELU as `torch.nn.functional.gelu(approximate='tanh')`.
    GeluPytorchTanh,
    /// x·sigmoid(x).
    Silu,
    /// `x * softmax(x)` over the last axis (`solu`, and `solu_ln` before its LayerNorm).
    Solu,
}

impl Activation {
    /// TL's name → activation (`xielu` and unknown names are not supported).
    pub fn from_name(name: &str) -> Option<Activation> {
        Some(match name {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_new" => Activation::GeluNew,
            "gelu_fast" => Activation::GeluFast,
            "gelu_pytorch_tanh" => Activation::GeluPytorchTanh,
            "silu" => Activation::Silu,
            "solu" | "solu_ln" => Activation::Solu,
            _ => return None,
        })
    }
}

/// Operations of a TransformerLens forward pass. Shapes: B batch, P positions, H heads,
/// E d_head, D d_model (or any last-axis width for element-wise ops).
pub trait Backend: Sync {
    /// A tensor on this backend.
    type Tensor: Clone + Send + Sync;

    /// A host array onto the backend (a copy).
    fn upload(&self, a: &ArrayD<f32>) -> Result<Self::Tensor>;
    /// A host array onto the backend; a backend whose tensors are host arrays keeps it as it is.
    fn upload_shared(&self, a: Arc<ArrayD<f32>>) -> Result<Self::Tensor>;
    /// The tensor on the host: shared, not copied, where the backend's tensors are host arrays
    /// (the CPU's activation cache keeps the forward pass's own buffers).
    fn download_shared(&self, t: &Self::Tensor) -> Result<Arc<ArrayD<f32>>>;
    /// The tensor on the host as an array the caller owns.
    fn download(&self, t: Self::Tensor) -> Result<ArrayD<f32>>;
    /// The shape of a tensor.
    fn shape(&self, t: &Self::Tensor) -> Vec<usize>;
    /// A model parameter onto the backend (a copy), by its TL name. The plain backends upload
    /// it as any array; the differentiating wrapper ([`crate::train::autodiff::Autodiff`])
    /// records it as a leaf whose gradient it returns under that name.
    fn parameter(&self, name: &str, a: &ArrayD<f32>) -> Result<Self::Tensor> {
        let _ = name;
        self.upload(a)
    }

    /// `W_E[tokens]`: tokens [B, P] → [B, P, D].
    fn embed(&self, w_e: &Self::Tensor, tokens: &Array2<u32>) -> Result<Self::Tensor>;
    /// `W_pos[0..P]` repeated over the batch → [B, P, D].
    fn pos_embed(&self, w_pos: &Self::Tensor, batch: usize, pos: usize) -> Result<Self::Tensor>;
    /// `out[b, p, …] = table[index[b, p], p, …]`: per-(row, position) table entries gathered
    /// for a batch, table [U, P, …], index [B, P] → [B, P, …].
    fn take_rows(&self, table: &Self::Tensor, index: &Array2<u32>) -> Result<Self::Tensor>;
    /// `a + b` (same shapes), reusing `a`'s storage when nothing else holds it.
    fn add(&self, a: Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x @ w + b` over the last axis (addmm): x [..., K], w [K, N], b `[N]` → [..., N].
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// Per-head projection `x·W[h] + b[h]`: x [B, P, D] (shared) or [B, P, H, D] (per-head
    /// inputs), w [H, D, E], b [H, E] → [B, P, H, E].
    fn head_linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// The last position of x: [B, P, …] → [B, 1, …] (the final block computes only what the
    /// loss at the last position needs, when nothing else asks for the other positions).
    fn last_position(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Attention scores `q·k / scale` (a true division), with key positions after the query
    /// set to `causal_ignore` when given: q [B, Pq, H, E], k [B, Pk, H, E] → [B, H, Pq, Pk].
    /// With Pq < Pk the queries are the last Pq positions (query i sits at Pk − Pq + i).
    fn attn_scores(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        scale: f32,
        causal_ignore: Option<f32>,
    ) -> Result<Self::Tensor>;
    /// Softmax over the last axis in f32, NaN → 0 (fully masked rows).
    fn softmax(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `z[b,q,h,:] = Σ_k pattern[b,h,q,k] v[b,k,h,:]`: pattern [B, H, Pq, Pk], v [B, Pk, H, E].
    fn attn_z(&self, pattern: &Self::Tensor, v: &Self::Tensor) -> Result<Self::Tensor>;
    /// Per-head outputs `z[..,h,:] @ W_O[h]`: z [B, P, H, E], w_o [H, E, D] → [B, P, H, D].
    fn attn_result(&self, z: &Self::Tensor, w_o: &Self::Tensor) -> Result<Self::Tensor>;
    /// The attention output `z.reshape(B, P, H·E) @ W_O + b_O` (b_O added once): z [B, P, H, E],
    /// w_o_flat [H·E, D] → [B, P, D].
    fn attn_out(
        &self,
        z: &Self::Tensor,
        w_o_flat: &Self::Tensor,
        b_o: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// Σ over the head axis plus a bias: [B, P, H, D] → [B, P, D].
    fn sum_heads(&self, x: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Repeat [B, P, D] along a new head axis → [B, P, H, D].
    fn repeat_heads(&self, x: &Self::Tensor, n_heads: usize) -> Result<Self::Tensor>;
    /// The activation function, element-wise (row-wise for SoLU), reusing `x`'s storage when
    /// nothing else holds it.
    fn activation(&self, x: Self::Tensor, act: Activation) -> Result<Self::Tensor>;
    /// `(x − mean) / sqrt(mean((x − mean)²) + eps)` over the last axis (no centring when
    /// `center` is false, i.e. RMS): returns (normalized, scale [..., 1]).
    fn normalize(
        &self,
        x: &Self::Tensor,
        center: bool,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// `(x − mean) / scale` with a given scale [..., 1] (after a hook replaced TL's hook_scale).
    fn normalize_with(
        &self,
        x: &Self::Tensor,
        center: bool,
        scale: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// `x * w (+ b)` broadcast over the last axis.
    fn affine(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
}

/// The loss at the last position, in f64 as the demo computes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Log-softmax cross-entropy (the demo's).
    #[default]
    CrossEntropy,
    /// StableMax cross-entropy (Prieto et al. 2025): s(x) = x + 1 for x ≥ 0, 1/(1 − x) below,
    /// probabilities s(xᵢ)/Σ s(xⱼ).
    StableMax,
}

/// The backward operation of every [`Backend`] operation: given the operation's inputs (or
/// outputs, where the derivative is cheaper from them) and the gradient `g` of its output,
/// the gradients of its inputs. Written per backend, like the forward operations, so the
/// reverse-mode wrapper [`crate::train::autodiff::Autodiff`] differentiates the hooked forward
/// pass on any backend that implements this trait. Shapes as in the forward operations.
pub trait Differentiable: Backend {
    /// Gradient of `W_E` [V, D] from the embedding's output gradient [B, P, D] (scatter-add).
    fn embed_backward(
        &self,
        g: &Self::Tensor,
        tokens: &Array2<u32>,
        d_vocab: usize,
    ) -> Result<Self::Tensor>;
    /// Gradient of `W_pos` [n_ctx, D]: the output gradient summed over the batch (rows past
    /// the batch's positions are zero).
    fn pos_embed_backward(&self, g: &Self::Tensor, n_ctx: usize) -> Result<Self::Tensor>;
    /// Gradient of a `take_rows` table [U, P, …] (scatter-add over the index).
    fn take_rows_backward(
        &self,
        g: &Self::Tensor,
        index: &Array2<u32>,
        rows: usize,
    ) -> Result<Self::Tensor>;
    /// `last_position`: g [B, 1, …] placed at the last of `pos` positions, zeros elsewhere.
    fn last_position_backward(&self, g: &Self::Tensor, pos: usize) -> Result<Self::Tensor>;
    /// Σ of `g` over every axis but the last `keep` (a bias's gradient).
    fn sum_leading(&self, g: &Self::Tensor, keep: usize) -> Result<Self::Tensor>;
    /// `linear`: (dx = g·wᵀ, dw = xᵀ·g) over the rows of x [.., K] and g [.., N].
    fn linear_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// `head_linear`: (dx with x's shape — summed over heads for a shared [B, P, D] input —,
    /// dW [H, D, E]).
    fn head_linear_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// `attn_scores`: (dq, dk); masked positions get no gradient.
    fn attn_scores_backward(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        g: &Self::Tensor,
        scale: f32,
        causal: bool,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// `softmax` from its output y: `y·(g − Σ g·y)` per row.
    fn softmax_backward(&self, y: &Self::Tensor, g: &Self::Tensor) -> Result<Self::Tensor>;
    /// `attn_z`: (d_pattern, dv).
    fn attn_z_backward(
        &self,
        pattern: &Self::Tensor,
        v: &Self::Tensor,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// `attn_result`: (dz, dW_O [H, E, D]).
    fn attn_result_backward(
        &self,
        z: &Self::Tensor,
        w_o: &Self::Tensor,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// `attn_out`: (dz [B, P, H, E], dW_O as [H·E, D]); b_O's gradient is `sum_leading`.
    fn attn_out_backward(
        &self,
        z: &Self::Tensor,
        w_o_flat: &Self::Tensor,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// `repeat_heads`: Σ over the head axis, [B, P, H, D] → [B, P, D].
    fn repeat_heads_backward(&self, g: &Self::Tensor) -> Result<Self::Tensor>;
    /// The activation function's derivative at its input x, times g (relu, gelu, gelu_new,
    /// gelu_fast, gelu_pytorch_tanh, silu; SoLU is refused).
    fn activation_backward(
        &self,
        x: &Self::Tensor,
        act: Activation,
        g: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// `normalize` from its outputs (y, scale): `(g − mean g − y·mean(g·y)) / scale`
    /// (no `mean g` term without centring).
    fn normalize_backward(
        &self,
        y: &Self::Tensor,
        scale: &Self::Tensor,
        g: &Self::Tensor,
        center: bool,
    ) -> Result<Self::Tensor>;
    /// `normalize_with` (the scale a hook set is a constant): `(g − mean g) / scale`.
    fn normalize_with_backward(
        &self,
        scale: &Self::Tensor,
        g: &Self::Tensor,
        center: bool,
    ) -> Result<Self::Tensor>;
    /// `affine`: (dx = g·w, dw = Σ g·x over the leading axes).
    fn affine_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        g: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// The mean loss over the last position of logits [B, P, V] (f64) and its gradient
    /// (zero at the other positions), cast to f32 as torch's `.to(float64)` node does.
    fn last_position_loss(
        &self,
        logits: &Self::Tensor,
        labels: &[u32],
        kind: LossKind,
    ) -> Result<(f64, Self::Tensor)>;
}
