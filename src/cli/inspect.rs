//! `tlens inspect`: what a file holds, without reading its tensors (except index tensors and
//! the 2022 runs' scalar losses).
//!
//! A file that is a training run (TL demo, tlens, 2022 code) is described as a run: layout,
//! config, tensors, checkpoints, losses, the operation and the split tlens would use. Any other
//! readable file — a sweep, losses only, a bare tensor, an optimizer-only dict, a TorchScript
//! module — is printed as the tree `torch.load` would return ([`crate::io::tree`]), never
//! refused because its layout is not a run.

use crate::error::{Error, Result};
use crate::io::tree::{self, escape, AnyFile};
use crate::run::{RunFile, SplitChoice};
use serde_json::{json, Map, Value as Json};
use std::path::Path;

/// The JSON description of a run (`inspect --json`).
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
    let task = task_json(run);
    json!({
        "kind": "run",
        "format": run.format_name(),
        "layout": run.layout.name(),
        "description": run.description,
        "config": run.config.as_ref().map(|c| c.to_json()),
        "config_class": run.config_class.as_ref().map(|(m, n)| format!("{m}.{n}")),
        "tensors": tensors,
        "n_checkpoints": run.n_checkpoints(),
        "checkpoint_epochs": run.checkpoint_epochs,
        "n_train_losses": run.train_losses.len(),
        "n_test_losses": run.test_losses.len(),
        "n_train_indices": run.train_indices.as_ref().map_or(0, Vec::len),
        "n_test_indices": run.test_indices.as_ref().map_or(0, Vec::len),
        "final_losses": run.final_losses.map(|(a, b)| json!({"train_loss": a, "test_loss": b})),
        "epoch": run.epoch,
        "optimizer": run.torch_optimizer,
        "scheduler": run.scheduler,
        "task": task,
        "notes": run.notes,
        "unreadable": run.unreadable.iter().map(|(n, why)| json!({"name": n, "why": why})).collect::<Vec<_>>(),
    })
}

/// The task tlens would evaluate: operation, p and split rule, or why it would refuse.
fn task_json(run: &RunFile) -> Json {
    let p = match run.modular_p() {
        Ok(p) => p,
        Err(e) => return json!({"modular_arithmetic": false, "why": e.to_string()}),
    };
    let op = run.operation().expect("checked by modular_p");
    let split = match run.split(p, SplitChoice::Auto) {
        Ok(s) => {
            json!({"rule": s.rule.to_string(), "n_train": s.train.len(), "n_test": s.test.len()})
        }
        Err(e) => json!({"unknown": e.to_string()}),
    };
    json!({"modular_arithmetic": true, "p": p, "operation": op.name(), "split": split})
}

/// Print a run, or the tree of a file that is not one. `force_tree` prints the tree of a run
/// too; `values` reads every tensor for its first values and min/mean/max.
pub fn run(path: &Path, as_json: bool, force_tree: bool, values: bool) -> Result<()> {
    let opts = tree::Options { values };
    let run = match RunFile::open(path) {
        Ok(r) => {
            crate::cli::warn_foreign(path, &r.foreign_globals);
            r
        }
        // Readable but not a run (or a run layout tlens cannot interpret): the tree.
        Err(e) if is_layout_error(&e) => return print_tree(path, opts, as_json, Some(&e)),
        Err(e) => return Err(e),
    };
    let mut d = describe(&run);
    if force_tree || values {
        let t = tree::describe(&AnyFile::open(path)?, opts).map_err(|e| e.in_file(path))?;
        d["tree"] = t["tree"].clone();
    }
    if as_json {
        crate::cli::print_out(&format!("{}\n", serde_json::to_string_pretty(&d)?))?;
        return Ok(());
    }
    let mut out = String::new();
    text_run(&mut out, path, &run, &d);
    if let Some(t) = d.get("tree") {
        out.push_str("tree:\n");
        out.push_str(&tree::render(t));
    }
    crate::cli::print_out(&out)
}

/// Errors that mean "this container holds no run tlens can interpret" (the tree is still
/// shown), as opposed to a damaged or hostile container (reported as errors).
fn is_layout_error(e: &Error) -> bool {
    matches!(
        e.root(),
        Error::NotARun(_)
            | Error::MissingKey { .. }
            | Error::Type { .. }
            | Error::Shape { .. }
            | Error::Invalid { .. }
            | Error::Unsupported(_)
    )
}

fn print_tree(path: &Path, opts: tree::Options, as_json: bool, why: Option<&Error>) -> Result<()> {
    let file = AnyFile::open(path)?;
    if let AnyFile::Torch(f) = &file {
        crate::cli::warn_foreign(path, &crate::io::pickle::foreign_globals(&f.globals));
    }
    let mut d = tree::describe(&file, opts).map_err(|e| e.in_file(path))?;
    let reason = why.map(|e| e.root().to_string());
    d["kind"] = json!("tree");
    d["not_a_run"] = json!(reason);
    if as_json {
        return crate::cli::print_out(&format!("{}\n", serde_json::to_string_pretty(&d)?));
    }
    let mut out = format!(
        "file:    {}\nformat:  {}\n",
        escape(&path.display().to_string()),
        file.format_name()
    );
    if let Some(r) = reason {
        out.push_str(&format!("({})\n", escape(&r)));
    }
    out.push_str(&tree::render(&d["tree"]));
    let n = d["tensors"].as_object().map_or(0, Map::len);
    out.push_str(&format!("tensors ({n}):\n"));
    if let Some(ts) = d["tensors"].as_object() {
        for (name, t) in ts {
            let name = if name.is_empty() { "(root)" } else { name };
            out.push_str(&format!(
                "  {:<40} {:<16} {}\n",
                escape(name),
                t["shape"].to_string(),
                t["dtype"].as_str().unwrap_or("?")
            ));
        }
    }
    crate::cli::print_out(&out)
}

fn text_run(out: &mut String, path: &Path, run: &RunFile, d: &Json) {
    use std::fmt::Write;
    let mut w = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    w(format!("file:    {}", escape(&path.display().to_string())));
    w(format!("format:  {}", d["format"].as_str().unwrap_or("")));
    w(format!("layout:  {}", d["layout"].as_str().unwrap_or("")));
    w(format!("kind:    {}", escape(&run.description)));
    match &run.config {
        Some(c) => {
            w(format!(
                "config:  n_layers {} n_heads {} d_model {} d_head {} d_mlp {} d_vocab {} d_vocab_out {} n_ctx {} act_fn {} normalization {} seed {}",
                c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_mlp.map_or("-".into(), |d| d.to_string()),
                c.d_vocab, c.d_vocab_out, c.n_ctx, escape(c.act_fn.as_deref().unwrap_or("-")),
                escape(c.normalization_type.as_deref().unwrap_or("None")),
                c.seed.map_or("-".into(), |s| s.to_string()),
            ));
            if let Some((m, n)) = &run.config_class {
                w(format!("         (pickled as {}.{})", escape(m), escape(n)));
            }
            for key in ["original_config", "model_config"] {
                if let Some(oc) = c.extra.get(key) {
                    w(format!("         {key}: {}", escape(&oc.to_string())));
                }
            }
        }
        None => w("config:  (none in file)".into()),
    }
    let task = &d["task"];
    if task["modular_arithmetic"] == json!(true) {
        let split = &task["split"];
        w(format!(
            "task:    {} mod {}; split: {}",
            task["operation"].as_str().unwrap_or("?"),
            task["p"],
            split["rule"]
                .as_str()
                .map(|r| format!("{r} ({} train, {} test)", split["n_train"], split["n_test"]))
                .or_else(|| split["unknown"].as_str().map(str::to_string))
                .unwrap_or_default()
        ));
    } else {
        w(format!(
            "task:    {} (eval, predict, cache and analyze refuse it)",
            escape(task["why"].as_str().unwrap_or(""))
        ));
    }
    if let Some(m) = run.model_entries() {
        w(format!("tensors ({}):", m.len()));
        for (name, shape, dtype) in m.entries() {
            w(format!(
                "  {:<28} {:<16} {dtype}",
                escape(name),
                format!("{shape:?}")
            ));
        }
    }
    for (name, why) in &run.unreadable {
        w(format!(
            "  {:<28} not readable: {}",
            escape(name),
            escape(why)
        ));
    }
    for n in &run.notes {
        w(format!("note:    {n}"));
    }
    let epochs = &run.checkpoint_epochs;
    let span = match (epochs.first(), epochs.last()) {
        (Some(a), Some(b)) => format!(" (epochs {a}..={b})"),
        _ => String::new(),
    };
    w(format!("checkpoints: {}{span}", run.n_checkpoints()));
    w(format!(
        "train losses: {}  test losses: {}",
        run.train_losses.len(),
        run.test_losses.len()
    ));
    let mut last = String::new();
    if let (Some(a), Some(b)) = (run.train_losses.last(), run.test_losses.last()) {
        write!(last, "last logged train loss {a:.6e}  test loss {b:.6e}").unwrap();
        w(std::mem::take(&mut last));
    }
    if let Some((a, b)) = run.final_losses {
        w(format!(
            "final train_loss {a:.6e}  test_loss {b:.6e} (as stored)"
        ));
    }
    if let Some(e) = run.epoch {
        w(format!("epoch:   {e}"));
    }
    if let Some(o) = &run.torch_optimizer {
        w(format!(
            "optimizer: torch state dict {}",
            escape(&o.to_string())
        ));
    }
    if let Some(s) = &run.scheduler {
        w(format!("scheduler: {}", escape(&s.to_string())));
    }
    w(format!(
        "train indices: {}  test indices: {}",
        d["n_train_indices"], d["n_test_indices"]
    ));
}
