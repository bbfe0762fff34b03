//! The loss at the last position (the demo's f64 log-softmax cross-entropy, and StableMax) and
//! accuracy: one loss function for evaluation, the tabulated trainer and the general one.

use super::LossKind;
use crate::backend::simd;
use ndarray::ArrayView2;

/// Negative log-likelihood of `label` under one row of logits, in f64 (the demo casts to f64
/// before log-softmax).
pub fn nll(row: &[f32], label: u32) -> f64 {
    simd::log_sum_exp(row) - row[label as usize] as f64
}

/// [`nll`] of one row and its gradient with respect to the logits times `scale`,
/// `(softmax − onehot)·scale`, written to `grad` in f32 (see [`simd::log_softmax_grad`];
/// `scratch` holds the row's exponentials).
pub fn nll_and_grad(
    row: &[f32],
    label: u32,
    scale: f64,
    grad: &mut [f32],
    scratch: &mut Vec<f64>,
) -> f64 {
    let lse = simd::log_softmax_grad(row, label as usize, scale, grad, scratch);
    lse - row[label as usize] as f64
}

/// The demo's loss: last-position logits cast to f64, log-softmax, mean negative log-likelihood.
/// `logits` is [N, V] (already the last position).
pub fn loss(logits: ArrayView2<f32>, labels: &[u32]) -> f64 {
    loss_with(LossKind::CrossEntropy, logits, labels)
}

/// StableMax's s(x) in f64: x + 1 for x ≥ 0, 1/(1 − x) below, and its derivative.
fn stablemax_s(x: f64) -> (f64, f64) {
    if x >= 0.0 {
        (x + 1.0, 1.0)
    } else {
        let r = 1.0 / (1.0 - x);
        (r, r * r)
    }
}

/// The negative log-likelihood of `label` under one row of logits for a loss kind, and, with
/// `grad`, its gradient times `scale` written in f32 (`scratch` is working space).
pub fn row_loss(
    kind: LossKind,
    row: &[f32],
    label: u32,
    grad: Option<(f64, &mut [f32])>,
    scratch: &mut Vec<f64>,
) -> f64 {
    match (kind, grad) {
        (LossKind::CrossEntropy, None) => nll(row, label),
        (LossKind::CrossEntropy, Some((scale, g))) => nll_and_grad(row, label, scale, g, scratch),
        (LossKind::StableMax, grad) => {
            let y = label as usize;
            let total: f64 = row.iter().map(|&x| stablemax_s(x as f64).0).sum();
            let (sy, dsy) = stablemax_s(row[y] as f64);
            if let Some((scale, g)) = grad {
                // d/dx_j [log Σ s − log s(x_y)] = s'(x_j)/Σ s − [j = y]·s'(x_y)/s(x_y)
                for (j, (g, &x)) in g.iter_mut().zip(row).enumerate() {
                    let mut d = stablemax_s(x as f64).1 / total;
                    if j == y {
                        d -= dsy / sy;
                    }
                    *g = (d * scale) as f32;
                }
            }
            total.ln() - sy.ln()
        }
    }
}

/// The mean loss of a kind over rows of last-position logits [N, V], in f64.
pub fn loss_with(kind: LossKind, logits: ArrayView2<f32>, labels: &[u32]) -> f64 {
    use rayon::prelude::*;
    assert_eq!(logits.nrows(), labels.len(), "one label per row");
    // Rows in parallel, summed in row order (the result does not depend on the thread count).
    let per_row: Vec<f64> = (0..labels.len())
        .into_par_iter()
        .with_min_len(256)
        .map_init(Vec::new, |scratch, i| {
            let row = logits.row(i);
            match row.as_slice() {
                Some(r) => row_loss(kind, r, labels[i], None, scratch),
                None => row_loss(kind, &row.to_vec(), labels[i], None, scratch),
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
