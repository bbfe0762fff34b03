//! `HookedTransformerConfig`: every field TransformerLens 2.18 defines (plus the fields 3.9 adds),
//! with TL's defaults and the derived values of TL's `__post_init__`.
//!
//! A config reaches tlens three ways — the pickled TL object (under any TL module path), a plain
//! dict (the 2022 files, `weights_only` files) or JSON — and all three go through one path:
//! pickle value → JSON object → serde. Fields tlens does not know are kept in [`extra`] and
//! written back, never dropped.
//!
//! [`extra`]: HookedTransformerConfig::extra

use crate::error::{Error, Result};
use crate::io::pickle::Value;
use crate::tensor::DType;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// An int-or-float field (TL 3.x widened `rotary_base` to `Union[float, int]`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Num {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
}

impl Num {
    /// The value as f64.
    pub fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
}

macro_rules! defaults {
    ($($name:ident: $t:ty = $v:expr;)*) => {
        mod default {
            #[allow(unused_imports)]
            use super::*;
            $(pub fn $name() -> $t { $v })*
        }
    };
}

defaults! {
    model_name: String = "custom".into();
    minus_one: i64 = -1;
    minus_one_f: f64 = -1.0;
    eps: f64 = 1e-5;
    yes: bool = true;
    init_mode: String = "gpt2".into();
    normalization_type: Option<String> = Some("LN".into());
    one: i64 = 1;
    attention_dir: String = "causal".into();
    positional_embedding_type: String = "standard".into();
    dtype: String = "float32".into();
    rotary_base: Num = Num::Int(10000);
    ntk_low: f64 = 1.0;
    ntk_high: f64 = 4.0;
    ntk_factor: f64 = 8.0;
    ntk_ctx: i64 = 8192;
}

/// TransformerLens's `HookedTransformerConfig` (field names and defaults as in TL 2.18; fields
/// new in TL 3.x are `Option`s that are `None` when absent, so 2.x configs round-trip exactly).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookedTransformerConfig {
    /// Number of transformer blocks.
    pub n_layers: i64,
    /// Width of the residual stream.
    pub d_model: i64,
    /// Maximum context length.
    pub n_ctx: i64,
    /// Width of each attention head.
    pub d_head: i64,
    #[serde(default = "default::model_name")]
    /// TL's model name (`custom` for hand-made configs).
    pub model_name: String,
    #[serde(default = "default::minus_one")]
    /// Number of attention heads (TL: -1 → d_model / d_head).
    pub n_heads: i64,
    #[serde(default)]
    /// Width of the MLP (None for attention-only models; TL: 4·d_model).
    pub d_mlp: Option<i64>,
    /// None by default as in TL 2.18; a non-attn-only model without one gets "relu" (TL 3.x's
    /// default) where 2.18 would reject the config.
    #[serde(default)]
    pub act_fn: Option<String>,
    #[serde(default = "default::minus_one")]
    /// Input vocabulary size.
    pub d_vocab: i64,
    #[serde(default = "default::eps")]
    /// LayerNorm epsilon.
    pub eps: f64,
    #[serde(default)]
    /// Whether attention fires `hook_result` (per-head outputs).
    pub use_attn_result: bool,
    #[serde(default = "default::yes")]
    /// Whether scores are divided by `attn_scale`.
    pub use_attn_scale: bool,
    #[serde(default = "default::minus_one_f")]
    /// The divisor of attention scores (TL: sqrt(d_head)).
    pub attn_scale: f64,
    #[serde(default)]
    /// Whether Q, K, V get separate residual inputs (and hooks).
    pub use_split_qkv_input: bool,
    #[serde(default)]
    /// Whether the MLP input is hooked (`hook_mlp_in`).
    pub use_hook_mlp_in: bool,
    #[serde(default)]
    /// Whether attention's input is hooked (`hook_attn_in`).
    pub use_attn_in: bool,
    #[serde(default)]
    /// Whether Q and K are normalised (refused by tlens).
    pub use_qk_norm: bool,
    #[serde(default)]
    /// Local attention (refused by tlens).
    pub use_local_attn: bool,
    #[serde(default)]
    /// TL's grouped-query-attention option.
    pub ungroup_grouped_query_attention: bool,
    #[serde(default)]
    /// The Hugging Face architecture the config came from.
    pub original_architecture: Option<String>,
    #[serde(default)]
    /// Whether the weights came from a named checkpoint.
    pub from_checkpoint: bool,
    #[serde(default)]
    /// That checkpoint's index.
    pub checkpoint_index: Option<i64>,
    #[serde(default)]
    /// That checkpoint's label type.
    pub checkpoint_label_type: Option<String>,
    #[serde(default)]
    /// That checkpoint's value.
    pub checkpoint_value: Option<i64>,
    #[serde(default)]
    /// The tokenizer's name.
    pub tokenizer_name: Option<String>,
    #[serde(default)]
    /// Local attention window.
    pub window_size: Option<i64>,
    #[serde(default)]
    /// Per-layer attention types.
    pub attn_types: Option<Vec<String>>,
    #[serde(default = "default::init_mode")]
    /// Weight initialisation scheme (`gpt2`, `xavier_uniform`, …).
    pub init_mode: String,
    #[serde(default = "default::normalization_type")]
    /// `LN`, `LNPre`, `RMS`, `RMSPre` or None.
    pub normalization_type: Option<String>,
    #[serde(default)]
    /// Device TL would use.
    pub device: Option<String>,
    #[serde(default = "default::one")]
    /// Number of devices.
    pub n_devices: i64,
    #[serde(default = "default::attention_dir")]
    /// `causal` or `bidirectional`.
    pub attention_dir: String,
    #[serde(default)]
    /// Whether the blocks have no MLP.
    pub attn_only: bool,
    #[serde(default)]
    /// Initialisation seed.
    pub seed: Option<i64>,
    #[serde(default = "default::minus_one_f")]
    /// Standard deviation of the `gpt2` init (TL: 0.8 / sqrt(d_model)).
    pub initializer_range: f64,
    #[serde(default = "default::yes")]
    /// Whether TL initialises weights.
    pub init_weights: bool,
    #[serde(default)]
    /// Divide layer l's scores by l + 1 as well.
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "default::positional_embedding_type")]
    /// `standard`, `rotary`, `shortformer` or `alibi`.
    pub positional_embedding_type: String,
    #[serde(default)]
    /// RMS scaling of the final norm.
    pub final_rms: bool,
    #[serde(default = "default::minus_one")]
    /// Output vocabulary size (TL: -1 → d_vocab).
    pub d_vocab_out: i64,
    #[serde(default)]
    /// Attention and MLP in parallel (refused by tlens).
    pub parallel_attn_mlp: bool,
    #[serde(default)]
    /// Rotary dimensions.
    pub rotary_dim: Option<i64>,
    #[serde(default)]
    /// Parameter count (derived).
    pub n_params: Option<i64>,
    #[serde(default)]
    /// Whether tokens are hooked.
    pub use_hook_tokens: bool,
    #[serde(default)]
    /// Gated MLP (refused by tlens).
    pub gated_mlp: bool,
    #[serde(default = "default::yes")]
    /// Prepend BOS by default.
    pub default_prepend_bos: bool,
    /// torch dtype name without the `torch.` prefix.
    #[serde(default = "default::dtype")]
    pub dtype: String,
    #[serde(default)]
    /// Whether the tokenizer prepends BOS.
    pub tokenizer_prepends_bos: Option<bool>,
    #[serde(default)]
    /// Key/value heads (grouped-query attention).
    pub n_key_value_heads: Option<i64>,
    #[serde(default)]
    /// LayerNorm after the embedding.
    pub post_embedding_ln: bool,
    #[serde(default = "default::rotary_base")]
    /// Rotary base.
    pub rotary_base: Num,
    #[serde(default)]
    /// Rotary base of local layers.
    pub rotary_base_local: Option<i64>,
    #[serde(default)]
    /// Trust remote code (HF).
    pub trust_remote_code: bool,
    #[serde(default)]
    /// Rotary over adjacent pairs.
    pub rotary_adjacent_pairs: bool,
    #[serde(default)]
    /// 4-bit loading.
    pub load_in_4bit: bool,
    #[serde(default)]
    /// Mixture-of-experts: number of experts.
    pub num_experts: Option<i64>,
    #[serde(default)]
    /// Mixture-of-experts: experts per token.
    pub experts_per_token: Option<i64>,
    #[serde(default)]
    /// T5 relative attention: max distance.
    pub relative_attention_max_distance: Option<i64>,
    #[serde(default)]
    /// T5 relative attention: buckets.
    pub relative_attention_num_buckets: Option<i64>,
    #[serde(default)]
    /// T5 decoder start token.
    pub decoder_start_token_id: Option<i64>,
    #[serde(default)]
    /// Tie input and output embeddings.
    pub tie_word_embeddings: bool,
    #[serde(default)]
    /// Norms before and after each sublayer.
    pub use_normalization_before_and_after: bool,
    #[serde(default = "default::minus_one_f")]
    /// Soft cap of attention scores.
    pub attn_scores_soft_cap: f64,
    #[serde(default = "default::minus_one_f")]
    /// Soft cap of output logits.
    pub output_logits_soft_cap: f64,
    #[serde(rename = "use_NTK_by_parts_rope", default)]
    /// NTK-by-parts RoPE scaling.
    pub use_ntk_by_parts_rope: bool,
    #[serde(rename = "NTK_by_parts_low_freq_factor", default = "default::ntk_low")]
    /// NTK-by-parts: low-frequency factor.
    pub ntk_by_parts_low_freq_factor: f64,
    #[serde(
        rename = "NTK_by_parts_high_freq_factor",
        default = "default::ntk_high"
    )]
    /// NTK-by-parts: high-frequency factor.
    pub ntk_by_parts_high_freq_factor: f64,
    #[serde(rename = "NTK_by_parts_factor", default = "default::ntk_factor")]
    /// NTK-by-parts: factor.
    pub ntk_by_parts_factor: f64,
    #[serde(rename = "NTK_original_ctx_len", default = "default::ntk_ctx")]
    /// NTK-by-parts: original context length.
    pub ntk_original_ctx_len: i64,

    // ---- fields added in TL 3.x (None when the config is from TL 2.x) ----
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: whether RMS norm is used.
    pub uses_rms_norm: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: LayerNorm folding.
    pub layer_norm_folding: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: QKV clipping.
    pub clip_qkv: Option<Option<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: log-n attention.
    pub use_logn_attn: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: training sequence length.
    pub train_seq_length: Option<Option<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: dynamic NTK RoPE.
    pub use_dynamic_ntk_rope: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: rotary scaling factor.
    pub rotary_scaling_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: quantization method.
    pub quantization_method: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: YaRN RoPE.
    pub use_yarn_rope: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: YaRN factor.
    pub yarn_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: YaRN attention factor.
    pub yarn_attention_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: YaRN beta fast.
    pub yarn_beta_fast: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: YaRN beta slow.
    pub yarn_beta_slow: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: YaRN original max positions.
    pub yarn_original_max_position_embeddings: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: YaRN truncate.
    pub yarn_truncate: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: YaRN on global attention only.
    pub yarn_global_attn_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: attention sinks.
    pub use_attention_sinks: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// TL 3.x: normalise top-k probabilities (MoE).
    pub norm_topk_prob: Option<bool>,

    /// Fields tlens does not know, kept in file order and written back unchanged.
    #[serde(flatten)]
    pub extra: IndexMap<String, Json>,
}

/// TL's module paths for the config class, by version.
pub const TL2_CONFIG_CLASS: (&str, &str) = (
    "transformer_lens.HookedTransformerConfig",
    "HookedTransformerConfig",
);
/// The TL ≥ 3.3 config class path (module, name).
pub const TL3_CONFIG_CLASS: (&str, &str) = (
    "transformer_lens.config.hooked_transformer_config",
    "HookedTransformerConfig",
);
const KNOWN_CONFIG_MODULES: [&str; 3] = [
    "transformer_lens.HookedTransformerConfig",
    "transformer_lens.config.HookedTransformerConfig",
    "transformer_lens.config.hooked_transformer_config",
];

/// Bounds on config sizes (far above any grokking model; a config beyond them is refused
/// before anything is allocated from it).
const MAX_LAYERS: i64 = 1 << 10;
const MAX_DIM: i64 = 1 << 24;
const MAX_HEADS: i64 = 1 << 12;
const MAX_PARAMS: i64 = 1 << 34;

impl HookedTransformerConfig {
    /// A config from the required fields, with TL's defaults and `__post_init__` applied.
    pub fn new(n_layers: i64, d_model: i64, n_ctx: i64, d_head: i64) -> Result<Self> {
        Self::from_json(serde_json::json!({
            "n_layers": n_layers, "d_model": d_model, "n_ctx": n_ctx, "d_head": d_head
        }))
    }

    /// The grokking demo's config (p = 113), exactly as the TL demo builds it.
    pub fn grokking_demo(p: i64) -> Self {
        Self::from_json(serde_json::json!({
            "n_layers": 1, "n_heads": 4, "d_model": 128, "d_head": 32, "d_mlp": 512,
            "act_fn": "relu", "normalization_type": null, "d_vocab": p + 1, "d_vocab_out": p,
            "n_ctx": 3, "init_weights": true, "device": "cpu", "seed": 999
        }))
        .expect("the demo config is valid")
    }

    /// From a JSON object of TL field names (missing fields take TL's defaults).
    pub fn from_json(v: Json) -> Result<Self> {
        let mut cfg: Self = serde_json::from_value(v)
            .map_err(|e| Error::invalid("HookedTransformerConfig", e.to_string()))?;
        cfg.post_init()?;
        Ok(cfg)
    }

    /// From JSON text.
    pub fn from_json_str(s: &str) -> Result<Self> {
        Self::from_json(serde_json::from_str(s)?)
    }

    /// As a JSON object of TL field names.
    pub fn to_json(&self) -> Json {
        serde_json::to_value(self).expect("config serialises")
    }

    /// From a pickled value: the TL config object (any TL module path) or a plain dict.
    pub fn from_pickle(v: &Value) -> Result<Self> {
        let fields = match v {
            Value::Object(o) => {
                if o.name != "HookedTransformerConfig"
                    || !KNOWN_CONFIG_MODULES.contains(&o.module.as_str())
                {
                    return Err(Error::type_err(
                        "config",
                        "transformer_lens HookedTransformerConfig",
                        o.class(),
                    ));
                }
                o.state.as_ref().ok_or_else(|| {
                    Error::invalid("config", "HookedTransformerConfig object has no state")
                })?
            }
            d @ Value::Dict(_) => d,
            other => {
                return Err(Error::type_err(
                    "config",
                    "HookedTransformerConfig or dict",
                    other.type_name(),
                ))
            }
        };
        let Value::Dict(d) = fields else {
            return Err(Error::type_err("config state", "dict", fields.type_name()));
        };
        let mut map = serde_json::Map::new();
        for (k, v) in &d.items {
            let k = k
                .as_str()
                .ok_or_else(|| Error::type_err("config field name", "str", k.type_name()))?;
            map.insert(k.to_string(), pickle_to_json(v, &format!("config.{k}"))?);
        }
        Self::from_json(Json::Object(map))
    }

    /// As a pickle value: the TL object (`class` = module, name) or, with `None`, a plain dict
    /// (what `torch.load(weights_only=True)` accepts).
    pub fn to_pickle(&self, class: Option<(&str, &str)>) -> Value {
        let Json::Object(map) = self.to_json() else {
            unreachable!("config serialises to an object")
        };
        let items = map
            .into_iter()
            .map(|(k, v)| {
                // torch dtype globals are on weights_only's allow-list, so both styles use one.
                let pv = if k == "dtype" {
                    match v.as_str().and_then(DType::from_torch_name) {
                        Some(d) => Value::Dtype(d),
                        None => json_to_pickle(&v),
                    }
                } else {
                    json_to_pickle(&v)
                };
                (Value::Str(k), pv)
            })
            .collect();
        let state = Value::Dict(crate::io::pickle::Dict {
            ordered: false,
            items,
            attrs: None,
        });
        match class {
            None => state,
            Some((module, name)) => Value::Object(Box::new(crate::io::pickle::Object {
                module: module.into(),
                name: name.into(),
                construct: crate::io::pickle::Construct::NewObj,
                args: Vec::new(),
                kwargs: Vec::new(),
                state: Some(state),
                list_items: Vec::new(),
                dict_items: Vec::new(),
            })),
        }
    }

    /// TL's `__post_init__`: fill derived fields and reject invalid combinations.
    pub fn post_init(&mut self) -> Result<()> {
        let ctx = "HookedTransformerConfig";
        for (name, v) in [
            ("n_layers", self.n_layers),
            ("d_model", self.d_model),
            ("n_ctx", self.n_ctx),
            ("d_head", self.d_head),
        ] {
            if v <= 0 {
                return Err(Error::invalid(
                    ctx,
                    format!("{name} must be positive, found {v}"),
                ));
            }
        }
        if self.n_heads == -1 {
            self.n_heads = self.d_model / self.d_head;
        }
        if self.n_heads <= 0 {
            return Err(Error::invalid(
                ctx,
                format!("n_heads must be positive, found {}", self.n_heads),
            ));
        }
        if self.use_local_attn && (self.window_size.is_none() || self.attn_types.is_none()) {
            return Err(Error::invalid(
                ctx,
                "local attention needs window_size and attn_types",
            ));
        }
        if !self.attn_only {
            if self.d_mlp.is_none() {
                self.d_mlp = Some(self.d_model * 4);
            }
            match self.act_fn.as_deref() {
                None => self.act_fn = Some("relu".into()),
                Some(a) if !SUPPORTED_ACTIVATIONS.contains(&a) => {
                    return Err(Error::invalid(
                        ctx,
                        format!("act_fn={a} must be one of {SUPPORTED_ACTIVATIONS:?}"),
                    ))
                }
                _ => {}
            }
        }
        if self.initializer_range < 0.0 {
            self.initializer_range = if self.init_mode == "gpt2" {
                0.8 / (self.d_model as f64).sqrt()
            } else {
                1.0
            };
        }
        if self.d_vocab_out == -1 {
            self.d_vocab_out = self.d_vocab;
        }
        if self.positional_embedding_type == "rotary" && self.rotary_dim.is_none() {
            self.rotary_dim = Some(self.d_head);
        }
        if self.num_experts.is_some() != self.experts_per_token.is_some() {
            return Err(Error::invalid(
                ctx,
                "num_experts and experts_per_token must be set together",
            ));
        }
        // Sizes are checked before anything is sized from them: a hostile config (n_layers
        // 2⁴⁰) is an error, never an allocation or an overflow.
        for (name, v, max) in [
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("d_model", self.d_model, MAX_DIM),
            ("n_ctx", self.n_ctx, MAX_DIM),
            ("d_head", self.d_head, MAX_DIM),
            ("n_heads", self.n_heads, MAX_HEADS),
            ("d_mlp", self.d_mlp.unwrap_or(1), MAX_DIM),
            ("d_vocab", self.d_vocab, MAX_DIM),
            ("d_vocab_out", self.d_vocab_out, MAX_DIM),
            ("num_experts", self.num_experts.unwrap_or(1), MAX_HEADS),
        ] {
            if v > max || v < -1 || (v == 0 && name != "d_mlp") {
                return Err(Error::invalid(
                    ctx,
                    format!("{name} = {v} is outside 1..={max}"),
                ));
            }
        }
        let overflow = || Error::invalid(ctx, "the parameter count overflows");
        let mul = |a: i64, b: i64| a.checked_mul(b).ok_or_else(overflow);
        let mut n_params = mul(
            mul(
                mul(self.n_layers, self.d_model)?,
                mul(self.d_head, self.n_heads)?,
            )?,
            4,
        )?;
        if !self.attn_only {
            let d_mlp = self.d_mlp.unwrap_or(0);
            let mut per_layer = mul(mul(self.d_model, d_mlp)?, 2 + self.gated_mlp as i64)?;
            if let Some(e) = self.num_experts.filter(|&e| e != 0) {
                per_layer = mul(per_layer + self.d_model, e)?;
            }
            n_params = n_params
                .checked_add(mul(self.n_layers, per_layer)?)
                .ok_or_else(overflow)?;
        }
        if n_params > MAX_PARAMS {
            return Err(Error::invalid(
                ctx,
                format!("{n_params} parameters is more than tlens handles ({MAX_PARAMS})"),
            ));
        }
        self.n_params = Some(n_params);
        if self.device.is_none() {
            self.device = Some("cpu".into());
        }
        if self.use_attn_scale && self.attn_scale == -1.0 {
            self.attn_scale = (self.d_head as f64).sqrt();
        }
        if DType::from_torch_name(&self.dtype).is_none() {
            return Err(Error::invalid(
                ctx,
                format!("unknown dtype '{}'", self.dtype),
            ));
        }
        Ok(())
    }

    /// `n_heads` as a size.
    pub fn n_heads(&self) -> usize {
        self.n_heads as usize
    }
    /// `d_model` as a size.
    pub fn d_model(&self) -> usize {
        self.d_model as usize
    }
    /// `d_head` as a size.
    pub fn d_head(&self) -> usize {
        self.d_head as usize
    }
    /// `n_layers` as a size.
    pub fn n_layers(&self) -> usize {
        self.n_layers as usize
    }
    /// `n_ctx` as a size.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx as usize
    }
    /// `d_mlp` as a size (0 when absent).
    pub fn d_mlp(&self) -> usize {
        self.d_mlp.unwrap_or(0) as usize
    }
    /// `d_vocab` as a size.
    pub fn d_vocab(&self) -> usize {
        self.d_vocab.max(0) as usize
    }
    /// `d_vocab_out` as a size.
    pub fn d_vocab_out(&self) -> usize {
        self.d_vocab_out.max(0) as usize
    }
}

/// TL's `SUPPORTED_ACTIVATIONS`.
pub const SUPPORTED_ACTIVATIONS: [&str; 9] = [
    "solu",
    "solu_ln",
    "gelu_new",
    "gelu_fast",
    "silu",
    "relu",
    "gelu",
    "gelu_pytorch_tanh",
    "xielu",
];

/// Convert a pickled config value to JSON. torch dtypes become their names; numpy scalars their
/// value; non-finite floats and values with no JSON form (tensors, objects) are an error naming
/// the field, so nothing is silently dropped.
pub fn pickle_to_json(v: &Value, path: &str) -> Result<Json> {
    Ok(match v {
        Value::None => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .ok_or_else(|| Error::invalid(path, format!("non-finite float {f}")))?,
        Value::Str(s) => Json::String(s.clone()),
        Value::NumpyScalar { value, .. } => pickle_to_json(value, path)?,
        Value::Dtype(d) => Json::String(d.torch_name().into()),
        Value::List(items) | Value::Tuple(items) | Value::Set(items) | Value::FrozenSet(items) => {
            Json::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| pickle_to_json(x, &format!("{path}[{i}]")))
                    .collect::<Result<_>>()?,
            )
        }
        Value::Dict(d) => {
            let mut m = serde_json::Map::new();
            for (k, x) in &d.items {
                let k = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    other => return Err(Error::type_err(path, "str dict key", other.type_name())),
                };
                let sub = format!("{path}.{k}");
                m.insert(k, pickle_to_json(x, &sub)?);
            }
            Json::Object(m)
        }
        other => return Err(Error::type_err(path, "plain data", other.type_name())),
    })
}

/// Convert JSON to a pickle value (objects become plain dicts).
pub fn json_to_pickle(v: &Json) -> Value {
    match v {
        Json::Null => Value::None,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) if !n.is_f64() => Value::Int(i),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(a) => Value::List(a.iter().map(json_to_pickle).collect()),
        Json::Object(m) => Value::Dict(crate::io::pickle::Dict {
            ordered: false,
            items: m
                .iter()
                .map(|(k, x)| (Value::Str(k.clone()), json_to_pickle(x)))
                .collect(),
            attrs: None,
        }),
    }
}
