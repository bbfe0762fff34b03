//! `tlens demo`: the main job on the run shipped in `fixtures/` (25,000 epochs of the reference
//! setup, trained by `tlens train`): what the model answers, how training went, and the paper's
//! analyses — key frequencies, neuron clusters, restricted/excluded loss, phases — with figures.

use crate::error::Result;
use crate::model::tabulated::last_logits;
use crate::HookedTransformer;
use ndarray::Array2;
use std::path::Path;
use std::time::Instant;

pub fn run(path: &Path, plots: &Path) -> Result<()> {
    let start = Instant::now();
    outln!("tlens demo on {}\n", path.display())?;
    let run = crate::cli::open_run(path)?;
    let p = run.modular_p().map_err(|e| e.in_file(path))?;
    let op = run.operation()?;
    let cfg = run.config.clone().expect("checked by modular_p");
    outln!(
        "a {}-layer, {}-head transformer (d_model {}, d_mlp {}) trained {} epochs on ({}) mod {p}",
        cfg.n_layers(),
        cfg.n_heads(),
        cfg.d_model(),
        cfg.d_mlp(),
        run.train_losses.len(),
        op.formula()
    )?;
    let model = HookedTransformer::new(cfg, run.model()?)?;
    let p = p as u32;
    let pairs = [(37u32, 58u32), (100, 100), (0, 112), (56, 57)].map(|(a, b)| (a % p, b % p));
    let tokens = Array2::from_shape_fn((pairs.len(), 3), |(i, j)| match j {
        0 => pairs[i].0,
        1 => pairs[i].1,
        _ => p,
    });
    let logits = last_logits(&model, &tokens)?;
    outln!("\npredictions:")?;
    for (row, (a, b)) in logits.outer_iter().zip(pairs) {
        let c = crate::task::argmax(row.as_slice().expect("contiguous"));
        let expr = op
            .formula()
            .replace('a', &a.to_string())
            .replace('b', &b.to_string());
        outln!("  {expr} mod {p} = {c}")?;
    }
    outln!("")?;
    super::analyze::run(&super::analyze::AnalyzeArgs {
        file: path,
        checkpoint: None,
        key_freqs: "auto",
        json: None,
        npz: None,
        plots: Some(plots.to_path_buf()),
        skip_checkpoints: false,
        split: crate::run::SplitChoice::Auto,
    })?;
    outln!("\ndemo finished in {:.1} s", start.elapsed().as_secs_f64())?;
    Ok(())
}
