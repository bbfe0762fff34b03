//! Zero-ablate each attention head in turn and measure the test loss — which heads does the
//! grokked model need?
//!
//!     cargo run --release --example ablate_head [-- RUN.pth]
//!
//! The hook on `blocks.0.attn.hook_z` (TL's `("z", 0)`) zeroes one head's output for the call;
//! everything else is the model as trained.

use ndarray::{s, Axis};
use tlens::analysis::Activations;
use tlens::{task, Hook, RunFile};

fn main() -> tlens::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| tlens::cli::DEMO_FIXTURE.to_string());
    let run = RunFile::open(&path)?;
    let acts = Activations::of_run(&run, None)?;
    let (model, t) = (&acts.model, &acts.task);
    let test_rows: Vec<usize> = t.test.iter().map(|&i| i as usize).collect();
    let test_loss = |logits: &ndarray::ArrayD<f32>| {
        // Last position, the p answer logits, the test inputs.
        let last = logits.slice(s![.., -1, ..t.p]).to_owned();
        let rows = last.select(Axis(0), &test_rows);
        let ys: Vec<u32> = test_rows.iter().map(|&i| t.labels[i]).collect();
        task::loss(rows.view(), &ys)
    };
    let clean = test_loss(&model.forward(&t.tokens)?);
    println!("{path}: test loss {clean:.3e} with every head");
    for head in 0..model.cfg.n_heads() {
        let mut hooks = [Hook::new(("z", 0), move |z, _| {
            let mut z = z.clone();
            z.index_axis_mut(Axis(2), head).fill(0.0);
            Some(z)
        })];
        let ablated = test_loss(&model.run_with_hooks(&t.tokens, &mut hooks)?);
        println!("  head {head} ablated: test loss {ablated:.3e}");
    }
    Ok(())
}
