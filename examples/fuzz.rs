//! Fuzz the readers: `cargo run --release --example fuzz -- [--iters N] [--seed S]
//! [--minutes M] [--as-limit-mb MB]`.
//!
//! Seeds are the fixtures (the TL demo files, the 2022 layouts, the format variants). The
//! inputs are made here and run in a child process (this program with `--worker`) under an
//! address-space limit, one at a time over a pipe: a panic is caught in the child, and an
//! abort (an allocation the limit refuses, a stack overflow), a signal or an input that takes
//! longer than `--timeout-s` ends the child — the parent sees which input did it, saves it to
//! `fuzz-crashes/`, and starts a new child. Every input must load or return an error, within
//! the memory limit and the time limit.

#[path = "../tests/support/fuzz.rs"]
#[allow(dead_code)]
mod fuzz;

use fuzz::{limit_address_space, mutate, pickles_of, run_one, Rng, Target};
use std::io::{BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("number"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--worker") {
        worker();
        return;
    }
    let iters = arg(&args, "--iters", 100_000);
    let minutes = arg(&args, "--minutes", 0);
    let seed = arg(&args, "--seed", 1);
    let as_limit_mb = arg(&args, "--as-limit-mb", 4096);
    let timeout = Duration::from_secs(arg(&args, "--timeout-s", 10));
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
    let names = [
        "demo_small.pth",
        "demo_small_legacy.pth",
        "demo_small_proto4.pth",
        "demo_small_tl3.pth",
        "demo_small.safetensors",
        "original_small.pth",
        "saved_runs/run_noconfig.pth",
        "saved_runs/legacy_proto1.pth",
        "saved_runs/legacy_proto5.pth",
        "saved_runs/torchscript_2022.pt",
        "saved_runs/sweep_frac_train.pth",
        "saved_runs/numpy_array.pth",
        "saved_runs/unsigned.pth",
        "saved_runs/unsigned.safetensors",
    ];
    let files: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(format!("{dir}/{n}")).expect("fixture"))
        .collect();
    let pickles = pickles_of(&files);
    let deadline = (minutes > 0).then(|| Instant::now() + Duration::from_secs(60 * minutes));
    let mut crashes = 0;
    let mut rng = Rng::new(seed);
    let mut child = Worker::start(as_limit_mb);
    let start = Instant::now();
    let (mut n, mut loaded, mut errors) = (0u64, 0u64, 0u64);
    let mut slowest = Duration::ZERO;
    // Whole files ten times less often than bare pickles (they are larger and slower).
    while deadline.map_or(n < iters, |d| Instant::now() < d) {
        let (target, seeds) = if n % 10 == 9 {
            (Target::File, &files)
        } else {
            (Target::Pickle, &pickles)
        };
        let a = &seeds[rng.below(seeds.len())];
        let b = &seeds[rng.below(seeds.len())];
        let mut input = a.clone();
        mutate(&mut input, b, &mut rng);
        n += 1;
        let t = Instant::now();
        match child.run(target, &input, timeout) {
            Outcome::Loaded => loaded += 1,
            Outcome::Error => errors += 1,
            bad => {
                crashes += 1;
                std::fs::create_dir_all("fuzz-crashes").unwrap();
                let path = format!("fuzz-crashes/{target:?}-{n}.bin");
                std::fs::write(&path, &input).unwrap();
                eprintln!(
                    "{} on input {n} ({} bytes): saved {path}",
                    bad.describe(),
                    input.len()
                );
                child = Worker::start(as_limit_mb);
            }
        }
        slowest = slowest.max(t.elapsed());
    }
    println!(
        "{n} inputs in {:.1} s ({loaded} loaded, {errors} errors, {crashes} crashes: panics, \
         aborts, signals or time-outs); address-space limit {as_limit_mb} MB; slowest input {:.3} s",
        start.elapsed().as_secs_f64(),
        slowest.as_secs_f64()
    );
    if crashes > 0 {
        std::process::exit(1);
    }
}

enum Outcome {
    Loaded,
    Error,
    Panicked,
    Died(String),
    TimedOut,
}

impl Outcome {
    fn describe(&self) -> String {
        match self {
            Outcome::Loaded => "loaded".into(),
            Outcome::Error => "error".into(),
            Outcome::Panicked => "panic".into(),
            Outcome::Died(status) => format!("worker died ({status})"),
            Outcome::TimedOut => "time-out".into(),
        }
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<u8>,
}

impl Worker {
    fn start(as_limit_mb: u64) -> Worker {
        let exe = std::env::current_exe().expect("own path");
        let mut cmd = Command::new(exe);
        cmd.arg("--worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        limit_address_space(&mut cmd, as_limit_mb << 20);
        let mut child = cmd.spawn().expect("worker starts");
        let stdin = child.stdin.take().expect("piped");
        let stdout: ChildStdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut b = [0u8; 1];
            while r.read_exact(&mut b).is_ok() {
                if tx.send(b[0]).is_err() {
                    break;
                }
            }
        });
        Worker {
            child,
            stdin,
            replies: rx,
        }
    }

    fn run(&mut self, target: Target, input: &[u8], timeout: Duration) -> Outcome {
        let mut msg = vec![matches!(target, Target::File) as u8];
        msg.extend_from_slice(&(input.len() as u64).to_le_bytes());
        msg.extend_from_slice(input);
        if self
            .stdin
            .write_all(&msg)
            .and_then(|_| self.stdin.flush())
            .is_err()
        {
            return self.died();
        }
        match self.replies.recv_timeout(timeout) {
            Ok(1) => Outcome::Loaded,
            Ok(0) => Outcome::Error,
            Ok(_) => Outcome::Panicked,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Outcome::TimedOut
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => self.died(),
        }
    }

    fn died(&mut self) -> Outcome {
        let status = self.child.wait().map(|s| format!("{s}"));
        Outcome::Died(status.unwrap_or_else(|e| e.to_string()))
    }
}

/// The child: read (target, length, bytes) records from stdin, answer 1 (loaded), 0 (error)
/// or 2 (panicked) for each.
fn worker() {
    let limits = fuzz::fuzz_limits();
    std::panic::set_hook(Box::new(|_| {}));
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    loop {
        let mut head = [0u8; 9];
        if stdin.read_exact(&mut head).is_err() {
            return;
        }
        let n = u64::from_le_bytes(head[1..].try_into().unwrap()) as usize;
        let mut input = vec![0u8; n];
        if stdin.read_exact(&mut input).is_err() {
            return;
        }
        let target = if head[0] == 1 {
            Target::File
        } else {
            Target::Pickle
        };
        let r = match run_one(target, &input, &limits) {
            Some(true) => 1u8,
            Some(false) => 0,
            None => 2,
        };
        if stdout.write_all(&[r]).and_then(|_| stdout.flush()).is_err() {
            return;
        }
    }
}
