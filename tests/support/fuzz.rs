//! An in-tree mutational fuzzer for the readers (no nightly toolchain or libFuzzer needed).
//!
//! Seeds are real files (the fixtures) and their pickles; each iteration applies a few
//! structure-blind mutations — bit flips, interesting bytes, little-endian length fields set to
//! boundary values, insertions, deletions, truncations, splices — and runs the full read path
//! under `catch_unwind`. The property is simply: every input either loads or returns an
//! [`tlens::Error`]; a panic is a bug. `cargo run --release --example fuzz -- --iters N` runs it
//! at length; `tests/hostile.rs` runs a short smoke pass in CI.

use std::panic::{catch_unwind, AssertUnwindSafe};
use tlens::io::pickle::{unpickle, Limits, Value};
use tlens::run::RunFile;

/// What a fuzzing session saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub inputs: u64,
    pub loaded: u64,
    pub errors: u64,
    /// Inputs that panicked (kept so they can be saved and replayed).
    pub panics: Vec<Vec<u8>>,
}

/// xorshift64* — deterministic, dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545f4914f6cdd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Apply 1–4 random mutations to `data`; `other` provides splice material.
pub fn mutate(data: &mut Vec<u8>, other: &[u8], rng: &mut Rng) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = [0u8, 0xff, 0x7f, 0x80, b'.', b'(', b'Q', b'R'][rng.below(8)];
            }
            2 if len >= 8 => {
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let i = rng.below(len - w + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                data[i..i + w].copy_from_slice(&v[..w]);
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = (1 + rng.below(64)).min(len - i);
                data.drain(i..i + n);
            }
            5 if len > 0 => data.truncate(rng.below(len)),
            6 if !other.is_empty() && len > 0 => {
                let i = rng.below(len);
                let j = rng.below(other.len());
                let n = (1 + rng.below(256)).min(other.len() - j).min(len - i);
                data[i..i + n].copy_from_slice(&other[j..j + n]);
            }
            _ if len > 1 => {
                // duplicate a chunk (repeats opcodes / records)
                let i = rng.below(len);
                let n = (1 + rng.below(32)).min(len - i);
                let chunk = data[i..i + n].to_vec();
                let at = rng.below(len);
                data.splice(at..at, chunk);
            }
            _ => {}
        }
    }
}

/// The read paths under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Whole files: container + pickle + every tensor.
    File,
    /// Bare pickles, with torch's storage persistent ids resolved.
    Pickle,
}

/// Run one input through `target`'s read path: `Some(loaded)`, or `None` if it panicked.
/// (Aborts — allocation failure, stack overflow — end the process: run it in a child to see
/// them, as `examples/fuzz.rs` does.)
pub fn run_one(target: Target, input: &[u8], limits: &Limits) -> Option<bool> {
    catch_unwind(AssertUnwindSafe(|| match target {
        Target::File => {
            // The run path (every tensor materialised), and the tree path of `inspect` /
            // `convert` (every tensor read by its dotted path).
            let run = RunFile::from_bytes(input.to_vec())
                .and_then(|r| r.load())
                .is_ok();
            let tree = tlens::io::tree::AnyFile::from_bytes(input.to_vec())
                .and_then(|f| {
                    tlens::io::tree::describe(&f, tlens::io::tree::Options { values: true })?;
                    tlens::io::tree::read_tensors(&f)
                })
                .is_ok();
            run || tree
        }
        Target::Pickle => {
            let mut load = |pid: Value, pos: usize| {
                Ok(Value::Storage(std::sync::Arc::new(
                    tlens::io::torch::storage_from_pid(pid, pos, false)?,
                )))
            };
            unpickle(input, &mut load, limits).is_ok()
        }
    }))
    .ok()
}

/// The reader limits fuzzing runs under: small, so that the limit paths are reached quickly
/// (the logic is the same as with the defaults).
pub fn fuzz_limits() -> Limits {
    Limits {
        max_values: 200_000,
        max_bytes_len: 1 << 20,
        max_total_bytes: 16 << 20,
        ..Limits::default()
    }
}

/// Fuzz `target` from `seeds` for `iters` inputs.
pub fn fuzz(target: Target, seeds: &[Vec<u8>], iters: u64, seed: u64) -> Report {
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let limits = fuzz_limits();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for _ in 0..iters {
        let a = &seeds[rng.below(seeds.len())];
        let b = &seeds[rng.below(seeds.len())];
        let mut input = a.clone();
        mutate(&mut input, b, &mut rng);
        report.inputs += 1;
        match run_one(target, &input, &limits) {
            Some(true) => report.loaded += 1,
            Some(false) => report.errors += 1,
            None => report.panics.push(input),
        }
    }
    std::panic::set_hook(prev);
    report
}

/// The pickles (`data.pkl`) inside torch zip files, as fuzz seeds.
pub fn pickles_of(files: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in files {
        let Ok(cd) = tlens::io::zipdir::central_directory(f) else {
            continue;
        };
        for e in cd.iter().filter(|e| e.name.ends_with("data.pkl")) {
            if let Ok(r) =
                tlens::io::zipdir::data_range(f, &e.name, e.header_start, e.compressed_size)
            {
                out.push(f[r].to_vec());
            }
        }
    }
    out
}

/// `setrlimit(RLIMIT_AS, bytes)` in a child process before it runs (Linux; elsewhere no limit):
/// the fuzzer and the budget tests run readers under it, so an allocation past the limit ends
/// the child visibly instead of exhausting the machine.
#[cfg(target_os = "linux")]
pub fn limit_address_space(cmd: &mut std::process::Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    #[repr(C)]
    struct RLimit {
        cur: u64,
        max: u64,
    }
    extern "C" {
        fn setrlimit(resource: i32, rlim: *const RLimit) -> i32;
    }
    const RLIMIT_AS: i32 = 9;
    // SAFETY: setrlimit is async-signal-safe and only changes the child's own limit.
    unsafe {
        cmd.pre_exec(move || {
            let l = RLimit {
                cur: bytes,
                max: bytes,
            };
            if setrlimit(RLIMIT_AS, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub fn limit_address_space(_: &mut std::process::Command, _: u64) {}
