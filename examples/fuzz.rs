//! Fuzz the readers: `cargo run --release --example fuzz -- [--iters N] [--seed S]`.
//! Seeds are the fixtures; panicking inputs are written to `fuzz-crashes/`.

use tlens::fuzz::{fuzz, pickles_of, Target};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("number"))
    };
    let iters = arg("--iters", 100_000);
    let seed = arg("--seed", 1);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
    let names = [
        "demo_small.pth",
        "demo_small_legacy.pth",
        "demo_small_proto4.pth",
        "demo_small_tl3.pth",
        "demo_small.safetensors",
        "original_small.pth",
    ];
    let files: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(format!("{dir}/{n}")).expect("fixture"))
        .collect();
    let pickles = pickles_of(&files);
    let mut panics = 0;
    for (target, seeds, n) in [
        (Target::Pickle, &pickles, iters),
        (Target::File, &files, iters / 10),
    ] {
        let t = std::time::Instant::now();
        let r = fuzz(target, seeds, n, seed);
        println!(
            "{target:?}: {} inputs in {:.1} s ({} loaded, {} errors, {} panics)",
            r.inputs,
            t.elapsed().as_secs_f64(),
            r.loaded,
            r.errors,
            r.panics.len()
        );
        for (i, p) in r.panics.iter().enumerate() {
            std::fs::create_dir_all("fuzz-crashes").unwrap();
            std::fs::write(format!("fuzz-crashes/{target:?}-{i}.bin"), p).unwrap();
        }
        panics += r.panics.len();
    }
    if panics > 0 {
        std::process::exit(1);
    }
}
