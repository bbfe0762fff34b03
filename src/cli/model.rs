//! `tlens predict`, `tlens eval`, `tlens cache`: run a run's final model or a checkpoint.

use crate::error::{Error, Result};
use crate::io::npz::NpzWriter;
use crate::model::get_act_name;
use crate::model::tabulated::last_logits;
use crate::run::{RunFile, SplitChoice};
use crate::task;
use crate::task::{evaluate_op, task_p};
use crate::HookedTransformer;
use ndarray::Array2;
use serde_json::json;
use std::path::Path;

/// The model of a run at `checkpoint` (an epoch listed in `checkpoint_epochs`), or its final model.
pub fn load_model(run: &RunFile, checkpoint: Option<i64>) -> Result<HookedTransformer> {
    let cfg = run
        .config
        .clone()
        .ok_or_else(|| Error::missing("run", "config (needed to build a model)"))?;
    let sd = match checkpoint {
        Some(epoch) => run.checkpoint(run.checkpoint_index(epoch).map_err(|_| {
            Error::invalid(
                "--checkpoint",
                format!(
                    "no checkpoint at epoch {epoch}; saved epochs: {:?}",
                    run.checkpoint_epochs
                ),
            )
        })?)?,
        None => run.model()?,
    };
    HookedTransformer::new(cfg, sd)
}

/// `tlens predict`: the model's answer to `a op b mod p`, with its probability.
pub fn predict(file: &Path, a: u32, b: u32, checkpoint: Option<i64>) -> Result<()> {
    let run = crate::cli::open_run(file)?;
    let p = run.modular_p().map_err(|e| e.in_file(file))?;
    let op = run.operation()?;
    let model = load_model(&run, checkpoint)?;
    if a as usize >= p || b as usize >= p {
        return Err(Error::invalid(
            "inputs",
            format!("a and b must be below p = {p}, got {a} and {b}"),
        ));
    }
    let tokens = Array2::from_shape_vec((1, 3), vec![a, b, p as u32]).expect("3 tokens");
    let logits = last_logits(&model, &tokens)?;
    let row = logits.row(0);
    if let Some(x) = row.iter().find(|x| !x.is_finite()) {
        return Err(Error::invalid(
            file.display().to_string(),
            format!(
                "the model's outputs are not finite (a logit is {x}): its weights hold NaN or Inf"
            ),
        ));
    }
    let c = task::argmax(row.as_slice().expect("contiguous"));
    let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    let prob = (row[c] as f64 - m).exp() / z;
    let expr = match op {
        task::Operation::Rand => format!("table[{a}, {b}]"),
        // The formula with a and b substituted (ab → a·b).
        _ => {
            let mut out = String::new();
            let mut after_var = false;
            for ch in op.formula().chars() {
                let v = match ch {
                    'a' => Some(a),
                    'b' => Some(b),
                    _ => None,
                };
                match v {
                    Some(v) => {
                        if after_var {
                            out.push('·');
                        }
                        out.push_str(&v.to_string());
                        after_var = true;
                    }
                    None => {
                        out.push(ch);
                        after_var = false;
                    }
                }
            }
            out
        }
    };
    out!("{expr} mod {p} = {c}   (p = {prob:.4})")?;
    let truth = match (op, run.rand_seed()) {
        (task::Operation::Rand, Some(seed)) => task::torch_randint(p * p, p as u32, seed)
            .get(a as usize * p + b as usize)
            .copied(),
        _ => op.label(a as usize, b as usize, p),
    };
    match truth {
        Some(truth) if truth as usize != c => out!("  (wrong: the answer is {truth})")?,
        Some(_) => {}
        None if op == task::Operation::Rand => out!("  (rand: the true table is not in the file)")?,
        None => out!("  ({} is undefined for b = 0)", op.name())?,
    }
    outln!("")?;
    Ok(())
}

/// `tlens eval`: loss and accuracy on the train, test and full data.
pub fn eval(
    file: &Path,
    checkpoint: Option<i64>,
    all: bool,
    as_json: bool,
    split: SplitChoice,
) -> Result<()> {
    let run = crate::cli::open_run(file)?;
    let p = run.modular_p().map_err(|e| e.in_file(file))?;
    let op = run.operation()?;
    // A split that cannot be known is said, and only the full-data figures are given.
    let (tr, te, rule) = match run.split(p, split) {
        Ok(s) => (s.train, s.test, Some(s.rule)),
        Err(e @ Error::UnknownData(_)) => {
            eprintln!("note: {e}; train/test columns are empty, full-data figures only");
            (Vec::new(), Vec::new(), None)
        }
        Err(e) => return Err(e.in_file(file)),
    };
    let epochs: Vec<Option<i64>> = if all {
        if run.n_checkpoints() == 0 {
            return Err(Error::invalid(
                "--all-checkpoints",
                "the file has no checkpoints",
            ));
        }
        run.checkpoint_epochs.iter().map(|&e| Some(e)).collect()
    } else {
        vec![checkpoint]
    };
    let mut rows = Vec::new();
    for e in epochs {
        let ev = evaluate_op(&load_model(&run, e)?, op, run.rand_seed(), &tr, &te)?;
        let mut j = serde_json::to_value(ev)?;
        if let Some(e) = e {
            j["epoch"] = json!(e);
        }
        rows.push(j);
    }
    if as_json {
        let mut out = if all { json!(rows) } else { rows.remove(0) };
        if !all {
            out["operation"] = json!(op.name());
            out["split"] = json!(rule.map(|r| r.to_string()));
        }
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(());
    }
    outln!(
        "task: ({}) mod {p}; split: {}",
        op.formula(),
        rule.map_or("unknown".to_string(), |r| r.to_string())
    )?;
    outln!(
        "{:>8} {:>12} {:>12} {:>12} {:>9} {:>9} {:>9}",
        "epoch",
        "train_loss",
        "test_loss",
        "full_loss",
        "train_acc",
        "test_acc",
        "acc"
    )?;
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let epoch = r
            .get("epoch")
            .and_then(|e| e.as_i64())
            .map_or("final".into(), |e| e.to_string());
        outln!(
            "{epoch:>8} {:>12.6e} {:>12.6e} {:>12.6e} {:>9.4} {:>9.4} {:>9.4}",
            f("train_loss"),
            f("test_loss"),
            f("full_loss"),
            f("train_accuracy"),
            f("test_accuracy"),
            f("accuracy")
        )?;
    }
    Ok(())
}

/// Parse `--inputs`: `all` or `a,b;a,b;…`.
pub fn parse_inputs(spec: &str, p: usize) -> Result<Array2<u32>> {
    if spec == "all" {
        return Ok(task::modular_addition(p).0);
    }
    let mut rows = Vec::new();
    for pair in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let nums: Vec<&str> = pair.split(',').map(str::trim).collect();
        let parse = |s: &str| -> Result<u32> {
            s.parse::<u32>()
                .ok()
                .filter(|&v| (v as usize) < p)
                .ok_or_else(|| {
                    Error::invalid("--inputs", format!("'{s}' is not an integer below p = {p}"))
                })
        };
        match nums.as_slice() {
            [a, b] => rows.extend([parse(a)?, parse(b)?, p as u32]),
            _ => {
                return Err(Error::invalid(
                    "--inputs",
                    format!("expected 'a,b', found '{pair}'"),
                ))
            }
        }
    }
    if rows.is_empty() {
        return Err(Error::invalid("--inputs", "no inputs"));
    }
    Ok(Array2::from_shape_vec((rows.len() / 3, 3), rows).expect("3 per row"))
}

/// `--names`: comma-separated TL names or shorthand, resolved against the model's hook points
/// as TL resolves them: a full name (`blocks.0.mlp.hook_post`) or shorthand with a layer
/// (`post0`, `k6`) names one point; shorthand without a layer (`post`, `pattern`, `embed`)
/// names that point in every layer (`post` is `blocks.L.mlp.hook_post`, never
/// `hook_resid_post`). A term that matches no hook point is an error.
pub fn resolve_names(spec: &str, model: &HookedTransformer) -> Result<Vec<String>> {
    let points = model.hook_names();
    let mut out: Vec<String> = Vec::new();
    for term in spec.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let full = get_act_name(term, None, None);
        let mut hits: Vec<String> = Vec::new();
        if points.contains(&full) {
            hits.push(full);
        } else if !term.contains('.') && !term.starts_with("hook_") {
            for l in 0..model.cfg.n_layers() {
                let n = get_act_name(term, Some(l as i64), None);
                if points.contains(&n) {
                    hits.push(n);
                }
            }
        }
        if hits.is_empty() {
            return Err(crate::model::hooked::unknown_hook(
                term.to_string(),
                &points,
            ));
        }
        for h in hits {
            if !out.contains(&h) {
                out.push(h);
            }
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("--names", "no names given"));
    }
    Ok(out)
}

/// `tlens cache`: every (or the named) hook's activation on the given inputs, as `.npz`.
pub fn cache(
    file: &Path,
    out: &Path,
    checkpoint: Option<i64>,
    inputs: Option<&str>,
    names: Option<&str>,
) -> Result<()> {
    crate::io::check_output(out, &["npz"], "--out")?;
    let run = crate::cli::open_run(file)?;
    run.modular_p().map_err(|e| e.in_file(file))?;
    let model = load_model(&run, checkpoint)?;
    let p = task_p(&model.cfg);
    let Some(inputs) = inputs else {
        // Every hook of every input: say how much that is instead of writing it silently.
        let per_input: usize = model
            .hook_names()
            .len()
            .saturating_mul(4 * model.cfg.d_mlp().max(model.cfg.d_model()) * 3);
        return Err(Error::invalid(
            "--inputs",
            format!(
                "give the inputs: `--inputs all` caches all {} inputs (about {} MB with every \
                 hook), or `--inputs \"37,58;1,2\"`",
                p * p,
                (p * p).saturating_mul(per_input) >> 20
            ),
        ));
    };
    let tokens = parse_inputs(inputs, p)?;
    let wanted = match names {
        Some(spec) => Some(resolve_names(spec, &model)?),
        None => None,
    };
    let filter = |name: &str| wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == name));
    let (logits, cache) = model.run_with_cache(&tokens, Some(&filter))?;
    let mut npz = NpzWriter::new();
    for (name, a) in cache.iter() {
        npz.add(name, a)?;
    }
    npz.add("logits", &logits)?;
    npz.add("tokens", &tokens.mapv(|t| t as i64))?;
    let n = cache.len();
    npz.write(out)?;
    outln!(
        "wrote {} ({n} hooks + logits {:?} + tokens, {} inputs)",
        out.display(),
        logits.shape(),
        tokens.nrows()
    )?;
    Ok(())
}
