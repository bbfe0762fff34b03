//! Hostile files cannot exhaust the machine: every crafted input below makes `tlens` exit 0 or
//! 1 — never a signal — within 10 s, under an address-space limit, with a peak resident
//! memory (measured by the kernel for the child process) under 1 GiB plus the file's size.
//! The files are built here, byte by byte, the way an attacker would write them.
//!
//! One test function runs the children one after another, so that the peak resident size the
//! kernel reports for waited-for children (getrusage RUSAGE_CHILDREN) is this file's alone.

#[path = "support/fuzz.rs"]
#[allow(dead_code)]
mod fuzz;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// A pickle written opcode by opcode (protocol 2).
struct P(Vec<u8>);

impl P {
    fn new() -> P {
        P(vec![0x80, 2])
    }
    fn op(&mut self, b: &[u8]) -> &mut P {
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut P {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(&mut self, i: i64) -> &mut P {
        // LONG1 with 8 bytes: any i64.
        self.0.extend_from_slice(&[0x8a, 8]);
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    fn global(&mut self, m: &str, n: &str) -> &mut P {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
        self
    }
    fn put(&mut self, i: u32) -> &mut P {
        self.0.push(b'r');
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    fn get(&mut self, i: u32) -> &mut P {
        self.0.push(b'j');
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    fn ints_tuple(&mut self, v: &[i64]) -> &mut P {
        self.op(b"(");
        for &x in v {
            self.int(x);
        }
        self.op(b"t")
    }
    /// `_rebuild_tensor_v2(storage key, offset 0, shape, stride)` over a float storage of
    /// `numel` elements.
    fn tensor(&mut self, key: &str, numel: i64, shape: &[i64], stride: &[i64]) -> &mut P {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        self.op(b"(")
            .str("storage")
            .global("torch", "FloatStorage")
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b"tQ");
        self.int(0).ints_tuple(shape).ints_tuple(stride).op(&[0x89]);
        self.global("collections", "OrderedDict")
            .op(b")R")
            .op(b"tR")
    }
    /// Lists of `fanout` references to the previous level, `levels` deep (memo 0..levels):
    /// fanout^levels values when expanded.
    fn laughs(&mut self, levels: u32, fanout: usize) -> &mut P {
        self.op(b"]").put(0);
        for level in 1..levels {
            self.op(b"(");
            for _ in 0..fanout {
                self.get(level - 1);
            }
            self.op(b"l").put(level);
        }
        self
    }
    fn stop(&mut self) -> Vec<u8> {
        self.0.push(b'.');
        std::mem::take(&mut self.0)
    }
}

/// A torch zip file holding `pkl` and raw storages.
fn torch_zip(pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(pkl).unwrap();
        for (k, b) in storages {
            z.start_file(format!("archive/data/{k}"), opts).unwrap();
            z.write_all(b).unwrap();
        }
        z.start_file("archive/version", opts).unwrap();
        z.write_all(b"3\n").unwrap();
        z.finish().unwrap();
    }
    buf.into_inner()
}

fn tmp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("tlens-budget-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[repr(C)]
struct RUsage {
    utime: [i64; 2],
    stime: [i64; 2],
    maxrss_kb: i64,
    rest: [i64; 13],
}

extern "C" {
    fn getrusage(who: i32, usage: *mut RUsage) -> i32;
}

/// Peak resident size (bytes) of the largest child waited for so far.
fn children_peak_rss() -> u64 {
    let mut u = RUsage {
        utime: [0; 2],
        stime: [0; 2],
        maxrss_kb: 0,
        rest: [0; 13],
    };
    // SAFETY: getrusage writes one struct rusage (this layout on Linux x86-64 / aarch64).
    let rc = unsafe { getrusage(-1, &mut u) };
    assert_eq!(rc, 0);
    u.maxrss_kb as u64 * 1024
}

/// Run tlens under an address-space limit; returns (exit code, stderr, seconds). A signal
/// (an abort, an out-of-memory kill) fails the test.
fn run_limited(args: &[&str]) -> (i32, String, f64) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tlens"));
    cmd.args(args);
    // 8 GiB of address space: far below what the unbudgeted reader asked for (4 TiB, 100 GiB),
    // far above what thread stacks and the binary reserve.
    fuzz::limit_address_space(&mut cmd, 8 << 30);
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let code = out.status.code().unwrap_or_else(|| {
        panic!(
            "tlens {args:?} ended by a signal: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        code,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        secs,
    )
}

struct Case {
    what: &'static str,
    file: PathBuf,
    args: Vec<&'static str>,
    /// Text the error must contain.
    expect: &'static str,
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn hostile_files_end_with_exit_1_in_bounded_time_and_memory() {
    let dir = tmp_dir();
    let mut cases = Vec::new();

    // 1. A broadcast tensor: shape (2^20, 2^20), strides (0, 0), over one stored float (4 TiB
    //    if materialised), as a model weight and as train_indices.
    let mut p = P::new();
    p.op(b"}")
        .op(b"(")
        .str("model")
        .op(b"}")
        .op(b"(")
        .str("embed.W_E");
    p.tensor("0", 1, &[1 << 20, 1 << 20], &[0, 0])
        .op(b"u")
        .op(b"u");
    let f = write(
        &dir,
        "broadcast.pth",
        &torch_zip(&p.stop(), &[("0", vec![0; 4])]),
    );
    for (args, expect) in [
        (
            vec!["convert", "FILE", "OUT.safetensors"],
            "limit exceeded at",
        ),
        (
            vec!["inspect", "FILE", "--values"],
            "limit exceeded at model.embed.W_E",
        ),
        // No config: refused before any tensor is read.
        (vec!["eval", "FILE"], "not a modular-arithmetic model"),
    ] {
        cases.push(Case {
            what: "broadcast tensor",
            file: f.clone(),
            args,
            expect,
        });
    }
    let mut p = P::new();
    p.op(b"}")
        .op(b"(")
        .str("model")
        .op(b"}")
        .op(b"(")
        .str("embed.W_E");
    p.tensor("0", 4, &[2, 2], &[2, 1]).op(b"u");
    p.str("train_indices")
        .tensor("1", 1, &[1 << 20, 1 << 20], &[0, 0])
        .op(b"u");
    let f = write(
        &dir,
        "broadcast_indices.pth",
        &torch_zip(&p.stop(), &[("0", vec![0; 16]), ("1", vec![0; 4])]),
    );
    cases.push(Case {
        what: "broadcast train_indices",
        file: f,
        args: vec!["inspect", "FILE"],
        expect: "limit exceeded at train_indices",
    });
    // 2^28 elements (1 GiB materialised): over the budget left after the pickle's tree.
    let mut p = P::new();
    p.op(b"}").op(b"(").str("w");
    p.tensor("0", 1, &[1 << 14, 1 << 14], &[0, 0]).op(b"u");
    let f = write(
        &dir,
        "broadcast_1g.pth",
        &torch_zip(&p.stop(), &[("0", vec![0; 4])]),
    );
    cases.push(Case {
        what: "1 GiB broadcast, convert",
        file: f,
        args: vec!["convert", "FILE", "OUT.safetensors"],
        expect: "limit exceeded at",
    });

    // 2. One 1 MB string referenced 100,000 times (100 GB expanded).
    let mut p = P::new();
    p.op(b"]").op(b"(").str(&"x".repeat(1 << 20)).put(0);
    for _ in 0..100_000 {
        p.get(0);
    }
    p.op(b"e");
    let f = write(&dir, "shared_string.pth", &torch_zip(&p.stop(), &[]));
    cases.push(Case {
        what: "shared 1 MB string",
        file: f,
        args: vec!["inspect", "FILE"],
        expect: "limit exceeded",
    });

    // 3. "Billion laughs": 30 levels of lists, each holding the previous level 10 times.
    let mut p = P::new();
    p.laughs(30, 10);
    let f = write(&dir, "laughs.pth", &torch_zip(&p.stop(), &[]));
    cases.push(Case {
        what: "billion laughs",
        file: f,
        args: vec!["inspect", "FILE", "--json"],
        expect: "limit exceeded",
    });

    // 4. One state dict repeated 100,000 times as checkpoints (each a 1 MB tensor: 100 GB).
    let mut p = P::new();
    p.op(b"}")
        .op(b"(")
        .str("model")
        .op(b"}")
        .op(b"(")
        .str("embed.W_E");
    p.tensor("0", 1 << 18, &[512, 512], &[512, 1])
        .op(b"u")
        .put(0);
    p.str("checkpoints").op(b"(");
    for _ in 0..100_000 {
        p.get(0);
    }
    p.op(b"l").op(b"u");
    let f = write(
        &dir,
        "repeated_checkpoint.pth",
        &torch_zip(&p.stop(), &[("0", vec![0; 1 << 20])]),
    );
    for args in [
        vec!["inspect", "FILE"],
        vec!["convert", "FILE", "OUT.safetensors"],
    ] {
        cases.push(Case {
            what: "one checkpoint repeated",
            file: f.clone(),
            args,
            expect: "",
        });
    }

    // 5. Persistent ids that each expand a shared exponential structure.
    let mut p = P::new();
    p.laughs(20, 8);
    p.op(b"0").op(b"(");
    for _ in 0..2000 {
        p.op(b"(")
            .str("storage")
            .get(19)
            .str("0")
            .str("cpu")
            .int(1)
            .op(b"tQ");
    }
    p.op(b"l");
    let f = write(
        &dir,
        "persid.pth",
        &torch_zip(&p.stop(), &[("0", vec![0; 4])]),
    );
    cases.push(Case {
        what: "repeated persistent ids",
        file: f,
        args: vec!["inspect", "FILE"],
        expect: "",
    });

    // 6. A config with n_layers 2^40.
    let cfg = r#"{"n_layers": 1099511627776, "d_model": 32, "n_ctx": 3, "d_head": 8,
        "n_heads": 4, "d_mlp": 128, "d_vocab": 24, "d_vocab_out": 23}"#;
    let mut meta = std::collections::HashMap::new();
    meta.insert("config".to_string(), cfg.replace('\n', " "));
    let t = tlens::Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[24, 32])));
    let bytes = tlens::io::safetensors::to_bytes(&[("embed.W_E".to_string(), &t)], meta).unwrap();
    let f = write(&dir, "layers.safetensors", &bytes);
    cases.push(Case {
        what: "n_layers 2^40",
        file: f,
        args: vec!["eval", "FILE"],
        expect: "n_layers = 1099511627776 is outside",
    });

    let mut peak_allowed = 0u64;
    for c in &cases {
        let out = dir.join("out.safetensors");
        let args: Vec<&str> = c
            .args
            .iter()
            .map(|a| match *a {
                "FILE" => c.file.to_str().unwrap(),
                "OUT.safetensors" => out.to_str().unwrap(),
                a => a,
            })
            .collect();
        let (code, err, secs) = run_limited(&args);
        let size = std::fs::metadata(&c.file).unwrap().len();
        peak_allowed = peak_allowed.max((1 << 30) + size);
        let peak = children_peak_rss();
        println!(
            "{:<28} {:<32} exit {code}  {secs:>5.2} s  peak RSS so far {} MB  ({})",
            c.what,
            args[0..1].join(" ") + " " + args.get(2).unwrap_or(&""),
            peak >> 20,
            err.lines().next().unwrap_or("")
        );
        assert!(code == 0 || code == 1, "{}: exit {code}", c.what);
        if !c.expect.is_empty() {
            assert_eq!(code, 1, "{}: {err}", c.what);
            assert!(err.contains(c.expect), "{}: {err}", c.what);
            assert!(err.contains("error: "), "{}: {err}", c.what);
        }
        assert!(
            err.len() < 4096,
            "{}: an error message of {} bytes",
            c.what,
            err.len()
        );
        assert!(secs <= 10.0, "{}: {secs} s", c.what);
        assert!(
            peak <= peak_allowed,
            "{}: peak RSS {} MB over {} MB",
            c.what,
            peak >> 20,
            peak_allowed >> 20
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_memory_budget_is_a_flag() {
    // A broadcast tensor of 64 MiB: refused under a 16 MiB budget, read under the default.
    let dir = tmp_dir().join("flag");
    std::fs::create_dir_all(&dir).unwrap();
    let mut p = P::new();
    p.op(b"}").op(b"(").str("w");
    p.tensor("0", 1, &[4096, 4096], &[0, 0]).op(b"u");
    let f = write(
        &dir,
        "b64m.pth",
        &torch_zip(&p.stop(), &[("0", vec![0; 4])]),
    );
    let f = f.to_str().unwrap();
    let out = dir.join("o.safetensors");
    let out = out.to_str().unwrap();
    let (code, err, _) = run_limited(&["convert", f, out, "--memory-budget", "16M"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("limit exceeded at"), "{err}");
    let (code, err, _) = run_limited(&["convert", f, out]);
    assert_eq!(code, 0, "{err}");
    let back = tlens::io::safetensors::SafetensorsFile::open(out).unwrap();
    assert_eq!(back.info("w").unwrap().1, vec![4096, 4096]);
    let (code, err, _) = run_limited(&["inspect", f, "--memory-budget", "lots"]);
    assert_eq!(code, 2, "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
