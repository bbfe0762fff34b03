//! `tlens convert`: a training run (either layout, zip or legacy) ⇄ safetensors or the TL-demo
//! .pth; any other file's tensors to safetensors (or a plain `.pth` dict) under their dotted
//! paths.

use crate::error::{Error, Result};
use crate::io::pickle::{Dict, Value};
use crate::io::tree::{self, AnyFile};
use crate::run::ConfigStyle;
use crate::tensor::Tensor;
use std::path::Path;

pub fn config_style(s: &str) -> Result<ConfigStyle> {
    match s {
        "tl2" => Ok(ConfigStyle::Tl2Object),
        "tl3" => Ok(ConfigStyle::Tl3Object),
        "dict" => Ok(ConfigStyle::Dict),
        other => Err(Error::invalid(
            "--config-style",
            format!("expected tl2, tl3 or dict, found '{other}'"),
        )),
    }
}

/// Output kinds, from the extension (checked before anything is read).
#[derive(Clone, Copy, PartialEq)]
enum Out {
    Safetensors,
    Pth,
}

fn out_kind(output: &Path) -> Result<Out> {
    match output.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "safetensors" => Ok(Out::Safetensors),
        "pth" | "pt" | "ckpt" => Ok(Out::Pth),
        other => Err(Error::invalid(
            output.display().to_string(),
            format!("unknown output extension '{other}' (use .pth or .safetensors)"),
        )),
    }
}

pub fn run(input: &Path, output: &Path, style: &str) -> Result<()> {
    let style = config_style(style)?;
    let kind = out_kind(output)?;
    crate::io::check_output(output, &["safetensors", "pth", "pt", "ckpt"], "OUTPUT")?;
    let file = match crate::cli::open_run(input) {
        Ok(file) => file,
        Err(e) if matches!(e.root(), Error::NotARun(_)) => {
            return convert_tree(input, output, kind, e.root())
        }
        Err(e) => return Err(e),
    };
    for (name, why) in &file.unreadable {
        eprintln!(
            "warning: {name} not converted: {why} (the other tensors are, under their names)"
        );
    }
    let run = file.load()?;
    match kind {
        Out::Safetensors => run.save_safetensors(output)?,
        Out::Pth => run.save_pth(output, style)?,
    }
    outln!(
        "wrote {} ({} tensors in the model, {} checkpoints, TL layout)",
        output.display(),
        run.model.len(),
        run.checkpoints.len()
    )?;
    Ok(())
}

/// A file that holds no run: every tensor (and numpy array) under its dotted path, as a flat
/// safetensors file or a `.pth` holding one plain dict (loadable with `weights_only=True`).
fn convert_tree(input: &Path, output: &Path, kind: Out, why: &Error) -> Result<()> {
    let file = AnyFile::open(input)?;
    let tensors = tree::read_tensors(&file).map_err(|e| e.in_file(input))?;
    if tensors.is_empty() {
        return Err(Error::invalid(
            input.display().to_string(),
            format!("nothing to convert: {why}, and it holds no tensors"),
        ));
    }
    let mut named: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    let mut seen = std::collections::HashSet::new();
    for (path, t) in tensors {
        let name = if path.is_empty() {
            "tensor".to_string()
        } else {
            path
        };
        if !seen.insert(name.clone()) {
            return Err(Error::invalid(
                input.display().to_string(),
                format!("two tensors flatten to the same name '{name}'"),
            ));
        }
        named.push((name, t));
    }
    match kind {
        Out::Safetensors => {
            let refs: Vec<(String, &Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
            let mut meta = std::collections::HashMap::new();
            meta.insert("format".to_string(), "tlens-tensors".to_string());
            let bytes = crate::io::safetensors::to_bytes(&refs, meta)?;
            crate::io::write_atomic(output, &bytes)?;
        }
        Out::Pth => {
            let mut w = crate::io::torch::TorchWriter::new(2);
            let items = named
                .iter()
                .map(|(n, t)| (Value::Str(n.clone()), w.add(t)))
                .collect();
            let root = Value::Dict(Dict {
                ordered: false,
                items,
                attrs: None,
            });
            w.write(&root, output)?;
        }
    }
    outln!(
        "wrote {} ({} tensor(s) under their dotted paths; {})",
        output.display(),
        named.len(),
        why
    )?;
    Ok(())
}
