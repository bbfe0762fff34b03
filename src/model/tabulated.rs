//! The tabulated forward pass: a model-level specialisation of the hooked forward pass for
//! 1-layer models, which evaluation, the analyses and the tabulated trainer call thousands of
//! times; tested equal to the general path.
//!
//! The residual stream entering attention depends only on (token, position), so `ln1`, Q, K,
//! V and the per-head OV products `v·W_O` are tabulated once per weight set; only the last
//! position's attention is then a per-input computation (H × P scores), and ln2/MLP/unembed
//! run as batched matrix products over the last position alone. [`last_logits`] picks it where
//! it applies ([`fast_path_applies`]) and the hooked forward pass elsewhere.
//!
//! ```
//! let run = tlens::RunFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_small.pth"))?;
//! let model = tlens::HookedTransformer::new(run.config.clone().unwrap(), run.model()?)?;
//! let (tokens, _) = tlens::task::modular_addition(23);
//! let fast = tlens::model::tabulated::last_logits(&model, &tokens)?;
//! let general = tlens::model::tabulated::last_logits_general(&model, &tokens)?;
//! assert!((&fast - &general).iter().all(|d| d.abs() < 1e-4));
//! # Ok::<(), tlens::Error>(())
//! ```

use crate::backend::gemm::{Mat, PackedB};
use crate::backend::{simd, Activation, Backend, Cpu};
use crate::error::{Error, Result};
use crate::model::hooked::NormKind;
use crate::model::HookedTransformer;
use ndarray::{Array2, ArrayD, Axis, IxDyn};
use rayon::prelude::*;

/// Last-position logits [N, d_vocab_out] through the hooked forward pass
/// ([`HookedTransformer::forward_last`]).
pub fn last_logits_general<B: Backend>(
    model: &HookedTransformer<B>,
    tokens: &Array2<u32>,
) -> Result<Array2<f32>> {
    let logits = model.backend().download(model.forward_last(tokens)?)?;
    Ok(logits
        .index_axis(Axis(1), 0)
        .to_owned()
        .into_dimensionality()
        .expect("[N, V]"))
}

/// Whether [`last_logits_fast`] applies to this model.
pub fn fast_path_applies<B: Backend>(model: &HookedTransformer<B>) -> bool {
    let c = &model.cfg;
    c.n_layers == 1 && !c.use_split_qkv_input && !c.use_attn_in
}

/// Last-position logits [N, d_vocab_out] — tabulated path for 1-layer models, general otherwise.
pub fn last_logits(model: &HookedTransformer<Cpu>, tokens: &Array2<u32>) -> Result<Array2<f32>> {
    if fast_path_applies(model) {
        last_logits_fast(model, tokens)
    } else {
        last_logits_general(model, tokens)
    }
}

/// The tabulated evaluation of a 1-layer model (see the module docs).
pub fn last_logits_fast(
    model: &HookedTransformer<Cpu>,
    tokens: &Array2<u32>,
) -> Result<Array2<f32>> {
    if model.normalization() == NormKind::None {
        return Ok(NormFreePass::new(model, tokens, false, 0, 0)?.logits);
    }
    Ok(last_position(model, tokens, false)?.logits)
}

/// The activations of a 1-layer model at the last position, from the tabulated path: what the
/// analyses read (the demo's `cache["pattern", 0][:, :, -1]`, `cache["resid_mid", 0][:, -1]`,
/// `cache["post", 0, "mlp"][:, -1]` and `logits[:, -1]`).
#[derive(Clone, Debug)]
pub struct LastPosition {
    /// Attention of the last query over the keys, [N, n_heads, P] (`hook_pattern[:, :, -1]`).
    pub pattern: ndarray::Array3<f32>,
    /// `blocks.0.hook_resid_mid` at the last position, [N, d_model] (when asked for).
    pub resid_mid: Option<Array2<f32>>,
    /// `blocks.0.mlp.hook_post` at the last position, [N, d_mlp] (None for attn-only models).
    pub mlp_post: Option<Array2<f32>>,
    /// `blocks.0.hook_resid_post` at the last position, [N, d_model] (when asked for).
    pub resid_post: Option<Array2<f32>>,
    /// Logits at the last position, [N, d_vocab_out].
    pub logits: Array2<f32>,
}

/// The (position, token) pairs that occur in a batch, numbered in order of position then token:
/// the tabulated path's tables have one row per pair (227 for the demo's dataset, not
/// n_ctx·d_vocab = 342), and the trainer sums gradients into the same rows.
#[derive(Clone, Debug)]
pub(crate) struct PairRows {
    v: usize,
    /// [P·V]: the row of (position, token), or `u32::MAX` where the pair does not occur.
    index: Vec<u32>,
    /// The (position, token) of each row.
    pub pairs: Vec<(usize, u32)>,
}

impl PairRows {
    fn new(tokens: &[u32], p: usize, v: usize) -> PairRows {
        let mut seen = vec![false; p * v];
        for t in tokens.chunks(p) {
            for (j, &tj) in t.iter().enumerate() {
                seen[j * v + tj as usize] = true;
            }
        }
        let mut index = vec![u32::MAX; p * v];
        let mut pairs = Vec::new();
        for (i, &s) in seen.iter().enumerate() {
            if s {
                index[i] = pairs.len() as u32;
                pairs.push((i / v, (i % v) as u32));
            }
        }
        PairRows { v, index, pairs }
    }

    /// The row of (position, token); the pair must occur in the batch.
    #[inline]
    pub fn row(&self, pos: usize, tok: u32) -> usize {
        self.index[pos * self.v + tok as usize] as usize
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }
}

/// The attention part of the tabulated pass: the tables over (position, token) rows and, per
/// input, the last query's pattern over the keys.
pub(crate) struct AttnPass {
    pub rows: PairRows,
    /// The residual stream entering the block (embedding + position), [R, D].
    pub x: Array2<f32>,
    /// q, k, v per row and head, [R, H, E] (from `ln1(x)` when the model has LayerNorm).
    pub q: ndarray::Array3<f32>,
    pub k: ndarray::Array3<f32>,
    pub v: ndarray::Array3<f32>,
    /// `hook_pattern[:, :, -1]`, [N, H, P].
    pub pattern: ndarray::Array3<f32>,
    /// The input tokens, [N·P] row-major.
    tokens: Vec<u32>,
}

/// The tabulated pass of a norm-free 1-layer model through the MLP (see
/// [`NormFreePass::new`]); the trainer differentiates exactly this computation.
pub(crate) struct NormFreePass {
    pub attn: AttnPass,
    /// The pair rows at the last position.
    pub base_rows: Vec<usize>,
    /// The constant part of the last residual stream per last-position row: x + b_O, [L, D].
    pub base_resid: Array2<f32>,
    /// `hook_post` at the last position of the first `post_rows` inputs (all with the
    /// residual stream).
    pub mlp_post: Option<Array2<f32>>,
    pub resid_mid: Option<Array2<f32>>,
    pub resid_post: Option<Array2<f32>>,
    pub logits: Array2<f32>,
}

fn check_tokens(
    cfg: &crate::HookedTransformerConfig,
    tokens: &Array2<u32>,
) -> Result<(usize, usize)> {
    let (n, p) = tokens.dim();
    let v = cfg.d_vocab();
    if p == 0 || p > cfg.n_ctx() {
        return Err(Error::invalid(
            "tokens",
            format!("{p} positions (n_ctx {})", cfg.n_ctx()),
        ));
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= v) {
        return Err(Error::invalid(
            "tokens",
            format!("token {t} out of range for d_vocab {v}"),
        ));
    }
    Ok((n, p))
}

/// The model's normalization `kind` with the weights under `prefix` (`blocks.0.ln1`, …).
fn apply_norm(
    model: &HookedTransformer<Cpu>,
    x: &ArrayD<f32>,
    prefix: &str,
    kind: NormKind,
) -> Result<ArrayD<f32>> {
    let be = Cpu;
    let f = |name: &str| model.state_dict.array::<f32>(name, None);
    if kind == NormKind::None {
        return Ok(x.clone());
    }
    let (y, _) = be.normalize(
        x,
        matches!(kind, NormKind::LN | NormKind::LNPre),
        model.cfg.eps as f32,
    )?;
    match kind {
        NormKind::LN => be.affine(
            &y,
            f(&format!("{prefix}.w"))?,
            Some(f(&format!("{prefix}.b"))?),
        ),
        NormKind::RMS => be.affine(&y, f(&format!("{prefix}.w"))?, None),
        _ => Ok(y),
    }
}

impl AttnPass {
    fn new(model: &HookedTransformer<Cpu>, tokens: &Array2<u32>) -> Result<AttnPass> {
        if !fast_path_applies(model) {
            return Err(Error::Unsupported(
                "the fast path needs a 1-layer model without split inputs".into(),
            ));
        }
        let cfg = &model.cfg;
        let sd = &model.state_dict;
        let be = Cpu;
        let (n, p) = check_tokens(cfg, tokens)?;
        let (v, d, h, e) = (cfg.d_vocab(), cfg.d_model(), cfg.n_heads(), cfg.d_head());
        let f = |name: &str| sd.array::<f32>(name, None);
        let toks = tokens
            .as_standard_layout()
            .into_owned()
            .into_raw_vec_and_offset()
            .0;
        let rows = PairRows::new(&toks, p, v);
        let r_n = rows.len();

        // The residual stream entering the block per (position, token) row, ln1, and q, k, v.
        let w_e = f("embed.W_E")?;
        let w_pos = f("pos_embed.W_pos")?;
        let mut x = Array2::<f32>::zeros((r_n, d));
        for (mut xr, &(pos, t)) in x.outer_iter_mut().zip(&rows.pairs) {
            xr.assign(&w_e.index_axis(Axis(0), t as usize));
            xr += &w_pos.index_axis(Axis(0), pos);
        }
        let x3 = x.view().into_shape_with_order((r_n, 1, d)).expect("rows");
        let x3 = x3.to_owned().into_dyn();
        let x_in = apply_norm(model, &x3, "blocks.0.ln1", model.normalization())?;
        let table = |w: &str, b: &str| -> Result<ndarray::Array3<f32>> {
            be.head_linear(&x_in, f(w)?, f(b)?)?
                .into_shape_with_order((r_n, h, e))
                .map_err(|_| {
                    Error::invalid("fast path", format!("table shape ≠ [{r_n}, {h}, {e}]"))
                })
        };
        // Three small products (under the size the matrix product splits across threads).
        let (q, (k, vt)) = rayon::join(
            || table("blocks.0.attn.W_Q", "blocks.0.attn.b_Q"),
            || {
                rayon::join(
                    || table("blocks.0.attn.W_K", "blocks.0.attn.b_K"),
                    || table("blocks.0.attn.W_V", "blocks.0.attn.b_V"),
                )
            },
        );
        let (q, k, vt) = (q?, k?, vt?);
        let scale = model.layer_attn_scale(0);
        let last = p - 1;

        // Per input: the last position's pattern over keys.
        let (qs, ks) = (
            q.as_slice().expect("standard layout"),
            k.as_slice().expect("standard layout"),
        );
        let at = |pos: usize, tok: u32, hi: usize| (rows.row(pos, tok) * h + hi) * e;
        // A score depends on an input only through its last token's query row and the key's
        // (position, token) row: when the inputs share few last tokens (the demo's all end in
        // `=`), each (query row, key row, head) score is computed once and looked up.
        // ndarray's (eight-way unrolled) dot: the summation order that keeps training within
        // 4e-10 of PyTorch's first epochs.
        let dot = |qo: usize, ko: usize| {
            ndarray::ArrayView1::from(&qs[qo..qo + e])
                .dot(&ndarray::ArrayView1::from(&ks[ko..ko + e]))
                / scale
        };
        let mut q_slot = vec![usize::MAX; r_n];
        let mut q_rows = Vec::new();
        for t in toks.chunks(p) {
            let r = rows.row(last, t[last]);
            if q_slot[r] == usize::MAX {
                q_slot[r] = q_rows.len();
                q_rows.push(r);
            }
        }
        let table: Option<Vec<f32>> = (q_rows.len() * r_n <= n * p).then(|| {
            let mut tab = vec![0f32; q_rows.len() * r_n * h];
            tab.par_chunks_mut((r_n * h).max(1))
                .zip(&q_rows)
                .for_each(|(t, &qr)| {
                    for (kr, t) in t.chunks_mut(h.max(1)).enumerate() {
                        for (hi, t) in t.iter_mut().enumerate() {
                            *t = dot((qr * h + hi) * e, (kr * h + hi) * e);
                        }
                    }
                });
            tab
        });
        let mut pattern = vec![0f32; n * h * p];
        pattern
            .par_chunks_mut((h * p).max(1))
            .zip(toks.par_chunks(p))
            .with_min_len(64)
            .for_each_init(Vec::new, |key_rows, (pat, t)| {
                // The input's key rows (in the score table when there is one).
                key_rows.clear();
                key_rows.extend((0..p).map(|j| rows.row(j, t[j])));
                let q_base = table
                    .as_ref()
                    .map(|_| q_slot[rows.row(last, t[last])] * r_n);
                for hi in 0..h {
                    let scores = &mut pat[hi * p..(hi + 1) * p];
                    // The last query attends to every key (j ≤ last), causal or not.
                    for (j, sc) in scores.iter_mut().enumerate() {
                        *sc = match (&table, q_base) {
                            (Some(tab), Some(qb)) => tab[(qb + key_rows[j]) * h + hi],
                            _ => dot(at(last, t[last], hi), at(j, t[j], hi)),
                        };
                    }
                    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for sc in scores.iter_mut() {
                        *sc = (*sc - m).exp();
                        sum += *sc;
                    }
                    scores.iter_mut().for_each(|sc| *sc /= sum);
                }
            });
        Ok(AttnPass {
            rows,
            x,
            q,
            k,
            v: vt,
            pattern: ndarray::Array3::from_shape_vec((n, h, p), pattern).expect("n × H × P"),
            tokens: toks,
        })
    }

    /// Number of inputs.
    pub fn len(&self) -> usize {
        self.pattern.dim().0
    }

    /// Positions per input.
    pub fn n_pos(&self) -> usize {
        self.pattern.dim().2
    }

    /// The input tokens, [N·P] row-major.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The (weight, table offset) terms of input `i`'s attention-weighted sum over a
    /// per-(row, head) table of rows `width` wide, heads outer and keys inner (TL's order).
    fn terms(
        &self,
        i: usize,
        width: usize,
        heads: std::ops::Range<usize>,
        out: &mut Vec<(f32, usize)>,
    ) {
        let (_, h, p) = self.pattern.dim();
        let t = &self.tokens[i * p..(i + 1) * p];
        let pat = self.pattern.as_slice().expect("standard layout");
        out.clear();
        for hi in heads {
            for (j, &tj) in t.iter().enumerate() {
                out.push((
                    pat[(i * h + hi) * p + j],
                    (self.rows.row(j, tj) * h + hi) * width,
                ));
            }
        }
    }

    /// `hook_z[:, -1]` flattened, [len(inputs), H·E], for the given inputs:
    /// z = Σ_j pattern·v per head (TL's order).
    fn z(&self, inputs: &[usize]) -> Array2<f32> {
        let (_, h, _) = self.pattern.dim();
        let e = self.v.dim().2;
        let vs = self.v.as_slice().expect("standard layout");
        let zero = vec![0f32; e];
        let mut z = Array2::<f32>::zeros((inputs.len(), h * e));
        z.as_slice_mut()
            .expect("standard layout")
            .par_chunks_mut((h * e).max(1))
            .zip(inputs.par_iter())
            .for_each_init(Vec::new, |terms, (zr, &i)| {
                for hi in 0..h {
                    self.terms(i, e, hi..hi + 1, terms);
                    simd::gather_sum(
                        simd::as_uninit(&mut zr[hi * e..(hi + 1) * e]),
                        &zero,
                        vs,
                        terms,
                        false,
                    );
                }
            });
        z
    }
}

/// The last position's activations and logits of a 1-layer model, tabulated (module docs);
/// the residual stream (`resid_mid`, `resid_post`) only when `with_resid`.
pub fn last_position(
    model: &HookedTransformer<Cpu>,
    tokens: &Array2<u32>,
    with_resid: bool,
) -> Result<LastPosition> {
    let norm = model.normalization();
    if norm == NormKind::None {
        let pass = NormFreePass::new(model, tokens, with_resid, tokens.nrows(), 0)?;
        return Ok(LastPosition {
            pattern: pass.attn.pattern,
            resid_mid: pass.resid_mid,
            mlp_post: pass.mlp_post,
            resid_post: pass.resid_post,
            logits: pass.logits,
        });
    }
    let attn = AttnPass::new(model, tokens)?;
    let cfg = &model.cfg;
    let sd = &model.state_dict;
    let be = Cpu;
    let f = |name: &str| sd.array::<f32>(name, None);
    let (n, p) = tokens.dim();
    let last = p - 1;
    // attn_out = z @ W_O (flattened) + b_O, batched; resid_mid = x_last + attn_out.
    let w_o = f("blocks.0.attn.W_O")?;
    let w_o_flat = w_o
        .view()
        .into_shape_with_order(IxDyn(&[cfg.n_heads() * cfg.d_head(), cfg.d_model()]))
        .expect("W_O [H, E, D]")
        .to_owned();
    let all: Vec<usize> = (0..n).collect();
    let z = attn.z(&all);
    let attn_out = be.linear(&z.into_dyn(), &w_o_flat, Some(f("blocks.0.attn.b_O")?))?;
    let x_last: Vec<usize> = (0..n)
        .map(|i| attn.rows.row(last, tokens[[i, last]]))
        .collect();
    let x_last = attn.x.select(Axis(0), &x_last).into_dyn();
    let resid_mid = be.add(x_last, &attn_out)?;
    let mut mlp_post = None;

    // ln2 → MLP → resid_post → ln_final → unembed, batched over the last position.
    let resid_post = if cfg.attn_only {
        resid_mid.clone()
    } else {
        let x = apply_norm(model, &resid_mid, "blocks.0.ln2", norm)?;
        let pre = be.linear(&x, f("blocks.0.mlp.W_in")?, Some(f("blocks.0.mlp.b_in")?))?;
        let act = cfg
            .act_fn
            .as_deref()
            .and_then(Activation::from_name)
            .expect("checked at construction");
        let mut post = be.activation(pre, act)?;
        if cfg.act_fn.as_deref() == Some("solu_ln") {
            let kind = if norm == NormKind::LN {
                NormKind::LN
            } else {
                NormKind::LNPre
            };
            post = apply_norm(model, &post, "blocks.0.mlp.ln", kind)?;
        }
        let mlp_out = be.linear(
            &post,
            f("blocks.0.mlp.W_out")?,
            Some(f("blocks.0.mlp.b_out")?),
        )?;
        mlp_post = Some(post.into_dimensionality().expect("[N, d_mlp]"));
        be.add(resid_mid.clone(), &mlp_out)?
    };
    let resid = apply_norm(model, &resid_post, "ln_final", norm)?;
    let logits = be.linear(&resid, f("unembed.W_U")?, Some(f("unembed.b_U")?))?;
    Ok(LastPosition {
        pattern: attn.pattern,
        resid_mid: Some(resid_mid.into_dimensionality().expect("[N, D]")),
        mlp_post,
        resid_post: Some(resid_post.into_dimensionality().expect("[N, D]")),
        logits: logits.into_dimensionality().expect("[N, V]"),
    })
}

/// Per input i: `out[i] = act(base[base_idx[i]] + Σ_{h,j} pattern[i, h, j]·table[row(j, t_j)·H + h])`
/// — the constant part plus the attention-weighted gather of a per-(row, head) table, in
/// parallel ([`gather_rows`] per block of inputs); `act` is ReLU when `relu`, else the
/// identity. Also returns, per input, whether the pre-activation row has an entry within
/// [`KINK`] of the row's largest magnitude of zero (see [`KinksTlWay`]).
fn gather_heads(
    attn: &AttnPass,
    table: &Array2<f32>,
    base: &Array2<f32>,
    base_idx: &[usize],
    relu: bool,
) -> (Array2<f32>, Vec<bool>) {
    let n = attn.len();
    let width = table.ncols();
    let mut out = Array2::<f32>::uninit((n, width));
    let mut near = vec![false; n];
    out.as_slice_mut()
        .expect("standard layout")
        .par_chunks_mut((BLOCK * width).max(1))
        .zip(near.par_chunks_mut(BLOCK))
        .enumerate()
        .for_each(|(c, (o, nr))| {
            gather_rows(attn, table, base, base_idx, c * BLOCK, o, nr, relu);
        });
    // SAFETY: gather_rows wrote every element of every row.
    (unsafe { out.assume_init() }, near)
}

/// Inputs per block of the tabulated pass: a block's `post` rows (BLOCK × d_mlp) stay in
/// L2 while the logits are computed from them.
const BLOCK: usize = 64;

/// [`gather_heads`] for the inputs `i0 .. i0 + near.len()` into `out` (their rows), on the
/// calling thread.
#[allow(clippy::too_many_arguments)]
fn gather_rows(
    attn: &AttnPass,
    table: &Array2<f32>,
    base: &Array2<f32>,
    base_idx: &[usize],
    i0: usize,
    out: &mut [std::mem::MaybeUninit<f32>],
    near: &mut [bool],
    relu: bool,
) {
    let h = attn.pattern.dim().1;
    let width = table.ncols();
    let tab = table.as_slice().expect("standard layout");
    let mut terms = Vec::with_capacity(h * attn.n_pos());
    for (k, (row, near)) in out
        .chunks_mut(width.max(1))
        .zip(near.iter_mut())
        .enumerate()
    {
        let i = i0 + k;
        attn.terms(i, width, 0..h, &mut terms);
        let b = base.row(base_idx[i]);
        let b = b.as_slice().expect("standard layout");
        let (lo, hi) = simd::gather_sum(row, b, tab, &terms, relu);
        *near = lo < KINK * hi;
    }
}

/// Rows of `pre` with an entry closer to the ReLU's kink than this fraction of the row's
/// largest magnitude are recomputed in TL's order of operations ([`KinksTlWay`]). Measured over
/// 150 million entries of the demo run's training rows (ten checkpoints from epoch 1,000 to
/// 25,000), the tabulated `pre` differed from TL's by at most 1.5e-6 of the row's largest
/// magnitude (more than 4e-7 for 0.04% of them), so 1e-5 leaves a margin of 6.7×. It flags
/// 2–12% of the training rows; 1e-4 flagged 20–55%, and their recomputation took 6–8% of an
/// epoch's CPU time.
const KINK: f32 = 1e-5;

/// ReLU kinks decided TL's way: [`KinksTlWay::apply`] recomputes, in TL's order of operations
/// (`resid_mid = x + z·W_O + b_O`, `pre = resid_mid·W_in + b_in`, the same products as the
/// general path; W_O and W_in packed once per pass), `pre` of the inputs `i0 + k` that
/// `near[k]` flags (an entry within [`KINK`] of the row's largest magnitude of zero), and
/// writes `relu(pre)` into their rows `k` of `post`.
///
/// The tabulated `pre` differs from TL's by float32 rounding (~1e-6 of the row's scale), which
/// is harmless everywhere except at a ReLU's kink: an entry that rounds to the other side of 0
/// switches that neuron's gradient on or off for the input. In training that happened about
/// once in ten epochs and moved the loss of the following epochs by 2e-6 relative to PyTorch's
/// (issue 4 asks for 1e-6). For the recomputed rows `pre` equals the general path's bit for
/// bit. (Recomputing only the entries near the kink instead of whole rows was tried: every
/// ReLU decision was still TL's, checked on every training row, yet the losses of epochs 3–9
/// moved to 2e-7–3e-6 of PyTorch's instead of ≤ 3.3e-9, so whole rows are kept.)
struct KinksTlWay {
    w_o: PackedB,
    w_in: PackedB,
    b_o: Vec<f32>,
    b_in: Vec<f32>,
}

impl KinksTlWay {
    fn new(
        w_o: ndarray::ArrayView2<f32>,
        b_o: ndarray::ArrayView1<f32>,
        w_in: ndarray::ArrayView2<f32>,
        b_in: ndarray::ArrayView1<f32>,
    ) -> KinksTlWay {
        let pack = |w: ndarray::ArrayView2<f32>| {
            // SAFETY: the view is valid for its shape and strides.
            unsafe {
                PackedB::new(
                    w.nrows(),
                    w.ncols(),
                    Mat {
                        ptr: w.as_ptr(),
                        rs: w.strides()[0],
                        cs: w.strides()[1],
                    },
                )
            }
        };
        KinksTlWay {
            w_o: pack(w_o),
            w_in: pack(w_in),
            b_o: b_o.to_vec(),
            b_in: b_in.to_vec(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        mut post: ndarray::ArrayViewMut2<f32>,
        near: &[bool],
        i0: usize,
        attn: &AttnPass,
        base_idx: &[usize],
        base_rows: &[usize],
    ) {
        let local: Vec<usize> = (0..near.len()).filter(|&k| near[k]).collect();
        if local.is_empty() {
            return;
        }
        let inputs: Vec<usize> = local.iter().map(|&k| i0 + k).collect();
        let (r, d, m) = (inputs.len(), self.b_o.len(), self.b_in.len());
        let z = attn.z(&inputs);
        let mut resid_mid = Array2::<f32>::zeros((r, d));
        let mut pre = Array2::<f32>::zeros((r, m));
        let mat = |a: &Array2<f32>| Mat {
            ptr: a.as_ptr(),
            rs: a.ncols() as isize,
            cs: 1,
        };
        // SAFETY: standard-layout arrays of the shapes the products expect.
        unsafe {
            let c = resid_mid.as_mut_ptr();
            self.w_o.mul(r, mat(&z), c, d, false, Some(&self.b_o));
        }
        for (mut row, &i) in resid_mid.outer_iter_mut().zip(&inputs) {
            row += &attn.x.row(base_rows[base_idx[i]]);
        }
        // SAFETY: as above.
        unsafe {
            let c = pre.as_mut_ptr();
            self.w_in
                .mul(r, mat(&resid_mid), c, m, false, Some(&self.b_in));
        }
        for (row, &k) in pre.outer_iter().zip(&local) {
            post.row_mut(k)
                .iter_mut()
                .zip(row)
                .for_each(|(y, &x)| *y = simd::relu(x));
        }
    }
}

/// Work done on the first [`BlockSink::rows`] inputs of a tabulated pass, block by block while
/// each block's `post` and logits are still in cache (the trainer's loss and backward pass,
/// `train::grad`, so that neither `post` nor the per-input gradients go through memory). The
/// rows are split into [`BlockSink::chunks`] fixed ranges, each processed in input order by one
/// task with its own accumulator: the results do not depend on the thread count.
pub(crate) trait BlockSink: Sync {
    type Acc: Send;
    fn rows(&self) -> usize;
    fn chunks(&self) -> usize;
    /// The accumulator of the chunk of inputs `range`.
    fn start(&self, t: &Tables, range: std::ops::Range<usize>) -> Self::Acc;
    /// Inputs `i0 ..` with their `post` ([rows, d_mlp]) and logits ([rows, d_vocab_out]).
    fn block(&self, t: &Tables, acc: &mut Self::Acc, i0: usize, post: &[f32], logits: &[f32]);
}

/// The tables of a [`NormFreePass`] that a [`BlockSink`] reads.
pub(crate) struct Tables<'a> {
    pub attn: &'a AttnPass,
    pub ovi: &'a Array2<f32>,
    pub ovu: &'a Array2<f32>,
    pub w_l: &'a Array2<f32>,
    /// The pair rows at the last position.
    pub base_rows: &'a [usize],
    /// Per input, the slot of its last-position row in `base_rows`.
    pub base_idx: &'a [usize],
}

/// No per-block work (evaluation).
pub(crate) struct NoSink;

impl BlockSink for NoSink {
    type Acc = ();
    fn rows(&self) -> usize {
        0
    }
    fn chunks(&self) -> usize {
        1
    }
    fn start(&self, _: &Tables, _: std::ops::Range<usize>) {}
    fn block(&self, _: &Tables, _: &mut (), _: usize, _: &[f32], _: &[f32]) {}
}

impl NormFreePass {
    /// The norm-free case, tabulated through the MLP: with no LayerNorm the residual stream is
    /// linear in the attention weights, so per (position, token, head) row the products
    /// OV = v·W_O, OV·W_in and OV·W_U are tables, the constant part (the last token's embedding
    /// plus b_O) is a table over the last token, and per input only
    /// `pre = base_in[t] + Σ_{h,j} pattern·OVI[j, t_j, h]` (12 rows of d_mlp for the demo) and
    /// `logits = base_U[t] + Σ pattern·OVU + post·W_L` (W_L = W_out·W_U) remain — about 2.5×
    /// fewer multiply-adds than z·W_O, resid·W_in, post·W_out, resid·W_U. Equal to TL's order of
    /// operations up to float32 rounding (tested against the general path and TL's logits).
    /// For the first `kink_rows` inputs (the trainer's train set), ReLU decisions near the kink
    /// follow TL's order of operations (see [`KinksTlWay`]). The MLP and logits run in blocks
    /// of [`BLOCK`] inputs so that a block's `post` is still in cache when `post·W_L` reads it;
    /// `post` is kept for the first `post_rows` inputs only (all with `with_resid`). Every
    /// input's values depend only on its own tokens, not on the rest of the batch.
    pub(crate) fn new(
        model: &HookedTransformer<Cpu>,
        tokens: &Array2<u32>,
        with_resid: bool,
        post_rows: usize,
        kink_rows: usize,
    ) -> Result<NormFreePass> {
        Self::with_sink(model, tokens, with_resid, post_rows, kink_rows, &NoSink).map(|(p, _)| p)
    }

    /// [`NormFreePass::new`], handing the first `sink.rows()` inputs' blocks to `sink` (their
    /// `post` is then not kept: `post_rows` must be 0); returns its accumulators in chunk order.
    pub(crate) fn with_sink<S: BlockSink>(
        model: &HookedTransformer<Cpu>,
        tokens: &Array2<u32>,
        with_resid: bool,
        post_rows: usize,
        kink_rows: usize,
        sink: &S,
    ) -> Result<(NormFreePass, Vec<S::Acc>)> {
        use crate::backend::cpu::matmul;
        let n_sink = sink.rows();
        if n_sink > tokens.nrows() || (n_sink > 0 && (with_resid || post_rows > 0)) {
            return Err(Error::invalid(
                "tabulated pass",
                format!(
                    "{n_sink} rows handed on of {} inputs, with {post_rows} post rows kept",
                    tokens.nrows()
                ),
            ));
        }
        if model.normalization() != NormKind::None {
            return Err(Error::Unsupported(
                "the norm-free tabulated pass needs normalization_type None".into(),
            ));
        }

        let attn = AttnPass::new(model, tokens)?;
        let cfg = &model.cfg;
        let sd = &model.state_dict;
        let be = Cpu;
        let f2 = |name: &str| -> Result<ndarray::ArrayView2<f32>> {
            let a = sd.array::<f32>(name, None)?;
            a.view().into_dimensionality().map_err(|_| {
                Error::invalid(name, format!("expected 2 dims, found {:?}", a.shape()))
            })
        };
        let f1 = |name: &str| -> Result<ndarray::ArrayView1<f32>> {
            let a = sd.array::<f32>(name, None)?;
            a.view()
                .into_dimensionality()
                .map_err(|_| Error::invalid(name, format!("expected 1 dim, found {:?}", a.shape())))
        };
        let (n, p) = tokens.dim();
        let (d, h, e) = (cfg.d_model(), cfg.n_heads(), cfg.d_head());
        let last = p - 1;
        let r_n = attn.rows.len();
        // OV[(r, h), :] = v[r, h, :] · W_O[h]   → [R·H, D]
        let w_o = sd.array::<f32>("blocks.0.attn.W_O", Some(&[h, e, d]))?;
        let per_head: Vec<Array2<f32>> = (0..h)
            .into_par_iter()
            .map(|hi| {
                let w = w_o.index_axis(Axis(0), hi);
                let w = w.into_dimensionality::<ndarray::Ix2>().expect("[E, D]");
                attn.v.index_axis(Axis(1), hi).dot(&w)
            })
            .collect();
        let mut ov = ndarray::Array3::<f32>::zeros((r_n, h, d));
        for (hi, o) in per_head.iter().enumerate() {
            ov.index_axis_mut(Axis(1), hi).assign(o);
        }
        let ov = ov.into_shape_with_order((r_n * h, d)).expect("rows");
        // The constant part: the last token's residual + b_O, per last-position row [L, D].
        let base_rows: Vec<usize> = (0..r_n).filter(|&r| attn.rows.pairs[r].0 == last).collect();
        let mut slot = vec![usize::MAX; r_n];
        for (l, &r) in base_rows.iter().enumerate() {
            slot[r] = l;
        }
        let base_idx: Vec<usize> = (0..n)
            .map(|i| slot[attn.rows.row(last, attn.tokens[i * p + last])])
            .collect();
        let base_resid = attn.x.select(Axis(0), &base_rows) + f1("blocks.0.attn.b_O")?;
        let w_u = f2("unembed.W_U")?;
        let mut base_u = matmul(base_resid.view(), w_u) + f1("unembed.b_U")?;
        let ovu = matmul(ov.view(), w_u);
        let gather = |table: &Array2<f32>, base: &Array2<f32>, relu: bool| {
            gather_heads(&attn, table, base, &base_idx, relu)
        };
        let resid_mid = with_resid.then(|| gather(&ov, &base_resid, false).0);
        let mut resid_post = resid_mid.clone();
        let mut mlp_post = None;
        let logits;
        let mut accs = Vec::new();
        if cfg.attn_only {
            if n_sink > 0 {
                return Err(Error::Unsupported(
                    "per-block work on an attention-only model".into(),
                ));
            }
            logits = gather(&ovu, &base_u, false).0;
        } else {
            let w_in = f2("blocks.0.mlp.W_in")?;
            let w_out = f2("blocks.0.mlp.W_out")?;
            let b_out = f1("blocks.0.mlp.b_out")?;
            let b_in = f1("blocks.0.mlp.b_in")?;
            let base_in = matmul(base_resid.view(), w_in) + b_in;
            let ovi = matmul(ov.view(), w_in);
            let act = cfg
                .act_fn
                .as_deref()
                .and_then(Activation::from_name)
                .expect("checked at construction");
            let solu_ln = cfg.act_fn.as_deref() == Some("solu_ln");
            base_u += &b_out.dot(&w_u);
            // W_L in f64, rounded once: its f32 rounding is then the only error the fused
            // product adds over TL's (post·W_out)·W_U.
            // Rows in parallel: each element is one dot product, whatever the split.
            use ndarray::parallel::prelude::*;
            let w_u64 = w_u.mapv(|x| x as f64);
            let mut w_l = Array2::<f32>::zeros((w_out.nrows(), w_u.ncols()));
            let rows = w_out.nrows().div_ceil(rayon::current_num_threads()).max(1);
            w_l.axis_chunks_iter_mut(Axis(0), rows)
                .into_par_iter()
                .zip(w_out.axis_chunks_iter(Axis(0), rows).into_par_iter())
                .for_each(|(mut l, o)| {
                    l.assign(&o.mapv(|x| x as f64).dot(&w_u64).mapv(|x| x as f32));
                });
            let w_o = w_o
                .view()
                .into_shape_with_order((h * e, d))
                .expect("W_O [H, E, D]");
            let b_o = f1("blocks.0.attn.b_O")?;
            let (m, v_out) = (cfg.d_mlp(), cfg.d_vocab_out());
            // SAFETY: w_l is a standard-layout [m, v_out] array.
            let w_l_packed = unsafe {
                PackedB::new(
                    m,
                    v_out,
                    Mat {
                        ptr: w_l.as_ptr(),
                        rs: v_out as isize,
                        cs: 1,
                    },
                )
            };
            // Block by block of inputs (in parallel): pre = base_in + Σ pattern·OVI with the
            // activation (ReLU as it is gathered), the kinks decided TL's way for the first
            // `kink_rows` inputs, then logits = base_U + Σ pattern·OVU + post·W_L while the
            // block's post is in cache. Only the first `keep` inputs' post is kept.
            let kinks = KinksTlWay::new(w_o, b_o, w_in, b_in);
            let keep = if with_resid { n } else { post_rows.min(n) };
            let mut post_all = Array2::<f32>::uninit((keep, m));
            let mut lg = Array2::<f32>::uninit((n, v_out));
            let relu = act == Activation::Relu;
            // One block: pre = base_in + Σ pattern·OVI (ReLU as it is gathered) into `post`,
            // the kinks decided TL's way for the first `kink_rows` inputs, then logits =
            // base_U + Σ pattern·OVU + post·W_L while the block's post is in cache.
            type Uninit = std::mem::MaybeUninit<f32>;
            let run_block = |i0: usize, post: &mut [Uninit], lgb: &mut [Uninit]| -> Result<()> {
                let rows = lgb.len() / v_out.max(1);
                let mut near = vec![false; rows];
                gather_rows(&attn, &ovi, &base_in, &base_idx, i0, post, &mut near, relu);
                // SAFETY: gather_rows wrote every element of the block's rows.
                let post: &mut [f32] =
                    unsafe { std::slice::from_raw_parts_mut(post.as_mut_ptr().cast(), post.len()) };
                let mut pb =
                    ndarray::ArrayViewMut2::from_shape((rows, m), post).expect("block rows");
                if !relu {
                    Cpu::activate_rows(pb.as_slice_mut().expect("rows"), m, act);
                } else if i0 < kink_rows {
                    // Where the activation's kink is closer than the tabulation's rounding,
                    // decide it with TL's order of operations.
                    let k = (kink_rows - i0).min(rows);
                    kinks.apply(
                        pb.slice_mut(ndarray::s![..k, ..]),
                        &near[..k],
                        i0,
                        &attn,
                        &base_idx,
                        &base_rows,
                    );
                }
                if solu_ln {
                    let (y, _) = be.normalize(&pb.to_owned().into_dyn(), true, cfg.eps as f32)?;
                    pb.assign(
                        &y.into_dimensionality::<ndarray::Ix2>()
                            .expect("[rows, d_mlp]"),
                    );
                }
                gather_rows(&attn, &ovu, &base_u, &base_idx, i0, lgb, &mut near, false);
                // SAFETY: post is [rows, m] row-major; lgb is [rows, v_out] (just written).
                unsafe {
                    w_l_packed.mul(
                        rows,
                        Mat {
                            ptr: pb.as_ptr(),
                            rs: m as isize,
                            cs: 1,
                        },
                        lgb.as_mut_ptr().cast(),
                        v_out,
                        true,
                        None,
                    )
                };
                Ok(())
            };
            let post_s = post_all.as_slice_mut().expect("standard layout");
            let (lg_sink, lg_after) = lg
                .as_slice_mut()
                .expect("standard layout")
                .split_at_mut(n_sink * v_out);
            // After the sink's rows: the kept rows (none when there is a sink), then the rest;
            // blocks never straddle `keep`.
            let (lg_keep, lg_rest) = lg_after.split_at_mut(keep.saturating_sub(n_sink) * v_out);
            let tables = Tables {
                attn: &attn,
                ovi: &ovi,
                ovu: &ovu,
                w_l: &w_l,
                base_rows: &base_rows,
                base_idx: &base_idx,
            };
            // The work: the sink's chunks (each one task, its blocks in order) and the other
            // blocks, the chunks spread evenly through the list with the blocks after each, so
            // that when rayon halves the list each half starts with its share of the chunks
            // and ends with blocks the other threads can take.
            enum Work<'a> {
                Chunk(usize, &'a mut [Uninit]),
                Block(usize, Option<&'a mut [Uninit]>, &'a mut [Uninit]),
            }
            let per = n_sink.div_ceil(sink.chunks().max(1)).max(1);
            let chunks: Vec<Work> = lg_sink
                .chunks_mut(per * v_out.max(1))
                .enumerate()
                .map(|(c, l)| Work::Chunk(c, l))
                .collect();
            let kept = post_s
                .chunks_mut((BLOCK * m).max(1))
                .zip(lg_keep.chunks_mut((BLOCK * v_out).max(1)))
                .enumerate()
                .map(|(c, (p, l))| Work::Block(c * BLOCK, Some(p), l));
            let rest = lg_rest
                .chunks_mut((BLOCK * v_out).max(1))
                .enumerate()
                .map(|(c, l)| Work::Block(keep.max(n_sink) + c * BLOCK, None, l));
            let blocks: Vec<Work> = kept.chain(rest).collect();
            let (n_chunks, n_blocks) = (chunks.len(), blocks.len());
            let mut work = Vec::with_capacity(n_chunks + n_blocks);
            let mut blocks = blocks.into_iter();
            for (c, chunk) in chunks.into_iter().enumerate() {
                work.push(chunk);
                let share = (c + 1) * n_blocks / n_chunks - c * n_blocks / n_chunks;
                work.extend(blocks.by_ref().take(share));
            }
            work.extend(blocks);
            let done: Vec<Option<S::Acc>> = work
                .into_par_iter()
                .with_max_len(1)
                .map_init(Vec::new, |post, item| -> Result<Option<S::Acc>> {
                    match item {
                        Work::Block(i0, kept, lgb) => {
                            let rows = lgb.len() / v_out.max(1);
                            let post = match kept {
                                Some(p) => p,
                                None => {
                                    post.resize(rows * m, std::mem::MaybeUninit::new(0.0));
                                    &mut post[..rows * m]
                                }
                            };
                            run_block(i0, post, lgb)?;
                            Ok(None)
                        }
                        Work::Chunk(c, lgc) => {
                            let end = ((c + 1) * per).min(n_sink);
                            let mut acc = sink.start(&tables, c * per..end);
                            for (b, lgb) in lgc.chunks_mut((BLOCK * v_out).max(1)).enumerate() {
                                let i0 = c * per + b * BLOCK;
                                let rows = lgb.len() / v_out.max(1);
                                post.resize(rows * m, std::mem::MaybeUninit::new(0.0));
                                run_block(i0, &mut post[..rows * m], lgb)?;
                                // SAFETY: run_block wrote the block's post and logits rows.
                                let (p, l) = unsafe {
                                    (
                                        std::slice::from_raw_parts(post.as_ptr().cast(), rows * m),
                                        std::slice::from_raw_parts(lgb.as_ptr().cast(), lgb.len()),
                                    )
                                };
                                sink.block(&tables, &mut acc, i0, p, l);
                            }
                            Ok(Some(acc))
                        }
                    }
                })
                .collect::<Result<_>>()?;
            accs = done.into_iter().flatten().collect();
            // SAFETY: every block wrote its post rows (kept ones) and its logits rows.
            let (post, lg) = unsafe { (post_all.assume_init(), lg.assume_init()) };
            logits = lg;
            if let Some(r) = &mut resid_post {
                *r += &matmul(post.view(), w_out);
                *r += &b_out;
            }
            mlp_post = Some(post);
        }
        Ok((
            NormFreePass {
                attn,
                base_rows,
                base_resid,
                mlp_post,
                resid_mid,
                resid_post,
                logits,
            },
            accs,
        ))
    }
}
