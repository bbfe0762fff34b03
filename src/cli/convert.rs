//! `tlens convert`: .pth (either layout, zip or legacy) ⇄ safetensors, and to the TL-demo .pth.

use crate::error::{Error, Result};
use crate::run::{ConfigStyle, RunFile};
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

pub fn run(input: &Path, output: &Path, style: &str) -> Result<()> {
    let style = config_style(style)?;
    let run = RunFile::open(input)?.load()?;
    let ext = output.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "safetensors" => run.save_safetensors(output)?,
        "pth" | "pt" | "ckpt" => run.save_pth(output, style)?,
        other => {
            return Err(Error::invalid(
                output.display().to_string(),
                format!("unknown output extension '{other}' (use .pth or .safetensors)"),
            ))
        }
    }
    println!(
        "wrote {} ({} tensors in the model, {} checkpoints, TL layout)",
        output.display(),
        run.model.len(),
        run.checkpoints.len()
    );
    Ok(())
}
