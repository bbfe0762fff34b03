//! `tlens sweep`: a sweep of training runs over comma-separated settings, sharded with
//! `--shard I/N`, and `--summarize DIR` to merge the shards and draw the phase diagram.

use crate::error::{Error, Result};
use crate::train::sweep::{self, Axes, Sweep};
use crate::train::TrainConfig;
use std::path::{Path, PathBuf};

/// `tlens sweep` flags.
#[derive(clap::Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct SweepArgs {
    /// The folder for the run files and summaries.
    #[arg(long, required_unless_present = "summarize")]
    pub out: Option<PathBuf>,
    /// Merge the summaries in this folder (every shard) into summary.json/csv and draw the
    /// phase diagram, instead of training.
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    pub summarize: Option<PathBuf>,
    /// The phase diagram's axes (default: the two swept axes with the most values).
    #[arg(long, requires = "summarize")]
    pub x: Option<String>,
    /// See --x.
    #[arg(long, requires = "summarize")]
    pub y: Option<String>,
    /// Run only the combinations whose index mod N is I (`I/N`, e.g. a Slurm array task).
    #[arg(long, default_value = "0/1")]
    pub shard: String,
    /// Epochs per run.
    #[arg(long, default_value_t = 25_000)]
    pub epochs: usize,
    /// Moduli, comma-separated.
    #[arg(long)]
    pub p: Option<String>,
    /// Operations, comma-separated (add, sub, mul, div, x2y2, x2xyy2, x2xyy2x, x3xy, x3xy2y,
    /// mix1, rand).
    #[arg(long)]
    pub op: Option<String>,
    /// Train fractions, comma-separated.
    #[arg(long)]
    pub frac_train: Option<String>,
    /// Weight decays, comma-separated.
    #[arg(long)]
    pub weight_decay: Option<String>,
    /// Learning rates, comma-separated.
    #[arg(long)]
    pub lr: Option<String>,
    /// Model seeds, comma-separated.
    #[arg(long)]
    pub seeds: Option<String>,
    /// Split seeds, comma-separated.
    #[arg(long)]
    pub data_seeds: Option<String>,
    /// Save a checkpoint every this many epochs.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: usize,
    /// Evaluate test loss and accuracies every this many epochs.
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Architecture, loss, filters and path of every run (as `tlens train`).
    #[command(flatten)]
    pub model: super::train::ModelArgs,
}

fn list<T: std::str::FromStr>(flag: &str, v: &Option<String>) -> Result<Vec<T>> {
    let Some(v) = v else { return Ok(Vec::new()) };
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<T>()
                .map_err(|_| Error::invalid(flag, format!("'{s}' is not a valid value")))
        })
        .collect()
}

/// `I/N` with I < N.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::invalid("--shard", format!("expected I/N with I < N, found '{s}'"));
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n) = (
        i.trim().parse::<usize>().map_err(|_| bad())?,
        n.trim().parse::<usize>().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

impl SweepArgs {
    /// The sweep these flags describe (every combination validated up front).
    pub fn sweep(&self) -> Result<Sweep> {
        let axes = Axes {
            p: list("--p", &self.p)?,
            op: list::<String>("--op", &self.op)?
                .iter()
                .map(|o| super::train::parse_op(o))
                .collect::<Result<_>>()?,
            frac_train: list("--frac-train", &self.frac_train)?,
            weight_decay: list("--weight-decay", &self.weight_decay)?,
            lr: list("--lr", &self.lr)?,
            seeds: list("--seeds", &self.seeds)?,
            data_seeds: list("--data-seeds", &self.data_seeds)?,
        };
        let base = self.model.apply(&TrainConfig {
            epochs: self.epochs,
            checkpoint_every: self.checkpoint_every,
            eval_every: self.eval_every,
            ..TrainConfig::default()
        })?;
        let s = Sweep::new(axes, base);
        for r in s.runs() {
            r.settings.validate()?;
        }
        Ok(s)
    }
}

/// Run the command.
pub fn run(args: &SweepArgs) -> Result<()> {
    if let Some(dir) = &args.summarize {
        return summarize(dir, args.x.as_deref(), args.y.as_deref());
    }
    let dir = args.out.as_ref().expect("required unless --summarize");
    let shard = parse_shard(&args.shard)?;
    let sweep = args.sweep()?;
    let mine = sweep.shard(shard.0, shard.1);
    outln!(
        "sweep: {} runs in all ({} swept: {}), shard {}/{} runs {}",
        sweep.runs().len(),
        sweep.swept_axes().len(),
        sweep.swept_axes().join(", "),
        shard.0,
        shard.1,
        mine.len()
    )?;
    let rows = sweep::run_shard(&sweep, dir, shard, |r, what| {
        eprintln!("  [{}] {} ({what})", r.index, r.name());
    })?;
    let stem = if shard.1 == 1 {
        "summary".to_string()
    } else {
        format!("summary.shard-{}-of-{}", shard.0, shard.1)
    };
    let json = dir.join(format!("{stem}.json"));
    crate::io::write_atomic(&json, serde_json::to_string_pretty(&rows)?.as_bytes())?;
    for r in &rows {
        outln!(
            "  {}: memorised at {}, grokked at {}, final test accuracy {:.3}",
            r.file,
            r.memorization_epoch
                .map_or("never".into(), |e| e.to_string()),
            r.grokking_epoch.map_or("never".into(), |e| e.to_string()),
            r.final_test_accuracy
        )?;
    }
    outln!("wrote {} and {} run files", json.display(), rows.len())?;
    Ok(())
}

fn summarize(dir: &Path, x: Option<&str>, y: Option<&str>) -> Result<()> {
    let rows = sweep::collect(dir)?;
    if rows.is_empty() {
        return Err(Error::invalid(
            dir.display().to_string(),
            "no finished runs (*.summary.json) in this folder",
        ));
    }
    let (json, csv) = sweep::write_summary(dir, &rows)?;
    outln!(
        "merged {} runs: wrote {} and {}",
        rows.len(),
        json.display(),
        csv.display()
    )?;
    let (ax, ay) = match (x, y) {
        (Some(x), Some(y)) => (x.to_string(), y.to_string()),
        _ => {
            let (a, b) = sweep::diagram_axes(&rows)?;
            (a.to_string(), b.to_string())
        }
    };
    for a in [&ax, &ay] {
        if rows.iter().all(|r| sweep::axis_value(r, a).is_none()) {
            return Err(Error::invalid(
                "--x/--y",
                format!("'{a}' is not an axis (frac_train, weight_decay, lr, p, seed, data_seed)"),
            ));
        }
    }
    let files = crate::analysis::plots::write_phase_diagram(dir, &rows, &ax, &ay)?;
    outln!(
        "wrote the phase diagram over {ax} and {ay}: {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    Ok(())
}
