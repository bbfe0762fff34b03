//! The `tlens` command line: one subcommand per job, each a thin layer over the library.
//! Errors are returned to `main`, which prints one line and exits non-zero.

/// `println!` that returns an error when stdout cannot be written (a full disk, a closed
/// pipe) instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::cli::print_out(&format!("{}\n", format_args!($($t)*)))
    };
}

/// `print!` that returns an error when stdout cannot be written.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::cli::print_out(&format!("{}", format_args!($($t)*)))
    };
}

pub mod analyze;
mod convert;
mod demo;
mod inspect;
pub mod model;
pub mod sweep;
pub mod train;

use crate::error::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// The grokked run shipped with the crate (trained by `tlens train` with the reference setup).
pub const DEMO_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/grokked_p113.pth");

#[derive(Parser, Debug)]
#[command(
    name = "tlens",
    version,
    about = "TransformerLens for grokking models, in Rust"
)]
/// The command line (`tlens --help`).
pub struct Cli {
    #[command(subcommand)]
    /// The subcommand.
    pub command: Command,
    /// Bytes that reading one file may allocate beyond what it stores (the pickle's values,
    /// broadcast tensors expanded, deflated entries inflated); e.g. 256M, 4G. Default 512M.
    #[arg(long, global = true, value_name = "BYTES", value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,
}

/// `--memory-budget`: a byte count with an optional K, M or G suffix (powers of 1024).
fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{s}' is not a positive byte count such as 512M or 4G"))
}

#[derive(Subcommand, Debug)]
/// The subcommands.
pub enum Command {
    /// Describe any torch or safetensors file: a run's format, layout, config, tensors,
    /// checkpoints, losses and task, or the tree of anything else.
    Inspect {
        /// The file to describe.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also print the file's whole tree (what `torch.load` returns) for a training run.
        #[arg(long)]
        tree: bool,
        /// Read every tensor: its first values and min/mean/max (implies --tree).
        #[arg(long)]
        values: bool,
    },
    /// Convert between .pth (either layout) and safetensors; output format from OUT's extension.
    Convert {
        /// The file to read.
        input: PathBuf,
        /// The file to write (.pth or .safetensors).
        output: PathBuf,
        /// How to pickle the config in a .pth: tl2 (the demo's TL object), tl3, or dict
        /// (loadable with torch.load(weights_only=True)).
        #[arg(long, default_value = "tl2")]
        config_style: String,
    },
    /// Predict `a op b mod p` with a run's model: `tlens predict RUN.pth 37 58`.
    Predict {
        /// The run file.
        file: PathBuf,
        /// First operand.
        a: u32,
        /// Second operand.
        b: u32,
        /// Use the checkpoint saved at this epoch instead of the final model.
        #[arg(long)]
        checkpoint: Option<i64>,
        /// auto, cpu or cuda. This version has no GPU backend: auto runs on the CPU, cuda is an
        /// error that says why.
        #[arg(long, value_enum, default_value_t = crate::backend::DeviceArg::Auto)]
        device: crate::backend::DeviceArg,
    },
    /// Train/test/full loss and accuracy of the final model, one checkpoint, or all checkpoints.
    Eval {
        /// The run file.
        file: PathBuf,
        /// Evaluate the checkpoint saved at this epoch.
        #[arg(long, conflicts_with = "all_checkpoints")]
        checkpoint: Option<i64>,
        /// Evaluate every checkpoint (JSON: a list with `epoch` per entry).
        #[arg(long)]
        all_checkpoints: bool,
        #[arg(long)]
        /// Print JSON instead of a table.
        json: bool,
        /// Train/test split: auto (stored indices, or the 2022 code's rule for its runs),
        /// demo (torch.randperm seed 598, 30%), or 2022 (random.shuffle seed 0, 30%).
        #[arg(long, default_value = "auto")]
        split: crate::run::SplitChoice,
        /// auto, cpu or cuda. This version has no GPU backend: auto runs on the CPU, cuda is an
        /// error that says why.
        #[arg(long, value_enum, default_value_t = crate::backend::DeviceArg::Auto)]
        device: crate::backend::DeviceArg,
    },
    /// Run with cache and save every hook's activation (TL names), logits and tokens as .npz.
    Cache {
        /// The run file.
        file: PathBuf,
        #[arg(long)]
        /// The `.npz` to write.
        out: PathBuf,
        #[arg(long)]
        /// Cache this checkpoint (its epoch) instead of the final model.
        checkpoint: Option<i64>,
        /// `all` (every a, b: p² inputs, hundreds of MB for p = 113) or `a,b;a,b;…`;
        /// required, so that a whole-dataset cache is never written by accident.
        #[arg(long)]
        inputs: Option<String>,
        /// Comma-separated hook names or TL shorthand: `blocks.0.mlp.hook_post`, `post0`, or
        /// `post` (every layer's); a name matching no hook point is an error (default: every
        /// hook).
        #[arg(long)]
        names: Option<String>,
        /// auto, cpu or cuda. This version has no GPU backend: auto runs on the CPU, cuda is an
        /// error that says why.
        #[arg(long, value_enum, default_value_t = crate::backend::DeviceArg::Auto)]
        device: crate::backend::DeviceArg,
    },
    /// The paper's analyses: Fourier structure, neuron clusters, restricted/excluded loss,
    /// progress measures over every checkpoint, phases; a report plus JSON, npz and figures.
    Analyze {
        /// The run file.
        file: PathBuf,
        /// Analyse the checkpoint saved at this epoch instead of the final model.
        #[arg(long)]
        checkpoint: Option<i64>,
        /// `auto` (the documented rule) or a list such as 17,25,32,47.
        #[arg(long, default_value = "auto")]
        key_freqs: String,
        #[arg(long, value_name = "OUT.json")]
        /// Write the analysis as JSON here.
        json: Option<PathBuf>,
        #[arg(long, value_name = "OUT.npz")]
        /// Write the arrays as `.npz` here.
        npz: Option<PathBuf>,
        /// Write the figures (PNG and SVG) to this folder.
        #[arg(long, value_name = "DIR")]
        plots: Option<PathBuf>,
        /// Only the analysed model: skip the progress measures over the checkpoints.
        #[arg(long)]
        no_checkpoints: bool,
        /// Train/test split: auto (stored indices, or the 2022 code's rule for its runs),
        /// demo (torch.randperm seed 598, 30%), or 2022 (random.shuffle seed 0, 30%).
        #[arg(long, default_value = "auto")]
        split: crate::run::SplitChoice,
        /// auto, cpu or cuda. This version has no GPU backend: auto runs on the CPU, cuda is an
        /// error that says why.
        #[arg(long, value_enum, default_value_t = crate::backend::DeviceArg::Auto)]
        device: crate::backend::DeviceArg,
    },
    /// Train like the TL grokking demo (defaults: the reference setup) and write a TL-demo .pth.
    Train(train::TrainArgs),
    /// Train one run per combination of comma-separated settings (`--seeds 1,2,3
    /// --weight-decay 1,0.3`), sharded with `--shard I/N`; `--summarize DIR` merges the shards'
    /// summaries (memorisation and grokking epochs) and draws the phase diagram.
    Sweep(sweep::SweepArgs),
    /// The main job on a run (default: the shipped grokked run): predictions, losses, key
    /// frequencies, neuron clusters, restricted/excluded loss, phases, and the figures.
    Demo {
        /// The run (default: the grokked run shipped in fixtures/grokked_p113.pth).
        file: Option<PathBuf>,
        /// Where to write the figures.
        #[arg(long, default_value = "tlens-demo-plots")]
        plots: PathBuf,
    },
}

/// Open a run for a command, with one warning (stderr) when the file references callables
/// that `torch.load` would run and tlens did not.
pub fn open_run(path: &std::path::Path) -> Result<crate::RunFile> {
    let run = crate::RunFile::open(path)?;
    warn_foreign(path, &run.foreign_globals);
    Ok(run)
}

/// The warning about callables a file references (printed once, escaped).
pub fn warn_foreign(path: &std::path::Path, foreign: &[String]) {
    if !foreign.is_empty() {
        eprintln!(
            "warning: {} references Python callables that torch.load(weights_only=False) would \
             import and may call; tlens ran none of them: {}",
            crate::io::tree::escape(&path.display().to_string()),
            crate::io::tree::escape(&foreign.join(", "))
        );
    }
}

/// Write to stdout; a failed write (a full disk, a closed pipe) is an error, not a panic.
pub fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    if let Some(b) = cli.memory_budget {
        crate::io::set_memory_budget(b);
    }
    match cli.command {
        Command::Inspect {
            file,
            json,
            tree,
            values,
        } => inspect::run(&file, json, tree, values),
        Command::Convert {
            input,
            output,
            config_style,
        } => convert::run(&input, &output, &config_style),
        Command::Predict {
            file,
            a,
            b,
            checkpoint,
            device,
        } => crate::backend::device::select(device)
            .and_then(|_| model::predict(&file, a, b, checkpoint)),
        Command::Eval {
            file,
            checkpoint,
            all_checkpoints,
            json,
            split,
            device,
        } => crate::backend::device::select(device)
            .and_then(|_| model::eval(&file, checkpoint, all_checkpoints, json, split)),
        Command::Cache {
            file,
            out,
            checkpoint,
            inputs,
            names,
            device,
        } => crate::backend::device::select(device).and_then(|_| {
            model::cache(&file, &out, checkpoint, inputs.as_deref(), names.as_deref())
        }),
        Command::Sweep(args) => sweep::run(&args),
        Command::Train(args) => {
            crate::backend::device::select(args.device)?;
            train::run(&args)
        }
        Command::Analyze {
            file,
            checkpoint,
            key_freqs,
            json,
            npz,
            plots,
            no_checkpoints,
            split,
            device,
        } => crate::backend::device::select(device)
            .and_then(|_| {
                analyze::run(&analyze::AnalyzeArgs {
                    file: &file,
                    checkpoint,
                    key_freqs: &key_freqs,
                    json,
                    npz,
                    plots,
                    skip_checkpoints: no_checkpoints,
                    split,
                })
            })
            .map(|_| ()),
        Command::Demo { file, plots } => demo::run(
            file.as_deref()
                .unwrap_or(std::path::Path::new(DEMO_FIXTURE)),
            &plots,
        ),
    }
}
