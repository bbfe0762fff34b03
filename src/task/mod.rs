//! The modular-arithmetic tasks: inputs `[a, b, =]` with `=` = token p and labels op(a, b) mod p
//! ([`ops`]: the demo's addition and the Power et al. list), the pairs and train/test splits
//! (here, drawn with torch's generator: [`rng`]), the loss ([`mod@loss`]) and evaluation ([`eval`]).
//!
//! The split must be bit-identical to `torch.manual_seed(seed); torch.randperm(p*p)`: torch's
//! CPU generator is MT19937 (`init_genrand`, standard tempering) and its randperm is the
//! Fisher–Yates variant `for i in 0..n−1: z = next_u32 % (n−i); swap(r[i], r[i+z])`
//! (docs/reference.md §5).
//!
//! ```
//! use tlens::task::{dataset, demo_split, torch_randperm, Operation};
//! // torch.manual_seed(0); torch.randperm(5) gives tensor([4, 0, 1, 3, 2]) (torch 2.15).
//! assert_eq!(torch_randperm(5, 0), [4, 0, 1, 3, 2]);
//! let (train, test) = demo_split(113, 0.3, 598);    // the TL demo's split
//! assert_eq!((train.len(), test.len()), (3830, 8939));
//! let (tokens, labels) = dataset(5, Operation::Subtract)?;
//! assert_eq!(tokens.row(7).to_vec(), [1, 2, 5]);    // [a, b, =], a-major
//! assert_eq!(labels[7], 4);                          // (1 − 2) mod 5
//! assert_eq!(Operation::X2xyy2.label(2, 3, 5), Some(4)); // 4 + 6 + 9 = 19 ≡ 4
//! # Ok::<(), tlens::Error>(())
//! ```

pub mod eval;
pub mod loss;
pub mod ops;
pub mod rng;

pub use eval::{evaluate, evaluate_op, task_p, Evaluation};
pub use loss::{accuracy, argmax, loss, loss_with, nll, nll_and_grad, row_loss};
pub use ops::{is_prime, Operation};
pub use rng::{python_shuffle_split, torch_randint, torch_randperm, Mt19937};

pub use crate::backend::LossKind;
use ndarray::Array2;

/// The pairs an operation is defined on, as a·p + b in a-major order: all p², or the p(p − 1)
/// with b ≠ 0 for div and mix1. Row i of [`dataset`] is pair `ids[i]`.
pub fn ids(p: usize, op: Operation) -> Vec<i64> {
    (0..p * p)
        .filter(|i| !(op.excludes_b_zero() && i % p == 0))
        .map(|i| i as i64)
        .collect()
}

/// The split of an operation's pairs as the demo makes it: the first
/// `int(n_pairs·frac_train)` of `torch.randperm(n_pairs)` (seed `data_seed`) train, the rest
/// test, as a·p + b ids ([`demo_split`] where all p² pairs are used).
pub fn split(p: usize, op: Operation, frac_train: f64, data_seed: u64) -> (Vec<i64>, Vec<i64>) {
    let ids = ids(p, op);
    let n = ids.len();
    let perm = torch_randperm(n, data_seed);
    let cutoff = ((n as f64 * frac_train) as usize).min(n);
    let map = |r: &[i64]| r.iter().map(|&i| ids[i as usize]).collect::<Vec<_>>();
    (map(&perm[..cutoff]), map(&perm[cutoff..]))
}

/// For each a·p + b, its row in [`dataset`] (None for an excluded pair).
pub fn rows_of(p: usize, op: Operation) -> Vec<Option<usize>> {
    let mut rows = vec![None; p * p];
    for (r, &i) in ids(p, op).iter().enumerate() {
        rows[i as usize] = Some(r);
    }
    rows
}

/// [`dataset`] with the seed of a `rand` table (`None`: no table, an error for `rand`).
pub fn dataset_seeded(
    p: usize,
    op: Operation,
    rand_seed: Option<u64>,
) -> crate::Result<(Array2<u32>, Vec<u32>)> {
    match (op, rand_seed) {
        (Operation::Rand, Some(seed)) => {
            let (tokens, _) = modular_addition(p);
            let high = u32::try_from(p).map_err(|_| crate::Error::invalid("p", "too large"))?;
            Ok((tokens, torch_randint(p * p, high, seed)))
        }
        _ => dataset(p, op),
    }
}

/// The inputs `[a, b, p]` an operation is defined on (a-major; all p², or those with b ≠ 0
/// for div and mix1: see [`ids`]) and their labels `op(a, b) mod p`.
pub fn dataset(p: usize, op: Operation) -> crate::Result<(Array2<u32>, Vec<u32>)> {
    if op == Operation::Rand {
        return Err(crate::Error::UnknownData(
            "the labels of 'rand' are a random table: the 2022 code drew it from numpy's \
             unseeded global generator and did not save it (a tlens run records its rand_seed)"
                .into(),
        ));
    }
    if op.excludes_b_zero() && !is_prime(p) {
        return Err(crate::Error::invalid(
            "p",
            format!(
                "{} needs a prime p (b⁻¹ mod p); {p} is not prime",
                op.name()
            ),
        ));
    }
    let (all, _) = modular_addition(p);
    let ids = ids(p, op);
    let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
    let tokens = all.select(ndarray::Axis(0), &rows);
    let labels = ids
        .iter()
        .map(|&i| {
            let i = i as usize;
            op.label(i / p, i % p, p).expect("defined on its ids")
        })
        .collect();
    Ok((tokens, labels))
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

#[cfg(test)]
mod tests {

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
