//! Opening and reading a full-size TL demo file (250 checkpoints, 25,000 losses, ≈ 230 MB).
//! The file is made by `benches/pytorch_anchor.py` (not committed); without it this bench skips.
//! Run the side-by-side comparison with `python benches/pytorch_anchor.py`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::path::PathBuf;
use std::time::Duration;

fn bench_file() -> Option<PathBuf> {
    let p = std::env::var_os("TLENS_BENCH_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/bench-data/demo_full.pth"
            ))
        });
    p.exists().then_some(p)
}

fn load(c: &mut Criterion) {
    let Some(path) = bench_file() else {
        eprintln!(
            "bench-data/demo_full.pth missing: run `python benches/pytorch_anchor.py` to make it"
        );
        return;
    };
    let mut g = c.benchmark_group("load");
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("open_lazy", |b| {
        b.iter(|| tlens::RunFile::open(&path).unwrap())
    });
    g.bench_function("open_and_one_checkpoint", |b| {
        b.iter(|| {
            let r = tlens::RunFile::open(&path).unwrap();
            r.checkpoint(r.n_checkpoints() / 2).unwrap()
        })
    });
    g.sample_size(10);
    g.bench_function("full_read", |b| {
        b.iter(|| tlens::RunFile::open(&path).unwrap().load().unwrap())
    });
    g.finish();
}

criterion_group!(benches, load);
criterion_main!(benches);
