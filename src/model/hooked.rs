//! `HookedTransformer`: TransformerLens's forward pass, with every hook point, on any backend.
//!
//! The forward pass follows TL 2.18 operation for operation (docs/reference.md §2): embed + pos_embed,
//! per block `ln1` (called once each for the query, key and value inputs, as TL does), per-head
//! Q/K/V, scores divided by `attn_scale`, causal mask to IGNORE, softmax, z, output projection
//! (b_O once), `ln2`, MLP (addmm), and `ln_final` + unembed. Hook points fire in TL's order.
//! Config features TL has but this model does not implement are rejected at construction.

use super::config::HookedTransformerConfig;
use super::hooks::{ActivationCache, Hook, HookCtx};
use super::state_dict::StateDict;
use crate::backend::{Activation, Backend, Cpu};
use crate::error::{Error, Result};
use ndarray::{Array2, ArrayD, IxDyn};

/// TL's normalization types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// No normalisation.
    None,
    /// LayerNorm with weight and bias.
    LN,
    /// LayerNorm without weight and bias.
    LNPre,
    /// RMSNorm with weight.
    RMS,
    /// RMSNorm without weight.
    RMSPre,
}

impl NormKind {
    fn parse(s: Option<&str>) -> Result<NormKind> {
        Ok(match s {
            None => NormKind::None,
            Some("LN") => NormKind::LN,
            Some("LNPre") => NormKind::LNPre,
            Some("RMS") => NormKind::RMS,
            Some("RMSPre") => NormKind::RMSPre,
            Some(other) => return Err(Error::Unsupported(format!("normalization_type {other}"))),
        })
    }

    fn center(self) -> bool {
        matches!(self, NormKind::LN | NormKind::LNPre)
    }
}

struct Norm<T> {
    kind: NormKind,
    w: Option<T>,
    b: Option<T>,
}

struct Mlp<T> {
    w_in: T,
    b_in: T,
    w_out: T,
    b_out: T,
    /// solu_ln's LayerNorm after the activation.
    ln: Option<Norm<T>>,
}

struct Block<T> {
    ln1: Norm<T>,
    w_q: T,
    b_q: T,
    w_k: T,
    b_k: T,
    w_v: T,
    b_v: T,
    w_o: T,
    /// W_O as [H·E, D] for the fused output projection.
    w_o_flat: T,
    b_o: T,
    ignore: f32,
    ln2: Option<Norm<T>>,
    mlp: Option<Mlp<T>>,
}

/// A TransformerLens HookedTransformer on backend `B` (the CPU by default).
pub struct HookedTransformer<B: Backend = Cpu> {
    /// The config.
    pub cfg: HookedTransformerConfig,
    backend: B,
    norm: NormKind,
    act: Option<Activation>,
    /// `cfg.attn_scale` (or 1 without `use_attn_scale`), in f64 as TL holds it.
    attn_scale: f64,
    eps: f32,
    /// TL 3.x configs also get `unembed.hook_in` / `unembed.hook_out`.
    unembed_hooks: bool,
    w_e: B::Tensor,
    w_pos: B::Tensor,
    blocks: Vec<Block<B::Tensor>>,
    ln_final: Norm<B::Tensor>,
    w_u: B::Tensor,
    b_u: B::Tensor,
    /// The weights as loaded (host copy), for analyses and the fast evaluation path.
    pub state_dict: StateDict,
}

/// Uploads parameters by name with shape checks, remembering which names were used.
struct Loader<'a, B: Backend> {
    sd: &'a StateDict,
    backend: &'a B,
    used: Vec<String>,
}

impl<B: Backend> Loader<'_, B> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        self.used.push(name.to_string());
        self.backend
            .parameter(name, self.sd.array::<f32>(name, Some(shape))?)
    }

    fn norm(&mut self, prefix: &str, width: usize, kind: NormKind) -> Result<Norm<B::Tensor>> {
        let (w, b) = match kind {
            NormKind::LN => (
                Some(self.get(&format!("{prefix}.w"), &[width])?),
                Some(self.get(&format!("{prefix}.b"), &[width])?),
            ),
            NormKind::RMS => (Some(self.get(&format!("{prefix}.w"), &[width])?), None),
            _ => (None, None),
        };
        Ok(Norm { kind, w, b })
    }
}

/// Names of the flags that are on.
pub(crate) fn enabled(flags: &[(&str, bool)]) -> Vec<String> {
    flags
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n.to_string())
        .collect()
}

/// Reject config features this forward pass does not implement (rather than compute wrong numbers).
pub fn check_supported(cfg: &HookedTransformerConfig) -> Result<()> {
    let mut bad = Vec::new();
    if cfg.positional_embedding_type != "standard" {
        bad.push(format!(
            "positional_embedding_type={}",
            cfg.positional_embedding_type
        ));
    }
    if cfg.attention_dir != "causal" && cfg.attention_dir != "bidirectional" {
        bad.push(format!("attention_dir={}", cfg.attention_dir));
    }
    let flags = [
        ("gated_mlp", cfg.gated_mlp),
        ("parallel_attn_mlp", cfg.parallel_attn_mlp),
        ("use_local_attn", cfg.use_local_attn),
        ("post_embedding_ln", cfg.post_embedding_ln),
        ("use_qk_norm", cfg.use_qk_norm),
        ("final_rms", cfg.final_rms),
        (
            "use_normalization_before_and_after",
            cfg.use_normalization_before_and_after,
        ),
        ("load_in_4bit", cfg.load_in_4bit),
        ("use_NTK_by_parts_rope", cfg.use_ntk_by_parts_rope),
        (
            "use_hook_tokens (tokens are not float activations)",
            cfg.use_hook_tokens,
        ),
    ];
    bad.extend(enabled(&flags));
    if cfg.num_experts.is_some() {
        bad.push("num_experts (mixture of experts)".into());
    }
    if cfg.n_key_value_heads.is_some_and(|k| k != cfg.n_heads) {
        bad.push("n_key_value_heads (grouped-query attention)".into());
    }
    if cfg.attn_scores_soft_cap > 0.0 || cfg.output_logits_soft_cap > 0.0 {
        bad.push("soft caps".into());
    }
    if cfg.dtype != "float32" {
        bad.push(format!("dtype={} (tlens computes in float32)", cfg.dtype));
    }
    if !cfg.attn_only {
        match cfg.act_fn.as_deref() {
            Some(a) if Activation::from_name(a).is_some() => {}
            other => bad.push(format!("act_fn={other:?}")),
        }
    }
    if cfg.d_vocab <= 0 {
        bad.push("d_vocab unset".into());
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "HookedTransformer config: {}",
            bad.join(", ")
        )))
    }
}

impl HookedTransformer<Cpu> {
    /// Build a CPU model from a config and a TL-layout state dict.
    pub fn new(cfg: HookedTransformerConfig, sd: StateDict) -> Result<Self> {
        crate::backend::cpu::tune_allocator();
        Self::with_backend(cfg, sd, Cpu)
    }
}

impl<B: Backend> HookedTransformer<B> {
    /// A model on a given backend.
    pub fn with_backend(cfg: HookedTransformerConfig, sd: StateDict, backend: B) -> Result<Self> {
        check_supported(&cfg)?;
        let (d, h, e) = (cfg.d_model(), cfg.n_heads(), cfg.d_head());
        let (v, v_out, n_ctx, m) = (cfg.d_vocab(), cfg.d_vocab_out(), cfg.n_ctx(), cfg.d_mlp());
        let norm = NormKind::parse(cfg.normalization_type.as_deref())?;
        let act = if cfg.attn_only {
            None
        } else {
            cfg.act_fn.as_deref().and_then(Activation::from_name)
        };
        // Parameters are read in TL's named_parameters() order, shape-checked by name.
        let mut ld = Loader {
            sd: &sd,
            backend: &backend,
            used: Vec::new(),
        };
        let w_e = ld.get("embed.W_E", &[v, d])?;
        let w_pos = ld.get("pos_embed.W_pos", &[n_ctx, d])?;
        let mut blocks = Vec::with_capacity(cfg.n_layers());
        for l in 0..cfg.n_layers() {
            let p = format!("blocks.{l}");
            let ln1 = ld.norm(&format!("{p}.ln1"), d, norm)?;
            let ignore = match sd.get(&format!("{p}.attn.IGNORE")) {
                Some(t) => *t
                    .expect::<f32>(&format!("{p}.attn.IGNORE"))?
                    .iter()
                    .next()
                    .ok_or_else(|| Error::invalid(format!("{p}.attn.IGNORE"), "empty"))?,
                None => f32::NEG_INFINITY,
            };
            let a = format!("{p}.attn");
            let w_q = ld.get(&format!("{a}.W_Q"), &[h, d, e])?;
            let w_o = ld.get(&format!("{a}.W_O"), &[h, e, d])?;
            let w_o_host = sd.array::<f32>(&format!("{p}.attn.W_O"), Some(&[h, e, d]))?;
            // The same parameter as W_O, flattened (its gradient is added to W_O's, whose
            // shape it takes: W_O comes first).
            let w_o_flat = backend.parameter(
                &format!("{p}.attn.W_O"),
                &w_o_host
                    .as_standard_layout()
                    .into_owned()
                    .into_shape_with_order(IxDyn(&[h * e, d]))
                    .expect("sizes match"),
            )?;
            let b_q = ld.get(&format!("{a}.b_Q"), &[h, e])?;
            let b_o = ld.get(&format!("{a}.b_O"), &[d])?;
            let w_k = ld.get(&format!("{a}.W_K"), &[h, d, e])?;
            let w_v = ld.get(&format!("{a}.W_V"), &[h, d, e])?;
            let b_k = ld.get(&format!("{a}.b_K"), &[h, e])?;
            let b_v = ld.get(&format!("{a}.b_V"), &[h, e])?;
            let (ln2, mlp) = if cfg.attn_only {
                (None, None)
            } else {
                let ln2 = ld.norm(&format!("{p}.ln2"), d, norm)?;
                let w_in = ld.get(&format!("{p}.mlp.W_in"), &[d, m])?;
                let b_in = ld.get(&format!("{p}.mlp.b_in"), &[m])?;
                let w_out = ld.get(&format!("{p}.mlp.W_out"), &[m, d])?;
                let b_out = ld.get(&format!("{p}.mlp.b_out"), &[d])?;
                let ln = if cfg.act_fn.as_deref() == Some("solu_ln") {
                    // TL: LayerNorm(d_mlp) when normalization_type is LN, else LayerNormPre.
                    let kind = if norm == NormKind::LN {
                        NormKind::LN
                    } else {
                        NormKind::LNPre
                    };
                    Some(ld.norm(&format!("{p}.mlp.ln"), m, kind)?)
                } else {
                    None
                };
                (
                    Some(ln2),
                    Some(Mlp {
                        w_in,
                        b_in,
                        w_out,
                        b_out,
                        ln,
                    }),
                )
            };
            blocks.push(Block {
                ln1,
                w_q,
                b_q,
                w_k,
                b_k,
                w_v,
                b_v,
                w_o,
                w_o_flat,
                b_o,
                ignore,
                ln2,
                mlp,
            });
        }
        let ln_final = ld.norm("ln_final", d, norm)?;
        let w_u = ld.get("unembed.W_U", &[d, v_out])?;
        let b_u = ld.get("unembed.b_U", &[v_out])?;
        // Anything else in the state dict (but TL's buffers) is unexpected, as in a strict
        // load_state_dict.
        if let Some(extra) = sd
            .names()
            .find(|n| !ld.used.iter().any(|u| u == n) && !super::is_buffer(n))
        {
            return Err(Error::invalid(
                "state dict",
                format!("unexpected tensor '{extra}' for this config"),
            ));
        }
        Ok(HookedTransformer {
            unembed_hooks: cfg.uses_rms_norm.is_some(),
            eps: cfg.eps as f32,
            attn_scale: if cfg.use_attn_scale {
                cfg.attn_scale
            } else {
                1.0
            },
            norm,
            act,
            backend,
            w_e,
            w_pos,
            blocks,
            ln_final,
            w_u,
            b_u,
            state_dict: sd,
            cfg,
        })
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The normalization of every LayerNorm position (ln1, ln2, ln_final).
    pub fn normalization(&self) -> NormKind {
        self.norm
    }

    /// The divisor of layer `l`'s attention scores, as torch uses it (f32).
    /// TL multiplies the scale by layer_id + 1 (in f64) for `scale_attn_by_inverse_layer_idx`.
    pub fn layer_attn_scale(&self, l: usize) -> f32 {
        let factor = if self.cfg.scale_attn_by_inverse_layer_idx {
            l as f64 + 1.0
        } else {
            1.0
        };
        (self.attn_scale * factor) as f32
    }

    /// Logits [batch, pos, d_vocab_out] for tokens [batch, pos].
    pub fn forward(&self, tokens: &Array2<u32>) -> Result<ArrayD<f32>> {
        let out = self.forward_ctx(tokens, &mut HookCtx::none())?;
        self.backend.download(out)
    }

    /// The logits at the last position, [batch, 1, d_vocab_out], as the backend's tensor: the
    /// same arithmetic as [`forward`](Self::forward) for that position (equal bit for bit), but
    /// the final block computes its query side, attention output, MLP and unembedding for the
    /// last position only (the others feed nothing the last position reads). On
    /// [`Autodiff`](crate::train::autodiff::Autodiff), the variable the loss differentiates.
    pub fn forward_last(&self, tokens: &Array2<u32>) -> Result<B::Tensor> {
        self.forward_pass(tokens, &mut HookCtx::none(), true)
    }

    /// Logits and the activations at every hook point accepted by `names_filter` (all if None).
    pub fn run_with_cache(
        &self,
        tokens: &Array2<u32>,
        names_filter: Option<&(dyn Fn(&str) -> bool + Sync)>,
    ) -> Result<(ArrayD<f32>, ActivationCache)> {
        let mut ctx = HookCtx {
            hooks: &mut [],
            cache: Some((names_filter, ActivationCache::new(self.cfg.n_layers()))),
            names: None,
        };
        let out = self.forward_ctx(tokens, &mut ctx)?;
        let cache = ctx.cache.take().expect("set above").1;
        Ok((self.backend.download(out)?, cache))
    }

    /// Every hook must match at least one hook point of this model ([`Error::UnknownHook`]).
    pub fn check_hooks(&self, hooks: &[Hook<'_>]) -> Result<()> {
        let names = self.hook_names();
        for h in hooks {
            if !names.iter().any(|n| h.filter.matches(n)) {
                let name = match &h.filter {
                    super::hooks::NameFilter::Name(n) => n.clone(),
                    super::hooks::NameFilter::Pred(_) => "(a name filter)".to_string(),
                };
                return Err(unknown_hook(name, &names));
            }
        }
        Ok(())
    }

    /// Logits with `hooks` applied for this call only.
    pub fn run_with_hooks(
        &self,
        tokens: &Array2<u32>,
        hooks: &mut [Hook<'_>],
    ) -> Result<ArrayD<f32>> {
        self.check_hooks(hooks)?;
        let mut ctx = HookCtx {
            hooks,
            cache: None,
            names: None,
        };
        let out = self.forward_ctx(tokens, &mut ctx)?;
        self.backend.download(out)
    }

    /// Hooks and a cache together: the cache records activations after the hooks ran.
    pub fn run_with_hooks_and_cache(
        &self,
        tokens: &Array2<u32>,
        hooks: &mut [Hook<'_>],
        names_filter: Option<&(dyn Fn(&str) -> bool + Sync)>,
    ) -> Result<(ArrayD<f32>, ActivationCache)> {
        self.check_hooks(hooks)?;
        let mut ctx = HookCtx {
            hooks,
            cache: Some((names_filter, ActivationCache::new(self.cfg.n_layers()))),
            names: None,
        };
        let out = self.forward_ctx(tokens, &mut ctx)?;
        let cache = ctx.cache.take().expect("set above").1;
        Ok((self.backend.download(out)?, cache))
    }

    /// Every hook point of this model, in firing order (TL's `hook_dict` order of use).
    pub fn hook_names(&self) -> Vec<String> {
        let mut ctx = HookCtx {
            hooks: &mut [],
            cache: None,
            names: Some(Vec::new()),
        };
        let tokens = Array2::<u32>::zeros((1, 1));
        self.forward_ctx(&tokens, &mut ctx)
            .expect("a one-token forward pass");
        let mut names = ctx.names.take().expect("set above");
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        names
    }

    /// A hook point: activation `x` leaves the backend only if a hook or the cache wants it.
    fn point(&self, ctx: &mut HookCtx, name: &str, x: B::Tensor) -> Result<B::Tensor> {
        Ok(self.point_replaced(ctx, name, x)?.0)
    }

    fn point_replaced(
        &self,
        ctx: &mut HookCtx,
        name: &str,
        x: B::Tensor,
    ) -> Result<(B::Tensor, bool)> {
        if !ctx.wants(name) {
            return Ok((x, false));
        }
        let host = self.backend.download_shared(&x)?;
        match ctx.apply(name, host)? {
            Some(act) => Ok((self.backend.upload_shared(act)?, true)),
            None => Ok((x, false)),
        }
    }

    /// TL's LayerNorm / LayerNormPre / RMSNorm / RMSNormPre with their hooks; `None` when the
    /// model has no normalization (the input is used as it is, without a copy).
    fn norm(
        &self,
        ctx: &mut HookCtx,
        prefix: &str,
        n: &Norm<B::Tensor>,
        x: &B::Tensor,
    ) -> Result<Option<B::Tensor>> {
        if n.kind == NormKind::None {
            return Ok(None);
        }
        let be = &self.backend;
        let (normed, scale) = be.normalize(x, n.kind.center(), self.eps)?;
        let (scale, replaced) = self.point_replaced(ctx, &format!("{prefix}.hook_scale"), scale)?;
        // A hook that replaced the scale changes the division, as in TL.
        let normed = if replaced {
            be.normalize_with(x, n.kind.center(), &scale)?
        } else {
            normed
        };
        let hn = format!("{prefix}.hook_normalized");
        let y = match n.kind {
            NormKind::LN => {
                let y = be.affine(&normed, n.w.as_ref().expect("LN weight"), n.b.as_ref())?;
                self.point(ctx, &hn, y)?
            }
            NormKind::RMS => {
                let y = self.point(ctx, &hn, normed)?;
                be.affine(&y, n.w.as_ref().expect("RMS weight"), None)?
            }
            _ => self.point(ctx, &hn, normed)?,
        };
        Ok(Some(y))
    }

    pub(crate) fn forward_ctx(&self, tokens: &Array2<u32>, ctx: &mut HookCtx) -> Result<B::Tensor> {
        self.forward_pass(tokens, ctx, false)
    }

    /// The forward pass; with `last_only` the final block works on the last position alone
    /// (only without hooks or a cache, which see every position).
    fn forward_pass(
        &self,
        tokens: &Array2<u32>,
        ctx: &mut HookCtx,
        last_only: bool,
    ) -> Result<B::Tensor> {
        let be = &self.backend;
        let (b, p) = tokens.dim();
        if p == 0 || b == 0 {
            return Err(Error::invalid("tokens", "empty batch"));
        }
        let embed = self.point(ctx, "hook_embed", be.embed(&self.w_e, tokens)?)?;
        let pos = self.point(ctx, "hook_pos_embed", be.pos_embed(&self.w_pos, b, p)?)?;
        let mut resid = be.add(embed, &pos)?;
        let n = self.blocks.len();
        for (l, blk) in self.blocks.iter().enumerate() {
            let last = last_only && l + 1 == n;
            resid = self.block(ctx, l, blk, resid, (l == 0).then_some(tokens), last)?;
        }
        let resid = self
            .norm(ctx, "ln_final", &self.ln_final, &resid)?
            .unwrap_or(resid);
        if self.unembed_hooks {
            let resid = self.point(ctx, "unembed.hook_in", resid)?;
            let logits = be.linear(&resid, &self.w_u, Some(&self.b_u))?;
            self.point(ctx, "unembed.hook_out", logits)
        } else {
            be.linear(&resid, &self.w_u, Some(&self.b_u))
        }
    }

    /// First-layer q, k, v per (distinct token, position) — the embedding, ln1 and the three
    /// projections of a batch made of each distinct token repeated over the positions — and
    /// each input's row in them. The same per-row arithmetic as on the whole batch (products
    /// are computed row by row), so the gathered values equal the direct ones bit for bit;
    /// the projections cost (distinct tokens)/(batch) of theirs (114/12,769 for the dataset).
    /// None when the batch has too few repeats for this to pay.
    #[allow(clippy::type_complexity)]
    fn qkv_tables(
        &self,
        blk: &Block<B::Tensor>,
        tokens: &Array2<u32>,
    ) -> Result<Option<(Array2<u32>, [B::Tensor; 3])>> {
        let be = &self.backend;
        let (b, p) = tokens.dim();
        let v = self.cfg.d_vocab();
        let mut slot = vec![u32::MAX; v];
        let mut distinct = Vec::new();
        for &t in tokens.iter() {
            let Some(s) = slot.get_mut(t as usize) else {
                return Ok(None); // out of range: the embedding reports it
            };
            if *s == u32::MAX {
                *s = distinct.len() as u32;
                distinct.push(t);
            }
        }
        if distinct.len() * 4 > b {
            return Ok(None);
        }
        let index = tokens.mapv(|t| slot[t as usize]);
        let table_tokens = Array2::from_shape_fn((distinct.len(), p), |(u, _)| distinct[u]);
        let u = distinct.len();
        let x = be.add(
            be.embed(&self.w_e, &table_tokens)?,
            &be.pos_embed(&self.w_pos, u, p)?,
        )?;
        let x_n = self.norm(&mut HookCtx::none(), "blocks.0.ln1", &blk.ln1, &x)?;
        let x = x_n.as_ref().unwrap_or(&x);
        Ok(Some((
            index,
            [
                be.head_linear(x, &blk.w_q, &blk.b_q)?,
                be.head_linear(x, &blk.w_k, &blk.b_k)?,
                be.head_linear(x, &blk.w_v, &blk.b_v)?,
            ],
        )))
    }

    fn block(
        &self,
        ctx: &mut HookCtx,
        l: usize,
        blk: &Block<B::Tensor>,
        resid: B::Tensor,
        tokens: Option<&Array2<u32>>,
        last: bool,
    ) -> Result<B::Tensor> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let p = format!("blocks.{l}");
        let resid_pre = self.point(ctx, &format!("{p}.hook_resid_pre"), resid)?;
        let h = cfg.n_heads();
        // Per-head inputs when split (or attn_in); otherwise q, k and v all read resid_pre.
        let split: Option<[B::Tensor; 3]> = if cfg.use_split_qkv_input {
            if cfg.use_attn_in {
                // TL fires hook_attn_in, then the split inputs take precedence.
                self.point(
                    ctx,
                    &format!("{p}.hook_attn_in"),
                    be.repeat_heads(&resid_pre, h)?,
                )?;
            }
            let rep = be.repeat_heads(&resid_pre, h)?;
            let q = self.point(ctx, &format!("{p}.hook_q_input"), rep.clone())?;
            let k = self.point(ctx, &format!("{p}.hook_k_input"), rep.clone())?;
            let v = self.point(ctx, &format!("{p}.hook_v_input"), rep)?;
            Some([q, k, v])
        } else if cfg.use_attn_in {
            let a = self.point(
                ctx,
                &format!("{p}.hook_attn_in"),
                be.repeat_heads(&resid_pre, h)?,
            )?;
            Some([a.clone(), a.clone(), a])
        } else {
            None
        };
        let [q_in, k_in, v_in] = match &split {
            Some([q, k, v]) => [q, k, v],
            None => [&resid_pre; 3],
        };
        // `last`: the query side of the final block at the last position only.
        let q_last = if last {
            Some(be.last_position(q_in)?)
        } else {
            None
        };
        let q_in = q_last.as_ref().unwrap_or(q_in);
        // TL calls ln1 once for each of the three inputs (its hooks fire three times).
        let ln1 = format!("{p}.ln1");
        let q_n = self.norm(ctx, &ln1, &blk.ln1, q_in)?;
        let k_n = self.norm(ctx, &ln1, &blk.ln1, k_in)?;
        let v_n = self.norm(ctx, &ln1, &blk.ln1, v_in)?;
        let q_in = q_n.as_ref().unwrap_or(q_in);
        let k_in = k_n.as_ref().unwrap_or(k_in);
        let v_in = v_n.as_ref().unwrap_or(v_in);
        let a = format!("{p}.attn");
        // In the first layer, with no hook that could change the residual stream, q, k and v
        // depend only on (token, position): compute them once per distinct token and gather.
        let tables = match tokens {
            Some(t) if split.is_none() && ctx.hooks.is_empty() => self.qkv_tables(blk, t)?,
            _ => None,
        };
        let [q, k, v] = match tables {
            Some((index, [q, k, v])) => [
                if last {
                    let pos = index.ncols();
                    let last_index = index.slice(ndarray::s![.., pos - 1..]).to_owned();
                    be.take_rows(&be.last_position(&q)?, &last_index)?
                } else {
                    be.take_rows(&q, &index)?
                },
                be.take_rows(&k, &index)?,
                be.take_rows(&v, &index)?,
            ],
            None => [
                be.head_linear(q_in, &blk.w_q, &blk.b_q)?,
                be.head_linear(k_in, &blk.w_k, &blk.b_k)?,
                be.head_linear(v_in, &blk.w_v, &blk.b_v)?,
            ],
        };
        let q = self.point(ctx, &format!("{a}.hook_q"), q)?;
        let k = self.point(ctx, &format!("{a}.hook_k"), k)?;
        let v = self.point(ctx, &format!("{a}.hook_v"), v)?;
        let scale = self.layer_attn_scale(l);
        let causal = (cfg.attention_dir == "causal").then_some(blk.ignore);
        let scores = self.point(
            ctx,
            &format!("{a}.hook_attn_scores"),
            be.attn_scores(&q, &k, scale, causal)?,
        )?;
        let pattern = self.point(ctx, &format!("{a}.hook_pattern"), be.softmax(&scores)?)?;
        let z = self.point(ctx, &format!("{a}.hook_z"), be.attn_z(&pattern, &v)?)?;
        let attn_out = if cfg.use_attn_result {
            let r = self.point(
                ctx,
                &format!("{a}.hook_result"),
                be.attn_result(&z, &blk.w_o)?,
            )?;
            be.sum_heads(&r, &blk.b_o)?
        } else {
            be.attn_out(&z, &blk.w_o_flat, &blk.b_o)?
        };
        let attn_out = self.point(ctx, &format!("{p}.hook_attn_out"), attn_out)?;
        let resid_pre = if last {
            be.last_position(&resid_pre)?
        } else {
            resid_pre
        };
        let (Some(ln2), Some(mlp)) = (&blk.ln2, &blk.mlp) else {
            return self.point(
                ctx,
                &format!("{p}.hook_resid_post"),
                be.add(resid_pre, &attn_out)?,
            );
        };
        let resid_mid = self.point(
            ctx,
            &format!("{p}.hook_resid_mid"),
            be.add(resid_pre, &attn_out)?,
        )?;
        let hooked_in = if cfg.use_hook_mlp_in {
            Some(self.point(ctx, &format!("{p}.hook_mlp_in"), resid_mid.clone())?)
        } else {
            None
        };
        let mlp_in = hooked_in.as_ref().unwrap_or(&resid_mid);
        let x_n = self.norm(ctx, &format!("{p}.ln2"), ln2, mlp_in)?;
        let x = x_n.as_ref().unwrap_or(mlp_in);
        let act = self
            .act
            .expect("checked: non-attn-only models have an activation");
        let pre = self.point(
            ctx,
            &format!("{p}.mlp.hook_pre"),
            be.linear(x, &mlp.w_in, Some(&mlp.b_in))?,
        )?;
        let post = match &mlp.ln {
            Some(ln) => {
                let mid =
                    self.point(ctx, &format!("{p}.mlp.hook_mid"), be.activation(pre, act)?)?;
                let y = self
                    .norm(ctx, &format!("{p}.mlp.ln"), ln, &mid)?
                    .unwrap_or(mid);
                self.point(ctx, &format!("{p}.mlp.hook_post"), y)?
            }
            None => self.point(ctx, &format!("{p}.mlp.hook_post"), be.activation(pre, act)?)?,
        };
        let mlp_out = self.point(
            ctx,
            &format!("{p}.hook_mlp_out"),
            be.linear(&post, &mlp.w_out, Some(&mlp.b_out))?,
        )?;
        self.point(
            ctx,
            &format!("{p}.hook_resid_post"),
            be.add(resid_mid, &mlp_out)?,
        )
    }
}

/// [`Error::UnknownHook`] for `name`, listing some of the model's hook points.
pub(crate) fn unknown_hook(name: String, names: &[String]) -> Error {
    let mut known: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
    if names.len() > known.len() {
        known.push("…");
    }
    Error::UnknownHook {
        name: crate::error::clip(name),
        known: known.join(", "),
    }
}
