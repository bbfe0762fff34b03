//! Neurons in the Fourier basis: the demo's `neuron_freq_norm`, each neuron's dominant frequency,
//! the frequency clusters, and the rule that picks the key frequencies.

use super::fourier::power_spectrum_2d_each;
use ndarray::{Array2, ArrayView2};

/// A neuron is "explained" by a frequency when that frequency holds more than this fraction of
/// its (mean-removed) variance — the demo's threshold.
pub const EXPLAINED: f64 = 0.85;

/// `neuron_freq_norm` [p//2, d_mlp] of last-position neuron activations `acts` [p², d_mlp]
/// (a-major inputs): row k−1 is the fraction of each neuron's variance in the 3×3 block
/// {const, sin k, cos k}² of its 2-D Fourier transform, the mean term removed — the demo's
/// definition, computed with FFTs (see [`super::fourier`]).
pub fn neuron_freq_norm(acts: ArrayView2<f32>, p: usize) -> Array2<f32> {
    let d_mlp = acts.ncols();
    assert_eq!(acts.nrows(), p * p, "acts must be [p², d_mlp]");
    let grid = acts
        .into_shape_with_order((p, p, d_mlp))
        .expect("[p², d] is [p, p, d] in a-major order");
    let each = power_spectrum_2d_each(grid);
    let mut out = Array2::<f32>::zeros((p / 2, d_mlp));
    for (n, (spec, total)) in each.iter().enumerate() {
        let var = total - spec[0];
        for k in 1..=p / 2 {
            out[[k - 1, n]] = if var > 0.0 {
                (spec[k] / var) as f32
            } else {
                0.0
            };
        }
    }
    out
}

/// One neuron's dominant frequency and the fraction of its variance that frequency explains.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct NeuronFreq {
    /// The neuron's index in the MLP.
    pub index: usize,
    /// Its dominant frequency k (1..=p/2).
    pub freq: usize,
    /// Fraction of its variance in frequency k's 3×3 Fourier block.
    pub frac_explained: f64,
}

/// Each neuron's dominant frequency (first maximum over k, as torch's `max(dim=0)`).
pub fn dominant_freqs(nfn: ArrayView2<f32>) -> Vec<NeuronFreq> {
    (0..nfn.ncols())
        .map(|n| {
            let col = nfn.column(n);
            let mut best = 0;
            for (k, &v) in col.iter().enumerate() {
                if v > col[best] {
                    best = k;
                }
            }
            NeuronFreq {
                index: n,
                freq: best + 1,
                frac_explained: col[best] as f64,
            }
        })
        .collect()
}

/// The neurons explained (> 0.85) by one frequency.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Cluster {
    /// The frequency the cluster's neurons share.
    pub freq: usize,
    /// The neurons' indices.
    pub neurons: Vec<usize>,
}

/// Clusters of explained neurons by frequency, largest first (ties: lower frequency first).
pub fn clusters(neurons: &[NeuronFreq]) -> Vec<Cluster> {
    let mut by: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for n in neurons.iter().filter(|n| n.frac_explained > EXPLAINED) {
        by.entry(n.freq).or_default().push(n.index);
    }
    let mut out: Vec<Cluster> = by
        .into_iter()
        .map(|(freq, neurons)| Cluster { freq, neurons })
        .collect();
    out.sort_by(|a, b| {
        b.neurons
            .len()
            .cmp(&a.neurons.len())
            .then(a.freq.cmp(&b.freq))
    });
    out
}

/// The key frequencies, found automatically. The rule:
/// 1. a frequency is key when at least 2% of the MLP's neurons (⌈0.02·d_mlp⌉) are explained
///    (> 0.85) by it — a neuron cluster, the paper's evidence that the model uses it;
/// 2. when no frequency has a cluster (before circuit formation), the frequencies holding at
///    least 3/(p//2) — three times an even share — of the embedding's non-constant power.
///
/// `embed_power` is the embedding's power per frequency (index 0 the constant). Returned in
/// increasing order; may be empty (no structure yet).
pub fn key_freqs_auto(neurons: &[NeuronFreq], embed_power: &[f64]) -> Vec<usize> {
    let d_mlp = neurons.len();
    let n_freqs = embed_power.len().saturating_sub(1);
    let need = (0.02 * d_mlp as f64).ceil() as usize;
    let mut counts = vec![0usize; n_freqs + 1];
    for n in neurons.iter().filter(|n| n.frac_explained > EXPLAINED) {
        counts[n.freq] += 1;
    }
    let keys: Vec<usize> = (1..=n_freqs)
        .filter(|&k| counts[k] >= need.max(1))
        .collect();
    if !keys.is_empty() {
        return keys;
    }
    let total: f64 = embed_power[1..].iter().sum();
    (1..=n_freqs)
        .filter(|&k| total > 0.0 && embed_power[k] / total >= 3.0 / n_freqs as f64)
        .collect()
}
