//! The Fourier basis of the TL grokking demo and power spectra over the p axis.
//!
//! Two tools, one basis. [`FourierBasis`] is the demo's real basis (constant, then sin k, cos k
//! for k = 1..p/2, each row normalised), used where the demo reads individual components
//! (embedding norms, attention spectra, Gini coefficients). Power *per frequency* — the
//! spectra of the signal chain and `neuron_freq_norm` — is computed with rustfft instead: for
//! real data the span of {const, sin k, cos k} is the span of the DFT terms {0, k, −k}, so the
//! power in frequency k (1-D), or in the 3×3 block {const, sin k, cos k}² (2-D), is the same
//! number as in the demo's basis (Parseval) at O(p log p) instead of O(p²) per vector. Tests
//! check the two against each other and against the demo's values.
//!
//! ```
//! use tlens::analysis::fourier::{power_spectrum_1d, FourierBasis};
//! let f = FourierBasis::new(7)?;
//! assert_eq!(f.names[..3], ["Constant", "Sin 1", "Cos 1"]);
//! // cos(2π·2x/7) over x = 0..7 lives entirely in frequency 2.
//! let x = ndarray::Array2::from_shape_fn((7, 1), |(i, _)| {
//!     (2.0 * std::f32::consts::PI * 2.0 * i as f32 / 7.0).cos()
//! });
//! let power = power_spectrum_1d(x.view());
//! assert!(power[2] > 0.999 * power.iter().sum::<f64>());
//! # Ok::<(), tlens::Error>(())
//! ```

use crate::error::{Error, Result};
use ndarray::{Array2, ArrayView2, ArrayView3, Axis};
use rustfft::num_complex::Complex;
use rustfft::FftPlanner;
use std::f64::consts::PI;

/// The demo's Fourier basis F [p, p]: row 0 constant, row 2k−1 = sin k, row 2k = cos k.
#[derive(Clone, Debug)]
pub struct FourierBasis {
    /// The modulus (the basis is p × p).
    pub p: usize,
    /// Rows are basis vectors, each of unit norm.
    pub basis: Array2<f32>,
    /// "Constant", "Sin 1", "Cos 1", …
    pub names: Vec<String>,
}

impl FourierBasis {
    /// The basis for an odd modulus p (for even p the demo's "Sin p/2" row is zero and its
    /// normalisation divides by zero, so even p is refused).
    pub fn new(p: usize) -> Result<FourierBasis> {
        if p < 3 || p.is_multiple_of(2) {
            return Err(Error::Unsupported(format!(
                "the Fourier analyses need an odd modulus p >= 3 (got p = {p})"
            )));
        }
        let mut basis = Array2::<f32>::zeros((p, p));
        let mut names = vec!["Constant".to_string()];
        let mut rows: Vec<Vec<f64>> = vec![vec![1.0; p]];
        // The argument as the demo's float32 tensor arithmetic rounds it:
        // ((arange(p) * 2) * π) * k / p, each step rounded to f32 — so that the basis agrees
        // with the demo's to float32 precision (the exact argument would differ by up to
        // ~3e-5 rad at k·x ≈ p²/2, which shows in sums over p² inputs).
        for k in 1..=p / 2 {
            let arg = |x: usize| {
                let t = (2 * x) as f32 * PI as f32;
                ((t * k as f32) / p as f32) as f64
            };
            rows.push((0..p).map(|x| arg(x).sin()).collect());
            rows.push((0..p).map(|x| arg(x).cos()).collect());
            names.push(format!("Sin {k}"));
            names.push(format!("Cos {k}"));
        }
        for (i, row) in rows.iter().enumerate() {
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            for (j, v) in row.iter().enumerate() {
                basis[[i, j]] = (v / norm) as f32;
            }
        }
        Ok(FourierBasis { p, basis, names })
    }

    /// Number of frequencies k ≥ 1 (p // 2).
    pub fn n_freqs(&self) -> usize {
        self.p / 2
    }

    /// F @ x for x [p, d] indexed by a token along axis 0: [p components, d].
    pub fn transform(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        self.check_len("x", x.nrows())?;
        Ok(self.basis.dot(&x))
    }

    /// F @ x @ Fᵀ for x [p, p] indexed by (a, b): the demo's 2-D transform (accumulated in
    /// f64: entries reach p·mean(x), where f32 sums would lose the 1e-4 absolute agreement).
    pub fn transform_2d(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        self.check_len("x rows", x.nrows())?;
        self.check_len("x columns", x.ncols())?;
        let f = self.basis.mapv(|v| v as f64);
        let x = x.mapv(|v| v as f64);
        Ok(f.dot(&x).dot(&f.t()).mapv(|v| v as f32))
    }

    /// Norm of each Fourier component of x [p, d] over d: `(F @ x).norm(dim=-1)`, `[p]`.
    pub fn component_norms(&self, x: ArrayView2<f32>) -> Result<Vec<f32>> {
        Ok(self
            .transform(x)?
            .outer_iter()
            .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt())
            .collect())
    }

    fn check_len(&self, what: &str, n: usize) -> Result<()> {
        if n != self.p {
            return Err(Error::invalid(
                "Fourier transform",
                format!("{what}: expected length p = {}, found {n}", self.p),
            ));
        }
        Ok(())
    }
}

/// The angle 2πk·n/p as the demo computes its cos/sin(k(a+b)) and cos(k(a+b−c)) tensors:
/// `freq * 2 * torch.pi / p` is a Python float (f64), multiplied into an integer tensor as
/// float32 — so the angle is f32(2πk/p)·f32(n), rounded to f32. Matching this rounding (up to
/// ~4e-5 rad at n ≈ 2p) keeps sums over p² and p³ inputs within 1e-4 of the demo's.
pub fn demo_angle(k: usize, p: usize, n: i64) -> f64 {
    let w = (2.0 * PI * k as f64 / p as f64) as f32;
    (w * n as f32) as f64
}

/// Power per frequency from per-component norms `[p]` in the demo's basis: index 0 the constant,
/// index k the sum of squares of sin k and cos k. Length p//2 + 1.
pub fn power_from_components(norms: &[f32]) -> Vec<f64> {
    let mut out = vec![(norms[0] as f64).powi(2)];
    for k in 1..=(norms.len() / 2) {
        out.push((norms[2 * k - 1] as f64).powi(2) + (norms[2 * k] as f64).powi(2));
    }
    out
}

/// 1-D power spectrum of x [p, d] along axis 0, summed over d: index 0 the constant term,
/// index k the power in frequency k (sin² + cos² in the normalised basis). Length p//2 + 1;
/// the entries sum to ‖x‖².
pub fn power_spectrum_1d(x: ArrayView2<f32>) -> Vec<f64> {
    let p = x.nrows();
    let fft = FftPlanner::<f64>::new().plan_fft_forward(p);
    let mut out = vec![0.0; p / 2 + 1];
    let mut buf = vec![Complex::new(0.0, 0.0); p];
    for col in x.axis_iter(Axis(1)) {
        for (b, v) in buf.iter_mut().zip(col.iter()) {
            *b = Complex::new(*v as f64, 0.0);
        }
        fft.process(&mut buf);
        out[0] += buf[0].norm_sqr() / p as f64;
        for (k, o) in out.iter_mut().enumerate().skip(1) {
            *o += (buf[k].norm_sqr() + buf[p - k].norm_sqr()) / p as f64;
        }
    }
    out
}

/// 2-D power spectrum of x [p, p, d] over (a, b), summed over d: index 0 the mean term
/// ([0, 0]), index k the power in the 3×3 block {const, sin k, cos k}² without the mean term.
/// Also returns the total power ‖x‖².
pub fn power_spectrum_2d(x: ArrayView3<f32>) -> (Vec<f64>, f64) {
    let each = power_spectrum_2d_each(x);
    let mut out = vec![0.0; x.dim().0 / 2 + 1];
    let mut total = 0.0;
    for (spec, t) in each {
        out.iter_mut().zip(&spec).for_each(|(o, s)| *o += s);
        total += t;
    }
    (out, total)
}

/// [`power_spectrum_2d`] of each slice x[:, :, i] separately (in parallel): per slice, the
/// spectrum (length p//2 + 1) and the total power. The demo's `neuron_freq_norm[k-1, n]` is
/// `spec[k] / (total − spec[0])` of neuron n's activations.
pub fn power_spectrum_2d_each(x: ArrayView3<f32>) -> Vec<(Vec<f64>, f64)> {
    use rayon::prelude::*;
    let (p, p2, d) = x.dim();
    assert_eq!(p, p2, "x must be [p, p, d]");
    let fft = FftPlanner::<f64>::new().plan_fft_forward(p);
    (0..d)
        .into_par_iter()
        .map(|di| {
            let mut grid = vec![Complex::new(0.0, 0.0); p * p];
            let mut total = 0.0;
            // Rows (over b), then columns (over a): grid[u * p + v] = X̂[u, v].
            for a in 0..p {
                for b in 0..p {
                    let v = x[[a, b, di]] as f64;
                    total += v * v;
                    grid[a * p + b] = Complex::new(v, 0.0);
                }
                fft.process(&mut grid[a * p..(a + 1) * p]);
            }
            let mut col = vec![Complex::new(0.0, 0.0); p];
            for v in 0..p {
                for (a, c) in col.iter_mut().enumerate() {
                    *c = grid[a * p + v];
                }
                fft.process(&mut col);
                for (u, c) in col.iter().enumerate() {
                    grid[u * p + v] = *c;
                }
            }
            let pw = |u: usize, v: usize| grid[u * p + v].norm_sqr() / (p * p) as f64;
            let mut out = vec![0.0; p / 2 + 1];
            out[0] = pw(0, 0);
            for (k, o) in out.iter_mut().enumerate().skip(1) {
                let idx = [0, k, p - k];
                *o = idx
                    .iter()
                    .flat_map(|&u| idx.iter().map(move |&v| (u, v)))
                    .map(|(u, v)| pw(u, v))
                    .sum::<f64>()
                    - pw(0, 0);
            }
            (out, total)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn basis_is_orthonormal_and_even_p_is_refused() {
        let f = FourierBasis::new(13).unwrap();
        let g = f.basis.dot(&f.basis.t());
        for i in 0..13 {
            for j in 0..13 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((g[[i, j]] - want).abs() < 1e-5, "{i},{j}: {}", g[[i, j]]);
            }
        }
        assert_eq!(f.names[1], "Sin 1");
        assert_eq!(f.names[12], "Cos 6");
        assert!(matches!(FourierBasis::new(12), Err(Error::Unsupported(_))));
    }

    #[test]
    fn fft_spectra_equal_the_basis_power() {
        let p = 11;
        let f = FourierBasis::new(p).unwrap();
        let x = Array2::from_shape_fn((p, 3), |(i, j)| ((i * 7 + j * 3) % 5) as f32 - 1.3);
        let via_basis = power_from_components(&f.component_norms(x.view()).unwrap());
        let via_fft = power_spectrum_1d(x.view());
        for (a, b) in via_basis.iter().zip(&via_fft) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // 2-D: the 3×3 block sums of F X Fᵀ.
        let x3 = Array3::from_shape_fn((p, p, 2), |(a, b, d)| {
            ((a * a + 3 * b + d) % 7) as f32 * 0.5 - (b as f32).sin()
        });
        let (spec, total) = power_spectrum_2d(x3.view());
        let mut want = vec![0.0f64; p / 2 + 1];
        let mut want_total = 0.0;
        for d in 0..2 {
            let t = f
                .transform_2d(x3.index_axis(Axis(2), d).to_owned().view())
                .unwrap();
            want_total += t.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            want[0] += (t[[0, 0]] as f64).powi(2);
            for (k, w) in want.iter_mut().enumerate().skip(1) {
                for u in [0, 2 * k - 1, 2 * k] {
                    for v in [0, 2 * k - 1, 2 * k] {
                        if u + v > 0 {
                            *w += (t[[u, v]] as f64).powi(2);
                        }
                    }
                }
            }
        }
        assert!((total - want_total).abs() < 1e-3 * want_total);
        for (a, b) in spec.iter().zip(&want) {
            assert!((a - b).abs() < 1e-3 + 1e-4 * b.abs(), "{a} vs {b}");
        }
    }
}
