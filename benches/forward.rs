//! Forward-pass benchmarks on the shipped p=113 run: the full-dataset forward with a cache of
//! every hook, and last-position evaluation (train/test/full loss and accuracy).
//! `python benches/pytorch_anchor.py` runs TransformerLens on the same work and prints ratios.

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;

fn forward(c: &mut Criterion) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo_p113.pth");
    let run = tlens::RunFile::open(path).unwrap();
    let model =
        tlens::HookedTransformer::new(run.config.clone().unwrap(), run.model().unwrap()).unwrap();
    let (tokens, _) = tlens::task::modular_addition(113);
    let (tr, te) = (
        run.train_indices.clone().unwrap(),
        run.test_indices.clone().unwrap(),
    );
    let mut g = c.benchmark_group("forward");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("run_with_cache_all_hooks", |b| {
        b.iter(|| model.run_with_cache(&tokens, None).unwrap())
    });
    g.bench_function("forward_logits", |b| {
        b.iter(|| model.forward(&tokens).unwrap())
    });
    g.bench_function("evaluate_last_position", |b| {
        b.iter(|| tlens::task::evaluate(&model, &tr, &te).unwrap())
    });
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
