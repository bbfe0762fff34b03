//! `tlens analyze`: the paper's analyses of a run, as a text report, JSON, npz and figures.

use crate::analysis::plots::{write_all, PlotData};
use crate::analysis::{analyze_run, Analysis, AnalysisArrays, Options};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `--key-freqs auto` or a comma-separated list.
pub fn parse_key_freqs(spec: &str) -> Result<Option<Vec<usize>>> {
    if spec.trim() == "auto" {
        return Ok(None);
    }
    spec.split(',')
        .map(|s| {
            s.trim().parse::<usize>().map_err(|_| {
                Error::invalid(
                    "--key-freqs",
                    format!("{s:?} is not a frequency (use auto or e.g. 17,25,32,47)"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// What `tlens analyze` was asked to do.
pub struct AnalyzeArgs<'a> {
    /// The run file.
    pub file: &'a Path,
    /// Analyse this checkpoint (its epoch) instead of the final model.
    pub checkpoint: Option<i64>,
    /// `auto` or a comma-separated list of frequencies.
    pub key_freqs: &'a str,
    /// Write the analysis as JSON here.
    pub json: Option<PathBuf>,
    /// Write the arrays as `.npz` here.
    pub npz: Option<PathBuf>,
    /// Write the figures to this folder.
    pub plots: Option<PathBuf>,
    /// Skip the progress measures over the checkpoints.
    pub skip_checkpoints: bool,
    /// Which train/test split to use.
    pub split: crate::run::SplitChoice,
}

/// Analyse, write what was asked for, print the report; returns the analysis.
pub fn run(args: &AnalyzeArgs) -> Result<(Analysis, AnalysisArrays)> {
    let start = Instant::now();
    // Outputs are checked before the analysis, not after it.
    if let Some(p) = &args.json {
        crate::io::check_output(p, &["json"], "--json")?;
    }
    if let Some(p) = &args.npz {
        crate::io::check_output(p, &["npz"], "--npz")?;
    }
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::invalid("--plots", format!("{}: {e}", dir.display())))?;
        crate::io::check_output(&dir.join("probe.png"), &["png"], "--plots")?;
    }
    let run = crate::cli::open_run(args.file)?;
    let opts = Options {
        checkpoint: args.checkpoint,
        key_freqs: parse_key_freqs(args.key_freqs)?,
        skip_checkpoints: args.skip_checkpoints,
        split: args.split,
    };
    let (analysis, arrays) = analyze_run(&run, &opts).map_err(|e| e.in_file(args.file))?;
    let took = start.elapsed();
    print_report(&analysis)?;
    outln!(
        "\nanalysed the model and {} checkpoints in {:.2} s",
        analysis.checkpoints.len(),
        took.as_secs_f64()
    )?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&analysis)?;
        crate::io::write_atomic(path, text.as_bytes()).map_err(|e| e.in_file(path))?;
        outln!("wrote {}", path.display())?;
    }
    if let Some(path) = &args.npz {
        arrays.write_npz(path)?;
        outln!("wrote {}", path.display())?;
    }
    if let Some(dir) = &args.plots {
        if run.test_every().is_none() && !run.test_losses.is_empty() {
            eprintln!(
                "note: the file does not say at which epochs its {} test losses were taken; \
                 the loss figure shows the train loss only",
                run.test_losses.len()
            );
        }
        let files = write_all(
            dir,
            &PlotData {
                analysis: &analysis,
                arrays: &arrays,
                train_losses: &run.train_losses,
                test_losses: &run.test_losses,
                test_every: run.test_every(),
            },
        )?;
        outln!(
            "wrote {} figures (PNG + SVG) to {}",
            files.len() / 2,
            dir.display()
        )?;
    }
    Ok((analysis, arrays))
}

fn fmt_phase(e: Option<i64>) -> String {
    e.map(|e| e.to_string()).unwrap_or_else(|| "-".into())
}

/// The short text report of an analysis.
pub fn print_report(a: &Analysis) -> Result<()> {
    let f = &a.final_;
    let what = match a.epoch {
        Some(e) => format!("checkpoint at epoch {e}"),
        None => "final model".into(),
    };
    outln!("{what}, ({}) mod {}:", a.operation.formula(), a.p)?;
    if !a.skipped.is_empty() {
        outln!(
            "  skipped (they assume addition, the run's operation is {}): {}",
            a.operation.name(),
            a.skipped.join(", ")
        )?;
    }
    outln!(
        "  loss  train {:.3e}  test {:.3e}   accuracy train {:.2}%  test {:.2}%",
        f.train_loss,
        f.test_loss,
        100.0 * f.train_accuracy,
        100.0 * f.test_accuracy
    )?;
    let keys: Vec<String> = a.key_freqs.iter().map(|k| k.to_string()).collect();
    outln!(
        "  key frequencies ({}): {}",
        a.key_freqs_source,
        if keys.is_empty() {
            "none".into()
        } else {
            keys.join(", ")
        }
    )?;
    outln!(
        "  restricted loss (test) {:.3e}   excluded loss (train) {:.3e}",
        f.restricted_loss,
        f.excluded_loss
    )?;
    outln!(
        "  neurons explained > 85% by one frequency: {:.1}% of {}",
        100.0 * f.frac_neurons_explained,
        a.neurons.len()
    )?;
    for c in &a.clusters {
        outln!(
            "    frequency {:>2}: {:>3} neurons",
            c.freq,
            c.neurons.len()
        )?;
    }
    let k = &f.key_freq_power_fraction;
    outln!(
        "  power in the key frequencies: W_E {:.3}  x1 {:.3}  x2 {:.3}  W_L {:.3}",
        k.w_e,
        k.x1,
        k.x2,
        k.w_l
    )?;
    outln!(
        "  logits: cos-sim with the key frequencies {}; residual {:.3} of the norm; loss rebuilt from them {:.3e}",
        a.logit_cos_sim_key
            .iter()
            .map(|c| format!("{c:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        f.logit_residual_fraction_key,
        f.key_freq_logits_loss
    )?;
    outln!(
        "  embedding: principal components' frequencies {:?}; Gini W_E {:.3}, W_L {:.3}; sum of squared weights {:.1}",
        a.embedding.pc_freq, f.gini_w_e, f.gini_w_l, f.sum_sq_weights
    )?;
    if !a.checkpoints.is_empty() {
        outln!(
            "  phases: memorisation ends at epoch {}, circuit formation at {}, clean-up at {}",
            fmt_phase(a.phases.memorization_end),
            fmt_phase(a.phases.circuit_formation_end),
            fmt_phase(a.phases.cleanup_end)
        )?;
        outln!("  progress measures (epoch: test / restricted / excluded loss):")?;
        let n = a.checkpoints.len();
        let step = n.div_ceil(8).max(1);
        for (i, c) in a.checkpoints.iter().enumerate() {
            if i % step == 0 || i + 1 == n {
                outln!(
                    "    {:>6}: {:.2e} / {:.2e} / {:.2e}",
                    c.epoch,
                    c.test_loss,
                    c.restricted_loss,
                    c.excluded_loss
                )?;
            }
        }
    }
    Ok(())
}
