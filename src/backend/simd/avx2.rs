//! The AVX2 + FMA twins of [`super`]'s AVX-512 kernels, for CPUs without AVX-512 (AMD Zen 2/3,
//! most laptops): the same operations in the same order, eight lanes to a register where
//! AVX-512 has sixteen, so two registers stand for one (`lo` lanes 0–7, `hi` lanes 8–15) and
//! every kernel gives the AVX-512 code's bits (tested against the portable code). Multiply and
//! add stay separate here too; only the matrix product (in `gemm`) fuses them, as its other
//! paths do.
//!
//! Measured on a 2-core AMD EPYC (Zen 3): the portable code ran one training epoch in 147 ms,
//! 43% of it in the scalar gathers.

use super::{label_grad, reduce16, reduce8, EXP_C, LN2_HI, LN2_LO, ROUND};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// The lanes `< min(left, 8)` of an 8 × 32-bit register (also the matrix product's column
/// masks in `gemm`).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn mask(left: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(left.min(8) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// The lanes `< min(left, 4)` of a 4 × 32-bit register.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn mask4(left: usize) -> __m128i {
    _mm_cmpgt_epi32(
        _mm_set1_epi32(left.min(4) as i32),
        _mm_setr_epi32(0, 1, 2, 3),
    )
}

/// Eight floats from `p`, the lanes at and past `left` zero (and not read).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load(p: *const f32, left: usize) -> __m256 {
    if left >= 8 {
        _mm256_loadu_ps(p)
    } else {
        _mm256_maskload_ps(p, mask(left))
    }
}

/// The first `min(left, 8)` lanes of `v` to `p`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store(p: *mut f32, left: usize, v: __m256) {
    if left >= 8 {
        _mm256_storeu_ps(p, v)
    } else {
        _mm256_maskstore_ps(p, mask(left), v)
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn axpy(out: &mut [f32], a: f32, x: &[f32]) {
    let n = out.len();
    let (o, x) = (out.as_mut_ptr(), x.as_ptr());
    let av = _mm256_set1_ps(a);
    let mut c = 0;
    while c < n {
        let v = _mm256_add_ps(
            load(o.add(c), n - c),
            _mm256_mul_ps(av, load(x.add(c), n - c)),
        );
        store(o.add(c), n - c, v);
        c += 8;
    }
}

/// [`super::gather_sum`]: 32 floats (four registers) at a time, then eight at a time.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gather_sum(
    out: &mut [MaybeUninit<f32>],
    base: &[f32],
    table: &[f32],
    terms: &[(f32, usize)],
    relu: bool,
) -> (f32, f32) {
    let n = out.len();
    let (t, b, o) = (table.as_ptr(), base.as_ptr(), out.as_mut_ptr() as *mut f32);
    let zero = _mm256_setzero_ps();
    let sign = _mm256_set1_ps(-0.0);
    let (mut lo, mut hi) = (_mm256_set1_ps(f32::INFINITY), zero);
    // ReLU as torch: keep x where !(x ≤ 0) (so NaN too), else +0.
    let act = |x: __m256| -> __m256 {
        if relu {
            _mm256_and_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(x, zero), x)
        } else {
            x
        }
    };
    let mut c = 0;
    while c + 32 <= n {
        let mut acc: [__m256; 4] = std::array::from_fn(|l| _mm256_loadu_ps(b.add(c + 8 * l)));
        for &(w, off) in terms {
            let wv = _mm256_set1_ps(w);
            let r = t.add(off + c);
            for (l, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, _mm256_loadu_ps(r.add(8 * l))));
            }
        }
        for (l, a) in acc.iter().enumerate() {
            let x = _mm256_andnot_ps(sign, *a);
            lo = _mm256_min_ps(x, lo); // NaN lanes leave lo/hi as they were
            hi = _mm256_max_ps(x, hi);
            _mm256_storeu_ps(o.add(c + 8 * l), act(*a));
        }
        c += 32;
    }
    while c < n {
        let left = n - c;
        let mut acc = load(b.add(c), left);
        for &(w, off) in terms {
            acc = _mm256_add_ps(
                acc,
                _mm256_mul_ps(_mm256_set1_ps(w), load(t.add(off + c), left)),
            );
        }
        let x = _mm256_andnot_ps(sign, acc);
        let keep = _mm256_castsi256_ps(mask(left));
        lo = _mm256_blendv_ps(lo, _mm256_min_ps(x, lo), keep);
        hi = _mm256_blendv_ps(hi, _mm256_max_ps(x, hi), keep);
        store(o.add(c), left, act(acc));
        c += 8;
    }
    let (mut l8, mut h8) = ([0f32; 8], [0f32; 8]);
    _mm256_storeu_ps(l8.as_mut_ptr(), lo);
    _mm256_storeu_ps(h8.as_mut_ptr(), hi);
    let lo = if n == 0 {
        0.0
    } else {
        l8.into_iter().fold(f32::INFINITY, f32::min)
    };
    (lo, h8.into_iter().fold(0.0, f32::max))
}

/// The sixteen lanes of `lo` (0–7) and `hi` (8–15) summed as [`reduce16`] sums them.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn reduce(lo: __m256, hi: __m256) -> f32 {
    let mut lanes = [0f32; 16];
    _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
    reduce16(lanes)
}

/// [`super::dot`]: lane l of sixteen takes the elements i ≡ l mod 16.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut c = 0;
    while c < n {
        for (h, d) in acc.iter_mut().enumerate() {
            let cc = c + 8 * h;
            if cc < n {
                let x = load(a.as_ptr().add(cc), n - cc);
                let y = load(b.as_ptr().add(cc), n - cc);
                *d = _mm256_add_ps(*d, _mm256_mul_ps(x, y));
            }
        }
        c += 16;
    }
    reduce(acc[0], acc[1])
}

/// [`super::dot_axpy_n`]: N dot products with `x` and their row updates in one pass.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // d[k][h]: two indices, one per loop
pub(super) unsafe fn dot_axpy_n<const N: usize>(
    x: &[f32],
    t: [&[f32]; N],
    acc: [&mut [f32]; N],
    w: [f32; N],
) -> [f32; N] {
    let n = x.len();
    let wv = w.map(|w| _mm256_set1_ps(w));
    let mut d = [[_mm256_setzero_ps(); 2]; N];
    let accp = acc.map(|a| a.as_mut_ptr());
    let mut c = 0;
    while c + 16 <= n {
        for h in 0..2 {
            let cc = c + 8 * h;
            let xv = _mm256_loadu_ps(x.as_ptr().add(cc));
            for k in 0..N {
                let tv = _mm256_loadu_ps(t[k].as_ptr().add(cc));
                d[k][h] = _mm256_add_ps(d[k][h], _mm256_mul_ps(xv, tv));
                let a = accp[k].add(cc);
                let av = _mm256_add_ps(_mm256_loadu_ps(a), _mm256_mul_ps(wv[k], xv));
                _mm256_storeu_ps(a, av);
            }
        }
        c += 16;
    }
    while c < n {
        for h in 0..2 {
            let cc = c + 8 * h;
            if cc >= n {
                break;
            }
            let left = n - cc;
            let xv = load(x.as_ptr().add(cc), left);
            for k in 0..N {
                let tv = load(t[k].as_ptr().add(cc), left);
                d[k][h] = _mm256_add_ps(d[k][h], _mm256_mul_ps(xv, tv));
                let a = accp[k].add(cc);
                store(
                    a,
                    left,
                    _mm256_add_ps(load(a, left), _mm256_mul_ps(wv[k], xv)),
                );
            }
        }
        c += 16;
    }
    d.map(|[lo, hi]| reduce(lo, hi))
}

/// [`super::exp_f64`] of N vectors of four, each step for all N before the next (see the
/// AVX-512 version).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp_n<const N: usize>(x: [__m256d; N]) -> [__m256d; N] {
    // max/min return their second operand when one is NaN: NaN passes through.
    let x = x.map(|x| {
        _mm256_min_pd(
            _mm256_set1_pd(709.0),
            _mm256_max_pd(_mm256_set1_pd(-708.0), x),
        )
    });
    let kr = x.map(|x| {
        _mm256_add_pd(
            _mm256_mul_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E)),
            _mm256_set1_pd(ROUND),
        )
    });
    let mut r = [_mm256_setzero_pd(); N];
    for i in 0..N {
        let k = _mm256_sub_pd(kr[i], _mm256_set1_pd(ROUND));
        r[i] = _mm256_sub_pd(
            _mm256_sub_pd(x[i], _mm256_mul_pd(k, _mm256_set1_pd(LN2_HI))),
            _mm256_mul_pd(k, _mm256_set1_pd(LN2_LO)),
        );
    }
    let mut p = [_mm256_set1_pd(EXP_C[0]); N];
    for &c in &EXP_C[1..] {
        for i in 0..N {
            p[i] = _mm256_add_pd(_mm256_mul_pd(p[i], r[i]), _mm256_set1_pd(c));
        }
    }
    let mut out = [_mm256_setzero_pd(); N];
    for i in 0..N {
        let bits = _mm256_add_epi64(
            _mm256_slli_epi64::<52>(_mm256_castpd_si256(kr[i])),
            _mm256_set1_epi64x(1023 << 52),
        );
        out[i] = _mm256_mul_pd(p[i], _mm256_castsi256_pd(bits));
    }
    out
}

/// The row's maximum and `Σ exp(x − m)` with [`super::exp_sum_plain`]'s lanes (lane l of
/// eight adds the elements i ≡ l mod 8: lanes 0–3 in one register, 4–7 in the other), each
/// exponential also written to `keep` when given.
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sum(row: &[f32], keep: Option<*mut f64>) -> (f64, f64) {
    let n = row.len();
    let p = row.as_ptr();
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut mv = ninf;
    let mut c = 0;
    while c < n {
        let x = load(p.add(c), n - c);
        let x = if n - c >= 8 {
            x
        } else {
            _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(mask(n - c)))
        };
        mv = _mm256_max_ps(mv, x);
        c += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
    let m = lanes.into_iter().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mvd = _mm256_set1_pd(m);
    let mut acc = [_mm256_setzero_pd(); 2];
    let mut c = 0;
    // Eight vectors of four at a time (their exponentials side by side), added in order.
    while c + 32 <= n {
        let x: [__m256d; 8] = std::array::from_fn(|v| {
            _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(p.add(c + 4 * v))), mvd)
        });
        for (v, e) in exp_n(x).into_iter().enumerate() {
            if let Some(ep) = keep {
                _mm256_storeu_pd(ep.add(c + 4 * v), e);
            }
            acc[v % 2] = _mm256_add_pd(acc[v % 2], e);
        }
        c += 32;
    }
    // Then four at a time; lanes past the row add nothing (a sum of exponentials is never −0).
    while c < n {
        let left = n - c;
        let m4 = mask4(left);
        let m64 = _mm256_cvtepi32_epi64(m4);
        let x = _mm256_cvtps_pd(_mm_maskload_ps(p.add(c), m4));
        let e = _mm256_and_pd(exp_n([_mm256_sub_pd(x, mvd)])[0], _mm256_castsi256_pd(m64));
        if let Some(ep) = keep {
            _mm256_maskstore_pd(ep.add(c), m64, e);
        }
        let v = (c / 4) % 2;
        acc[v] = _mm256_add_pd(acc[v], e);
        c += 4;
    }
    let mut lanes = [0f64; 8];
    _mm256_storeu_pd(lanes.as_mut_ptr(), acc[0]);
    _mm256_storeu_pd(lanes.as_mut_ptr().add(4), acc[1]);
    (m, reduce8(lanes))
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn log_sum_exp(row: &[f32]) -> f64 {
    let (m, sum) = exp_sum(row, None);
    m + sum.ln()
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn log_softmax_grad(
    row: &[f32],
    label: usize,
    scale: f64,
    grad: &mut [f32],
    e: &mut [f64],
) -> f64 {
    let n = row.len();
    let ep = e.as_mut_ptr();
    let (m, sum) = exp_sum(row, Some(ep));
    let inv = 1.0 / sum;
    let (iv, sv) = (_mm256_set1_pd(inv), _mm256_set1_pd(scale));
    let mut c = 0;
    while c < n {
        let left = n - c;
        let m4 = mask4(left);
        let x = _mm256_maskload_pd(ep.add(c), _mm256_cvtepi32_epi64(m4));
        let g = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(x, iv), sv));
        _mm_maskstore_ps(grad.as_mut_ptr().add(c), m4, g);
        c += 4;
    }
    label_grad(e, inv, label, scale, grad);
    m + sum.ln()
}
