//! The trainer's three per-block matrix products on one thread, as `tlens train` runs them on
//! each block of 64 inputs: the logits `post·W_L` ([64 × 512]·[512 × 113], B packed once),
//! the backward's `dlogits·W_Lᵀ` ([64 × 113]·[113 × 512]) and the chained `postᵀ·dlogits`
//! ([512 × 64]·[64 × 113], B packed per call). Throughput is printed in multiply-adds per
//! second (criterion's "elem/s"); `TLENS_SIMD=avx2` or `portable` times the other kernels.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use tlens::backend::gemm::{sgemm_chain, Mat, PackedB};

fn products(c: &mut Criterion) {
    let (m, k, n) = (64usize, 512usize, 113usize);
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 104_729) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let dl: Vec<f32> = (0..m * n)
        .map(|i| ((i * 31) % 100) as f32 * 1e-4 - 5e-3)
        .collect();
    let row_major = |p: &[f32], cols: usize| Mat {
        ptr: p.as_ptr(),
        rs: cols as isize,
        cs: 1,
    };
    // SAFETY (every product below): the buffers have the shapes and strides given.
    let w_l = unsafe { PackedB::new(k, n, row_major(&b, n)) };
    let w_lt = unsafe {
        PackedB::new(
            n,
            k,
            Mat {
                ptr: b.as_ptr(),
                rs: 1,
                cs: n as isize,
            },
        )
    };
    let mut g = c.benchmark_group("gemm");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements((m * k * n) as u64));
    let mut logits = vec![0f32; m * n];
    g.bench_function("logits_64x512x113", |bch| {
        bch.iter(|| unsafe { w_l.mul(m, row_major(&a, k), logits.as_mut_ptr(), n, false, None) })
    });
    let mut d_post = vec![0f32; m * k];
    g.bench_function("d_post_64x113x512", |bch| {
        bch.iter(|| unsafe { w_lt.mul(m, row_major(&dl, n), d_post.as_mut_ptr(), k, false, None) })
    });
    let mut s = vec![0f32; k * n];
    g.bench_function("s_chain_512x64x113", |bch| {
        bch.iter(|| unsafe {
            let post_t = Mat {
                ptr: a.as_ptr(),
                rs: 1,
                cs: k as isize,
            };
            sgemm_chain(k, m, n, post_t, row_major(&dl, n), s.as_mut_ptr(), n)
        })
    });
    g.finish();
}

criterion_group!(benches, products);
criterion_main!(benches);
