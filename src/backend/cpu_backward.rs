//! The CPU backend's backward operations ([`Differentiable`]): the derivative of each forward
//! operation of [`super::cpu`], on the same reference-counted host arrays, with the same
//! sgemm for every product (transposed operands are strided views, not copies).
//!
//! The arithmetic is float32 as torch's autograd computes it, except the loss (f64, as the
//! demo) and GELU (torch's own f32 erf formula). Sums over the batch use the products' own
//! order, so gradients agree with torch's to float32 rounding, not bit for bit.

use super::cpu::{as4, gelu_grad_torch, map_fma, rows, shape_err, std_layout, Cpu, CHUNK, ROWS};
use super::{Activation, Differentiable, LossKind};
use crate::error::{Error, Result};
use ndarray::parallel::prelude::*;
use ndarray::{s, Array2, Array3, Array4, ArrayD, Axis, Ix2, IxDyn};
use rayon::prelude::*;
use std::sync::Arc;

type T = Arc<ArrayD<f32>>;

fn arc(a: ArrayD<f32>) -> T {
    Arc::new(a)
}

/// `a @ b` on 2-D views (any strides).
fn mm(a: ndarray::ArrayView2<f32>, b: ndarray::ArrayView2<f32>) -> Array2<f32> {
    super::cpu::matmul(a, b)
}

fn two<'a>(x: &'a ArrayD<f32>, op: &str) -> Result<ndarray::ArrayView2<'a, f32>> {
    x.view()
        .into_dimensionality::<Ix2>()
        .map_err(|_| shape_err(op, format!("expected 2 dims, found {:?}", x.shape())))
}

/// The derivative of an element-wise activation at x.
fn act_grad(act: Activation, x: f32) -> Result<f32> {
    Ok(match act {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => gelu_grad_torch(x),
        Activation::GeluNew | Activation::GeluPytorchTanh | Activation::GeluFast => {
            // 0.5·x·(1 + tanh(u)), u = c·(x + 0.044715·x³)
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            let u = c * (x + 0.044715 * x * x * x);
            let t = u.tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Activation::Silu => {
            let sg = 1.0 / (1.0 + (-x).exp());
            sg * (1.0 + x * (1.0 - sg))
        }
        Activation::Solu => {
            return Err(Error::Unsupported(
                "the derivative of act_fn solu/solu_ln (training supports relu, gelu, gelu_new, \
                 gelu_fast, gelu_pytorch_tanh, silu)"
                    .into(),
            ))
        }
    })
}

/// The backward pass of a per-head product `out[.., h, :] = x[.., h, :] @ w[h]`: x [B, P, H, K],
/// w [H, K, N], g [B, P, H, N] → (dx = g_h·w[h]ᵀ per head, dw[h] = x_hᵀ·g_h). Serves
/// `head_linear` with per-head inputs and `attn_result`.
fn per_head_backward(
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    g: &ArrayD<f32>,
    op: &str,
) -> Result<(T, T)> {
    let x4 = as4(x, op)?;
    let g4 = as4(g, op)?;
    let (b, p, h, k) = x4.dim();
    let n = g4.dim().3;
    if w.shape() != [h, k, n] || g4.dim() != (b, p, h, n) {
        return Err(shape_err(
            op,
            format!("x {:?}, w {:?}, g {:?}", x.shape(), w.shape(), g.shape()),
        ));
    }
    let mut dx = Array4::<f32>::zeros((b, p, h, k));
    let mut dw = Array3::<f32>::zeros((h, k, n));
    for hi in 0..h {
        let head = |a: &ndarray::ArrayView4<f32>, width: usize| {
            a.slice(s![.., .., hi, ..])
                .to_owned()
                .into_shape_with_order((b * p, width))
                .expect("sizes")
        };
        let (xi, gi) = (head(&x4, k), head(&g4, n));
        let wi = w
            .slice(s![hi, .., ..])
            .into_dimensionality::<Ix2>()
            .expect("2-D");
        dx.slice_mut(s![.., .., hi, ..]).assign(
            &mm(gi.view(), wi.t())
                .into_shape_with_order((b, p, k))
                .expect("sizes"),
        );
        dw.slice_mut(s![hi, .., ..]).assign(&mm(xi.t(), gi.view()));
    }
    Ok((arc(dx.into_dyn()), arc(dw.into_dyn())))
}

impl Differentiable for Cpu {
    fn embed_backward(&self, g: &T, tokens: &Array2<u32>, d_vocab: usize) -> Result<T> {
        let d = *g.shape().last().unwrap_or(&0);
        let g = std_layout(g);
        let gs = g.as_slice().expect("standard layout");
        let mut out = Array2::<f32>::zeros((d_vocab, d));
        for (&t, row) in tokens.iter().zip(gs.chunks(d.max(1))) {
            let t = t as usize;
            if t >= d_vocab {
                return Err(shape_err(
                    "embed_backward",
                    format!("token {t} ≥ {d_vocab}"),
                ));
            }
            out.row_mut(t)
                .iter_mut()
                .zip(row)
                .for_each(|(o, g)| *o += g);
        }
        Ok(arc(out.into_dyn()))
    }

    fn pos_embed_backward(&self, g: &T, n_ctx: usize) -> Result<T> {
        let (p, d) = (g.shape()[1], g.shape()[2]);
        if p > n_ctx {
            return Err(shape_err(
                "pos_embed_backward",
                format!("{p} > n_ctx {n_ctx}"),
            ));
        }
        let mut out = Array2::<f32>::zeros((n_ctx, d));
        out.slice_mut(s![..p, ..]).assign(&g.sum_axis(Axis(0)));
        Ok(arc(out.into_dyn()))
    }

    fn take_rows_backward(&self, g: &T, index: &Array2<u32>, rows_n: usize) -> Result<T> {
        let (b, p) = index.dim();
        let width: usize = g.shape()[2..].iter().product();
        let g = std_layout(g);
        let gs = g.as_slice().expect("standard layout");
        let mut out = vec![0f32; rows_n * p * width];
        for bi in 0..b {
            for j in 0..p {
                let r = index[[bi, j]] as usize;
                if r >= rows_n {
                    return Err(shape_err(
                        "take_rows_backward",
                        format!("row {r} ≥ {rows_n}"),
                    ));
                }
                let src = &gs[(bi * p + j) * width..(bi * p + j + 1) * width];
                out[(r * p + j) * width..(r * p + j + 1) * width]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(o, g)| *o += g);
            }
        }
        let mut shape = vec![rows_n, p];
        shape.extend_from_slice(&g.shape()[2..]);
        Ok(arc(ArrayD::from_shape_vec(shape, out).expect("sizes")))
    }

    fn last_position_backward(&self, g: &T, pos: usize) -> Result<T> {
        let mut shape = g.shape().to_vec();
        if shape.get(1) != Some(&1) || pos == 0 {
            return Err(shape_err(
                "last_position_backward",
                format!("{shape:?} to {pos} positions"),
            ));
        }
        shape[1] = pos;
        let mut out = ArrayD::<f32>::zeros(IxDyn(&shape));
        out.slice_axis_mut(Axis(1), ndarray::Slice::from(pos - 1..pos))
            .assign(&**g);
        Ok(arc(out))
    }

    fn sum_leading(&self, g: &T, keep: usize) -> Result<T> {
        let nd = g.ndim();
        if keep > nd {
            return Err(shape_err(
                "sum_leading",
                format!("keep {keep} of {nd} dims"),
            ));
        }
        let tail: Vec<usize> = g.shape()[nd - keep..].to_vec();
        let width: usize = tail.iter().product();
        let g = std_layout(g);
        let g2 = g
            .view()
            .into_shape_with_order((g.len().checked_div(width).unwrap_or(0), width))
            .expect("standard layout");
        // Rows in fixed blocks, each summed in order, blocks added in order.
        let partial: Vec<ndarray::Array1<f32>> = g2
            .axis_chunks_iter(Axis(0), ROWS * 4)
            .into_par_iter()
            .map(|c| c.sum_axis(Axis(0)))
            .collect();
        let mut out = ndarray::Array1::<f32>::zeros(width);
        for p in partial {
            out += &p;
        }
        Ok(arc(out.into_shape_with_order(IxDyn(&tail)).expect("sizes")))
    }

    fn linear_backward(&self, x: &T, w: &T, g: &T) -> Result<(T, T)> {
        let w2 = two(w, "linear_backward")?;
        let (x, g) = (std_layout(x), std_layout(g));
        let (x2, g2) = (rows(&x), rows(&g));
        if x2.nrows() != g2.nrows() || x2.ncols() != w2.nrows() || g2.ncols() != w2.ncols() {
            return Err(shape_err(
                "linear_backward",
                format!("x {:?}, w {:?}, g {:?}", x.shape(), w.shape(), g.shape()),
            ));
        }
        let dx = mm(g2, w2.t());
        let dw = mm(x2.t(), g2);
        let dx = dx
            .into_shape_with_order(IxDyn(x.shape()))
            .expect("sizes match");
        Ok((arc(dx), arc(dw.into_dyn())))
    }

    fn head_linear_backward(&self, x: &T, w: &T, g: &T) -> Result<(T, T)> {
        let (h, d, e) = (w.shape()[0], w.shape()[1], w.shape()[2]);
        let g4 = as4(g, "head_linear_backward")?;
        let (b, p) = (g4.dim().0, g4.dim().1);
        let g = std_layout(g);
        let g2 = g
            .view()
            .into_shape_with_order((b * p, h * e))
            .expect("standard layout");
        let x = std_layout(x);
        match x.ndim() {
            3 => {
                // One product over the flattened heads: W as [D, H·E].
                let wf = w
                    .view()
                    .permuted_axes(IxDyn(&[1, 0, 2]))
                    .as_standard_layout()
                    .into_owned()
                    .into_shape_with_order((d, h * e))
                    .expect("sizes");
                let dx = mm(g2, wf.t());
                let dwf = mm(rows(&x).t(), g2);
                let dw = dwf
                    .into_shape_with_order((d, h, e))
                    .expect("sizes")
                    .permuted_axes((1, 0, 2))
                    .as_standard_layout()
                    .into_owned();
                Ok((
                    arc(dx.into_shape_with_order(IxDyn(&[b, p, d])).expect("sizes")),
                    arc(dw.into_dyn()),
                ))
            }
            4 => per_head_backward(&x, w, &g, "head_linear_backward"),
            n => Err(shape_err(
                "head_linear_backward",
                format!("input with {n} dims"),
            )),
        }
    }

    fn attn_scores_backward(
        &self,
        q: &T,
        k: &T,
        g: &T,
        scale: f32,
        causal: bool,
    ) -> Result<(T, T)> {
        let (b, pq, h, e) = as4(q, "attn_scores_backward")?.dim();
        let pk = as4(k, "attn_scores_backward")?.dim().1;
        let (q, k, g) = (std_layout(q), std_layout(k), std_layout(g));
        let (qs, ks, gs) = (
            q.as_slice().expect("std"),
            k.as_slice().expect("std"),
            g.as_slice().expect("std"),
        );
        let mut dq = vec![0f32; b * pq * h * e];
        let mut dk = vec![0f32; b * pk * h * e];
        dq.par_chunks_mut(pq * h * e)
            .zip(dk.par_chunks_mut(pk * h * e))
            .enumerate()
            .for_each(|(bi, (dqb, dkb))| {
                let qb = &qs[bi * pq * h * e..(bi + 1) * pq * h * e];
                let kb = &ks[bi * pk * h * e..(bi + 1) * pk * h * e];
                let gb = &gs[bi * h * pq * pk..(bi + 1) * h * pq * pk];
                for hi in 0..h {
                    for i in 0..pq {
                        for j in 0..pk {
                            if causal && j > i + (pk - pq) {
                                continue;
                            }
                            let gv = gb[(hi * pq + i) * pk + j] / scale;
                            let (qo, ko) = ((i * h + hi) * e, (j * h + hi) * e);
                            for c in 0..e {
                                dqb[qo + c] += gv * kb[ko + c];
                                dkb[ko + c] += gv * qb[qo + c];
                            }
                        }
                    }
                }
            });
        Ok((
            arc(ArrayD::from_shape_vec(IxDyn(&[b, pq, h, e]), dq).expect("sizes")),
            arc(ArrayD::from_shape_vec(IxDyn(&[b, pk, h, e]), dk).expect("sizes")),
        ))
    }

    fn softmax_backward(&self, y: &T, g: &T) -> Result<T> {
        let (y, g) = (std_layout(y), std_layout(g));
        let k = *y.shape().last().unwrap_or(&1);
        let mut out = ArrayD::<f32>::zeros(y.raw_dim());
        if k > 0 {
            out.as_slice_mut()
                .expect("fresh")
                .par_chunks_mut(k * ROWS)
                .zip(y.as_slice().expect("std").par_chunks(k * ROWS))
                .zip(g.as_slice().expect("std").par_chunks(k * ROWS))
                .for_each(|((o, y), g)| {
                    for ((o, y), g) in o.chunks_mut(k).zip(y.chunks(k)).zip(g.chunks(k)) {
                        let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                            *o = y * (g - dot);
                        }
                    }
                });
        }
        Ok(arc(out))
    }

    fn attn_z_backward(&self, pattern: &T, v: &T, g: &T) -> Result<(T, T)> {
        let (b, h, pq, pk) = as4(pattern, "attn_z_backward")?.dim();
        let e = as4(v, "attn_z_backward")?.dim().3;
        let (pat, v, g) = (std_layout(pattern), std_layout(v), std_layout(g));
        let (ps, vs, gs) = (
            pat.as_slice().expect("std"),
            v.as_slice().expect("std"),
            g.as_slice().expect("std"),
        );
        let mut dp = vec![0f32; b * h * pq * pk];
        let mut dv = vec![0f32; b * pk * h * e];
        dp.par_chunks_mut(h * pq * pk)
            .zip(dv.par_chunks_mut(pk * h * e))
            .enumerate()
            .for_each(|(bi, (dpb, dvb))| {
                let pb = &ps[bi * h * pq * pk..(bi + 1) * h * pq * pk];
                let vb = &vs[bi * pk * h * e..(bi + 1) * pk * h * e];
                let gb = &gs[bi * pq * h * e..(bi + 1) * pq * h * e];
                for i in 0..pq {
                    for hi in 0..h {
                        let go = &gb[(i * h + hi) * e..(i * h + hi + 1) * e];
                        for j in 0..pk {
                            let vo = (j * h + hi) * e;
                            let vv = &vb[vo..vo + e];
                            dpb[(hi * pq + i) * pk + j] =
                                go.iter().zip(vv).map(|(a, b)| a * b).sum();
                            let w = pb[(hi * pq + i) * pk + j];
                            dvb[vo..vo + e]
                                .iter_mut()
                                .zip(go)
                                .for_each(|(d, g)| *d += w * g);
                        }
                    }
                }
            });
        Ok((
            arc(ArrayD::from_shape_vec(IxDyn(&[b, h, pq, pk]), dp).expect("sizes")),
            arc(ArrayD::from_shape_vec(IxDyn(&[b, pk, h, e]), dv).expect("sizes")),
        ))
    }

    fn attn_result_backward(&self, z: &T, w_o: &T, g: &T) -> Result<(T, T)> {
        per_head_backward(z, w_o, g, "attn_result_backward")
    }

    fn attn_out_backward(&self, z: &T, w_o_flat: &T, g: &T) -> Result<(T, T)> {
        let (b, p, h, e) = as4(z, "attn_out_backward")?.dim();
        let w2 = two(w_o_flat, "attn_out_backward")?;
        let (z, g) = (std_layout(z), std_layout(g));
        let zf = z
            .view()
            .into_shape_with_order((b * p, h * e))
            .expect("standard layout");
        let g2 = rows(&g);
        let dz = mm(g2, w2.t())
            .into_shape_with_order(IxDyn(&[b, p, h, e]))
            .expect("sizes");
        let dw = mm(zf.t(), g2);
        Ok((arc(dz), arc(dw.into_dyn())))
    }

    fn repeat_heads_backward(&self, g: &T) -> Result<T> {
        as4(g, "repeat_heads_backward")?;
        Ok(arc(g.sum_axis(Axis(2))))
    }

    fn activation_backward(&self, x: &T, act: Activation, g: &T) -> Result<T> {
        act_grad(act, 0.0)?; // refuses SoLU up front
        let (x, g) = (std_layout(x), std_layout(g));
        if x.shape() != g.shape() {
            return Err(shape_err(
                "activation_backward",
                format!("{:?} vs {:?}", x.shape(), g.shape()),
            ));
        }
        // The derivative at x, then times g (torch: dy·(cdf + x·pdf)).
        let mut out = x.into_owned();
        out.as_slice_mut()
            .expect("std")
            .par_chunks_mut(CHUNK)
            .zip(g.as_slice().expect("std").par_chunks(CHUNK))
            .for_each(|(o, g)| {
                if act == Activation::Gelu {
                    map_fma(o, gelu_grad_torch);
                } else {
                    o.iter_mut()
                        .for_each(|v| *v = act_grad(act, *v).unwrap_or(f32::NAN));
                }
                o.iter_mut().zip(g).for_each(|(o, g)| *o *= g);
            });
        Ok(arc(out))
    }

    fn normalize_backward(&self, y: &T, scale: &T, g: &T, center: bool) -> Result<T> {
        let (y, g, sc) = (std_layout(y), std_layout(g), std_layout(scale));
        let k = *y.shape().last().unwrap_or(&1);
        let mut out = ArrayD::<f32>::zeros(y.raw_dim());
        if k > 0 && !y.is_empty() {
            let kf = k as f32;
            out.as_slice_mut()
                .expect("fresh")
                .par_chunks_mut(k)
                .zip(y.as_slice().expect("std").par_chunks(k))
                .zip(g.as_slice().expect("std").par_chunks(k))
                .zip(sc.as_slice().expect("std").par_iter())
                .for_each(|(((o, y), g), &s)| {
                    let mg = if center {
                        g.iter().sum::<f32>() / kf
                    } else {
                        0.0
                    };
                    let mgy = g.iter().zip(y).map(|(a, b)| a * b).sum::<f32>() / kf;
                    for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                        *o = (g - mg - y * mgy) / s;
                    }
                });
        }
        Ok(arc(out))
    }

    fn normalize_with_backward(&self, scale: &T, g: &T, center: bool) -> Result<T> {
        let mut out = std_layout(g).into_owned();
        if center {
            let ax = Axis(out.ndim() - 1);
            let k = *out.shape().last().unwrap_or(&1) as f32;
            let mean = out.sum_axis(ax).insert_axis(ax) / k;
            out -= &mean;
        }
        out /= &**scale;
        Ok(arc(out))
    }

    fn affine_backward(&self, x: &T, w: &T, g: &T) -> Result<(T, T)> {
        let g = std_layout(g);
        let dx = g.view().to_owned() * &**w;
        let gx = g.into_owned() * &**x;
        let dw = self.sum_leading(&arc(gx), 1)?;
        Ok((arc(dx), dw))
    }

    fn last_position_loss(&self, logits: &T, labels: &[u32], kind: LossKind) -> Result<(f64, T)> {
        let (b, p, v) = match logits.shape() {
            &[b, p, v] => (b, p, v),
            s => return Err(shape_err("last_position_loss", format!("logits {s:?}"))),
        };
        if labels.len() != b || p == 0 {
            return Err(shape_err(
                "last_position_loss",
                format!("{b} inputs, {} labels", labels.len()),
            ));
        }
        if let Some(&y) = labels.iter().find(|&&y| y as usize >= v) {
            return Err(Error::invalid(
                "labels",
                format!("label {y} out of range for d_vocab_out {v}"),
            ));
        }
        let logits = std_layout(logits);
        let ls = logits.as_slice().expect("std");
        let mut grad = vec![0f32; b * p * v];
        let inv_n = 1.0 / b as f64;
        let losses: Vec<f64> = grad
            .par_chunks_mut(p * v)
            .zip(ls.par_chunks(p * v))
            .zip(labels.par_iter())
            .map_init(Vec::new, |scratch, ((gr, lg), &y)| {
                let last = (p - 1) * v;
                crate::task::row_loss(
                    kind,
                    &lg[last..last + v],
                    y,
                    Some((inv_n, &mut gr[last..last + v])),
                    scratch,
                )
            })
            .collect();
        let loss = losses.iter().sum::<f64>() / b as f64;
        Ok((
            loss,
            arc(ArrayD::from_shape_vec(IxDyn(&[b, p, v]), grad).expect("sizes")),
        ))
    }
}
