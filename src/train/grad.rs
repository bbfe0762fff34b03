//! The demo's loss and its exact gradients for the model family the trainer supports: one layer,
//! attention + ReLU MLP, no LayerNorm, standard positions, loss at the last position.
//!
//! The forward pass is the evaluation's tabulated pass (`eval::NormFreePass`): q, k, v and the
//! per-head products OV = v·W_O, OV·W_in, OV·W_U are tables over the (position, token) rows, and
//! per input only the last query's pattern, `pre = base_in + Σ pattern·OVI`, and
//! `logits = base_U + Σ pattern·OVU + post·W_L` (W_L = W_out·W_U) are computed. The backward
//! pass differentiates exactly that computation, which equals TL's graph (REFERENCE §2) up to
//! float32 rounding. Its per-input work is three [N, d_mlp]×[d_mlp, d_vocab_out] products
//! (logits, `d_post = dlogits·W_Lᵀ`, `S = postᵀ·dlogits`); everything that goes through the
//! residual stream is first summed per table row — `BI[r, h] = Σ pattern·d_pre`,
//! `BL[r, h] = Σ pattern·dlogits` over the inputs that use row r — and then multiplied with the
//! small tables: `g_W_in = base_residᵀ·CI + OVᵀ·BI`, `g_W_out = S·W_Uᵀ`,
//! `g_W_U = base_residᵀ·CL + OVᵀ·BL + W_outᵀ·S`, and for the attention weights
//! `D = BL·W_Uᵀ + BI·W_inᵀ` (the row sums of `pattern·d_resid_mid`). That is about 2.5× fewer
//! multiply-adds than back-propagating through resid·W_in, post·W_out and resid·W_U per input.
//! (Measured alternative: back-propagating `d_resid_mid = d_pre·W_inᵀ + dlogits·W_Uᵀ` per input
//! makes the row sums 128 wide instead of 512 + 113, but its extra products cost more than that
//! saves: an epoch went from 39 to 43 ms.) The attention backward reads the same table rows
//! (OVI, OVU) as the row sums BI, BL update, so both happen in one pass over the inputs.
//!
//! Float32 like torch except where torch uses float64: the loss is computed in f64 and its
//! gradient `(softmax − onehot)/N` is cast to f32 where torch's `.to(float64)` node casts it back.
//! Biases are frozen (the demo sets `requires_grad = False` on every `b_`), so only `W_`
//! gradients are produced. The per-row sums run over fixed chunks of the inputs, each in input
//! order, added in chunk order, so gradients do not depend on the thread count.

use crate::backend::cpu::{matmul, matmul_acc};
use crate::backend::simd::{self, axpy};
use crate::error::{Error, Result};
use crate::eval::NormFreePass;
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
    let pass = forward(&model, tokens, labels.len())?;
    backward(&model, &pass, labels)
}

/// The pass [`backward`] differentiates, over `tokens` whose first `n_train` rows are the
/// training inputs (any further rows — the test set — are only evaluated).
pub(crate) fn forward(
    model: &HookedTransformer,
    tokens: &Array2<u32>,
    n_train: usize,
) -> Result<NormFreePass> {
    if n_train == 0 || n_train > tokens.nrows() {
        return Err(Error::invalid(
            "training batch",
            format!("{} inputs, {n_train} labels", tokens.nrows()),
        ));
    }
    NormFreePass::new(model, tokens, false, n_train, n_train)
}

/// Loss and gradients of the first `labels.len()` inputs of `pass` (made by [`forward`] with
/// the same model).
pub(crate) fn backward(
    model: &HookedTransformer,
    pass: &NormFreePass,
    labels: &[u32],
) -> Result<(f64, StateDict)> {
    let cfg = &model.cfg;
    let sd = &model.state_dict;

    check_trainable(cfg)?;
    let n = labels.len();
    let p = pass.attn.n_pos();
    if n == 0 || n > pass.attn.len() {
        return Err(Error::invalid(
            "training batch",
            format!("{} inputs, {n} labels", pass.attn.len()),
        ));
    }
    let v_out = cfg.d_vocab_out();
    if let Some(&y) = labels.iter().find(|&&y| y as usize >= v_out) {
        return Err(Error::invalid(
            "labels",
            format!("label {y} out of range for d_vocab_out {v_out}"),
        ));
    }
    let (d, h, e, m) = (cfg.d_model(), cfg.n_heads(), cfg.d_head(), cfg.d_mlp());
    let hw = h * e;
    let last = p - 1;
    let scale = model.layer_attn_scale(0);
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
    let (ov, ovu, base_rows, base_resid) = (&pass.ov, &pass.ovu, &pass.base_rows, &pass.base_resid);
    let ovi = pass.ovi.as_ref().expect("MLP model");
    let w_l = pass.w_l.as_ref().expect("MLP model");
    let post = pass
        .mlp_post
        .as_ref()
        .expect("MLP model")
        .slice(s![..n, ..]);
    let logits = pass.logits.slice(s![..n, ..]);
    let rows = &attn.rows;
    let r_n = rows.len();
    let toks = attn.tokens();

    // ---- loss and dlogits = (softmax − onehot)/N, in f64, cast to f32 ----
    let inv_n = 1.0 / n as f64;
    let mut dlogits = Array2::<f32>::zeros((n, v_out));
    let losses: Vec<f64> = dlogits
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(logits.axis_iter(Axis(0)).into_par_iter())
        .zip(labels.par_iter())
        .map(|((mut g, row), &y)| {
            crate::task::nll_and_grad(
                row.as_slice().expect("standard layout"),
                y,
                inv_n,
                g.as_slice_mut().expect("standard layout"),
            )
        })
        .collect();
    let loss = losses.iter().sum::<f64>() * inv_n;

    // ---- backward through the MLP: the per-input products ----
    let mut d_pre = matmul(dlogits.view(), w_l.t());
    // relu passes the gradient where its output is > 0 (NaN included, as torch)
    d_pre
        .as_slice_mut()
        .expect("standard layout")
        .par_chunks_mut(1 << 14)
        .zip(
            post.as_slice()
                .expect("standard layout")
                .par_chunks(1 << 14),
        )
        .for_each(|(g, x)| {
            g.iter_mut()
                .zip(x)
                .for_each(|(g, &x)| *g = if x <= 0.0 { 0.0 } else { *g })
        });
    let s_mat = matmul(post.t(), dlogits.view()); // S = postᵀ·dlogits [d_mlp, V_out]

    // ---- attention backward and the per-row sums, one pass over the inputs ----
    // Per input: d_pattern = d_resid_mid·OV = dlogits·OVU + d_pre·OVI per (key, head) row,
    // softmax backward → d_scores, dq. Per (position, token) row r the sums over the inputs
    // that use it: BI = Σ pattern·d_pre and BL = Σ pattern·dlogits per head, DK = Σ d_score·q,
    // and at the last position DQ = Σ dq, CI = Σ d_pre, CL = Σ dlogits (the residual path).
    // The dot products and BI/BL read the same table rows, so they are one fused loop. The
    // inputs are split into a fixed number of chunks, each summed in input order into its own
    // accumulators, which are then added in chunk order: the sums do not depend on the thread
    // count.
    let row_of = |i: usize, j: usize| rows.row(j, toks[i * p + j]);
    let (ovi_s, ovu_s) = (
        ovi.as_slice().expect("standard layout"),
        ovu.as_slice().expect("standard layout"),
    );
    let (ks, qs) = (
        attn.k.as_slice().expect("standard layout"),
        attn.q.as_slice().expect("standard layout"),
    );
    let pat = attn.pattern.as_slice().expect("standard layout");
    let (dl_s, dp_s) = (
        dlogits.as_slice().expect("standard layout"),
        d_pre.as_slice().expect("standard layout"),
    );
    let mut base_slot = vec![usize::MAX; r_n];
    for (l, &r) in base_rows.iter().enumerate() {
        base_slot[r] = l;
    }
    let n_base = base_rows.len();
    struct Sums {
        bi: Vec<f32>,
        bl: Vec<f32>,
        dk: Vec<f32>,
        dq: Vec<f32>,
        ci: Vec<f32>,
        cl: Vec<f32>,
    }
    let new_sums = || Sums {
        bi: vec![0f32; r_n * h * m],
        bl: vec![0f32; r_n * h * v_out],
        dk: vec![0f32; r_n * hw],
        dq: vec![0f32; r_n * hw],
        ci: vec![0f32; n_base * m],
        cl: vec![0f32; n_base * v_out],
    };
    const CHUNKS: usize = 2;
    let per = n.div_ceil(CHUNKS);
    let mut chunks: Vec<Sums> = (0..CHUNKS)
        .into_par_iter()
        .map(|c| {
            let mut acc = new_sums();
            let (mut dpat, mut ds, mut dq) = (vec![0f32; p], vec![0f32; h * p], vec![0f32; hw]);
            for i in (c * per).min(n)..((c + 1) * per).min(n) {
                let (dl, dp) = (&dl_s[i * v_out..(i + 1) * v_out], &dp_s[i * m..(i + 1) * m]);
                let ql = row_of(i, last);
                dq.iter_mut().for_each(|x| *x = 0.0);
                for hi in 0..h {
                    let pw = &pat[(i * h + hi) * p..(i * h + hi + 1) * p];
                    for j in 0..p {
                        let rh = row_of(i, j) * h + hi;
                        dpat[j] = simd::dot_axpy(
                            dl,
                            &ovu_s[rh * v_out..(rh + 1) * v_out],
                            &mut acc.bl[rh * v_out..(rh + 1) * v_out],
                            pw[j],
                        ) + simd::dot_axpy(
                            dp,
                            &ovi_s[rh * m..(rh + 1) * m],
                            &mut acc.bi[rh * m..(rh + 1) * m],
                            pw[j],
                        );
                    }
                    let sum: f32 = (0..p).map(|j| pw[j] * dpat[j]).sum();
                    let hs = hi * e..(hi + 1) * e;
                    for j in 0..p {
                        let dsj = pw[j] * (dpat[j] - sum) / scale;
                        ds[hi * p + j] = dsj;
                        let r = row_of(i, j);
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
                axpy(&mut acc.dq[ql * hw..(ql + 1) * hw], 1.0, &dq);
                let l = base_slot[ql];
                axpy(&mut acc.ci[l * m..(l + 1) * m], 1.0, dp);
                axpy(&mut acc.cl[l * v_out..(l + 1) * v_out], 1.0, dl);
            }
            acc
        })
        .collect();
    let mut sums = chunks.remove(0);
    for c in &chunks {
        for (x, y) in [
            (&mut sums.bi, &c.bi),
            (&mut sums.bl, &c.bl),
            (&mut sums.dk, &c.dk),
            (&mut sums.dq, &c.dq),
            (&mut sums.ci, &c.ci),
            (&mut sums.cl, &c.cl),
        ] {
            x.par_chunks_mut(1 << 14)
                .zip(y.par_chunks(1 << 14))
                .for_each(|(x, y)| axpy(x, 1.0, y));
        }
    }
    let arr = |v: Vec<f32>, r: usize, c: usize| Array2::from_shape_vec((r, c), v).expect("sizes");
    let bi = arr(sums.bi, r_n * h, m);
    let bl = arr(sums.bl, r_n * h, v_out);
    let dk_b = arr(sums.dk, r_n, hw);
    let dq_b = arr(sums.dq, r_n, hw);
    let ci = arr(sums.ci, n_base, m);
    let cl = arr(sums.cl, n_base, v_out);

    // ---- weight gradients from the row sums ----
    let g_wout = matmul(s_mat.view(), w_u.t());
    let mut g_win = matmul(base_resid.t(), ci.view());
    matmul_acc(ov.t(), bi.view(), g_win.view_mut());
    let mut g_wu = matmul(base_resid.t(), cl.view());
    matmul_acc(ov.t(), bl.view(), g_wu.view_mut());
    matmul_acc(w_out.t(), s_mat.view(), g_wu.view_mut());
    let b_out = b_out
        .view()
        .into_shape_with_order(d)
        .expect("b_out [d_model]");
    if b_out.iter().any(|&b| b != 0.0) {
        let colsum = dlogits.sum_axis(Axis(0));
        g_wu += &b_out.insert_axis(Axis(1)).dot(&colsum.insert_axis(Axis(0)));
    }
    // D[(r, h)] = Σ pattern·d_resid_mid = BL·W_Uᵀ + BI·W_inᵀ  [R·H, D]
    let mut dd = matmul(bl.view(), w_u.t());
    matmul_acc(bi.view(), w_in.t(), dd.view_mut());
    let mut g_wo = ndarray::Array3::<f32>::zeros((h, e, d));
    let mut dv_b = Array2::<f32>::zeros((r_n, hw));
    for hi in 0..h {
        let dh = dd.slice(s![hi..;h, ..]); // [R, D]
        let vh = attn.v.index_axis(Axis(1), hi); // [R, E]
        g_wo.index_axis_mut(Axis(0), hi).assign(&matmul(vh.t(), dh));
        dv_b.slice_mut(s![.., hi * e..(hi + 1) * e])
            .assign(&matmul(dh, w_o.index_axis(Axis(0), hi).t()));
    }
    let g_wq = matmul(attn.x.t(), dq_b.view()); // [D, H·E]
    let g_wk = matmul(attn.x.t(), dk_b.view());
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
