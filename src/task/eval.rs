//! Evaluating a model on its task: the demo's train/test/full loss and accuracy over the pairs
//! an operation is defined on.
//!
//! ```
//! let run = tlens::RunFile::open(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_small.pth"))?;
//! let model = tlens::HookedTransformer::new(run.config.clone().unwrap(), run.model()?)?;
//! let split = run.split(23, tlens::run::SplitChoice::Auto)?;
//! let ev = tlens::task::evaluate(&model, &split.train, &split.test)?;
//! // The run's last logged train loss is the loss before its last step; close to this one.
//! assert!((ev.train_loss - run.train_losses.last().unwrap()).abs() < 0.05);
//! assert!(ev.train_accuracy >= ev.test_accuracy);
//! # Ok::<(), tlens::Error>(())
//! ```

use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::model::tabulated::last_logits;
use crate::model::HookedTransformer;
use crate::task;
use ndarray::Axis;
use rayon::prelude::*;

/// The task's modulus for a model: the `=` token is the last input token (d_vocab − 1).
pub fn task_p(model_cfg: &crate::HookedTransformerConfig) -> usize {
    model_cfg.d_vocab().saturating_sub(1)
}

/// Loss and accuracy of a model on the train split, the test split and all inputs.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Evaluation {
    /// Mean loss over the train split.
    pub train_loss: f64,
    /// Mean loss over the test split.
    pub test_loss: f64,
    /// Mean loss over all p² inputs.
    pub full_loss: f64,
    /// Share of train inputs answered correctly.
    pub train_accuracy: f64,
    /// Share of test inputs answered correctly.
    pub test_accuracy: f64,
    /// Share of all inputs answered correctly.
    pub accuracy: f64,
}

/// Evaluate on all p² inputs of (a + b) mod p; `train`/`test` index the a-major dataset (as
/// the demo's indices). Each input's loss and correctness is computed once; the three splits
/// average them (an empty split gives NaN).
pub fn evaluate(model: &HookedTransformer<Cpu>, train: &[i64], test: &[i64]) -> Result<Evaluation> {
    evaluate_op(model, task::Operation::Add, None, train, test)
}

/// [`evaluate`] for the labels of another operation (the 2022 code's `fn_name`, or tlens's
/// `--op`); `rand_seed` is a `rand` run's table seed. The full loss is over the pairs the
/// operation is defined on (b ≠ 0 for div and mix1); `train`/`test` are a·p + b ids.
pub fn evaluate_op(
    model: &HookedTransformer<Cpu>,
    op: task::Operation,
    rand_seed: Option<u64>,
    train: &[i64],
    test: &[i64],
) -> Result<Evaluation> {
    let p = task_p(&model.cfg);
    let (tokens, labels) = task::dataset_seeded(p, op, rand_seed)?;
    let rows_of = task::rows_of(p, op);
    let logits = last_logits(model, &tokens)?;
    let per_row: Vec<(f64, bool)> = logits
        .axis_chunks_iter(Axis(0), 512)
        .into_par_iter()
        .zip(labels.par_chunks(512))
        .flat_map_iter(|(rows, ys)| {
            rows.outer_iter()
                .zip(ys)
                .map(|(r, &y)| {
                    let r = r.as_slice().expect("standard layout");
                    (task::nll(r, y), task::argmax(r) == y as usize)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let mean = |idx: &mut dyn Iterator<Item = usize>| -> (f64, f64) {
        let (mut loss, mut correct, mut n) = (0.0, 0usize, 0usize);
        for i in idx {
            loss += per_row[i].0;
            correct += per_row[i].1 as usize;
            n += 1;
        }
        if n == 0 {
            (f64::NAN, f64::NAN)
        } else {
            (loss / n as f64, correct as f64 / n as f64)
        }
    };
    let check = |idx: &[i64]| -> Result<Vec<usize>> {
        idx.iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| rows_of.get(i).copied().flatten())
                    .ok_or_else(|| {
                        Error::invalid(
                            "indices",
                            format!(
                                "index {i} is not one of the {} pairs of {} mod {p}",
                                per_row.len(),
                                op.name()
                            ),
                        )
                    })
            })
            .collect()
    };
    let (train, test) = (check(train)?, check(test)?);
    let (train_loss, train_accuracy) = mean(&mut train.into_iter());
    let (test_loss, test_accuracy) = mean(&mut test.into_iter());
    let (full_loss, accuracy) = mean(&mut (0..per_row.len()));
    Ok(Evaluation {
        train_loss,
        test_loss,
        full_loss,
        train_accuracy,
        test_accuracy,
        accuracy,
    })
}
