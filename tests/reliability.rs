//! No silent wrong results and no crash on ordinary mistakes: each case asserts the exact error
//! kind or message and the exit code.

mod common;

use common::{fixture, tlens};
use std::path::{Path, PathBuf};
use std::process::Command;
use tlens::{Error, Hook, HookedTransformer, RunFile};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tlens-rel-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn stdout_write_errors_are_errors_not_panics() {
    if !Path::new("/dev/full").exists() {
        return;
    }
    let file = fixture("demo_small.pth");
    for args in [
        vec!["inspect", s(&file), "--json"],
        vec!["eval", s(&file)],
        vec!["predict", s(&file), "1", "2"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tlens"))
            .args(&args)
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("I/O error") && err.lines().count() == 1,
            "{err}"
        );
    }
}

#[test]
fn figures_are_written_whole_or_not_at_all_and_errors_name_them() {
    let dir = tmp("plots");
    // A folder where a figure should go: the rename fails; the error names the figure and no
    // temporary file is left.
    std::fs::create_dir_all(dir.join("loss_curves.png")).unwrap();
    std::fs::write(dir.join("loss_curves.png/x"), b"keep").unwrap();
    let (code, _, err) = tlens(&[
        "analyze",
        s(&fixture("demo_small.pth")),
        "--no-checkpoints",
        "--plots",
        s(&dir),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("loss_curves.png"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn stale_temporary_files_of_killed_saves_are_removed() {
    let dir = tmp("stale");
    let out = dir.join("run.safetensors");
    // A save by a process that no longer exists (pid 4000000000 is above Linux's pid_max).
    let stale = dir.join(".run.safetensors.tmp4000000000");
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    let other = dir.join(".other.tmp4000000000");
    std::fs::write(&other, b"x").unwrap();
    let (code, _, err) = tlens(&["convert", s(&fixture("demo_small.pth")), s(&out)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.exists());
    if cfg!(target_os = "linux") {
        assert!(
            !stale.exists(),
            "the stale temp file of the same target is removed"
        );
    }
    assert!(other.exists(), "other targets' files are left alone");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_small_file_rewritten_while_open_cannot_kill_tlens() {
    // Small files are read into memory: truncating the file after opening it changes nothing
    // (a mapped file would raise SIGBUS on the next read).
    let dir = tmp("sigbus");
    let path = dir.join("run.pth");
    std::fs::copy(fixture("demo_small.pth"), &path).unwrap();
    let run = RunFile::open(&path).unwrap();
    std::fs::File::create(&path).unwrap().set_len(0).unwrap();
    let loaded = run.load().unwrap();
    assert_eq!(loaded.checkpoints.len(), 3);
    std::fs::remove_dir_all(&dir).ok();
}

/// A torch file holding `model` (a tiny state dict under a hostile name) plus `extra` pickle
/// bytes for one more key.
fn crafted(name: Option<&str>, extra_key: &str, extra: &[u8]) -> Vec<u8> {
    let mut run = RunFile::open(fixture("demo_small.pth"))
        .unwrap()
        .load()
        .unwrap();
    if let Some(name) = name {
        let t = run.model.get("embed.W_E").unwrap().clone();
        run.model.insert(name.to_string(), t);
    }
    let mut w = tlens::io::torch::TorchWriter::new(2);
    let root = run.to_pickle(&mut w, tlens::ConfigStyle::Tl2Object);
    let mut bytes = w.to_bytes(&root).unwrap();
    if !extra.is_empty() {
        // Add `extra_key: <extra>` through the pickle: rewrite data.pkl's last SETITEMS.
        let mut p = tlens::io::pickle::Pickler::new(2);
        p.value(&root).unwrap();
        let mut pkl = p.finish();
        assert_eq!(pkl.pop(), Some(b'.'));
        // The root dict is on the stack: SETITEM extra_key extra.
        pkl.push(b'X');
        pkl.extend_from_slice(&(extra_key.len() as u32).to_le_bytes());
        pkl.extend_from_slice(extra_key.as_bytes());
        pkl.extend_from_slice(extra);
        pkl.extend_from_slice(b"s.");
        bytes = w.to_bytes_with_pickle(&pkl).unwrap();
    }
    bytes
}

#[test]
fn names_from_a_file_reach_the_terminal_escaped() {
    let dir = tmp("escape");
    let path = dir.join("esc.pth");
    std::fs::write(&path, crafted(Some("\x1b[31mred\x07"), "", b"")).unwrap();
    let (code, out, err) = tlens(&["inspect", s(&path)]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
    assert!(out.contains("\\u{1b}[31mred\\u{7}"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn callables_in_a_valid_run_are_named_in_one_warning() {
    let dir = tmp("callables");
    let path = dir.join("armed.pth");
    // `payload: os.system` and `hook: builtins.eval` referenced (never called by tlens).
    let mut extra = b"cos\nsystem\ns".to_vec();
    extra.extend_from_slice(b"X\x04\x00\x00\x00hookcbuiltins\neval\n");
    std::fs::write(&path, crafted(None, "payload", &extra)).unwrap();
    for args in [vec!["inspect", s(&path)], vec!["eval", s(&path)]] {
        let (code, _, err) = tlens(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
        assert_eq!(warnings.len(), 1, "{err}");
        assert!(
            warnings[0].contains("os.system") && warnings[0].contains("builtins.eval"),
            "{err}"
        );
        assert!(warnings[0].contains("ran none of them"), "{err}");
    }
    // The shipped runs name no callables.
    let (_, _, err) = tlens(&["inspect", s(&fixture("grokked_p113.pth"))]);
    assert!(!err.contains("warning"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hooks_that_match_nothing_are_errors() {
    let run = RunFile::open(fixture("demo_small.pth")).unwrap();
    let model = HookedTransformer::new(run.config.clone().unwrap(), run.model().unwrap()).unwrap();
    let tokens = ndarray::Array2::from_shape_vec((1, 3), vec![1u32, 2, 23]).unwrap();
    for bad in ["blocks.0.attn.hook_zz", "zz0", "blocks.7.hook_resid_post"] {
        let mut hooks = [Hook::new(bad, |_, _| None)];
        let err = model.run_with_hooks(&tokens, &mut hooks).unwrap_err();
        assert!(matches!(err, Error::UnknownHook { .. }), "{bad}: {err}");
    }
    let mut hooks = [Hook::filtered(|n| n.contains("nothing"), |_, _| None)];
    assert!(matches!(
        model.run_with_hooks(&tokens, &mut hooks).unwrap_err(),
        Error::UnknownHook { .. }
    ));
    // TL's (name, layer) form resolves and fires.
    let mut fired = 0;
    let mut hooks = [Hook::new(("z", 0i64), |z, _| {
        fired += 1;
        Some(z * 0.0)
    })];
    let ablated = model.run_with_hooks(&tokens, &mut hooks).unwrap();
    drop(hooks);
    assert_eq!(fired, 1);
    assert_ne!(ablated, model.forward(&tokens).unwrap());
}

#[test]
fn cache_names_are_tl_names_and_unknown_ones_are_errors() {
    let dir = tmp("names");
    let out = dir.join("c.npz");
    let file = fixture("demo_small.pth");
    let (code, _, err) = tlens(&[
        "cache",
        s(&file),
        "--out",
        s(&out),
        "--inputs",
        "1,2",
        "--names",
        "nonsense",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no hook point matches 'nonsense'"), "{err}");
    assert!(!out.exists());
    let (code, _, err) = tlens(&[
        "cache",
        s(&file),
        "--out",
        s(&out),
        "--inputs",
        "1,2",
        "--names",
        "post,k0",
    ]);
    assert_eq!(code, 0, "{err}");
    let mut names = tlens::io::npz::NpzReader::open(&out).unwrap().names();
    names.sort();
    assert_eq!(
        names,
        [
            "blocks.0.attn.hook_k",
            "blocks.0.mlp.hook_post",
            "logits",
            "tokens"
        ],
        "`post` is the MLP's hook_post, not hook_resid_post"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn train_flags_are_validated_before_anything_runs() {
    let dir = tmp("train");
    let out = dir.join("r.pth");
    for (flags, name) in [
        (vec!["--epochs", "0"], "--epochs"),
        (vec!["--lr", "-1"], "--lr"),
        (vec!["--lr", "nan"], "--lr"),
        (vec!["--lr", "inf"], "--lr"),
        (vec!["--weight-decay", "-1"], "--weight-decay"),
        (vec!["--beta1", "1.5"], "--beta1"),
        (vec!["--beta2", "2"], "--beta2"),
        (vec!["--frac-train", "1.0"], "--frac-train"),
        (vec!["--frac-train", "0"], "--frac-train"),
        (vec!["--p", "2"], "--p"),
        (vec!["--p", "4"], "--p"),
        (vec!["--p", "100001"], "--p"),
        (vec!["--p", "4294967297"], "--p"),
        (vec!["--checkpoint-every", "0"], "--checkpoint-every"),
        (vec!["--eval-every", "0"], "--eval-every"),
    ] {
        let mut args = vec!["train", "--out", s(&out)];
        args.extend(&flags);
        let (code, _, err) = tlens(&args);
        assert_eq!(code, 1, "{flags:?}: {err}");
        assert!(
            err.contains(name) && err.lines().count() == 1,
            "{flags:?}: {err}"
        );
        assert!(!out.exists(), "{flags:?} wrote a file");
    }
    // Wrong output kinds are refused before training.
    for (o, why) in [
        (dir.join("x.npz"), "extension"),
        (PathBuf::from("/dev/null"), "not a regular file"),
        (dir.join("missing/r.pth"), "does not exist"),
    ] {
        let (code, _, err) = tlens(&["train", "--out", s(&o), "--epochs", "1"]);
        assert_eq!(code, 1, "{o:?}: {err}");
        assert!(err.contains(why), "{o:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resume_refuses_conflicting_settings_and_eval_every_keeps_epochs() {
    let dir = tmp("resume");
    let out = dir.join("r.pth");
    let (code, _, err) = tlens(&[
        "train",
        "--out",
        s(&out),
        "--p",
        "23",
        "--epochs",
        "30",
        "--eval-every",
        "10",
        "--checkpoint-every",
        "10",
    ]);
    assert_eq!(code, 0, "{err}");
    let run = RunFile::open(&out).unwrap();
    assert_eq!(run.test_losses.len(), 3);
    assert_eq!(
        run.test_every(),
        Some(10),
        "test loss i was taken at epoch 10·i"
    );
    let (code, _, err) = tlens(&[
        "train",
        "--out",
        s(&out),
        "--resume",
        "--p",
        "29",
        "--lr",
        "0.01",
        "--epochs",
        "40",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--p 29 (the run has 23)") && err.contains("--lr 0.01 (the run has 0.001)"),
        "{err}"
    );
    // The same settings (or none) and more epochs: resumed.
    let (code, _, err) = tlens(&[
        "train",
        "--out",
        s(&out),
        "--resume",
        "--p",
        "23",
        "--epochs",
        "40",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(RunFile::open(&out).unwrap().train_losses.len(), 40);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn outputs_are_checked_before_the_work() {
    let dir = tmp("outputs");
    let file = fixture("demo_small.pth");
    let (code, _, err) = tlens(&["cache", s(&file), "--out", s(&dir.join("c.txt"))]);
    assert_eq!(code, 1);
    assert!(err.contains("extension 'txt'"), "{err}");
    // Without --inputs, cache says what a whole-dataset cache would be instead of writing it.
    let npz = dir.join("all.npz");
    let (code, _, err) = tlens(&["cache", s(&file), "--out", s(&npz)]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--inputs all") && err.contains("529 inputs"),
        "{err}"
    );
    assert!(!npz.exists());
    let t = std::time::Instant::now();
    let (code, _, err) = tlens(&[
        "analyze",
        s(&fixture("grokked_p113.pth")),
        "--json",
        "/missing/dir/a.json",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    assert!(
        t.elapsed().as_secs_f64() < 5.0,
        "checked before the analysis"
    );
    // A symbolic link and a FIFO are not replaced by regular files.
    #[cfg(unix)]
    {
        let target = dir.join("target.safetensors");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.join("link.safetensors");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let (code, _, err) = tlens(&["convert", s(&file), s(&link)]);
        assert_eq!(code, 1);
        assert!(err.contains("symbolic link"), "{err}");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        let fifo = dir.join("fifo.safetensors");
        if Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .is_ok_and(|s| s.success())
        {
            let (code, _, err) = tlens(&["convert", s(&file), s(&fifo)]);
            assert_eq!(code, 1);
            assert!(err.contains("not a regular file"), "{err}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn models_that_do_not_fit_the_task_are_refused_in_one_line() {
    for f in [
        "models/rms_solu_split.pth",
        "models/attn_only_lnpre_bidir.pth",
    ] {
        let path = fixture(f);
        for args in [
            vec!["eval", s(&path)],
            vec!["predict", s(&path), "1", "2"],
            vec!["cache", s(&path), "--out", "/tmp/never.npz"],
        ] {
            let (code, out, err) = tlens(&args);
            assert_eq!(code, 1, "{f} {args:?}: {err}");
            assert!(
                err.contains("not a modular-arithmetic model") && err.lines().count() == 1,
                "{f}: {err}"
            );
            assert!(out.is_empty(), "{f}: printed {out}");
        }
    }
}

#[test]
fn non_finite_weights_are_said_not_printed_as_answers() {
    let dir = tmp("nan");
    let mut run = RunFile::open(fixture("demo_small.pth"))
        .unwrap()
        .load()
        .unwrap();
    let mut w = run.model.remove("unembed.W_U").unwrap();
    if let tlens::Tensor::F32(a) = &mut w {
        a[[0, 0]] = f32::NAN;
    }
    run.model.insert("unembed.W_U", w);
    let path = dir.join("nan.pth");
    run.save_pth(&path, tlens::ConfigStyle::Tl2Object).unwrap();
    let (code, out, err) = tlens(&["predict", s(&path), "1", "2"]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("not finite"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
