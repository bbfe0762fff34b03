//! `tlens inspect`: what a file holds, without reading its tensors (except index tensors).

use crate::error::Result;
use crate::run::RunFile;
use serde_json::{json, Map, Value as Json};
use std::path::Path;

/// The JSON description `inspect --json` prints.
pub fn describe(run: &RunFile) -> Json {
    let mut tensors = Map::new();
    let entries = run.model_entries();
    if let Some(m) = entries {
        for (name, shape, dtype) in m.entries() {
            tensors.insert(
                name.into(),
                json!({"shape": shape, "dtype": dtype.torch_name()}),
            );
        }
    }
    json!({
        "format": run.format_name(),
        "layout": run.layout.name(),
        "config": run.config.as_ref().map(|c| c.to_json()),
        "config_class": run.config_class.as_ref().map(|(m, n)| format!("{m}.{n}")),
        "tensors": tensors,
        "n_checkpoints": run.n_checkpoints(),
        "checkpoint_epochs": run.checkpoint_epochs,
        "n_train_losses": run.train_losses.len(),
        "n_test_losses": run.test_losses.len(),
        "n_train_indices": run.train_indices.as_ref().map_or(0, Vec::len),
        "n_test_indices": run.test_indices.as_ref().map_or(0, Vec::len),
    })
}

pub fn run(path: &Path, as_json: bool) -> Result<()> {
    let run = RunFile::open(path)?;
    let d = describe(&run);
    if as_json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    println!("file:    {}", path.display());
    println!("format:  {}", d["format"].as_str().unwrap_or(""));
    println!("layout:  {}", d["layout"].as_str().unwrap_or(""));
    match &run.config {
        Some(c) => {
            println!(
                "config:  n_layers {} n_heads {} d_model {} d_head {} d_mlp {} d_vocab {} d_vocab_out {} n_ctx {} act_fn {} normalization {} seed {}",
                c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_mlp.map_or("-".into(), |d| d.to_string()),
                c.d_vocab, c.d_vocab_out, c.n_ctx, c.act_fn.as_deref().unwrap_or("-"),
                c.normalization_type.as_deref().unwrap_or("None"),
                c.seed.map_or("-".into(), |s| s.to_string()),
            );
            if let Some((m, n)) = &run.config_class {
                println!("         (pickled as {m}.{n})");
            }
        }
        None => println!("config:  (none in file)"),
    }
    if let Some(m) = run.model_entries() {
        println!("tensors ({}):", m.len());
        for (name, shape, dtype) in m.entries() {
            println!("  {name:<28} {:<16} {dtype}", format!("{shape:?}"));
        }
    }
    let epochs = &run.checkpoint_epochs;
    let span = match (epochs.first(), epochs.last()) {
        (Some(a), Some(b)) => format!(" (epochs {a}..={b})"),
        _ => String::new(),
    };
    println!("checkpoints: {}{span}", run.n_checkpoints());
    println!(
        "train losses: {}  test losses: {}",
        run.train_losses.len(),
        run.test_losses.len()
    );
    if let (Some(a), Some(b)) = (run.train_losses.last(), run.test_losses.last()) {
        println!("final train loss {a:.6e}  final test loss {b:.6e}");
    }
    println!(
        "train indices: {}  test indices: {}",
        d["n_train_indices"], d["n_test_indices"]
    );
    Ok(())
}
