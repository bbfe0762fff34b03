//! `tlens demo`: the main job on the run shipped in `fixtures/` — what the file holds, how
//! training went, what the model answers. (The paper's analyses will be added here.)

use crate::error::Result;
use crate::eval::{evaluate, last_logits};
use crate::run::RunFile;
use crate::HookedTransformer;
use ndarray::Array2;
use std::path::Path;

pub fn run(path: &Path) -> Result<()> {
    println!("tlens demo on {}\n", path.display());
    super::inspect::run(path, false)?;
    let run = RunFile::open(path)?;
    let cfg = run.config.clone().expect("the demo run has a config");
    let n = run.train_losses.len();
    if n > 0 {
        println!("\nloss over training (epoch: train / test):");
        let mut epochs: Vec<usize> = [0, 100, 500, 1000, 2000, 5000, 10_000, 15_000, 20_000]
            .into_iter()
            .filter(|&e| e < n)
            .collect();
        epochs.push(n - 1);
        for e in epochs {
            let test = run.test_losses.get(e).copied().unwrap_or(f64::NAN);
            println!("  {e:>6}: {:.3e} / {:.3e}", run.train_losses[e], test);
        }
    }
    let model = HookedTransformer::new(cfg, run.model()?)?;
    if let (Some(tr), Some(te)) = (&run.train_indices, &run.test_indices) {
        let ev = evaluate(&model, tr, te)?;
        println!(
            "\nfinal model: train loss {:.3e}, test loss {:.3e}, test accuracy {:.2}%, all {} inputs {:.2}%",
            ev.train_loss,
            ev.test_loss,
            100.0 * ev.test_accuracy,
            tr.len() + te.len(),
            100.0 * ev.accuracy
        );
    }
    let p = crate::eval::task_p(&model.cfg) as u32;
    let pairs = [(37u32, 58u32), (100, 100), (0, 112), (56, 57)];
    let tokens = Array2::from_shape_fn((pairs.len(), 3), |(i, j)| match j {
        0 => pairs[i].0,
        1 => pairs[i].1,
        _ => p,
    });
    let logits = last_logits(&model, &tokens)?;
    println!("\npredictions:");
    for (row, (a, b)) in logits.outer_iter().zip(pairs) {
        let c = crate::task::argmax(row.as_slice().expect("contiguous"));
        println!("  {a} + {b} mod {p} = {c}");
    }
    Ok(())
}
