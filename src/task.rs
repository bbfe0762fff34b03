//! The modular-addition task of the grokking demo: inputs `[a, b, =]` with `=` = token p, labels
//! (a + b) mod p, the train/test split torch's generator gives, and the demo's loss.
//!
//! The split must be bit-identical to `torch.manual_seed(seed); torch.randperm(p*p)`: torch's
//! CPU generator is MT19937 (`init_genrand`, standard tempering) and its randperm is the
//! Fisher–Yates variant `for i in 0..n−1: z = next_u32 % (n−i); swap(r[i], r[i+z])`
//! (REFERENCE §5).

use ndarray::{Array2, ArrayView2};

/// Mersenne Twister MT19937, as torch's CPU generator.
#[derive(Clone)]
pub struct Mt19937 {
    mt: [u32; 624],
    idx: usize,
}

impl Mt19937 {
    /// `torch.manual_seed(seed)`: init_genrand with the seed's low 32 bits.
    pub fn new(seed: u64) -> Mt19937 {
        let mut mt = [0u32; 624];
        mt[0] = seed as u32;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { mt, idx: 624 }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.idx >= 624 {
            for i in 0..624 {
                let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.mt[i] = v;
            }
            self.idx = 0;
        }
        let mut y = self.mt[self.idx];
        self.idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

impl Mt19937 {
    /// CPython's `random.seed(n)` for a non-negative int: `init_by_array` with the 32-bit
    /// words of n, least significant first (`[0]` for 0).
    pub fn python(seed: u64) -> Mt19937 {
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut g = Mt19937::new(19_650_218);
        let mt = &mut g.mt;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..624.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..623 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        g.idx = 624;
        g
    }

    /// CPython's `random._randbelow(n)` (getrandbits with rejection), for 0 < n < 2³².
    pub fn python_randbelow(&mut self, n: u32) -> u32 {
        let k = 32 - n.leading_zeros(); // n.bit_length()
        loop {
            let r = self.next_u32() >> (32 - k);
            if r < n {
                return r;
            }
        }
    }
}

/// The 2022 original's split (Nanda's grokking code, `gen_train_test`): the pairs (a, b) in
/// a-major order, `random.seed(seed); random.shuffle(pairs)`, the first `int(frac_train·p²)`
/// train. Returned as indices a·p + b into the a-major dataset.
pub fn python_shuffle_split(p: usize, frac_train: f64, seed: u64) -> (Vec<i64>, Vec<i64>) {
    let n = p * p;
    let mut g = Mt19937::python(seed);
    let mut pairs: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = g.python_randbelow(i as u32 + 1) as usize;
        pairs.swap(i, j);
    }
    let cutoff = ((n as f64 * frac_train) as usize).min(n);
    let test = pairs.split_off(cutoff);
    (pairs, test)
}

/// `torch.manual_seed(seed); torch.randperm(n)`.
pub fn torch_randperm(n: usize, seed: u64) -> Vec<i64> {
    let mut g = Mt19937::new(seed);
    let mut r: Vec<i64> = (0..n as i64).collect();
    for i in 0..n.saturating_sub(1) {
        let z = (g.next_u32() as u64 % (n - i) as u64) as usize;
        r.swap(i, i + z);
    }
    r
}

/// All p² inputs `[a, b, p]` (a-major) and their labels (a + b) mod p.
pub fn modular_addition(p: usize) -> (Array2<u32>, Vec<u32>) {
    let mut tokens = Array2::<u32>::zeros((p * p, 3));
    let mut labels = Vec::with_capacity(p * p);
    for a in 0..p {
        for b in 0..p {
            let i = a * p + b;
            tokens[[i, 0]] = a as u32;
            tokens[[i, 1]] = b as u32;
            tokens[[i, 2]] = p as u32;
            labels.push(((a + b) % p) as u32);
        }
    }
    (tokens, labels)
}

/// The demo's split: the first `int(p²·frac_train)` of `randperm(p²)` (seed `data_seed`) train,
/// the rest test.
pub fn demo_split(p: usize, frac_train: f64, data_seed: u64) -> (Vec<i64>, Vec<i64>) {
    let n = p * p;
    let mut perm = torch_randperm(n, data_seed);
    let cutoff = (n as f64 * frac_train) as usize;
    let test = perm.split_off(cutoff.min(n));
    (perm, test)
}

/// Negative log-likelihood of `label` under one row of logits, in f64 (the demo casts to f64
/// before log-softmax).
pub fn nll(row: &[f32], label: u32) -> f64 {
    log_sum_exp(row) - row[label as usize] as f64
}

/// `log Σ exp(x)` of a row of f32 logits, in f64 (max-subtracted, as torch's log_softmax).
///
/// The maximum and the sum run in eight lanes (the sum's lanes are added pairwise at the end)
/// and the exponentials are computed for AVX-512 or AVX2 where the CPU has them (run-time
/// check): a sequential f64 sum and max are chains of dependent additions, which made the loss
/// of the 8,939 test inputs take 2.5 ms. The lanes change the sum's rounding at the 1e-16 level.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    #[inline(always)]
    fn plain(row: &[f32]) -> f64 {
        const L: usize = 8;
        let mut mx = [f64::NEG_INFINITY; L];
        for c in row.chunks(L) {
            for (m, &x) in mx.iter_mut().zip(c) {
                *m = m.max(x as f64);
            }
        }
        let m = mx.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let mut acc = [0f64; L];
        for c in row.chunks(L) {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += exp_f64(x as f64 - m);
            }
        }
        let sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        m + sum.ln()
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(row: &[f32]) -> f64 {
            plain(row)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(row: &[f32]) -> f64 {
            plain(row)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { avx512(row) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(row) };
        }
    }
    plain(row)
}

/// e^x in f64, within 2 ulp of libm's `exp` (tested), written as straight-line arithmetic so
/// that the loss's loops vectorise: libm's `exp` is a call per element, and the losses' 1.4
/// million exponentials were 8% of a training epoch. `x = k·ln 2 + r` with |r| ≤ ln 2 / 2, e^r
/// by its Taylor series to r¹³ (truncation < 5e-18), times 2^k. Below −708 (e^x < 3e-308, far
/// under what a log-sum-exp with a term equal to 1 can see) the argument is clamped; NaN stays NaN.
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1; // 32 significant bits: k·LN2_HI is exact
    const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
    const INV_LN2: f64 = std::f64::consts::LOG2_E;
    const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5·2^52: adding it rounds to an integer
    let x = if x < -708.0 {
        -708.0
    } else if x > 709.0 {
        709.0
    } else {
        x
    };
    let k = (x * INV_LN2 + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // 1/n! for n = 13 down to 0
    const C: [f64; 14] = [
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
    let mut p = C[0];
    for &c in &C[1..] {
        p = p * r + c;
    }
    // 2^k from its exponent bits (k is in [−1022, 1023] after the clamp; NaN gives k = 0).
    let scale = f64::from_bits(((k as i64 + 1023) as u64) << 52);
    p * scale
}

/// [`nll`] of one row and its gradient with respect to the logits times `scale`,
/// `(softmax − onehot)·scale`, written to `grad` in f32. The softmax is `exp(x − lse)`, the
/// exponential of torch's f64 log-softmax output, as its backward computes it.
pub fn nll_and_grad(row: &[f32], label: u32, scale: f64, grad: &mut [f32]) -> f64 {
    let lse = log_sum_exp(row);
    for (j, (g, &x)) in grad.iter_mut().zip(row).enumerate() {
        let onehot = if j == label as usize { 1.0 } else { 0.0 };
        *g = ((exp_f64(x as f64 - lse) - onehot) * scale) as f32;
    }
    lse - row[label as usize] as f64
}

/// The demo's loss: last-position logits cast to f64, log-softmax, mean negative log-likelihood.
/// `logits` is [N, V] (already the last position).
pub fn loss(logits: ArrayView2<f32>, labels: &[u32]) -> f64 {
    use rayon::prelude::*;
    assert_eq!(logits.nrows(), labels.len(), "one label per row");
    // Rows in parallel, summed in row order (the result does not depend on the thread count).
    let per_row: Vec<f64> = (0..labels.len())
        .into_par_iter()
        .with_min_len(256)
        .map(|i| {
            let row = logits.row(i);
            match row.as_slice() {
                Some(r) => nll(r, labels[i]),
                None => nll(&row.to_vec(), labels[i]),
            }
        })
        .collect();
    per_row.iter().sum::<f64>() / labels.len() as f64
}

/// Fraction of rows whose argmax (first maximum, as torch) is the label.
pub fn accuracy(logits: ArrayView2<f32>, labels: &[u32]) -> f64 {
    let correct = logits
        .outer_iter()
        .zip(labels)
        .filter(|(row, &y)| argmax(row.as_slice().unwrap_or(&row.to_vec())) == y as usize)
        .count();
    correct as f64 / labels.len() as f64
}

/// Index of the first maximum.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {

    #[test]
    fn exp_f64_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        let mut check = |x: f64| {
            let (a, b) = (super::exp_f64(x), x.exp());
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
        assert!(super::exp_f64(f64::NAN).is_nan());
        assert_eq!(super::exp_f64(0.0), 1.0);
        assert!(super::exp_f64(f64::NEG_INFINITY) < 1e-300);
    }

    use super::*;

    #[test]
    fn mt19937_matches_the_reference_stream() {
        // The reference MT19937 with init_genrand(5489): first outputs 3499211612, 581869302.
        let mut g = Mt19937::new(5489);
        assert_eq!(g.next_u32(), 3_499_211_612);
        assert_eq!(g.next_u32(), 581_869_302);
        // 10000th output (a standard check value of the C++ std::mt19937).
        let mut g = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }
}
