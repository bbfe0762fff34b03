//! Progress measures over the checkpoints of a run (Nanda et al. 2023, section 5): losses,
//! restricted and excluded loss, Gini coefficients of the Fourier norms of W_E and W_L, the total
//! sum of squared weights, and the logits' cosine similarity with each frequency — plus the
//! phase boundaries read off the loss curves.
//!
//! ```
//! use tlens::analysis::progress::{gini, phases};
//! assert_eq!(gini(&[1.0, 1.0, 1.0, 1.0]), 0.0);      // spread evenly
//! assert!(gini(&[0.0, 0.0, 0.0, 8.0]) > 0.7);         // one frequency holds everything
//! // Memorisation (test loss rises to a peak), circuit formation, clean-up:
//! let test: Vec<f64> = (0..300)
//!     .map(|e| if e < 100 { 1.0 + e as f64 } else { 100.0 * (-0.1 * (e - 100) as f64).exp() })
//!     .collect();
//! let ph = phases(&test);
//! assert_eq!(ph.memorization_end, Some(99));
//! assert!(ph.circuit_formation_end.unwrap() < ph.cleanup_end.unwrap());
//! ```

use serde::Serialize;

/// The Gini coefficient of non-negative values: Σᵢ (2i − n − 1)·x₍ᵢ₎ / (n·Σx) over the values
/// sorted ascending (i = 1..n); 0 when all are equal, → 1 when one value holds everything.
pub fn gini(values: &[f32]) -> f64 {
    let mut x: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    x.sort_by(f64::total_cmp);
    let n = x.len() as f64;
    let sum: f64 = x.iter().sum();
    if x.is_empty() || sum == 0.0 {
        return 0.0;
    }
    x.iter()
        .enumerate()
        .map(|(i, v)| (2.0 * (i as f64 + 1.0) - n - 1.0) * v)
        .sum::<f64>()
        / (n * sum)
}

/// Every progress measure of one checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckpointMeasures {
    /// The checkpoint's epoch (-1 for the analysed model itself).
    pub epoch: i64,
    /// Loss on the train split.
    pub train_loss: f64,
    /// Loss on the test split.
    pub test_loss: f64,
    /// Share of train / test inputs whose argmax logit is the label.
    pub train_accuracy: f64,
    /// Share of test inputs answered correctly.
    pub test_accuracy: f64,
    /// Restricted loss (test split): only the key frequencies kept.
    pub restricted_loss: f64,
    /// Excluded loss (train split): the key frequencies removed.
    pub excluded_loss: f64,
    #[serde(rename = "gini_W_E")]
    /// Gini coefficient of W_E's Fourier-component norms.
    pub gini_w_e: f64,
    #[serde(rename = "gini_W_L")]
    /// Gini coefficient of W_L's Fourier-component norms.
    pub gini_w_l: f64,
    /// Sum of squared parameters.
    pub sum_sq_weights: f64,
    /// Cosine similarity of the logits with the cos cube of each key frequency (same order as
    /// the analysis' `key_freqs`); all frequencies are in the npz's `logit_cos_sim`.
    pub logit_cos_sim_key: Vec<f64>,
}

/// The three phase boundaries of grokking (epochs); `None` when the run does not show that phase.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Phases {
    /// Epoch where the test loss peaks (the model has memorised the train set).
    pub memorization_end: Option<i64>,
    /// Epoch where the test loss has fallen 10% of the way from its peak to its minimum.
    pub circuit_formation_end: Option<i64>,
    /// Epoch where the test loss is within 10% (in log) of its minimum.
    pub cleanup_end: Option<i64>,
}

/// Phase boundaries from the per-epoch test loss (index = epoch). The rule, in log₁₀ test loss:
/// - memorisation ends where the test loss peaks (the model fits the training set while
///   its test loss climbs; afterwards weight decay starts forming the circuit);
/// - with `hi` the log test loss at that peak and `lo` the lowest log test loss of the run,
///   circuit formation ends at the first later epoch where the log test loss has fallen 10% of
///   the way from `hi` to `lo` (test loss starts to drop: the circuit now dominates), and
///   clean-up ends at the first epoch where it is within 10% of `lo` (the memorising
///   components are gone).
///
/// A run whose test loss never falls a factor of 10 below its peak has not grokked: only
/// `memorization_end` is given (and none at all when the peak is the last epoch).
pub fn phases(test_losses: &[f64]) -> Phases {
    let none = Phases {
        memorization_end: None,
        circuit_formation_end: None,
        cleanup_end: None,
    };
    let logs: Vec<f64> = test_losses.iter().map(|l| l.max(1e-300).log10()).collect();
    if logs.len() < 3 || logs.iter().any(|l| !l.is_finite()) {
        return none;
    }
    let peak = (0..logs.len())
        .max_by(|&a, &b| logs[a].total_cmp(&logs[b]).then(b.cmp(&a)))
        .expect("non-empty");
    if peak + 1 >= logs.len() {
        return none;
    }
    let hi = logs[peak];
    let lo = logs[peak..].iter().copied().fold(f64::INFINITY, f64::min);
    let memorization_end = Some(peak as i64);
    if hi - lo < 1.0 {
        return Phases {
            memorization_end,
            ..none
        };
    }
    let first_below = |t: f64| (peak..logs.len()).find(|&e| logs[e] <= t).map(|e| e as i64);
    Phases {
        memorization_end,
        circuit_formation_end: first_below(hi - 0.1 * (hi - lo)),
        cleanup_end: first_below(lo + 0.1 * (hi - lo)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gini_of_known_vectors() {
        assert_eq!(gini(&[1.0, 1.0, 1.0, 1.0]), 0.0);
        // One of four holds everything: (2·4 − 5)·1 / (4·1) = 3/4.
        assert!((gini(&[0.0, 0.0, 5.0, 0.0]) - 0.75).abs() < 1e-12);
        // [1, 2, 3]: (−2·1 + 0·2 + 2·3) / (3·6) = 4/18.
        assert!((gini(&[3.0, 1.0, 2.0]) - 4.0 / 18.0).abs() < 1e-12);
    }

    #[test]
    fn phases_of_a_synthetic_grokking_curve() {
        // Test loss climbs to 10 at epoch 20, plateaus, then falls to 10^-6.1 between 60 and 80
        // (log₁₀ 0.9 − 0.35·(e − 60)), then stays at 1e-6.
        let curve: Vec<f64> = (0..120)
            .map(|e| match e {
                0..=20 => 1.0 + 9.0 * e as f64 / 20.0,
                21..=59 => 10.0 - 0.01 * (e - 20) as f64,
                60 => 10.0 - 0.01 * 40.0,
                61..=80 => 10f64.powf(0.9 - 0.35 * (e - 60) as f64),
                _ => 1e-6,
            })
            .collect();
        let ph = phases(&curve);
        assert_eq!(ph.memorization_end, Some(20));
        // hi = 1, lo = −6.1: 10% of the way is log 0.29, first reached at epoch 62 (0.2).
        assert_eq!(ph.circuit_formation_end, Some(62));
        // Within 0.71 decades of lo: log −5.39, first reached at epoch 78 (−5.4).
        assert_eq!(ph.cleanup_end, Some(78));
        // No grokking: only the memorisation peak.
        let flat: Vec<f64> = (0..50)
            .map(|e| if e < 10 { e as f64 } else { 9.0 })
            .collect();
        let ph = phases(&flat);
        assert_eq!(ph.memorization_end, Some(9));
        assert_eq!(ph.circuit_formation_end, None);
    }
}
