//! The paper's progress measures over every checkpoint of a run, as a table: train, test,
//! restricted and excluded loss, test accuracy and the Gini coefficient of W_E's Fourier
//! norms, with the phase boundaries read off the test loss.
//!
//!     cargo run --release --example progress_measures [-- RUN.pth]

use tlens::analysis::{analyze_run, Options};
use tlens::RunFile;

fn main() -> tlens::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| tlens::cli::DEMO_FIXTURE.to_string());
    let run = RunFile::open(&path)?;
    let (a, _) = analyze_run(&run, &Options::default())?;
    println!("{path}: key frequencies {:?}", a.key_freqs);
    println!(
        "{:>7} {:>10} {:>10} {:>11} {:>10} {:>9} {:>8}",
        "epoch", "train", "test", "restricted", "excluded", "test acc", "gini W_E"
    );
    for c in &a.checkpoints {
        println!(
            "{:>7} {:>10.2e} {:>10.2e} {:>11.2e} {:>10.2e} {:>9.3} {:>8.3}",
            c.epoch,
            c.train_loss,
            c.test_loss,
            c.restricted_loss,
            c.excluded_loss,
            c.test_accuracy,
            c.gini_w_e
        );
    }
    let ph = a.phases;
    println!(
        "phases: memorisation ends {:?}, circuit formed {:?}, clean-up ends {:?}",
        ph.memorization_end, ph.circuit_formation_end, ph.cleanup_end
    );
    Ok(())
}
