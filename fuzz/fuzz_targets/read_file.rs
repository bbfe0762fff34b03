//! Any bytes as a checkpoint file: the run path (every tensor materialised) and the tree path
//! of `inspect` / `convert`. Every input must load or return an error — libFuzzer reports
//! panics, aborts, out-of-memory (`-rss_limit_mb`) and time-outs (`-timeout`).
#![no_main]

#[path = "../../tests/support/fuzz.rs"]
#[allow(dead_code)]
mod fuzz;

use libfuzzer_sys::fuzz_target;
use fuzz::{run_one, Target};
use tlens::io::pickle::Limits;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    assert!(run_one(Target::File, data, &limits).is_some(), "panicked");
});
