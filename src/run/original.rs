//! The 2022 original (`full_run_data.pth` of Nanda's grokking code) and its conversion to the
//! TransformerLens layout.
//!
//! The original model stores some weights transposed relative to TL and has no attention biases
//! or unembed bias. Conversion (docs/reference.md §7):
//!
//! | original                        | TransformerLens                     |
//! |---------------------------------|-------------------------------------|
//! | `embed.W_E` [D, V]              | transpose → [V, D]                  |
//! | `pos_embed.W_pos` [n_ctx, D]    | unchanged                           |
//! | `attn.W_Q/K/V` [H, dh, D]       | transpose last two → [H, D, dh]     |
//! | `attn.W_O` [D, H·dh]            | "D (H dh) → H dh D"                 |
//! | `mlp.W_in` [dm, D]              | transpose → [D, dm]                 |
//! | `mlp.W_out` [D, dm]             | transpose → [dm, D]                 |
//! | `mlp.b_in`, `mlp.b_out`         | unchanged                           |
//! | `unembed.W_U` [D, V]            | unchanged (unembeds to all V = p+1 tokens, so d_vocab_out = V) |
//! | `attn.mask` (float tril)        | dropped; TL's bool `mask` (n_ctx, n_ctx) and `IGNORE` = −1e10 added |
//! | —                               | `b_Q/b_K/b_V` [H, dh], `b_O` `[D]`, `b_U` `[V]`: zeros |
//!
//! The original masks with `−1e10` and divides by √d_head *after* masking; TL divides first and
//! masks with IGNORE. Softmax gives the same pattern (masked entries are exactly 0 either way).

use crate::error::{Error, Result};
use crate::model::{HookedTransformerConfig, StateDict};
use crate::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};
use serde_json::Value as Json;

/// Shapes the conversion needs, read from tensor metadata (no data).
pub struct OriginalShapes {
    /// Number of blocks.
    pub n_layers: usize,
    /// Residual width.
    pub d_model: usize,
    /// Input vocabulary (p + 1).
    pub d_vocab: usize,
    /// Context length.
    pub n_ctx: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Head width.
    pub d_head: usize,
    /// MLP width (None: attention-only).
    pub d_mlp: Option<usize>,
    /// Output vocabulary (the 2022 unembedding covers all p + 1 tokens).
    pub d_vocab_out: usize,
}

impl OriginalShapes {
    /// Infer from name → shape pairs of an original-layout state dict.
    pub fn infer<'a>(
        shapes: impl Fn(&str) -> Option<&'a [usize]>,
        n_layers: usize,
    ) -> Result<Self> {
        let get = |n: &str, nd: usize| -> Result<&'a [usize]> {
            let s = shapes(n).ok_or_else(|| Error::missing("original-layout state dict", n))?;
            if s.len() != nd {
                return Err(Error::invalid(
                    n,
                    format!("expected {nd} dims, found shape {s:?}"),
                ));
            }
            Ok(s)
        };
        let we = get("embed.W_E", 2)?;
        let wpos = get("pos_embed.W_pos", 2)?;
        let wq = get("blocks.0.attn.W_Q", 3)?;
        let wu = get("unembed.W_U", 2)?;
        let d_mlp = match shapes("blocks.0.mlp.W_in") {
            Some(s) if s.len() == 2 => Some(s[0]),
            Some(s) => {
                return Err(Error::invalid(
                    "blocks.0.mlp.W_in",
                    format!("expected 2 dims, found {s:?}"),
                ))
            }
            None => None,
        };
        Ok(OriginalShapes {
            n_layers,
            d_model: we[0],
            d_vocab: we[1],
            n_ctx: wpos[0],
            n_heads: wq[0],
            d_head: wq[1],
            d_mlp,
            d_vocab_out: wu[1],
        })
    }

    /// The TL config equivalent to the original model, with the 2022 config dict's values
    /// (`seed`, …) where they apply; the whole dict is kept under `extra["original_config"]`
    /// (and an attention-only model's `model_config` under `extra["model_config"]`).
    pub fn config(
        &self,
        original: Option<&Json>,
        model_config: Option<&Json>,
    ) -> Result<HookedTransformerConfig> {
        let mut j = serde_json::json!({
            "n_layers": self.n_layers, "d_model": self.d_model, "n_ctx": self.n_ctx,
            "d_head": self.d_head, "n_heads": self.n_heads, "d_vocab": self.d_vocab,
            "d_vocab_out": self.d_vocab_out, "act_fn": "relu", "normalization_type": null,
            "attn_only": self.d_mlp.is_none(), "model_name": "grokking-2022-original",
        });
        if let Some(d) = self.d_mlp {
            j["d_mlp"] = d.into();
        }
        if let Some(orig) = original {
            if let Some(seed) = orig.get("seed").and_then(Json::as_i64) {
                j["seed"] = seed.into();
            }
            j["original_config"] = orig.clone();
        }
        if let Some(mc) = model_config {
            if let Some(seed) = mc.get("seed").and_then(Json::as_i64) {
                j["seed"] = seed.into();
            }
            j["model_config"] = mc.clone();
        }
        HookedTransformerConfig::from_json(j)
    }
}

fn f32_param<'a>(sd: &'a StateDict, name: &str, shape: &[usize]) -> Result<&'a ArrayD<f32>> {
    sd.array::<f32>(name, Some(shape))
}

fn owned(a: ndarray::ArrayViewD<f32>) -> Tensor {
    Tensor::from(a.as_standard_layout().into_owned())
}

/// Convert an original-layout state dict to TL layout (see the module table).
pub fn to_transformer_lens(sd: &StateDict, s: &OriginalShapes) -> Result<StateDict> {
    let (d, v, h, dh) = (s.d_model, s.d_vocab, s.n_heads, s.d_head);
    let mut out = StateDict::new();
    let we = f32_param(sd, "embed.W_E", &[d, v])?;
    out.insert("embed.W_E", owned(we.t().into_dyn()));
    out.insert(
        "pos_embed.W_pos",
        Tensor::F32(f32_param(sd, "pos_embed.W_pos", &[s.n_ctx, d])?.clone()),
    );
    let zeros = |shape: &[usize]| Tensor::F32(ArrayD::zeros(IxDyn(shape)));
    for l in 0..s.n_layers {
        let p = format!("blocks.{l}");
        let qkv = |n: &str| -> Result<Tensor> {
            let w = f32_param(sd, &format!("{p}.attn.{n}"), &[h, dh, d])?;
            Ok(owned(w.view().permuted_axes(IxDyn(&[0, 2, 1]))))
        };
        out.insert(format!("{p}.attn.W_Q"), qkv("W_Q")?);
        let wo = f32_param(sd, &format!("{p}.attn.W_O"), &[d, h * dh])?;
        let wo = wo
            .view()
            .into_shape_with_order(IxDyn(&[d, h, dh]))
            .map_err(|e| Error::invalid(format!("{p}.attn.W_O"), e.to_string()))?;
        out.insert(
            format!("{p}.attn.W_O"),
            owned(wo.permuted_axes(IxDyn(&[1, 2, 0]))),
        );
        out.insert(format!("{p}.attn.b_Q"), zeros(&[h, dh]));
        out.insert(format!("{p}.attn.b_O"), zeros(&[d]));
        out.insert(format!("{p}.attn.W_K"), qkv("W_K")?);
        out.insert(format!("{p}.attn.W_V"), qkv("W_V")?);
        out.insert(format!("{p}.attn.b_K"), zeros(&[h, dh]));
        out.insert(format!("{p}.attn.b_V"), zeros(&[h, dh]));
        let mut mask = ArrayD::from_elem(IxDyn(&[s.n_ctx, s.n_ctx]), false);
        for (idx, m) in mask.indexed_iter_mut() {
            *m = idx[1] <= idx[0];
        }
        out.insert(format!("{p}.attn.mask"), Tensor::Bool(mask));
        out.insert(
            format!("{p}.attn.IGNORE"),
            Tensor::F32(ArrayD::from_elem(IxDyn(&[]), -1e10)),
        );
        if let Some(dm) = s.d_mlp {
            let w_in = f32_param(sd, &format!("{p}.mlp.W_in"), &[dm, d])?;
            out.insert(format!("{p}.mlp.W_in"), owned(w_in.t().into_dyn()));
            out.insert(
                format!("{p}.mlp.b_in"),
                Tensor::F32(f32_param(sd, &format!("{p}.mlp.b_in"), &[dm])?.clone()),
            );
            let w_out = f32_param(sd, &format!("{p}.mlp.W_out"), &[d, dm])?;
            out.insert(format!("{p}.mlp.W_out"), owned(w_out.t().into_dyn()));
            out.insert(
                format!("{p}.mlp.b_out"),
                Tensor::F32(f32_param(sd, &format!("{p}.mlp.b_out"), &[d])?.clone()),
            );
        }
    }
    let wu = f32_param(sd, "unembed.W_U", &[d, s.d_vocab_out])?;
    out.insert("unembed.W_U", Tensor::F32(wu.clone()));
    out.insert("unembed.b_U", zeros(&[s.d_vocab_out]));
    Ok(out)
}
