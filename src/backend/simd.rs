//! Hand-vectorised inner loops of the CPU backend's tabulated passes (evaluation, training).
//!
//! The crate is built for baseline x86-64, so loops that matter are written with AVX-512
//! intrinsics (here) and AVX2 intrinsics (the crate-internal module `avx2`), chosen at run time by
//! what the CPU has ([`level`]), with a plain-Rust fallback that performs the same operations
//! in the same order: every kernel here gives the same bits on every machine. Multiply and add
//! stay separate (never fused), as the scalar code has them.
//!
//! Why hand-written: the gathers of the tabulated pass (`out = base + Σ w·row`) were
//! load/store-bound as one `axpy` per term (each term re-read and re-wrote the output row),
//! and the f64 loss was a chain of dependent additions with a libm call per element.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// The instruction set the kernels here and in [`super::gemm`] use: chosen once from what the
/// CPU has, capped by the environment variable `TLENS_SIMD` (`avx512`, `avx2` or `portable`; any
/// other value caps nothing). Every level gives the same bits, only slower (tests compare them;
/// the CLI tests run evaluation, the activation cache and training at each level).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust for baseline x86-64 (SSE2) and other architectures (matrixmultiply for
    /// matrix products).
    Portable,
    /// AVX2 with FMA (8-float registers), e.g. AMD Zen 2/3, Intel Haswell and later.
    Avx2,
    /// AVX-512F and VL (16-float registers).
    Avx512,
}

/// The level this process runs at (see [`Level`]).
#[inline]
pub fn level() -> Level {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
    let decode = |v: u8| match v {
        0 => Level::Portable,
        1 => Level::Avx2,
        _ => Level::Avx512,
    };
    match LEVEL.load(Ordering::Relaxed) {
        u8::MAX => {
            let cap = match std::env::var("TLENS_SIMD").as_deref() {
                Ok("portable") => Level::Portable,
                Ok("avx2") => Level::Avx2,
                _ => Level::Avx512,
            };
            let l = cpu_level().min(cap);
            LEVEL.store(l as u8, Ordering::Relaxed);
            l
        }
        v => decode(v),
    }
}

/// The best level this CPU supports.
fn cpu_level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// Whether the AVX-512 kernels run ([`level`] is [`Level::Avx512`]).
#[inline]
pub fn has_avx512() -> bool {
    level() == Level::Avx512
}

/// `out[i] += a·x[i]` (a multiply, then an add).
#[inline]
pub fn axpy(out: &mut [f32], a: f32, x: &[f32]) {
    assert_eq!(out.len(), x.len(), "axpy: lengths");
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the level's instructions are present (checked at run time); lengths are equal.
        Level::Avx512 => return unsafe { axpy_avx512(out, a, x) },
        Level::Avx2 => return unsafe { avx2::axpy(out, a, x) },
        Level::Portable => {}
    }
    axpy_plain(out, a, x)
}

fn axpy_plain(out: &mut [f32], a: f32, x: &[f32]) {
    out.iter_mut().zip(x).for_each(|(o, x)| *o += a * x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn axpy_avx512(out: &mut [f32], a: f32, x: &[f32]) {
    let n = out.len();
    let (o, x) = (out.as_mut_ptr(), x.as_ptr());
    let av = _mm512_set1_ps(a);
    let mut c = 0;
    while c < n {
        let m = lane_mask(n - c);
        let v = _mm512_add_ps(
            _mm512_maskz_loadu_ps(m, o.add(c)),
            _mm512_mul_ps(av, _mm512_maskz_loadu_ps(m, x.add(c))),
        );
        _mm512_mask_storeu_ps(o.add(c), m, v);
        c += 16;
    }
}

/// The mask of the first `min(left, 16)` lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lane_mask(left: usize) -> u16 {
    if left >= 16 {
        u16::MAX
    } else {
        (1u16 << left) - 1
    }
}

/// View initialised floats as a write-only output for the kernels here.
#[inline]
pub fn as_uninit(x: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the kernels only write initialised values.
    unsafe { &mut *(x as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// ReLU as torch has it: `x ≤ 0 → +0`, NaN stays NaN.
#[inline(always)]
pub fn relu(x: f32) -> f32 {
    if x <= 0.0 {
        0.0
    } else {
        x
    }
}

/// `pre = base + Σ_t w_t · table[o_t .. o_t + out.len()]`, the terms added in order, each as a
/// multiply then an add (the same bits as `pre = base` followed by one [`axpy`] per term), the
/// row kept in registers; writes `relu(pre)` when `relu`, else `pre`, to `out` (every element).
/// Returns `(min |pre|, max |pre|)` over the row (0, 0 for an empty row; NaNs are skipped).
#[inline]
pub fn gather_sum(
    out: &mut [MaybeUninit<f32>],
    base: &[f32],
    table: &[f32],
    terms: &[(f32, usize)],
    relu: bool,
) -> (f32, f32) {
    let n = out.len();
    assert_eq!(base.len(), n, "gather_sum: base length");
    assert!(
        terms.iter().all(|&(_, o)| o + n <= table.len()),
        "gather_sum: a row outside the table"
    );
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the level's instructions are present (checked at run time); every row lies inside `table` (asserted above).
        Level::Avx512 => return unsafe { gather_sum_avx512(out, base, table, terms, relu) },
        Level::Avx2 => return unsafe { avx2::gather_sum(out, base, table, terms, relu) },
        Level::Portable => {}
    }
    gather_sum_plain(out, base, table, terms, relu)
}

fn gather_sum_plain(
    out: &mut [MaybeUninit<f32>],
    base: &[f32],
    table: &[f32],
    terms: &[(f32, usize)],
    relu: bool,
) -> (f32, f32) {
    let n = out.len();
    let (mut lo, mut hi) = (f32::INFINITY, 0f32);
    for (c, y) in out.iter_mut().enumerate() {
        let mut acc = base[c];
        for &(w, o) in terms {
            acc += w * table[o + c];
        }
        let a = acc.abs();
        lo = lo.min(a);
        hi = hi.max(a);
        y.write(if relu { self::relu(acc) } else { acc });
    }
    (if n == 0 { 0.0 } else { lo }, hi)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn gather_sum_avx512(
    out: &mut [MaybeUninit<f32>],
    base: &[f32],
    table: &[f32],
    terms: &[(f32, usize)],
    relu: bool,
) -> (f32, f32) {
    let n = out.len();
    let (t, b, o) = (table.as_ptr(), base.as_ptr(), out.as_mut_ptr() as *mut f32);
    let zero = _mm512_setzero_ps();
    let (mut lo, mut hi) = (_mm512_set1_ps(f32::INFINITY), zero);
    // ReLU as torch: keep x where !(x ≤ 0) (so NaN too), else +0.
    let act = |x: __m512| -> __m512 {
        if relu {
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLE_UQ>(x, zero), x)
        } else {
            x
        }
    };
    let mut c = 0;
    // Four registers (64 floats) at a time, then one (masked) at a time.
    while c + 64 <= n {
        let mut acc = [
            _mm512_loadu_ps(b.add(c)),
            _mm512_loadu_ps(b.add(c + 16)),
            _mm512_loadu_ps(b.add(c + 32)),
            _mm512_loadu_ps(b.add(c + 48)),
        ];
        for &(w, off) in terms {
            let wv = _mm512_set1_ps(w);
            let r = t.add(off + c);
            for (l, a) in acc.iter_mut().enumerate() {
                *a = _mm512_add_ps(*a, _mm512_mul_ps(wv, _mm512_loadu_ps(r.add(16 * l))));
            }
        }
        for (l, a) in acc.iter().enumerate() {
            let x = _mm512_abs_ps(*a);
            lo = _mm512_min_ps(x, lo); // NaN lanes leave lo/hi as they were
            hi = _mm512_max_ps(x, hi);
            _mm512_storeu_ps(o.add(c + 16 * l), act(*a));
        }
        c += 64;
    }
    while c < n {
        let m = lane_mask(n - c);
        let mut acc = _mm512_maskz_loadu_ps(m, b.add(c));
        for &(w, off) in terms {
            let x = _mm512_maskz_loadu_ps(m, t.add(off + c));
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(w), x));
        }
        let x = _mm512_abs_ps(acc);
        lo = _mm512_mask_min_ps(lo, m, x, lo);
        hi = _mm512_mask_max_ps(hi, m, x, hi);
        _mm512_mask_storeu_ps(o.add(c), m, act(acc));
        c += 16;
    }
    let lo = if n == 0 {
        0.0
    } else {
        _mm512_reduce_min_ps(lo)
    };
    (lo, _mm512_reduce_max_ps(hi))
}

/// `Σ a[i]·b[i]` in sixteen lanes (lane l takes the elements i ≡ l mod 16, multiply then add),
/// the lanes then summed pairwise.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths");
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the level's instructions are present (checked at run time); lengths are equal.
        Level::Avx512 => return unsafe { dot_avx512(a, b) },
        Level::Avx2 => return unsafe { avx2::dot(a, b) },
        Level::Portable => {}
    }
    dot_plain(a, b)
}

fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (ca, cb) in a.chunks(16).zip(b.chunks(16)) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    reduce16(acc)
}

/// [`dot`]`(x, t)`, and `acc[i] += w·x[i]` in the same pass over `x` (the backward pass reads
/// a table row for the dot product and updates the same row's gradient sum).
#[inline]
pub fn dot_axpy(x: &[f32], t: &[f32], acc: &mut [f32], w: f32) -> f32 {
    assert!(
        x.len() == t.len() && x.len() == acc.len(),
        "dot_axpy: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the level's instructions are present (checked at run time); lengths are equal.
        Level::Avx512 => return unsafe { dot_axpy_avx512(x, t, acc, w) },
        Level::Avx2 => return unsafe { avx2::dot_axpy_n(x, [t], [acc], [w])[0] },
        Level::Portable => {}
    }
    dot_axpy_plain(x, t, acc, w)
}

fn dot_axpy_plain(x: &[f32], t: &[f32], acc: &mut [f32], w: f32) -> f32 {
    axpy_plain(acc, w, x);
    dot_plain(x, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn dot_axpy_avx512(x: &[f32], t: &[f32], acc: &mut [f32], w: f32) -> f32 {
    let n = x.len();
    let wv = _mm512_set1_ps(w);
    let mut d = _mm512_setzero_ps();
    let mut c = 0;
    while c < n {
        let m = lane_mask(n - c);
        let xv = _mm512_maskz_loadu_ps(m, x.as_ptr().add(c));
        let tv = _mm512_maskz_loadu_ps(m, t.as_ptr().add(c));
        d = _mm512_add_ps(d, _mm512_mul_ps(xv, tv));
        let a = acc.as_mut_ptr().add(c);
        let av = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a), _mm512_mul_ps(wv, xv));
        _mm512_mask_storeu_ps(a, m, av);
        c += 16;
    }
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), d);
    reduce16(lanes)
}

/// [`dot_axpy`] of N table rows against the same `x` in one pass: `out[k] = x·t[k]` and
/// `acc[k] += w[k]·x`, each with exactly [`dot_axpy`]'s arithmetic. The N dot products are
/// independent chains of additions side by side (one at a time, each waits on its last add).
pub fn dot_axpy_n<const N: usize>(
    x: &[f32],
    t: [&[f32]; N],
    mut acc: [&mut [f32]; N],
    w: [f32; N],
) -> [f32; N] {
    assert!(
        t.iter().all(|t| t.len() == x.len()) && acc.iter().all(|a| a.len() == x.len()),
        "dot_axpy_n: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the level's instructions are present (checked at run time); lengths are equal.
        Level::Avx512 => return unsafe { dot_axpy_n_avx512(x, t, acc, w) },
        Level::Avx2 => return unsafe { avx2::dot_axpy_n(x, t, acc, w) },
        Level::Portable => {}
    }
    std::array::from_fn(|k| dot_axpy_plain(x, t[k], acc[k], w[k]))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn dot_axpy_n_avx512<const N: usize>(
    x: &[f32],
    t: [&[f32]; N],
    acc: [&mut [f32]; N],
    w: [f32; N],
) -> [f32; N] {
    let n = x.len();
    let wv = w.map(|w| _mm512_set1_ps(w));
    let mut d = [_mm512_setzero_ps(); N];
    let accp = acc.map(|a| a.as_mut_ptr());
    let mut c = 0;
    while c < n {
        let m = lane_mask(n - c);
        let xv = _mm512_maskz_loadu_ps(m, x.as_ptr().add(c));
        for k in 0..N {
            let tv = _mm512_maskz_loadu_ps(m, t[k].as_ptr().add(c));
            d[k] = _mm512_add_ps(d[k], _mm512_mul_ps(xv, tv));
            let a = accp[k].add(c);
            let av = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a), _mm512_mul_ps(wv[k], xv));
            _mm512_mask_storeu_ps(a, m, av);
        }
        c += 16;
    }
    d.map(|d| {
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), d);
        reduce16(lanes)
    })
}

/// Pairwise sum of sixteen lanes (halves added lane by lane, as the vector code does).
#[inline(always)]
fn reduce16(mut acc: [f32; 16]) -> f32 {
    let mut w = 8;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let mut acc = _mm512_setzero_ps();
    let mut c = 0;
    while c < n {
        let m = lane_mask(n - c);
        let x = _mm512_maskz_loadu_ps(m, a.as_ptr().add(c));
        let y = _mm512_maskz_loadu_ps(m, b.as_ptr().add(c));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(x, y));
        c += 16;
    }
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
    reduce16(lanes)
}

// ---- the f64 loss: log-sum-exp of f32 logits ----

const LN2_HI: f64 = 0.693_147_180_369_123_8; // 32 significant bits: k·LN2_HI is exact
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5·2^52: adding it rounds to an integer
/// 1/n! for n = 13 down to 0.
const EXP_C: [f64; 14] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// e^x in f64, within 2 ulp of libm's `exp` (tested), as straight-line arithmetic so that the
/// vector version computes the same bits: `x = k·ln 2 + r` with |r| ≤ ln 2 / 2, e^r by its
/// Taylor series to r¹³ (truncation < 5e-18), times 2^k. Below −708 (e^x < 3e-308, far under
/// what a log-sum-exp with a term equal to 1 can see) the argument is clamped; NaN stays NaN.
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    let x = x.clamp(-708.0, 709.0); // NaN stays NaN
    let kr = x * std::f64::consts::LOG2_E + ROUND;
    let k = kr - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = EXP_C[0];
    for &c in &EXP_C[1..] {
        p = p * r + c;
    }
    // 2^k from the integer in kr's low mantissa bits (k in [−1022, 1023] after the clamp).
    let scale = f64::from_bits((kr.to_bits() << 52).wrapping_add(1023 << 52));
    p * scale
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn exp_f64_avx512(x: __m512d) -> __m512d {
    exp_f64_avx512_n([x])[0]
}

/// [`exp_f64`] of N vectors, each step done for all N before the next: the polynomial is a
/// chain of 26 dependent operations, and N independent chains side by side keep the FP units
/// busy (one chain at a time left the loss's exponentials 3–4× slower than their operation
/// count). Every vector gets exactly the single-vector arithmetic.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
#[inline]
unsafe fn exp_f64_avx512_n<const N: usize>(x: [__m512d; N]) -> [__m512d; N] {
    // max/min return their second operand when one is NaN: NaN passes through.
    let x = x.map(|x| {
        _mm512_min_pd(
            _mm512_set1_pd(709.0),
            _mm512_max_pd(_mm512_set1_pd(-708.0), x),
        )
    });
    let kr = x.map(|x| {
        _mm512_add_pd(
            _mm512_mul_pd(x, _mm512_set1_pd(std::f64::consts::LOG2_E)),
            _mm512_set1_pd(ROUND),
        )
    });
    let mut r = [_mm512_setzero_pd(); N];
    for i in 0..N {
        let k = _mm512_sub_pd(kr[i], _mm512_set1_pd(ROUND));
        r[i] = _mm512_sub_pd(
            _mm512_sub_pd(x[i], _mm512_mul_pd(k, _mm512_set1_pd(LN2_HI))),
            _mm512_mul_pd(k, _mm512_set1_pd(LN2_LO)),
        );
    }
    let mut p = [_mm512_set1_pd(EXP_C[0]); N];
    for &c in &EXP_C[1..] {
        for i in 0..N {
            p[i] = _mm512_add_pd(_mm512_mul_pd(p[i], r[i]), _mm512_set1_pd(c));
        }
    }
    let mut out = [_mm512_setzero_pd(); N];
    for i in 0..N {
        let bits = _mm512_add_epi64(
            _mm512_slli_epi64::<52>(_mm512_castpd_si512(kr[i])),
            _mm512_set1_epi64(1023 << 52),
        );
        out[i] = _mm512_mul_pd(p[i], _mm512_castsi512_pd(bits));
    }
    out
}

/// `log Σ exp(x)` of a row of f32 logits, in f64, max-subtracted (as torch's log_softmax):
/// the exponentials are summed in eight lanes (lane l takes the elements i ≡ l mod 8), the
/// lanes then added pairwise.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the level's instructions are present (checked at run time)
        Level::Avx512 => return unsafe { log_sum_exp_avx512(row) },
        Level::Avx2 => return unsafe { avx2::log_sum_exp(row) },
        Level::Portable => {}
    }
    log_sum_exp_plain(row)
}

fn log_sum_exp_plain(row: &[f32]) -> f64 {
    let (m, sum) = exp_sum_plain(row, None);
    m + sum.ln()
}

/// [`exp_sum_avx512`]'s arithmetic, element by element.
fn exp_sum_plain(row: &[f32], mut keep: Option<&mut [f64]>) -> (f64, f64) {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let mut acc = [0f64; 8];
    for (i, &x) in row.iter().enumerate() {
        let e = exp_f64(x as f64 - m);
        if let Some(k) = keep.as_deref_mut() {
            k[i] = e;
        }
        acc[i % 8] += e;
    }
    (m, reduce8(acc))
}

#[inline(always)]
fn reduce8(a: [f64; 8]) -> f64 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// The row's maximum m and `Σ exp(x − m)` (lane l adds the elements i ≡ l mod 8, the lanes then
/// added pairwise), each `exp(x − m)` also written to `keep` when given (`row.len()` f64s).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn exp_sum_avx512(row: &[f32], keep: Option<*mut f64>) -> (f64, f64) {
    let n = row.len();
    let p = row.as_ptr();
    // The maximum, in f32 (exact), with NaN propagated as f64::max would not: a NaN logit
    // makes the row's loss NaN either way, through the exponentials below.
    let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut c = 0;
    while c < n {
        let k = lane_mask(n - c);
        mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, p.add(c)));
        c += 16;
    }
    let m = _mm512_reduce_max_ps(mv) as f64;
    let mvd = _mm512_set1_pd(m);
    let mut acc = _mm512_setzero_pd();
    let mut c = 0;
    // Four vectors at a time (their exponentials side by side), added in order.
    while c + 32 <= n {
        let x: [__m512d; 4] = std::array::from_fn(|v| {
            _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p.add(c + 8 * v))), mvd)
        });
        for (v, e) in exp_f64_avx512_n(x).into_iter().enumerate() {
            if let Some(ep) = keep {
                _mm512_storeu_pd(ep.add(c + 8 * v), e);
            }
            acc = _mm512_add_pd(acc, e);
        }
        c += 32;
    }
    while c < n {
        let k = (lane_mask(n - c) & 0xff) as u8;
        let x = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(k, p.add(c)));
        let e = exp_f64_avx512(_mm512_sub_pd(x, mvd));
        if let Some(ep) = keep {
            _mm512_mask_storeu_pd(ep.add(c), k, e);
        }
        acc = _mm512_add_pd(acc, _mm512_maskz_mov_pd(k, e));
        c += 8;
    }
    let mut lanes = [0f64; 8];
    _mm512_storeu_pd(lanes.as_mut_ptr(), acc);
    (m, reduce8(lanes))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn log_sum_exp_avx512(row: &[f32]) -> f64 {
    let (m, sum) = exp_sum_avx512(row, None);
    m + sum.ln()
}

/// The gradient of the f64 log-softmax loss of one row of f32 logits: writes
/// `grad[j] = (softmax_j − [j = label])·scale` rounded to f32 (torch's backward of
/// `log_softmax`, then the cast back to float32) and returns `log Σ exp(x)` (the same bits as
/// [`log_sum_exp`]). The softmax is `exp(x_j − max)·(1/Σ)` from the very exponentials the sum
/// adds (kept in `scratch`), so each is computed once; it differs from torch's
/// `exp(log_softmax)` by an f64 rounding, far below the f32 result's.
pub fn log_softmax_grad(
    row: &[f32],
    label: usize,
    scale: f64,
    grad: &mut [f32],
    scratch: &mut Vec<f64>,
) -> f64 {
    assert_eq!(row.len(), grad.len(), "log_softmax_grad: lengths");
    scratch.resize(row.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the level's instructions are present (checked at run time); the three slices have the same length.
        Level::Avx512 => {
            return unsafe { log_softmax_grad_avx512(row, label, scale, grad, scratch) }
        }
        Level::Avx2 => return unsafe { avx2::log_softmax_grad(row, label, scale, grad, scratch) },
        Level::Portable => {}
    }
    log_softmax_grad_plain(row, label, scale, grad, scratch)
}

fn log_softmax_grad_plain(
    row: &[f32],
    label: usize,
    scale: f64,
    grad: &mut [f32],
    e: &mut [f64],
) -> f64 {
    let (m, sum) = exp_sum_plain(row, Some(e));
    let inv = 1.0 / sum;
    for (g, &e) in grad.iter_mut().zip(e.iter()) {
        *g = ((e * inv) * scale) as f32;
    }
    label_grad(e, inv, label, scale, grad);
    m + sum.ln()
}

/// The label's entry: `(softmax − 1)·scale`.
fn label_grad(e: &[f64], inv: f64, label: usize, scale: f64, grad: &mut [f32]) {
    if let Some(g) = grad.get_mut(label) {
        *g = ((e[label] * inv - 1.0) * scale) as f32;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn log_softmax_grad_avx512(
    row: &[f32],
    label: usize,
    scale: f64,
    grad: &mut [f32],
    e: &mut [f64],
) -> f64 {
    let n = row.len();
    let ep = e.as_mut_ptr();
    let (m, sum) = exp_sum_avx512(row, Some(ep));
    let inv = 1.0 / sum;
    let (iv, sv) = (_mm512_set1_pd(inv), _mm512_set1_pd(scale));
    let mut c = 0;
    while c < n {
        let k = (lane_mask(n - c) & 0xff) as u8;
        let g = _mm512_mul_pd(_mm512_mul_pd(_mm512_maskz_loadu_pd(k, ep.add(c)), iv), sv);
        _mm256_mask_storeu_ps(grad.as_mut_ptr().add(c), k, _mm512_cvtpd_ps(g));
        c += 8;
    }
    label_grad(e, inv, label, scale, grad);
    m + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Vec<f32>> {
        let mut rng = crate::task::Mt19937::new(7);
        let mut u = || (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0;
        [1usize, 7, 8, 9, 16, 17, 113, 512, 515]
            .iter()
            .map(|&n| (0..n).map(|_| u() * 30.0).collect())
            .collect()
    }

    #[test]
    fn exp_f64_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        let mut check = |x: f64| {
            let (a, b) = (exp_f64(x), x.exp());
            if b > 1e-300 {
                worst = worst.max(((a - b) / b).abs());
            } else {
                assert!(a < 1e-300, "{x}: {a} vs {b}");
            }
        };
        for i in 0..=200_000 {
            check(-740.0 + 1449.0 * i as f64 / 200_000.0);
        }
        for i in 0..=20_000 {
            check(-1.0 + 2.0 * i as f64 / 20_000.0);
        }
        assert!(worst <= 2.0 * f64::EPSILON, "max relative error {worst:e}");
        assert!(exp_f64(f64::NAN).is_nan());
        assert_eq!(exp_f64(0.0), 1.0);
        assert!(exp_f64(f64::NEG_INFINITY) < 1e-300);
    }

    #[test]
    fn vector_kernels_equal_the_plain_arithmetic_bit_for_bit() {
        // On an AVX-512 machine this compares the intrinsics with the scalar order they claim;
        // elsewhere both sides are the plain code.
        for row in rows() {
            let n = row.len();
            assert_eq!(
                log_sum_exp(&row).to_bits(),
                log_sum_exp_plain(&row).to_bits(),
                "lse n={n}"
            );
            let mut g = vec![0f32; n];
            let lse = log_softmax_grad(&row, n / 2, 0.25, &mut g, &mut Vec::new());
            assert_eq!(lse.to_bits(), log_sum_exp(&row).to_bits(), "lse n={n}");
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let e: Vec<f64> = row.iter().map(|&x| exp_f64(x as f64 - m)).collect();
            let mut acc = [0f64; 8];
            e.iter().enumerate().for_each(|(i, &v)| acc[i % 8] += v);
            let inv = 1.0 / reduce8(acc);
            for (j, &gj) in g.iter().enumerate() {
                let onehot = if j == n / 2 { 1.0 } else { 0.0 };
                let want = ((e[j] * inv - onehot) * 0.25) as f32;
                assert_eq!(gj.to_bits(), want.to_bits(), "grad n={n} j={j}");
                // and torch's exp(log_softmax) to within the f32 rounding
                let torch = ((exp_f64(row[j] as f64 - lse) - onehot) * 0.25) as f32;
                assert!(
                    (gj - torch).abs() <= f32::EPSILON * torch.abs(),
                    "n={n} j={j}"
                );
            }
            let b: Vec<f32> = row.iter().map(|x| x * 0.37 - 1.0).collect();
            let mut acc = [0f32; 16];
            for (i, (&x, &y)) in row.iter().zip(&b).enumerate() {
                acc[i % 16] += x * y;
            }
            assert_eq!(
                dot(&row, &b).to_bits(),
                reduce16(acc).to_bits(),
                "dot n={n}"
            );
            let mut sums = b.clone();
            let d = dot_axpy(&row, &b, &mut sums, -0.7);
            assert_eq!(d.to_bits(), reduce16(acc).to_bits(), "dot_axpy n={n}");
            for ((&s, &x), &y) in sums.iter().zip(&row).zip(&b) {
                assert_eq!(s.to_bits(), (y + -0.7 * x).to_bits(), "dot_axpy sums n={n}");
            }
            let mut out = b.clone();
            axpy(&mut out, 0.3, &row);
            for ((&o, &x), &y) in out.iter().zip(&row).zip(&b) {
                assert_eq!(o.to_bits(), (y + 0.3 * x).to_bits(), "axpy n={n}");
            }
            // gather: base + three rows of a table
            let table: Vec<f32> = row.iter().chain(&b).chain(&row).copied().collect();
            let terms = [(0.5f32, 0), (-1.25, n), (0.125, 2 * n)];
            let mut want = b.clone();
            for &(w, o) in &terms {
                for (y, &x) in want.iter_mut().zip(&table[o..o + n]) {
                    *y += w * x;
                }
            }
            let mut got = vec![0f32; n];
            let (lo, hi) = gather_sum(as_uninit(&mut got), &b, &table, &terms, false);
            assert_eq!(got, want, "gather n={n}");
            let abs = want.iter().map(|x| x.abs());
            assert_eq!(
                lo,
                abs.clone().fold(f32::INFINITY, f32::min),
                "min |pre| n={n}"
            );
            assert_eq!(hi, abs.fold(0.0, f32::max), "max |pre| n={n}");
            gather_sum(as_uninit(&mut got), &b, &table, &terms, true);
            let relued: Vec<f32> = want.iter().map(|&x| relu(x)).collect();
            assert_eq!(got, relued, "gather + relu n={n}");
        }
    }

    #[test]
    fn dispatched_kernels_equal_the_portable_ones_bit_for_bit() {
        // The AVX-512 code (when this CPU has it) against the fallback a CPU without it runs.
        for row in rows() {
            let n = row.len();
            let b: Vec<f32> = row.iter().map(|x| x * 0.61 + 0.25).collect();
            assert_eq!(dot(&row, &b).to_bits(), dot_plain(&row, &b).to_bits());
            let (mut s1, mut s2) = (b.clone(), b.clone());
            let d1 = dot_axpy(&row, &b, &mut s1, 0.9);
            let d2 = dot_axpy_plain(&row, &b, &mut s2, 0.9);
            assert_eq!((d1.to_bits(), &s1), (d2.to_bits(), &s2), "dot_axpy n={n}");
            let t2: Vec<f32> = b.iter().map(|x| x * -0.3 + 0.5).collect();
            let (mut s3, mut s4, mut s5, mut s6) = (b.clone(), t2.clone(), b.clone(), t2.clone());
            let dn = dot_axpy_n(&row, [&b, &t2], [&mut s3, &mut s4], [0.9, -0.4]);
            let d5 = dot_axpy_plain(&row, &b, &mut s5, 0.9);
            let d6 = dot_axpy_plain(&row, &t2, &mut s6, -0.4);
            assert_eq!(
                (dn.map(f32::to_bits), &s3, &s4),
                ([d5.to_bits(), d6.to_bits()], &s5, &s6),
                "dot_axpy_n n={n}"
            );
            let (mut a1, mut a2) = (b.clone(), b.clone());
            axpy(&mut a1, -1.5, &row);
            axpy_plain(&mut a2, -1.5, &row);
            assert_eq!(a1, a2, "axpy n={n}");
            let (mut g1, mut g2) = (vec![0f32; n], vec![0f32; n]);
            let l1 = log_softmax_grad(&row, n / 3, 0.5, &mut g1, &mut Vec::new());
            let l2 = log_softmax_grad_plain(&row, n / 3, 0.5, &mut g2, &mut vec![0.0; n]);
            assert_eq!(
                (l1.to_bits(), &g1),
                (l2.to_bits(), &g2),
                "log_softmax_grad n={n}"
            );
            let table: Vec<f32> = row.iter().chain(&b).copied().collect();
            let terms = [(0.75f32, 0), (-0.5, n), (2.0, 0)];
            for relu in [false, true] {
                let (mut o1, mut o2) = (vec![0f32; n], vec![0f32; n]);
                let r1 = gather_sum(as_uninit(&mut o1), &b, &table, &terms, relu);
                let r2 = gather_sum_plain(as_uninit(&mut o2), &b, &table, &terms, relu);
                assert_eq!((o1, r1), (o2, r2), "gather n={n} relu={relu}");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernels_equal_the_portable_ones_bit_for_bit() {
        // Called directly, so an AVX-512 machine tests them too.
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        for row in rows() {
            let n = row.len();
            let b: Vec<f32> = row.iter().map(|x| x * -0.43 + 0.125).collect();
            let t2: Vec<f32> = b.iter().map(|x| x * 0.7 - 0.5).collect();
            // SAFETY (every call below): AVX2 and FMA are present; lengths are equal.
            unsafe {
                assert_eq!(avx2::dot(&row, &b).to_bits(), dot_plain(&row, &b).to_bits());
                let (mut s1, mut s2, mut s3, mut s4) =
                    (b.clone(), t2.clone(), b.clone(), t2.clone());
                let d = avx2::dot_axpy_n(&row, [&b, &t2], [&mut s1, &mut s2], [0.9, -0.4]);
                let d3 = dot_axpy_plain(&row, &b, &mut s3, 0.9);
                let d4 = dot_axpy_plain(&row, &t2, &mut s4, -0.4);
                assert_eq!(
                    (d.map(f32::to_bits), &s1, &s2),
                    ([d3.to_bits(), d4.to_bits()], &s3, &s4),
                    "dot_axpy_n n={n}"
                );
                let (mut a1, mut a2) = (b.clone(), b.clone());
                avx2::axpy(&mut a1, 0.3, &row);
                axpy_plain(&mut a2, 0.3, &row);
                assert_eq!(a1, a2, "axpy n={n}");
                assert_eq!(
                    avx2::log_sum_exp(&row).to_bits(),
                    log_sum_exp_plain(&row).to_bits(),
                    "lse n={n}"
                );
                let (mut g1, mut g2) = (vec![0f32; n], vec![0f32; n]);
                let l1 = avx2::log_softmax_grad(&row, n / 2, 0.5, &mut g1, &mut vec![0.0; n]);
                let l2 = log_softmax_grad_plain(&row, n / 2, 0.5, &mut g2, &mut vec![0.0; n]);
                assert_eq!((l1.to_bits(), &g1), (l2.to_bits(), &g2), "grad n={n}");
                let table: Vec<f32> = row.iter().chain(&b).copied().collect();
                let terms = [(0.75f32, 0), (-0.5, n), (2.0, 0)];
                for relu in [false, true] {
                    let (mut o1, mut o2) = (vec![0f32; n], vec![0f32; n]);
                    let r1 = avx2::gather_sum(as_uninit(&mut o1), &b, &table, &terms, relu);
                    let r2 = gather_sum_plain(as_uninit(&mut o2), &b, &table, &terms, relu);
                    assert_eq!((o1, r1), (o2, r2), "gather n={n} relu={relu}");
                }
            }
        }
    }

    #[test]
    fn relu_in_the_gather_is_torchs_on_nan_and_signed_zero() {
        let table = [f32::NAN, -0.0, -1.0, 2.0];
        let base = [0.0, -0.0, 0.0, 0.0];
        let mut out = [7f32; 4];
        let terms: Vec<(f32, usize)> = vec![(1.0, 0)];
        gather_sum(as_uninit(&mut out), &base, &table, &terms, true);
        assert!(out[0].is_nan());
        assert_eq!(out[1].to_bits(), 0f32.to_bits()); // +0, not -0
        assert_eq!(out[2].to_bits(), 0f32.to_bits());
        assert_eq!(out[3], 2.0);
    }

    #[test]
    fn log_sum_exp_matches_a_direct_f64_sum() {
        for row in rows() {
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let direct = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            let got = log_sum_exp(&row);
            assert!((got - direct).abs() <= 4.0 * f64::EPSILON * direct.abs().max(1.0));
        }
        assert!(log_sum_exp(&[1.0, f32::NAN, 2.0]).is_nan());
    }
}
