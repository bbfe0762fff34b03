//! One training epoch of the demo (train step on 3,830 inputs + test loss on 8,939), as
//! `tlens train` runs it. `python benches/pytorch_anchor.py train` times the TL demo loop on the
//! same machine and prints the ratio. `ln_gelu_2l_epoch`: the same epoch for a 2-layer
//! LayerNorm GELU model, trained on the general path.

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;

fn epoch(c: &mut Criterion) {
    let mut t = tlens::train::Trainer::new(tlens::train::TrainConfig::default()).unwrap();
    let mut g = c.benchmark_group("train");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    g.bench_function("demo_epoch", |b| b.iter(|| t.step().unwrap()));
    // The general path: a 2-layer LayerNorm GELU model of the demo's sizes.
    let mut t2 = tlens::train::Trainer::new(tlens::train::TrainConfig {
        arch: tlens::train::Arch {
            n_layers: 2,
            act_fn: "gelu".into(),
            normalization: Some("LN".into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    g.bench_function("ln_gelu_2l_epoch", |b| b.iter(|| t2.step().unwrap()));
    g.finish();
}

criterion_group!(benches, epoch);
criterion_main!(benches);
