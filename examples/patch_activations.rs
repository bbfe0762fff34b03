//! Activation patching between two inputs: run a "clean" input and a "corrupted" one, then
//! run the corrupted input again with one hook point's activation (at the last position)
//! taken from the clean run, and see how much of the clean answer comes back.
//!
//!     cargo run --release --example patch_activations [-- RUN.pth]
//!
//! The `=` token is the same in both inputs, so everything that depends on a and b reaches the
//! last position through attention: patching the attention output there restores the clean
//! answer completely, the embeddings not at all, the MLP activations almost completely.

use ndarray::{array, s, ArrayD};
use tlens::{Hook, HookedTransformer, RunFile};

fn main() -> tlens::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| tlens::cli::DEMO_FIXTURE.to_string());
    let run = RunFile::open(&path)?;
    let p = run.modular_p()? as u32;
    let model = HookedTransformer::new(run.config.clone().unwrap(), run.model()?)?;
    let (clean_in, corrupt_in) = (array![[37 % p, 58 % p, p]], array![[5 % p, 9 % p, p]]);
    let answer = ((37 + 58) % p) as usize;
    let (_, clean) = model.run_with_cache(&clean_in, None)?;
    // The logit of the clean answer minus the mean logit, at the last position.
    let score = |logits: &ArrayD<f32>| {
        let row = logits.slice(s![0, -1, ..]);
        row[answer] - row.mean().unwrap_or(0.0)
    };
    let clean_score = score(&model.forward(&clean_in)?);
    let corrupt_score = score(&model.forward(&corrupt_in)?);
    println!("clean 37 + 58: answer {answer} scores {clean_score:.2}; corrupted 5 + 9: {corrupt_score:.2}");
    for point in [
        "hook_embed",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_resid_mid",
        "blocks.0.mlp.hook_post",
        "blocks.0.hook_resid_post",
    ] {
        let from = clean[point].clone();
        let mut hooks = [Hook::new(point, move |x, _| {
            let mut x = x.clone();
            // The last position only: [batch, pos, ...].
            let mut last = x.slice_mut(s![.., -1, ..]);
            last.assign(&from.slice(s![.., -1, ..]));
            Some(x)
        })];
        let patched = score(&model.run_with_hooks(&corrupt_in, &mut hooks)?);
        let restored = (patched - corrupt_score) / (clean_score - corrupt_score);
        println!(
            "  patch {point:<26} at '=': score {patched:7.2}  ({:5.1}% restored)",
            100.0 * restored
        );
    }
    Ok(())
}
