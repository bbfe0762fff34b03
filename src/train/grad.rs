//! The demo's loss and its exact gradients for the model family the trainer supports: one layer,
//! attention + ReLU MLP, no LayerNorm, standard positions, loss at the last position.
//!
//! The forward pass is the evaluation's tabulated pass (`eval::NormFreePass`): q, k, v and the
//! per-head products OV = v·W_O, OV·W_in, OV·W_U are tables over the (position, token) rows, and
//! per input only the last query's pattern, `pre = base_in + Σ pattern·OVI`, and
//! `logits = base_U + Σ pattern·OVU + post·W_L` (W_L = W_out·W_U) are computed. The backward
//! pass differentiates exactly that computation, which equals TL's graph (docs/reference.md §2) up to
//! float32 rounding. Its per-input work is three [N, d_mlp]×[d_mlp, d_vocab_out] products
//! (logits, `d_post = dlogits·W_Lᵀ`, `S = postᵀ·dlogits`); everything that goes through the
//! residual stream is first summed per table row — `BI[r, h] = Σ pattern·d_pre`,
//! `BL[r, h] = Σ pattern·dlogits` over the inputs that use row r — and then multiplied with the
//! small tables, per head h through its circuits `W_O[h]·W_in` and `W_O[h]·W_U`:
//! `P_h = V_hᵀ·BI_h`, `g_W_in = base_residᵀ·CI + Σ_h W_O[h]ᵀ·P_h`, `g_W_out = S·W_Uᵀ`,
//! `g_W_U = base_residᵀ·CL + Σ_h W_O[h]ᵀ·V_hᵀ·BL_h + W_outᵀ·S`, and for the attention weights
//! `g_W_O[h] = P_h·W_inᵀ + V_hᵀ·BL_h·W_Uᵀ`, `dv_h = BI_h·(W_O[h]·W_in)ᵀ + BL_h·(W_O[h]·W_U)ᵀ`
//! (the row sums of `pattern·d_resid_mid` carried through W_O; going through OV = v·W_O
//! instead, as the forward tables do, costs twice the multiply-adds: measured on Zen 3, the
//! weight products went from 5.5–7.7 to 4.4–5.3 ms, in parallel over heads). That is about
//! 2.5× fewer multiply-adds than back-propagating through resid·W_in, post·W_out and resid·W_U
//! per input.
//! (Measured alternative: back-propagating `d_resid_mid = d_pre·W_inᵀ + dlogits·W_Uᵀ` per input
//! makes the row sums 128 wide instead of 512 + 113, but its extra products cost more than that
//! saves: an epoch went from 39 to 43 ms.) The attention backward reads the same table rows
//! (OVI, OVU) as the row sums BI, BL update, so both happen in one pass over the inputs.
//!
//! All the per-input work runs inside the forward pass (`forward` hands a `BlockSink` to
//! the pass): each block of 64 training inputs is differentiated right after its logits, while
//! its `post` rows and logits are still in cache, so neither `post` nor `dlogits` nor `d_pre`
//! is ever stored for the whole batch; `backward` adds the chunks' sums and does the small
//! weight products. S is accumulated with the bits of one `postᵀ·dlogits` product (each
//! element a fused multiply-add chain over each window of 256 inputs, the windows added in
//! order), so splitting the pass into blocks changed no result.
//!
//! Float32 like torch except where torch uses float64: the loss is computed in f64 and its
//! gradient `(softmax − onehot)/N` is cast to f32 where torch's `.to(float64)` node casts it back.
//! Biases are frozen (the demo sets `requires_grad = False` on every `b_`), so only `W_`
//! gradients are produced. The per-row sums run over fixed chunks of the inputs, each in input
//! order, added in chunk order, so gradients do not depend on the thread count.

use crate::backend::cpu::{matmul, matmul_acc};
use crate::backend::gemm::{sgemm_chain, Mat, PackedB, KC};
use crate::backend::simd::{self, axpy};
use crate::error::{Error, Result};
use crate::model::tabulated::{BlockSink, NormFreePass, Tables};
use crate::model::{HookedTransformer, HookedTransformerConfig, StateDict};
use crate::tensor::Tensor;
use ndarray::{s, Array2, ArrayView2, Axis, Ix2, Ix3, IxDyn};
use rayon::prelude::*;

/// Check that the trainer supports `cfg` (one layer, attention + ReLU MLP, no LayerNorm).
pub fn check_trainable(cfg: &HookedTransformerConfig) -> Result<()> {
    crate::model::hooked::check_supported(cfg)?;
    let mut bad = Vec::new();
    if cfg.n_layers != 1 {
        bad.push(format!("n_layers={}", cfg.n_layers));
    }
    if cfg.attn_only {
        bad.push("attn_only".into());
    }
    if cfg.normalization_type.is_some() {
        bad.push(format!("normalization_type={:?}", cfg.normalization_type));
    }
    if cfg.act_fn.as_deref() != Some("relu") {
        bad.push(format!("act_fn={:?}", cfg.act_fn));
    }
    if cfg.attention_dir != "causal" {
        bad.push(format!("attention_dir={}", cfg.attention_dir));
    }
    // use_attn_result changes only which hooks exist, not the arithmetic: allowed.
    bad.extend(crate::model::hooked::enabled(&[
        ("use_split_qkv_input", cfg.use_split_qkv_input),
        ("use_attn_in", cfg.use_attn_in),
        (
            "scale_attn_by_inverse_layer_idx",
            cfg.scale_attn_by_inverse_layer_idx,
        ),
    ]));
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "training this config (the trainer supports 1-layer attention + ReLU MLP models without \
             LayerNorm): {}",
            bad.join(", ")
        )))
    }
}

fn w<'a>(sd: &'a StateDict, name: &str) -> Result<&'a ndarray::ArrayD<f32>> {
    sd.array::<f32>(name, None)
}

fn two(a: &ndarray::ArrayD<f32>) -> ArrayView2<'_, f32> {
    a.view().into_dimensionality::<Ix2>().expect("2-D")
}

/// Loss (f64) and the gradient of every `W_` parameter, for tokens [N, P] and labels `[N]`.
pub fn loss_and_grads(
    cfg: &HookedTransformerConfig,
    sd: &StateDict,
    tokens: &Array2<u32>,
    labels: &[u32],
) -> Result<(f64, StateDict)> {
    check_trainable(cfg)?;
    let model = HookedTransformer::new(cfg.clone(), sd.clone())?;
    let pass = forward(&model, tokens, labels)?;
    backward(&model, pass)
}

/// The forward pass over `tokens`, whose first `labels.len()` rows are the training inputs
/// (any further rows — the test set — are only evaluated), with the per-input half of the
/// backward pass already done block by block ([`TrainSink`]); [`backward`] finishes it.
pub(crate) struct TrainPass {
    pub pass: NormFreePass,
    chunks: Vec<ChunkAcc>,
}

pub(crate) fn forward(
    model: &HookedTransformer,
    tokens: &Array2<u32>,
    labels: &[u32],
) -> Result<TrainPass> {
    check_trainable(&model.cfg)?;
    let n = labels.len();
    if n == 0 || n > tokens.nrows() {
        return Err(Error::invalid(
            "training batch",
            format!("{} inputs, {n} labels", tokens.nrows()),
        ));
    }
    let v_out = model.cfg.d_vocab_out();
    if let Some(&y) = labels.iter().find(|&&y| y as usize >= v_out) {
        return Err(Error::invalid(
            "labels",
            format!("label {y} out of range for d_vocab_out {v_out}"),
        ));
    }
    let sink = TrainSink {
        labels,
        inv_n: 1.0 / n as f64,
        scale: model.layer_attn_scale(0),
        h: model.cfg.n_heads(),
        e: model.cfg.d_head(),
        m: model.cfg.d_mlp(),
        v_out,
        w_lt: std::sync::OnceLock::new(),
    };
    let (pass, chunks) = NormFreePass::with_sink(model, tokens, false, 0, n, &sink)?;
    Ok(TrainPass { pass, chunks })
}

/// Fixed ranges of the training inputs, each summed in input order by one task (the sums do
/// not depend on the thread count).
const CHUNKS: usize = 2;

/// The per-input half of the backward pass, run on each block of training inputs while its
/// `post` and logits are in cache: the loss and `dlogits = (softmax − onehot)/N` (f64, cast to
/// f32), `S += postᵀ·dlogits`, `d_pre = (dlogits·W_Lᵀ)·[post > 0]`, and the attention backward
/// with the per-row sums ([`TrainSink::input`]).
struct TrainSink<'a> {
    labels: &'a [u32],
    inv_n: f64,
    scale: f32,
    h: usize,
    e: usize,
    m: usize,
    v_out: usize,
    /// W_Lᵀ packed once per pass (by whichever chunk starts first).
    w_lt: std::sync::OnceLock<PackedB>,
}

/// Sums over the inputs that use each (position, token) row r: BI = Σ pattern·d_pre and
/// BL = Σ pattern·dlogits per head, DK = Σ d_score·q, and at the last position DQ = Σ dq,
/// CI = Σ d_pre, CL = Σ dlogits (the residual path).
struct Sums {
    bi: Vec<f32>,
    bl: Vec<f32>,
    dk: Vec<f32>,
    dq: Vec<f32>,
    ci: Vec<f32>,
    cl: Vec<f32>,
}

/// One chunk's accumulators and scratch.
struct ChunkAcc {
    /// The chunk's inputs.
    range: std::ops::Range<usize>,
    /// Per-input losses, in input order.
    losses: Vec<f64>,
    /// S = postᵀ·dlogits [d_mlp, d_vocab_out] with the bits of one product over all the
    /// inputs (`sgemm`: a fused multiply-add chain per element over each window of `KC`
    /// inputs, the windows added in order): the chains of the windows that begin in this
    /// chunk, complete ones first, then the one still open at the chunk's end.
    windows: Vec<Vec<f32>>,
    open: Option<(usize, Vec<f32>)>,
    /// The chunk's first inputs when their window began in the previous chunk: their post and
    /// dlogits rows, over which the merge continues that window's chain.
    head_post: Vec<f32>,
    head_dl: Vec<f32>,
    sums: Sums,
    dl: Vec<f32>,
    dp: Vec<f32>,
    exps: Vec<f64>,
    /// d_pattern and dq of one input.
    scratch: (Vec<f32>, Vec<f32>),
}

impl BlockSink for TrainSink<'_> {
    type Acc = ChunkAcc;

    fn rows(&self) -> usize {
        self.labels.len()
    }

    fn chunks(&self) -> usize {
        CHUNKS
    }

    fn start(&self, t: &Tables, range: std::ops::Range<usize>) -> ChunkAcc {
        let (h, m, v) = (self.h, self.m, self.v_out);
        let (r_n, n_base) = (t.attn.rows.len(), t.base_rows.len());
        ChunkAcc {
            range,
            losses: Vec::new(),
            windows: Vec::new(),
            open: None,
            head_post: Vec::new(),
            head_dl: Vec::new(),
            sums: Sums {
                bi: vec![0f32; r_n * h * m],
                bl: vec![0f32; r_n * h * v],
                dk: vec![0f32; r_n * h * self.e],
                dq: vec![0f32; r_n * h * self.e],
                ci: vec![0f32; n_base * m],
                cl: vec![0f32; n_base * v],
            },
            dl: Vec::new(),
            dp: Vec::new(),
            exps: Vec::new(),
            scratch: (Vec::new(), Vec::new()),
        }
    }

    fn block(&self, t: &Tables, acc: &mut ChunkAcc, i0: usize, post: &[f32], logits: &[f32]) {
        let (m, v) = (self.m, self.v_out);
        let rows = logits.len() / v;
        acc.dl.resize(rows * v, 0.0);
        acc.dp.resize(rows * m, 0.0);
        for (r, (row, dl)) in logits.chunks(v).zip(acc.dl.chunks_mut(v)).enumerate() {
            let y = self.labels[i0 + r];
            let loss = crate::task::nll_and_grad(row, y, self.inv_n, dl, &mut acc.exps);
            acc.losses.push(loss);
        }
        let w_lt = self.w_lt.get_or_init(|| {
            // SAFETY: W_L is a standard-layout [d_mlp, d_vocab_out] array; its transpose is
            // [d_vocab_out, d_mlp] with strides (1, d_vocab_out).
            unsafe {
                PackedB::new(
                    v,
                    m,
                    Mat {
                        ptr: t.w_l.as_ptr(),
                        rs: 1,
                        cs: v as isize,
                    },
                )
            }
        });
        // S: each window's chain continued over the block's inputs in it.
        let mut r = 0;
        while r < rows {
            let i = i0 + r;
            let w0 = i / KC * KC;
            let seg = (w0 + KC).min(i0 + rows) - i;
            let (p_rows, d_rows) = (&post[r * m..(r + seg) * m], &acc.dl[r * v..(r + seg) * v]);
            if w0 < acc.range.start {
                acc.head_post.extend_from_slice(p_rows);
                acc.head_dl.extend_from_slice(d_rows);
            } else {
                if acc.open.as_ref().is_none_or(|(s, _)| *s != w0) {
                    acc.open = Some((w0, vec![0f32; m * v]));
                }
                let win = &mut acc.open.as_mut().expect("just opened").1;
                chain(m, v, p_rows, d_rows, win);
                if i + seg == w0 + KC || i + seg == self.labels.len() {
                    let (_, w) = acc.open.take().expect("open");
                    acc.windows.push(w);
                }
            }
            r += seg;
        }
        // SAFETY: dl is [rows, v] and dp [rows, m] row-major.
        unsafe {
            w_lt.mul(
                rows,
                Mat {
                    ptr: acc.dl.as_ptr(),
                    rs: v as isize,
                    cs: 1,
                },
                acc.dp.as_mut_ptr(),
                m,
                false,
                None,
            );
        }
        // relu passes the gradient where its output is > 0 (NaN included, as torch)
        acc.dp
            .iter_mut()
            .zip(post)
            .for_each(|(g, &x)| *g = if x <= 0.0 { 0.0 } else { *g });
        for r in 0..rows {
            self.input(
                t,
                &mut acc.sums,
                &mut acc.scratch,
                i0 + r,
                &acc.dl[r * v..(r + 1) * v],
                &acc.dp[r * m..(r + 1) * m],
            );
        }
    }
}

/// `acc ← acc + postᵀ·dl` continuing each element's chain, for post [rows, m], dl [rows, v].
fn chain(m: usize, v: usize, post: &[f32], dl: &[f32], acc: &mut [f32]) {
    let rows = dl.len() / v;
    assert!(
        post.len() == rows * m && acc.len() == m * v,
        "chain: shapes"
    );
    // SAFETY: postᵀ is [m, rows] with strides (1, m), dl [rows, v] row-major, acc [m, v].
    unsafe {
        sgemm_chain(
            m,
            rows,
            v,
            Mat {
                ptr: post.as_ptr(),
                rs: 1,
                cs: m as isize,
            },
            Mat {
                ptr: dl.as_ptr(),
                rs: v as isize,
                cs: 1,
            },
            acc.as_mut_ptr(),
            v,
        )
    }
}

impl TrainSink<'_> {
    /// The attention backward of input i and its share of the per-row sums. Per input:
    /// d_pattern = d_resid_mid·OV = dlogits·OVU + d_pre·OVI per (key, head) row, softmax
    /// backward → d_scores, dq. The dot products and BI/BL read the same table rows, so they
    /// are one fused loop.
    fn input(
        &self,
        t: &Tables,
        acc: &mut Sums,
        scratch: &mut (Vec<f32>, Vec<f32>),
        i: usize,
        dl: &[f32],
        dp: &[f32],
    ) {
        let (h, e, m, v_out) = (self.h, self.e, self.m, self.v_out);
        let attn = t.attn;
        let (p, hw) = (attn.n_pos(), h * e);
        let last = p - 1;
        let (rows, toks) = (&attn.rows, attn.tokens());
        let row_of = |j: usize| rows.row(j, toks[i * p + j]);
        let (ovi, ovu) = (
            t.ovi.as_slice().expect("standard layout"),
            t.ovu.as_slice().expect("standard layout"),
        );
        let (ks, qs) = (
            attn.k.as_slice().expect("standard layout"),
            attn.q.as_slice().expect("standard layout"),
        );
        let pat = attn.pattern.as_slice().expect("standard layout");
        let ql = row_of(last);
        let (dpat, dq) = (&mut scratch.0, &mut scratch.1);
        dpat.resize(p, 0.0);
        dq.clear();
        dq.resize(hw, 0.0);
        for hi in 0..h {
            let pw = &pat[(i * h + hi) * p..(i * h + hi + 1) * p];
            if let Ok(pw3) = <[f32; 3]>::try_from(pw) {
                // The three keys' rows side by side (distinct rows: one per position).
                let rh: [usize; 3] = std::array::from_fn(|j| row_of(j) * h + hi);
                let span = |w: usize| rh.map(|r| r * w..(r + 1) * w);
                let du = simd::dot_axpy_n(
                    dl,
                    span(v_out).map(|s| &ovu[s]),
                    acc.bl.get_disjoint_mut(span(v_out)).expect("distinct rows"),
                    pw3,
                );
                let di = simd::dot_axpy_n(
                    dp,
                    span(m).map(|s| &ovi[s]),
                    acc.bi.get_disjoint_mut(span(m)).expect("distinct rows"),
                    pw3,
                );
                for j in 0..3 {
                    dpat[j] = du[j] + di[j];
                }
            } else {
                for j in 0..p {
                    let rh = row_of(j) * h + hi;
                    dpat[j] = simd::dot_axpy(
                        dl,
                        &ovu[rh * v_out..(rh + 1) * v_out],
                        &mut acc.bl[rh * v_out..(rh + 1) * v_out],
                        pw[j],
                    ) + simd::dot_axpy(
                        dp,
                        &ovi[rh * m..(rh + 1) * m],
                        &mut acc.bi[rh * m..(rh + 1) * m],
                        pw[j],
                    );
                }
            }
            let sum: f32 = (0..p).map(|j| pw[j] * dpat[j]).sum();
            let hs = hi * e..(hi + 1) * e;
            for j in 0..p {
                let dsj = pw[j] * (dpat[j] - sum) / self.scale;
                let r = row_of(j);
                axpy(
                    &mut dq[hs.clone()],
                    dsj,
                    &ks[(r * h + hi) * e..(r * h + hi + 1) * e],
                );
                axpy(
                    &mut acc.dk[r * hw..(r + 1) * hw][hs.clone()],
                    dsj,
                    &qs[ql * hw..(ql + 1) * hw][hs.clone()],
                );
            }
        }
        axpy(&mut acc.dq[ql * hw..(ql + 1) * hw], 1.0, &dq[..]);
        let l = t.base_idx[i];
        axpy(&mut acc.ci[l * m..(l + 1) * m], 1.0, dp);
        axpy(&mut acc.cl[l * v_out..(l + 1) * v_out], 1.0, dl);
    }
}

/// Loss and gradients of the training inputs of a pass made by [`forward`] with `model`:
/// the chunks' sums are added in chunk order, then multiplied with the small tables.
pub(crate) fn backward(model: &HookedTransformer, tp: TrainPass) -> Result<(f64, StateDict)> {
    let cfg = &model.cfg;
    let sd = &model.state_dict;
    check_trainable(cfg)?;
    let TrainPass { pass, chunks } = tp;
    let n: usize = chunks.iter().map(|c| c.losses.len()).sum();
    if n == 0 {
        return Err(Error::invalid("training batch", "no training inputs"));
    }
    let v_out = cfg.d_vocab_out();
    let (d, h, e) = (cfg.d_model(), cfg.n_heads(), cfg.d_head());
    let m = cfg.d_mlp();
    let hw = h * e;
    let w_in = two(w(sd, "blocks.0.mlp.W_in")?);
    let w_out = two(w(sd, "blocks.0.mlp.W_out")?);
    let w_u = two(w(sd, "unembed.W_U")?);
    let b_out = w(sd, "blocks.0.mlp.b_out")?;
    let flat = |name: &str| -> Result<Array2<f32>> {
        // W [H, D, E] → [D, H·E]
        let a = w(sd, name)?
            .view()
            .into_dimensionality::<Ix3>()
            .expect("3-D");
        Ok(a.permuted_axes([1, 0, 2])
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((d, hw))
            .expect("sizes"))
    };
    let (wq, wk, wv) = (
        flat("blocks.0.attn.W_Q")?,
        flat("blocks.0.attn.W_K")?,
        flat("blocks.0.attn.W_V")?,
    );
    let w_o = w(sd, "blocks.0.attn.W_O")?
        .view()
        .into_shape_with_order((h, e, d))
        .expect("W_O [H,E,D]")
        .to_owned();
    let attn = &pass.attn;
    let (base_rows, base_resid) = (&pass.base_rows, &pass.base_resid);
    let rows = &attn.rows;
    let r_n = rows.len();
    let n_base = base_rows.len();

    let loss = chunks.iter().flat_map(|c| &c.losses).sum::<f64>() / n as f64;
    // S: the windows in order, each added to the sum (the first one is the sum); a window
    // begun in one chunk is finished over the next chunk's head rows.
    let mut windows: Vec<Vec<f32>> = Vec::new();
    let mut pending: Option<Vec<f32>> = None;
    let mut sums: Option<Sums> = None;
    for c in chunks {
        if !c.head_dl.is_empty() {
            let mut p = pending
                .take()
                .expect("the head's window is open in the previous chunk");
            chain(m, v_out, &c.head_post, &c.head_dl, &mut p);
            let head_end = c.range.start + c.head_dl.len() / v_out;
            if head_end % KC == 0 || head_end == n {
                windows.push(p);
            } else {
                pending = Some(p);
            }
        }
        windows.extend(c.windows);
        if let Some((_, w)) = c.open {
            pending = Some(w);
        }
        let Some(sums) = &mut sums else {
            sums = Some(c.sums);
            continue;
        };
        for (x, y) in [
            (&mut sums.bi, &c.sums.bi),
            (&mut sums.bl, &c.sums.bl),
            (&mut sums.dk, &c.sums.dk),
            (&mut sums.dq, &c.sums.dq),
            (&mut sums.ci, &c.sums.ci),
            (&mut sums.cl, &c.sums.cl),
        ] {
            x.par_chunks_mut(1 << 14)
                .zip(y.par_chunks(1 << 14))
                .for_each(|(x, y)| axpy(x, 1.0, y));
        }
    }
    assert!(pending.is_none(), "S: the last window ends with the inputs");
    let sums = sums.expect("at least one chunk");
    // S = the windows added in order (the first one is the sum), element ranges in parallel.
    let mut windows = windows.into_iter();
    let mut s_sum = windows.next().expect("at least one window");
    let rest: Vec<Vec<f32>> = windows.collect();
    s_sum
        .par_chunks_mut(1 << 12)
        .enumerate()
        .for_each(|(c, x)| {
            for w in &rest {
                axpy(x, 1.0, &w[c << 12..(c << 12) + x.len()]);
            }
        });
    let arr = |v: Vec<f32>, r: usize, c: usize| Array2::from_shape_vec((r, c), v).expect("sizes");
    let s_mat = arr(s_sum, m, v_out);
    let bi = arr(sums.bi, r_n * h, m);
    let bl = arr(sums.bl, r_n * h, v_out);
    let dk_b = arr(sums.dk, r_n, hw);
    let dq_b = arr(sums.dq, r_n, hw);
    let ci = arr(sums.ci, n_base, m);
    let cl = arr(sums.cl, n_base, v_out);

    // ---- weight gradients from the row sums ----
    // Per head h, through its circuits W_O[h]·W_in and W_O[h]·W_U, with BI_h, BL_h the head's
    // rows of BI, BL and V_h its rows of v:
    //   P_h = V_hᵀ·BI_h, PL_h = V_hᵀ·BL_h,
    //   dW_O[h] = P_h·W_inᵀ + PL_h·W_Uᵀ,
    //   dv_h = BI_h·(W_O[h]·W_in)ᵀ + BL_h·(W_O[h]·W_U)ᵀ,
    // and below dW_in = base_residᵀ·CI + Σ_h W_O[h]ᵀ·P_h, dW_U likewise with PL_h — about
    // half the multiply-adds of going through OV = v·W_O ([R·H, D]).
    let w_o_h = |hi: usize| w_o.index_axis(Axis(0), hi);
    let per_head: Vec<[Array2<f32>; 4]> = (0..h)
        .into_par_iter()
        .map(|hi| {
            let bi_h = bi.slice(s![hi..;h, ..]);
            let bl_h = bl.slice(s![hi..;h, ..]);
            let v_h = attn.v.index_axis(Axis(1), hi);
            let p = matmul(v_h.t(), bi_h);
            let pl = matmul(v_h.t(), bl_h);
            let mut g_wo = matmul(p.view(), w_in.t());
            matmul_acc(pl.view(), w_u.t(), g_wo.view_mut());
            let mut dv = matmul(bi_h, matmul(w_o_h(hi), w_in).t());
            matmul_acc(bl_h, matmul(w_o_h(hi), w_u).t(), dv.view_mut());
            [p, pl, g_wo, dv]
        })
        .collect();
    let mut g_wo = ndarray::Array3::<f32>::zeros((h, e, d));
    let mut dv_b = Array2::<f32>::zeros((r_n, hw));
    for (hi, [_, _, g, dv]) in per_head.iter().enumerate() {
        g_wo.index_axis_mut(Axis(0), hi).assign(g);
        dv_b.slice_mut(s![.., hi * e..(hi + 1) * e]).assign(dv);
    }
    // The remaining independent products, in parallel.
    type Job<'a> = &'a (dyn Fn() -> Array2<f32> + Sync);
    let jobs: [Job; 5] = [
        &|| {
            let mut g = matmul(base_resid.t(), ci.view());
            for (hi, [p, ..]) in per_head.iter().enumerate() {
                matmul_acc(w_o_h(hi).t(), p.view(), g.view_mut());
            }
            g
        },
        &|| {
            let mut g = matmul(base_resid.t(), cl.view());
            for (hi, [_, pl, ..]) in per_head.iter().enumerate() {
                matmul_acc(w_o_h(hi).t(), pl.view(), g.view_mut());
            }
            matmul_acc(w_out.t(), s_mat.view(), g.view_mut());
            g
        },
        &|| matmul(s_mat.view(), w_u.t()),
        &|| matmul(attn.x.t(), dq_b.view()), // [D, H·E]
        &|| matmul(attn.x.t(), dk_b.view()),
    ];
    let [g_win, mut g_wu, g_wout, g_wq, g_wk]: [Array2<f32>; 5] = jobs
        .par_iter()
        .map(|job| job())
        .collect::<Vec<_>>()
        .try_into()
        .expect("five products");
    let b_out = b_out
        .view()
        .into_shape_with_order(d)
        .expect("b_out [d_model]");
    if b_out.iter().any(|&b| b != 0.0) {
        let colsum = cl.sum_axis(Axis(0)); // Σ dlogits over the inputs
        g_wu += &b_out.insert_axis(Axis(1)).dot(&colsum.insert_axis(Axis(0)));
    }
    let g_wv = matmul(attn.x.t(), dv_b.view());
    // dx per (position, token) row = dk·W_Kᵀ + dv·W_Vᵀ + dq·W_Qᵀ, plus at the last position the
    // residual path Σ d_resid_mid = CL·W_Uᵀ + CI·W_inᵀ.
    let mut dx_b = matmul(dk_b.view(), wk.t());
    matmul_acc(dv_b.view(), wv.t(), dx_b.view_mut());
    matmul_acc(dq_b.view(), wq.t(), dx_b.view_mut());
    let mut drm = matmul(cl.view(), w_u.t());
    matmul_acc(ci.view(), w_in.t(), drm.view_mut());
    for (l, &r) in base_rows.iter().enumerate() {
        let mut row = dx_b.row_mut(r);
        row += &drm.row(l);
    }
    let mut g_we = Array2::<f32>::zeros((cfg.d_vocab(), d));
    let mut g_wpos = Array2::<f32>::zeros((cfg.n_ctx(), d));
    for (r, &(pos, t)) in rows.pairs.iter().enumerate() {
        let row = dx_b.row(r);
        let mut a = g_we.row_mut(t as usize);
        a += &row;
        let mut b = g_wpos.row_mut(pos);
        b += &row;
    }

    let unflat = |g: Array2<f32>| -> Tensor {
        // [D, H·E] → [H, D, E]
        let g = g.into_shape_with_order((d, h, e)).expect("sizes");
        Tensor::F32(
            g.permuted_axes([1, 0, 2])
                .as_standard_layout()
                .into_owned()
                .into_dyn(),
        )
    };
    let mut grads = StateDict::new();
    grads.insert("embed.W_E", Tensor::F32(g_we.into_dyn()));
    grads.insert("pos_embed.W_pos", Tensor::F32(g_wpos.into_dyn()));
    grads.insert("blocks.0.attn.W_Q", unflat(g_wq));
    grads.insert(
        "blocks.0.attn.W_O",
        Tensor::F32(
            g_wo.into_dyn()
                .into_shape_with_order(IxDyn(&[h, e, d]))
                .expect("sizes"),
        ),
    );
    grads.insert("blocks.0.attn.W_K", unflat(g_wk));
    grads.insert("blocks.0.attn.W_V", unflat(g_wv));
    grads.insert("blocks.0.mlp.W_in", Tensor::F32(g_win.into_dyn()));
    grads.insert("blocks.0.mlp.W_out", Tensor::F32(g_wout.into_dyn()));
    grads.insert("unembed.W_U", Tensor::F32(g_wu.into_dyn()));
    Ok((loss, grads))
}
