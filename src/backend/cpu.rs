//! The CPU backend: ndarray tensors (reference-counted, so the activation cache shares them), the
//! sgemm of [`super::gemm`], rayon across rows.
//!
//! Arithmetic follows TL's float32 order where it matters (true division by `attn_scale`,
//! max-subtracted softmax, addmm-style bias after the product); summation order inside the
//! products differs from torch's, so results agree to ulp level, not bit level (docs/reference.md §2).

use super::{Activation, Backend};
use crate::error::{Error, Result};
use ndarray::parallel::prelude::*;
use ndarray::{s, Array2, Array4, ArrayD, ArrayView2, ArrayViewMut2, Axis, Ix4, IxDyn};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// The CPU backend (stateless).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Keep large freed buffers mapped (glibc only; once per process; opt out with
/// `TLENS_NO_MALLOPT=1`).
///
/// A forward pass over the whole dataset allocates 20–80 MB activations. glibc returns freed
/// blocks above its mmap threshold (at most 32 MB) and trims the heap top, so every pass would
/// page-fault fresh zeroed memory again; on the 2-core test machine that doubled `forward`
/// (168 ms → 255 ms) and `run_with_cache` (210 ms → 456 ms). Raising `M_MMAP_THRESHOLD` and
/// `M_TRIM_THRESHOLD` to 1 GiB keeps the memory for reuse, as a caching allocator would.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TLENS_NO_MALLOPT").is_some() {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_MMAP_THRESHOLD: i32 = -3;
            // SAFETY: mallopt only changes allocator tuning parameters.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 1 << 30);
                mallopt(M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    });
}

/// Rows per parallel task in products and row-wise ops.
pub(super) const ROWS: usize = 256;

pub(super) fn shape_err(op: &str, msg: String) -> Error {
    Error::invalid(format!("cpu backend {op}"), msg)
}

/// View `x` as a 2-D [N, K] matrix over its last axis (x must be in standard layout).
pub(super) fn rows(x: &ArrayD<f32>) -> ArrayView2<'_, f32> {
    let k = *x.shape().last().unwrap_or(&1);
    let n = x.len().checked_div(k).unwrap_or(0);
    x.view()
        .into_shape_with_order((n, k))
        .expect("standard layout")
}

pub(super) fn std_layout(x: &ArrayD<f32>) -> std::borrow::Cow<'_, ArrayD<f32>> {
    if x.is_standard_layout() {
        std::borrow::Cow::Borrowed(x)
    } else {
        std::borrow::Cow::Owned(x.as_standard_layout().into_owned())
    }
}

/// `a @ b`, split across threads ([`super::gemm::sgemm`]).
pub fn matmul(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
    matmul_bias(a, b, None)
}

/// `a @ b + bias` (the bias row added after the product, as torch's addmm).
pub fn matmul_bias(a: ArrayView2<f32>, b: ArrayView2<f32>, bias: Option<&[f32]>) -> Array2<f32> {
    let mut out = Array2::<f32>::uninit((a.nrows(), b.ncols()));
    // SAFETY: without accumulation sgemm writes every element of `out` and reads none.
    unsafe {
        product(a, b, out.as_mut_ptr().cast(), false, bias);
        out.assume_init()
    }
}

/// `out += a @ b` (out [M, N] in standard layout), split across threads.
pub fn matmul_acc(a: ArrayView2<f32>, b: ArrayView2<f32>, mut out: ArrayViewMut2<f32>) {
    assert_eq!(
        out.dim(),
        (a.nrows(), b.ncols()),
        "matmul_acc: output shape"
    );
    let ptr = out
        .as_slice_mut()
        .expect("matmul_acc: the output is in standard layout")
        .as_mut_ptr();
    // SAFETY: `out` is a standard-layout [M, N] buffer that sgemm reads and writes in place.
    unsafe { product(a, b, ptr, true, None) }
}

/// # Safety
/// `c` points to a row-major [a.rows, b.cols] buffer not overlapping `a` or `b`.
unsafe fn product(
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    c: *mut f32,
    accumulate: bool,
    bias: Option<&[f32]>,
) {
    use super::gemm::{sgemm, Mat};
    assert_eq!(a.ncols(), b.nrows(), "matmul: inner dimensions");
    let mat = |x: &ArrayView2<f32>| Mat {
        ptr: x.as_ptr(),
        rs: x.strides()[0],
        cs: x.strides()[1],
    };
    sgemm(
        a.nrows(),
        a.ncols(),
        b.ncols(),
        mat(&a),
        mat(&b),
        c,
        b.ncols(),
        accumulate,
        bias,
    );
}

/// A buffer of `len` floats that `fill` initialises completely (no zero-filling pass: the
/// whole-dataset activations are 20–80 MB each).
fn filled(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(len) };
    fill(&mut v);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `fill` wrote every element (callers copy a source into each chunk), and
    // MaybeUninit<f32> has f32's layout.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// `dst = src` for uninitialised `dst`.
#[inline]
fn copy_into(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy_into: lengths");
    // SAFETY: equal lengths; MaybeUninit<f32> has f32's layout; the slices do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast(), src.len()) }
}

/// Elements per parallel task in element-wise ops.
pub(super) const CHUNK: usize = 1 << 14;

/// Apply `f` to each row (last axis) of `x` in parallel, writing a same-shaped output.
fn map_rows(x: &ArrayD<f32>, f: impl Fn(&[f32], &mut [f32]) + Sync) -> ArrayD<f32> {
    let x = std_layout(x);
    let mut out = ArrayD::<f32>::zeros(x.raw_dim());
    let k = *x.shape().last().unwrap_or(&1);
    if k == 0 || x.is_empty() {
        return out;
    }
    let src = x.as_slice().expect("standard layout");
    out.as_slice_mut()
        .expect("fresh array")
        .par_chunks_mut(k * ROWS)
        .zip(src.par_chunks(k * ROWS))
        .for_each(|(o, s)| {
            for (o, s) in o.chunks_mut(k).zip(s.chunks(k)) {
                f(s, o)
            }
        });
    out
}

/// torch's float erf (`Vectorized<float>::erf` in ATen's vectorized CPU code, which its GELU
/// kernels use): Abramowitz–Stegun 7.1.26, `1 − t·r(t)·exp(−x²)` with `t = 1/(1 + 0.3275911·|x|)`,
/// evaluated with fused multiply-adds in f32 (absolute error ≤ 1.5e-7). Measured on 200,001
/// points in [−6, 6], torch's GELU equals this formula's bits far more often than the exact
/// erf's (81% vs 31% before fused multiply-adds), and it is what makes GELU cheap: the exact f64
/// erf was 17–60% of a 2-layer GELU training epoch (perf).
#[inline(always)]
pub(super) fn erf_torch(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let r = 1.061_405_4_f32
        .mul_add(t, -1.453_152_1)
        .mul_add(t, 1.421_413_8)
        .mul_add(t, -0.284_496_74)
        .mul_add(t, 0.254_829_6);
    let e = (-(x * x)).exp();
    (-e * t).mul_add(r, 1.0).copysign(x)
}

/// GELU (exact form) as torch computes it in f32: `x·0.5·(1 + erf(x·√½))`.
#[inline(always)]
pub(super) fn gelu_torch(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf_torch(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU's derivative as torch's `GeluBackward` computes it in f32: `cdf + x·pdf`, cdf =
/// `0.5·(1 + erf(x·√½))`, pdf = `(2/√π·√½·0.5)·exp(−0.5·x²)`.
#[inline(always)]
pub(super) fn gelu_grad_torch(x: f32) -> f32 {
    let beta = (std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2 * 0.5) as f32;
    let cdf = 0.5 * (1.0 + erf_torch(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = beta * (x * x * -0.5).exp();
    cdf + x * pdf
}

/// `f` over a slice, compiled with fused multiply-adds where the CPU has them (`mul_add`
/// is otherwise a library call).
pub(super) fn map_fma(data: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "fma")]
        unsafe fn with_fma(data: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
            data.iter_mut().for_each(|v| *v = f(*v));
        }
        // SAFETY: the CPU has FMA (checked above).
        unsafe { with_fma(data, f) };
        return;
    }
    data.iter_mut().for_each(|v| *v = f(*v));
}

fn act_scalar(act: Activation, x: f32) -> f32 {
    match act {
        // torch.relu propagates NaN (f32::max would turn it into 0).
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        Activation::Relu => {
            if !(x <= 0.0) {
                x
            } else {
                0.0
            }
        }
        Activation::Gelu => gelu_torch(x),
        Activation::GeluNew | Activation::GeluPytorchTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::GeluFast => {
            0.5 * x * (1.0 + (x * 0.797_884_6 * (1.0 + 0.044715 * x * x)).tanh())
        }
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Solu => unreachable!("row-wise"),
    }
}

fn softmax_row(s: &[f32], o: &mut [f32]) {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (o, &x) in o.iter_mut().zip(s) {
        *o = (x - m).exp();
        sum += *o;
    }
    for o in o.iter_mut() {
        *o /= sum;
        if o.is_nan() {
            *o = 0.0;
        }
    }
}

pub(super) fn as4<'a>(x: &'a ArrayD<f32>, op: &str) -> Result<ndarray::ArrayView4<'a, f32>> {
    x.view()
        .into_dimensionality::<Ix4>()
        .map_err(|_| shape_err(op, format!("expected 4 dims, found {:?}", x.shape())))
}

/// The operations on host arrays. The model reaches them through [`Backend`] (whose tensors
/// share their storage with the activation cache); the tabulated passes call them directly.
impl Cpu {
    /// Gather rows of `table` for every index (embedding-style lookup).
    pub fn take_rows(&self, table: &ArrayD<f32>, index: &Array2<u32>) -> Result<ArrayD<f32>> {
        let table = std_layout(table);
        let (u, p) = (table.shape()[0], table.shape().get(1).copied().unwrap_or(0));
        let (b, pi) = index.dim();
        if pi > p {
            return Err(shape_err(
                "take_rows",
                format!("index has {pi} positions, table {p}"),
            ));
        }
        if let Some(&i) = index.iter().find(|&&i| i as usize >= u) {
            return Err(shape_err("take_rows", format!("row {i} of {u}")));
        }
        let width: usize = table.shape()[2..].iter().product();
        let src = table.as_slice().expect("standard layout");
        let index = index.as_standard_layout();
        let idx = index.as_slice().expect("standard layout");
        let out = filled(b * pi * width, |out| {
            out.par_chunks_mut((pi * width).max(1))
                .zip(idx.par_chunks(pi.max(1)))
                .for_each(|(o, ix)| {
                    for (j, (o, &i)) in o.chunks_mut(width.max(1)).zip(ix).enumerate() {
                        let r = (i as usize * p + j) * width;
                        copy_into(o, &src[r..r + width]);
                    }
                })
        });
        let mut shape = vec![b, pi];
        shape.extend_from_slice(&table.shape()[2..]);
        Ok(ArrayD::from_shape_vec(shape, out).expect("sizes"))
    }

    /// `W_E[tokens]`: [batch, pos, d_model].
    pub fn embed(&self, w_e: &ArrayD<f32>, tokens: &Array2<u32>) -> Result<ArrayD<f32>> {
        let (v, d) = (w_e.shape()[0], w_e.shape()[1]);
        let (b, p) = tokens.dim();
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::invalid(
                "tokens",
                format!("token {t} out of range for d_vocab {v}"),
            ));
        }
        let w_e = std_layout(w_e);
        let table = w_e.as_slice().expect("standard layout");
        let tokens = tokens.as_standard_layout();
        let toks = tokens.as_slice().expect("standard layout");
        let out = filled(b * p * d, |out| {
            out.par_chunks_mut((ROWS * d).max(1))
                .zip(toks.par_chunks(ROWS))
                .for_each(|(o, ts)| {
                    for (o, &t) in o.chunks_mut(d.max(1)).zip(ts) {
                        copy_into(o, &table[t as usize * d..(t as usize + 1) * d]);
                    }
                })
        });
        Ok(ArrayD::from_shape_vec(IxDyn(&[b, p, d]), out).expect("sizes match"))
    }

    /// `W_pos[0..pos]` broadcast over the batch.
    pub fn pos_embed(&self, w_pos: &ArrayD<f32>, batch: usize, pos: usize) -> Result<ArrayD<f32>> {
        let (n_ctx, d) = (w_pos.shape()[0], w_pos.shape()[1]);
        if pos > n_ctx {
            return Err(Error::invalid(
                "tokens",
                format!("{pos} positions but n_ctx is {n_ctx}"),
            ));
        }
        let rows = w_pos.slice(s![..pos, ..]).as_standard_layout().into_owned();
        let block = rows.as_slice().expect("standard layout");
        let out = filled(batch * pos * d, |out| {
            if !block.is_empty() {
                out.par_chunks_mut(block.len())
                    .for_each(|o| copy_into(o, block));
            }
        });
        Ok(ArrayD::from_shape_vec(IxDyn(&[batch, pos, d]), out).expect("sizes match"))
    }

    /// Elementwise sum `a + b`.
    pub fn add(&self, a: ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        if a.shape() != b.shape() {
            return Err(shape_err(
                "add",
                format!("{:?} vs {:?}", a.shape(), b.shape()),
            ));
        }
        let mut out = if a.is_standard_layout() {
            a
        } else {
            a.as_standard_layout().into_owned()
        };
        let b = std_layout(b);
        out.as_slice_mut()
            .expect("standard layout")
            .par_chunks_mut(CHUNK)
            .zip(b.as_slice().expect("standard layout").par_chunks(CHUNK))
            .for_each(|(o, b)| o.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        Ok(out)
    }

    /// `x @ w + b` over the last axis.
    pub fn linear(
        &self,
        x: &ArrayD<f32>,
        w: &ArrayD<f32>,
        b: Option<&ArrayD<f32>>,
    ) -> Result<ArrayD<f32>> {
        let x = std_layout(x);
        let (k, n) = (w.shape()[0], w.shape()[1]);
        if x.shape().last() != Some(&k) {
            return Err(shape_err(
                "linear",
                format!("input {:?} vs weight {:?}", x.shape(), w.shape()),
            ));
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("non-empty") = n;
        let out = self.linear_rows(rows(&x), w, b)?;
        Ok(out
            .into_shape_with_order(IxDyn(&shape))
            .expect("sizes match"))
    }

    /// `x @ w + b` for x [N, K] (the bias added in the product's last step).
    fn linear_rows(
        &self,
        x: ArrayView2<f32>,
        w: &ArrayD<f32>,
        b: Option<&ArrayD<f32>>,
    ) -> Result<Array2<f32>> {
        let w2 = w
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|_| shape_err("linear", format!("weight {:?}", w.shape())))?;
        if x.ncols() != w2.nrows() {
            return Err(shape_err(
                "linear",
                format!("input [.., {}] vs weight {:?}", x.ncols(), w.shape()),
            ));
        }
        let b = b.map(std_layout);
        let bias = match &b {
            Some(b) if b.len() == w2.ncols() => Some(b.as_slice().expect("standard layout")),
            Some(b) => return Err(shape_err("linear", format!("bias {:?}", b.shape()))),
            None => None,
        };
        Ok(matmul_bias(x, w2, bias))
    }

    /// Per-head `x @ W[h] + b[h]`: [batch, pos, head, d_head].
    pub fn head_linear(
        &self,
        x: &ArrayD<f32>,
        w: &ArrayD<f32>,
        b: &ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        let (h, d, e) = (w.shape()[0], w.shape()[1], w.shape()[2]);
        let x = std_layout(x);
        let (bsz, p) = (x.shape()[0], x.shape()[1]);
        let out = match x.ndim() {
            3 => {
                // [BP, D] @ [D, H·E]
                let wf = w
                    .view()
                    .permuted_axes(IxDyn(&[1, 0, 2]))
                    .as_standard_layout()
                    .into_owned();
                let wf = wf.into_shape_with_order((d, h * e)).expect("sizes match");
                let mut out = matmul(rows(&x), wf.view());
                let bf = b.view().into_shape_with_order(h * e).expect("bias [H, E]");
                out.axis_chunks_iter_mut(Axis(0), ROWS)
                    .into_par_iter()
                    .for_each(|mut c| c += &bf);
                out.into_shape_with_order(IxDyn(&[bsz, p, h, e]))
                    .expect("sizes match")
            }
            4 => {
                let mut out = Array4::<f32>::zeros((bsz, p, h, e));
                let x4 = as4(&x, "head_linear")?;
                for hi in 0..h {
                    let xi = x4
                        .slice(s![.., .., hi, ..])
                        .to_owned()
                        .into_shape_with_order((bsz * p, d))
                        .expect("sizes");
                    let wi = w.slice(s![hi, .., ..]);
                    let mut r = matmul(xi.view(), wi.into_dimensionality().expect("2-D"));
                    r += &b.slice(s![hi, ..]);
                    out.slice_mut(s![.., .., hi, ..])
                        .assign(&r.into_shape_with_order((bsz, p, e)).expect("sizes"));
                }
                out.into_dyn()
            }
            n => return Err(shape_err("head_linear", format!("input with {n} dims"))),
        };
        Ok(out)
    }

    /// Attention scores `q·k / scale`, masked as the config says.
    pub fn attn_scores(
        &self,
        q: &ArrayD<f32>,
        k: &ArrayD<f32>,
        scale: f32,
        causal_ignore: Option<f32>,
    ) -> Result<ArrayD<f32>> {
        let (b, pq, h, e) = as4(q, "attn_scores")?.dim();
        let pk = as4(k, "attn_scores")?.dim().1;
        if pq > pk {
            return Err(shape_err("attn_scores", format!("{pq} queries, {pk} keys")));
        }
        let (q, k) = (std_layout(q), std_layout(k));
        let (qs, ks) = (q.as_slice().expect("std"), k.as_slice().expect("std"));
        let mut out = vec![0f32; b * h * pq * pk];
        out.par_chunks_mut(h * pq * pk)
            .enumerate()
            .for_each(|(bi, ob)| {
                let qb = &qs[bi * pq * h * e..(bi + 1) * pq * h * e];
                let kb = &ks[bi * pk * h * e..(bi + 1) * pk * h * e];
                for hi in 0..h {
                    for i in 0..pq {
                        let qv = &qb[(i * h + hi) * e..(i * h + hi + 1) * e];
                        for j in 0..pk {
                            ob[(hi * pq + i) * pk + j] = match causal_ignore {
                                Some(ig) if j > i + (pk - pq) => ig,
                                _ => {
                                    let kv = &kb[(j * h + hi) * e..(j * h + hi + 1) * e];
                                    qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() / scale
                                }
                            };
                        }
                    }
                }
            });
        Ok(ArrayD::from_shape_vec(IxDyn(&[b, h, pq, pk]), out).expect("sizes match"))
    }

    /// The last position of [B, P, …] as [B, 1, …].
    pub fn last_position(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let p = *x
            .shape()
            .get(1)
            .ok_or_else(|| shape_err("last_position", "1-D input".into()))?;
        if p == 0 {
            return Err(shape_err("last_position", "no positions".into()));
        }
        Ok(x.slice_axis(Axis(1), ndarray::Slice::from(p - 1..p))
            .as_standard_layout()
            .into_owned())
    }

    /// Softmax over the last axis (NaN → 0, as TL).
    pub fn softmax(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(map_rows(x, softmax_row))
    }

    /// `z = pattern · v` per head.
    pub fn attn_z(&self, pattern: &ArrayD<f32>, v: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let (b, h, pq, pk) = as4(pattern, "attn_z")?.dim();
        let e = as4(v, "attn_z")?.dim().3;
        let (pat, v) = (std_layout(pattern), std_layout(v));
        let (ps, vs) = (pat.as_slice().expect("std"), v.as_slice().expect("std"));
        let mut out = vec![0f32; b * pq * h * e];
        out.par_chunks_mut(pq * h * e)
            .enumerate()
            .for_each(|(bi, ob)| {
                let pb = &ps[bi * h * pq * pk..(bi + 1) * h * pq * pk];
                let vb = &vs[bi * pk * h * e..(bi + 1) * pk * h * e];
                for i in 0..pq {
                    for hi in 0..h {
                        let zo = &mut ob[(i * h + hi) * e..(i * h + hi + 1) * e];
                        for j in 0..pk {
                            let w = pb[(hi * pq + i) * pk + j];
                            let vv = &vb[(j * h + hi) * e..(j * h + hi + 1) * e];
                            zo.iter_mut().zip(vv).for_each(|(z, v)| *z += w * v);
                        }
                    }
                }
            });
        Ok(ArrayD::from_shape_vec(IxDyn(&[b, pq, h, e]), out).expect("sizes match"))
    }

    /// Per-head outputs `z[h] @ W_O[h]` (TL's `hook_result`).
    pub fn attn_result(&self, z: &ArrayD<f32>, w_o: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let z4 = as4(z, "attn_result")?;
        let (b, p, h, e) = z4.dim();
        let d = w_o.shape()[2];
        let mut out = Array4::<f32>::zeros((b, p, h, d));
        for hi in 0..h {
            let zi = z4
                .slice(s![.., .., hi, ..])
                .to_owned()
                .into_shape_with_order((b * p, e))
                .expect("sizes");
            let wi = w_o
                .slice(s![hi, .., ..])
                .into_dimensionality()
                .expect("2-D");
            let r = matmul(zi.view(), wi);
            out.slice_mut(s![.., .., hi, ..])
                .assign(&r.into_shape_with_order((b, p, d)).expect("sizes"));
        }
        Ok(out.into_dyn())
    }

    /// Sum over heads plus the bias.
    pub fn sum_heads(&self, x: &ArrayD<f32>, bias: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let mut out = x.sum_axis(Axis(2));
        out += bias;
        Ok(out)
    }

    /// Repeat `x` along a new head axis (split-QKV inputs).
    pub fn repeat_heads(&self, x: &ArrayD<f32>, n_heads: usize) -> Result<ArrayD<f32>> {
        let (b, p, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let v = x.view().insert_axis(Axis(2));
        Ok(v.broadcast(IxDyn(&[b, p, n_heads, d]))
            .expect("broadcast heads")
            .to_owned())
    }

    /// Apply an activation function elementwise.
    pub fn activation(&self, x: ArrayD<f32>, act: Activation) -> Result<ArrayD<f32>> {
        let mut x = if x.is_standard_layout() {
            x
        } else {
            x.as_standard_layout().into_owned()
        };
        let k = *x.shape().last().unwrap_or(&1);
        Cpu::activate_rows(x.as_slice_mut().expect("standard layout"), k, act);
        Ok(x)
    }

    /// The activation in place on rows of width `k` (row-wise for SoLU), in parallel.
    pub fn activate_rows(data: &mut [f32], k: usize, act: Activation) {
        if act == Activation::Solu {
            // x · softmax(x) over each row, in place.
            if k > 0 {
                data.par_chunks_mut(k).for_each(|row| {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = row.iter().map(|&v| (v - m).exp()).sum();
                    row.iter_mut().for_each(|v| *v *= (*v - m).exp() / sum);
                });
            }
        } else if act == Activation::Relu {
            // The common case as its own loop, which vectorises (the per-element match in
            // `act_scalar` kept it scalar).
            data.par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|v| *v = super::simd::relu(*v)));
        } else if act == Activation::Gelu {
            data.par_chunks_mut(CHUNK)
                .for_each(|c| map_fma(c, gelu_torch));
        } else {
            data.par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|v| *v = act_scalar(act, *v)));
        }
    }

    /// LayerNorm / RMSNorm without the affine part; returns the normalised values and the scale.
    pub fn normalize(
        &self,
        x: &ArrayD<f32>,
        center: bool,
        eps: f32,
    ) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
        let xs = std_layout(x);
        let k = *xs.shape().last().unwrap_or(&1);
        let mut out = ArrayD::<f32>::zeros(xs.raw_dim());
        let mut sshape = xs.shape().to_vec();
        *sshape.last_mut().expect("non-empty") = 1;
        let mut scale = ArrayD::<f32>::zeros(IxDyn(&sshape));
        if k > 0 && !xs.is_empty() {
            let kf = k as f32;
            out.as_slice_mut()
                .expect("fresh")
                .par_chunks_mut(k)
                .zip(xs.as_slice().expect("standard layout").par_chunks(k))
                .zip(scale.as_slice_mut().expect("fresh").par_iter_mut())
                .for_each(|((o, s), sc)| {
                    let mean = if center {
                        s.iter().sum::<f32>() / kf
                    } else {
                        0.0
                    };
                    let mut ss = 0.0f32;
                    for (o, &v) in o.iter_mut().zip(s) {
                        *o = v - mean;
                        ss += *o * *o;
                    }
                    *sc = (ss / kf + eps).sqrt();
                    for o in o.iter_mut() {
                        *o /= *sc;
                    }
                });
        }
        Ok((out, scale))
    }

    /// Normalise with a scale computed earlier.
    pub fn normalize_with(
        &self,
        x: &ArrayD<f32>,
        center: bool,
        scale: &ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        let mut out = std_layout(x).into_owned();
        if center {
            let k = *out.shape().last().unwrap_or(&1) as f32;
            let mean = out
                .sum_axis(Axis(out.ndim() - 1))
                .insert_axis(Axis(out.ndim() - 1))
                / k;
            out -= &mean;
        }
        out /= scale;
        Ok(out)
    }

    /// `x * w + b` (the affine part of LayerNorm).
    pub fn affine(
        &self,
        x: &ArrayD<f32>,
        w: &ArrayD<f32>,
        b: Option<&ArrayD<f32>>,
    ) -> Result<ArrayD<f32>> {
        let mut out = std_layout(x).into_owned() * w;
        if let Some(b) = b {
            out += b;
        }
        Ok(out)
    }

    /// `z.reshape(B, P, H·E) @ W_O + b_O` without copying z (see [`Backend::attn_out`]).
    pub fn attn_out(
        &self,
        z: &ArrayD<f32>,
        w_o_flat: &ArrayD<f32>,
        b_o: &ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        let (b, p, h, e) = as4(z, "attn_out")?.dim();
        let z = std_layout(z);
        let flat = z
            .view()
            .into_shape_with_order((b * p, h * e))
            .expect("standard layout");
        let out = self.linear_rows(flat, w_o_flat, Some(b_o))?;
        let d = out.ncols();
        Ok(out
            .into_shape_with_order(IxDyn(&[b, p, d]))
            .expect("sizes match"))
    }

    /// `a + b` into a new array (a is shared).
    pub fn add_new(&self, a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        if a.shape() != b.shape() {
            return Err(shape_err(
                "add",
                format!("{:?} vs {:?}", a.shape(), b.shape()),
            ));
        }
        let (a, b) = (std_layout(a), std_layout(b));
        let mut out = ArrayD::<f32>::uninit(a.raw_dim());
        out.as_slice_mut()
            .expect("standard layout")
            .par_chunks_mut(CHUNK)
            .zip(a.as_slice().expect("standard layout").par_chunks(CHUNK))
            .zip(b.as_slice().expect("standard layout").par_chunks(CHUNK))
            .for_each(|((o, a), b)| {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    o.write(a + b);
                }
            });
        // SAFETY: every element was written above.
        Ok(unsafe { out.assume_init() })
    }

    /// ReLU into a new array (x is shared; the common activation's cached-forward case).
    fn relu_new(&self, x: &ArrayD<f32>) -> ArrayD<f32> {
        let x = std_layout(x);
        let mut out = ArrayD::<f32>::uninit(x.raw_dim());
        out.as_slice_mut()
            .expect("standard layout")
            .par_chunks_mut(CHUNK)
            .zip(x.as_slice().expect("standard layout").par_chunks(CHUNK))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    o.write(super::simd::relu(x));
                }
            });
        // SAFETY: every element was written above.
        unsafe { out.assume_init() }
    }
}

/// The model's view of the CPU: tensors are reference-counted host arrays, so a hook point
/// hands the activation cache the forward pass's own buffer (no copy), and an operation that
/// would reuse its input's storage does so only when nothing else holds it.
impl Backend for Cpu {
    type Tensor = Arc<ArrayD<f32>>;

    fn upload(&self, a: &ArrayD<f32>) -> Result<Self::Tensor> {
        Ok(Arc::new(std_layout(a).into_owned()))
    }

    fn upload_shared(&self, a: Arc<ArrayD<f32>>) -> Result<Self::Tensor> {
        if a.is_standard_layout() {
            Ok(a)
        } else {
            Ok(Arc::new(a.as_standard_layout().into_owned()))
        }
    }

    fn download_shared(&self, t: &Self::Tensor) -> Result<Arc<ArrayD<f32>>> {
        Ok(t.clone())
    }

    fn download(&self, t: Self::Tensor) -> Result<ArrayD<f32>> {
        Ok(Arc::try_unwrap(t).unwrap_or_else(|t| (*t).clone()))
    }

    fn shape(&self, t: &Self::Tensor) -> Vec<usize> {
        t.shape().to_vec()
    }

    fn embed(&self, w_e: &Self::Tensor, tokens: &Array2<u32>) -> Result<Self::Tensor> {
        Cpu::embed(self, w_e, tokens).map(Arc::new)
    }

    fn pos_embed(&self, w_pos: &Self::Tensor, batch: usize, pos: usize) -> Result<Self::Tensor> {
        Cpu::pos_embed(self, w_pos, batch, pos).map(Arc::new)
    }

    fn take_rows(&self, table: &Self::Tensor, index: &Array2<u32>) -> Result<Self::Tensor> {
        Cpu::take_rows(self, table, index).map(Arc::new)
    }

    fn add(&self, a: Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        match Arc::try_unwrap(a) {
            Ok(a) => Cpu::add(self, a, b),
            Err(a) => self.add_new(&a, b),
        }
        .map(Arc::new)
    }

    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        Cpu::linear(self, x, w, b.map(|b| &**b)).map(Arc::new)
    }

    fn head_linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        Cpu::head_linear(self, x, w, b).map(Arc::new)
    }

    fn attn_scores(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        scale: f32,
        causal_ignore: Option<f32>,
    ) -> Result<Self::Tensor> {
        Cpu::attn_scores(self, q, k, scale, causal_ignore).map(Arc::new)
    }

    fn last_position(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        Cpu::last_position(self, x).map(Arc::new)
    }

    fn softmax(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        Cpu::softmax(self, x).map(Arc::new)
    }

    fn attn_z(&self, pattern: &Self::Tensor, v: &Self::Tensor) -> Result<Self::Tensor> {
        Cpu::attn_z(self, pattern, v).map(Arc::new)
    }

    fn attn_out(
        &self,
        z: &Self::Tensor,
        w_o_flat: &Self::Tensor,
        b_o: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        Cpu::attn_out(self, z, w_o_flat, b_o).map(Arc::new)
    }

    fn attn_result(&self, z: &Self::Tensor, w_o: &Self::Tensor) -> Result<Self::Tensor> {
        Cpu::attn_result(self, z, w_o).map(Arc::new)
    }

    fn sum_heads(&self, x: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        Cpu::sum_heads(self, x, b).map(Arc::new)
    }

    fn repeat_heads(&self, x: &Self::Tensor, n_heads: usize) -> Result<Self::Tensor> {
        Cpu::repeat_heads(self, x, n_heads).map(Arc::new)
    }

    fn activation(&self, x: Self::Tensor, act: Activation) -> Result<Self::Tensor> {
        match Arc::try_unwrap(x) {
            Ok(x) => Cpu::activation(self, x, act),
            Err(x) if act == Activation::Relu => Ok(self.relu_new(&x)),
            Err(x) => Cpu::activation(self, (*x).clone(), act),
        }
        .map(Arc::new)
    }

    fn normalize(
        &self,
        x: &Self::Tensor,
        center: bool,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (y, s) = Cpu::normalize(self, x, center, eps)?;
        Ok((Arc::new(y), Arc::new(s)))
    }

    fn normalize_with(
        &self,
        x: &Self::Tensor,
        center: bool,
        scale: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        Cpu::normalize_with(self, x, center, scale).map(Arc::new)
    }

    fn affine(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        Cpu::affine(self, x, w, b.map(|b| &**b)).map(Arc::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.5, 0.999_593_047_982_555),
            (-1.5, -0.966_105_146_475_310_7),
        ] {
            let got = erf_torch(x as f32) as f64;
            assert!((got - want).abs() < 2.5e-7, "erf({x}) = {got} vs {want}");
        }
    }
}

#[cfg(test)]
mod relu_tests {
    use super::*;

    #[test]
    fn relu_is_torchs_on_nan_and_signed_zero() {
        assert!(act_scalar(Activation::Relu, f32::NAN).is_nan());
        assert_eq!(act_scalar(Activation::Relu, -2.0), 0.0);
        assert_eq!(act_scalar(Activation::Relu, 3.5), 3.5);
    }
}
