//! Logit periodicity: how much of the last-position logits over all (a, b, c) is the demo's
//! "cos cube" cos(2πk(a+b−c)/p) for each frequency k.
//!
//! The cube for k depends on (a, b, c) only through s = a + b − c, so the logits are first
//! summed into 3p − 2 buckets by s (one pass over p³ values) and every coefficient is a dot
//! product with cos(2πks/p) — instead of the demo's 56 dense p³ cubes.

use crate::task;
use ndarray::{Array2, ArrayView2};
use std::f64::consts::PI;

/// Coefficients of the logits with every normalised cos cube, and the logits' norm.
#[derive(Clone, Debug, PartialEq)]
pub struct LogitPeriodicity {
    /// The modulus.
    pub p: usize,
    /// ⟨logits, ĉ_k⟩ for k = 1..p//2 (index k−1) — the demo's `get_cos_coeffs`.
    pub coeffs: Vec<f64>,
    /// ‖logits‖ over all p³ entries.
    pub norm: f64,
}

impl LogitPeriodicity {
    /// From last-position logits [p², p] of all inputs (a-major).
    pub fn new(logits: ArrayView2<f32>, p: usize) -> LogitPeriodicity {
        assert_eq!(logits.dim(), (p * p, p), "logits must be [p², p]");
        // Bucket by s = a + b − c ∈ [−(p−1), 2p−2] (offset by p−1); all sums in f64 (the
        // demo's float32 sums over p³ values are only good to ~2e-4).
        let mut bucket = vec![0f64; 3 * p - 2];
        let mut sq = 0f64;
        for (i, row) in logits.outer_iter().enumerate() {
            let ab = i / p + i % p;
            for (c, &v) in row.iter().enumerate() {
                bucket[ab + p - 1 - c] += v as f64;
                sq += (v as f64) * (v as f64);
            }
        }
        let counts = s_counts(p);
        let coeffs = (1..=p / 2)
            .map(|k| {
                let (cube, norm) = cube_s(p, k, &counts);
                bucket.iter().zip(&cube).map(|(b, c)| b * c).sum::<f64>() / norm
            })
            .collect();
        LogitPeriodicity {
            p,
            coeffs,
            norm: sq.sqrt(),
        }
    }

    /// Cosine similarity with each cube (k = 1..p//2) — the demo's `get_cos_sim`.
    pub fn cos_sim(&self) -> Vec<f64> {
        self.coeffs.iter().map(|c| c / self.norm).collect()
    }

    /// ‖logits − Σ_{k∈freqs} coeff_k ĉ_k‖ / ‖logits‖ (the cubes are orthonormal). With every
    /// frequency this is the demo's `get_residual_cos_sim`.
    pub fn residual_fraction(&self, freqs: &[usize]) -> f64 {
        let explained: f64 = freqs.iter().map(|&k| self.coeffs[k - 1].powi(2)).sum();
        ((self.norm.powi(2) - explained).max(0.0)).sqrt() / self.norm
    }

    /// The demo's loss of the logits rebuilt from `freqs` alone (Σ coeff_k ĉ_k), over all inputs.
    pub fn rebuilt_loss(&self, freqs: &[usize]) -> f64 {
        let p = self.p;
        let counts = s_counts(p);
        let mut a = vec![0f64; 3 * p - 2]; // rebuilt logit as a function of s = a + b − c
        for &k in freqs {
            let (cube, norm) = cube_s(p, k, &counts);
            for (am, c) in a.iter_mut().zip(&cube) {
                *am += self.coeffs[k - 1] * c / norm;
            }
        }
        let mut rows = Array2::<f32>::zeros((p * p, p));
        let mut labels = Vec::with_capacity(p * p);
        for (i, mut row) in rows.outer_iter_mut().enumerate() {
            let ab = i / p + i % p;
            for (c, v) in row.iter_mut().enumerate() {
                *v = a[ab + p - 1 - c] as f32;
            }
            labels.push((ab % p) as u32);
        }
        task::loss(rows.view(), &labels)
    }
}

/// How many (a, b, c) have a + b − c = s (index s + p − 1).
fn s_counts(p: usize) -> Vec<f64> {
    let mut n = vec![0f64; 3 * p - 2];
    for ab in 0..2 * p - 1 {
        let pairs = (ab + 1).min(2 * p - 1 - ab) as f64;
        for c in 0..p {
            n[ab + p - 1 - c] += pairs;
        }
    }
    n
}

/// The demo's cos cube for frequency k as a function of s, and its norm over all (a, b, c).
fn cube_s(p: usize, k: usize, counts: &[f64]) -> (Vec<f64>, f64) {
    let cube: Vec<f64> = (0..3 * p - 2)
        .map(|s| (2.0 * PI * k as f64 * (s as f64 - (p as f64 - 1.0)) / p as f64).cos())
        .collect();
    let norm = cube
        .iter()
        .zip(counts)
        .map(|(c, n)| n * c * c)
        .sum::<f64>()
        .sqrt();
    (cube, norm)
}
