//! The trainer against PyTorch: gradients of one step (TL init, seed 999; split seed 598),
//! finite differences, and refusal of configs it does not differentiate.

mod common;

use common::{fixture, manifest};
use ndarray::Axis;
use tlens::RunFile;

fn demo_batch() -> (ndarray::Array2<u32>, Vec<u32>) {
    let (tokens, labels) = tlens::task::modular_addition(113);
    let (tr, _) = tlens::task::demo_split(113, 0.3, 598);
    let rows: Vec<usize> = tr.iter().map(|&i| i as usize).collect();
    (
        tokens.select(Axis(0), &rows),
        rows.iter().map(|&i| labels[i]).collect(),
    )
}

#[test]
fn gradients_match_pytorch() {
    let m = manifest();
    let cfg = tlens::HookedTransformerConfig::grokking_demo(113);
    let sd = tlens::train::init_weights(&cfg).unwrap();
    let (tokens, labels) = demo_batch();
    let (loss, grads) = tlens::train::loss_and_grads(&cfg, &sd, &tokens, &labels).unwrap();
    let want_loss = m["init"]["demo_seed999_loss"].as_f64().unwrap();
    assert!(
        (loss - want_loss).abs() <= 1e-7 * want_loss,
        "loss {loss} vs {want_loss}"
    );
    let want = RunFile::open(fixture("init/demo_seed999_grads.safetensors"))
        .unwrap()
        .model()
        .unwrap();
    assert_eq!(grads.len(), want.len(), "one gradient per W_ parameter");
    for (name, g_ref) in want.iter() {
        let g_ref = g_ref.array::<f32>().unwrap();
        let g = grads.array::<f32>(name, Some(g_ref.shape())).unwrap();
        let scale = g_ref.iter().fold(0f32, |a, &b| a.max(b.abs()));
        let err = g
            .iter()
            .zip(g_ref.iter())
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        // Relative to the tensor's largest gradient (elementwise-relative is meaningless for
        // entries that are ~0).
        assert!(
            err <= 1e-5 * scale,
            "{name}: max |Δ| {err:e}, max |g| {scale:e}"
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    let run = RunFile::open(fixture("init/small_seed1.safetensors")).unwrap();
    let (tokens, labels) = tlens::task::modular_addition(23);
    check_finite_differences(
        run.config.clone().unwrap(),
        run.model().unwrap(),
        tokens,
        labels,
    );
}

#[test]
fn gradients_match_finite_differences_with_biases() {
    // The demo's biases are zero and frozen, but a resumed or imported run may carry non-zero
    // ones: they enter the tabulated pass's constant parts (b_O, b_in, b_out·W_U, b_U).
    let run = RunFile::open(fixture("init/small_seed1.safetensors")).unwrap();
    let mut sd = run.model().unwrap();
    for name in sd.names().map(str::to_string).collect::<Vec<_>>() {
        if name.contains(".b_") {
            let mut a = sd.array::<f32>(&name, None).unwrap().clone();
            for (i, x) in a.iter_mut().enumerate() {
                *x = 0.5 * ((i * 37 % 11) as f32 - 5.0) / 5.0;
            }
            sd.insert(name, tlens::Tensor::F32(a));
        }
    }
    // 40 inputs, so that the labels are unbalanced and Σ_n dlogits (which b_out·W_U's gradient
    // term multiplies) is far from zero.
    let (tokens, labels) = tlens::task::modular_addition(23);
    let tokens = tokens.slice(ndarray::s![..40, ..]).to_owned();
    check_finite_differences(
        run.config.clone().unwrap(),
        sd,
        tokens,
        labels[..40].to_vec(),
    );
}

fn check_finite_differences(
    cfg: tlens::HookedTransformerConfig,
    sd: tlens::StateDict,
    tokens: ndarray::Array2<u32>,
    labels: Vec<u32>,
) {
    // A small model and batch: central finite differences (h = 1e-3) of the loss on a few
    // weights of every matrix. The loss is computed from f32 activations, so the difference
    // quotient carries ~1e-4 of noise; the tolerance is 1% + 5e-4.
    let (loss0, grads) = tlens::train::loss_and_grads(&cfg, &sd, &tokens, &labels).unwrap();
    assert!(loss0.is_finite());
    for name in grads.names().map(str::to_string).collect::<Vec<_>>() {
        let g = grads.array::<f32>(&name, None).unwrap();
        // the largest-gradient entry and one other
        let (imax, _) =
            g.iter().enumerate().fold(
                (0, 0f32),
                |a, (i, &x)| if x.abs() > a.1 { (i, x.abs()) } else { a },
            );
        for idx in [imax, g.len() / 3] {
            let step = 1e-3f32;
            let eval = |delta: f32| {
                let mut s2 = sd.clone();
                let t = s2.get(&name).unwrap().clone();
                let mut a = t.array::<f32>().unwrap().clone();
                a.as_slice_mut().unwrap()[idx] += delta;
                s2.insert(name.clone(), tlens::Tensor::F32(a));
                tlens::train::loss_and_grads(&cfg, &s2, &tokens, &labels)
                    .unwrap()
                    .0
            };
            let fd = (eval(step) - eval(-step)) / (2.0 * step as f64);
            let an = g.as_slice().unwrap()[idx] as f64;
            assert!(
                (fd - an).abs() <= 1e-2 * an.abs() + 5e-4,
                "{name}[{idx}]: fd {fd:e} vs analytic {an:e}"
            );
        }
        // And along a direction that moves every entry (±1 in a fixed pseudo-random pattern):
        // the difference quotient against Σ g·u, which sees every entry's gradient at once.
        let u: Vec<f32> = (0..g.len())
            .map(|i| {
                if (i * 2654435761usize) >> 7 & 1 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let step = 1e-4f32;
        let eval = |delta: f32| {
            let mut s2 = sd.clone();
            let mut a = s2.get(&name).unwrap().array::<f32>().unwrap().clone();
            a.iter_mut().zip(&u).for_each(|(x, u)| *x += delta * u);
            s2.insert(name.clone(), tlens::Tensor::F32(a));
            tlens::train::loss_and_grads(&cfg, &s2, &tokens, &labels)
                .unwrap()
                .0
        };
        let fd = (eval(step) - eval(-step)) / (2.0 * step as f64);
        let an: f64 = g.iter().zip(&u).map(|(&g, &u)| (g * u) as f64).sum();
        let size: f64 = g.iter().map(|&g| g.abs() as f64).sum();
        eprintln!("{name}: directional fd {fd:e} vs analytic {an:e} (Σ|g| {size:e})");
        assert!(
            (fd - an).abs() <= 1e-3 * size + 1e-4,
            "{name} along u: fd {fd:e} vs analytic {an:e} (Σ|g| {size:e})"
        );
    }
}

#[test]
fn untrainable_configs_are_refused_by_name() {
    let mut cfg = tlens::HookedTransformerConfig::grokking_demo(113);
    cfg.n_layers = 2;
    match tlens::train::check_trainable(&cfg) {
        Err(tlens::Error::Unsupported(msg)) => assert!(msg.contains("n_layers=2"), "{msg}"),
        other => panic!("{other:?}"),
    }
    let mut cfg = tlens::HookedTransformerConfig::grokking_demo(113);
    cfg.act_fn = Some("gelu".into());
    assert!(matches!(
        tlens::train::check_trainable(&cfg),
        Err(tlens::Error::Unsupported(_))
    ));
}

#[test]
fn adamw_first_step_matches_the_formula() {
    // One parameter, two steps, checked against torch's AdamW written out in f64.
    use tlens::train::{AdamW, AdamWConfig};
    let mut params = tlens::StateDict::new();
    params.insert(
        "w",
        tlens::Tensor::F32(ndarray::arr1(&[0.5f32, -1.0]).into_dyn()),
    );
    let mut grads = tlens::StateDict::new();
    grads.insert(
        "w",
        tlens::Tensor::F32(ndarray::arr1(&[0.1f32, -0.2]).into_dyn()),
    );
    let c = AdamWConfig::default();
    let mut opt = AdamW::new(c);
    opt.step(&mut params, &grads, c.lr).unwrap();
    opt.step(&mut params, &grads, c.lr).unwrap();
    let got = params.get("w").unwrap().to_f64_vec();
    for (i, (&p0, &g)) in [0.5f64, -1.0].iter().zip(&[0.1f64, -0.2]).enumerate() {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for t in 1..=2 {
            p *= 1.0 - c.lr * c.weight_decay;
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let step = c.lr / (1.0 - c.beta1.powi(t));
            p -= step * m / (v.sqrt() / (1.0 - c.beta2.powi(t)).sqrt() + c.eps);
        }
        assert!((got[i] - p).abs() < 1e-6, "{i}: {} vs {p}", got[i]);
    }
    assert_eq!(opt.step, 2);
}

#[test]
fn training_losses_follow_pytorch() {
    // From the same initial weights (tlens's bit-exact TL init), the per-epoch losses of the
    // demo loop against those the TL demo recorded in fixtures/demo_p113.pth (300 epochs).
    let m = manifest();
    let want_train = common::f64s(&m["demo_p113"]["train_losses"]);
    let want_test = common::f64s(&m["demo_p113"]["test_losses"]);
    let settings = tlens::train::TrainConfig {
        epochs: 300,
        ..Default::default()
    };
    let mut t = tlens::train::Trainer::new(settings).unwrap();
    // Bands: epochs 0-5, 6-9, 10-29, 30-299.
    let mut worst = [0f64; 4];
    for epoch in 0..300 {
        t.step().unwrap();
        let band = match epoch {
            0..=5 => 0,
            6..=9 => 1,
            10..=29 => 2,
            _ => 3,
        };
        for (got, want) in [
            (t.train_losses[epoch], want_train[epoch]),
            (t.test_losses[epoch], want_test[epoch]),
        ] {
            worst[band] = worst[band].max((got - want).abs() / want.abs());
        }
    }
    eprintln!(
        "max relative loss difference: epochs 0-5 {:e}, 6-9 {:e}, 10-29 {:e}, 30-299 {:e}",
        worst[0], worst[1], worst[2], worst[3]
    );
    // Issue 4 asks for ≤ 1e-6 over the first 10 epochs. Measured: ≤ 3.4e-9 (since the
    // gradients of the embedding-side weights are summed per (position, token), as torch's
    // embedding backward sums per token; before that, 2.5e-6 at epoch 8). Epochs 30–299 (the
    // chaotic phase, where any change of rounding moves the path): 0.052 since the ReLU kink
    // threshold went from 1e-4 to 1e-5 (fewer rows recomputed TL's way), 0.131 before, 0.074
    // before the per-head weight products.
    assert!(worst[0] <= 1e-6, "epochs 0-5: {:e}", worst[0]);
    assert!(worst[1] <= 1e-6, "epochs 6-9: {:e}", worst[1]);
    assert!(worst[2] <= 1e-4, "epochs 10-29: {:e}", worst[2]);
    assert!(worst[3] <= 0.15, "epochs 30-299: {:e}", worst[3]);
    assert_eq!(t.checkpoint_epochs, vec![99, 199, 299]);
}

fn small_settings(epochs: usize) -> tlens::train::TrainConfig {
    tlens::train::TrainConfig {
        p: 23,
        epochs,
        checkpoint_every: 10,
        ..Default::default()
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let mut whole = tlens::train::Trainer::new(small_settings(60)).unwrap();
    for _ in 0..60 {
        whole.step().unwrap();
    }
    let mut first = tlens::train::Trainer::new(small_settings(60)).unwrap();
    for _ in 0..30 {
        first.step().unwrap();
    }
    // Through the file format, as after an interruption.
    let bytes = first
        .to_run()
        .to_pth_bytes(tlens::ConfigStyle::Tl2Object, 2)
        .unwrap();
    let file = RunFile::from_bytes(bytes).unwrap();
    assert!(file.has_optimizer_state());
    let mut resumed = tlens::train::Trainer::resume(file.load().unwrap()).unwrap();
    assert_eq!(resumed.epoch, 30);
    for _ in 30..60 {
        resumed.step().unwrap();
    }
    assert_eq!(resumed.train_losses, whole.train_losses);
    assert_eq!(resumed.test_losses, whole.test_losses);
    assert_eq!(resumed.checkpoint_epochs, whole.checkpoint_epochs);
    assert_eq!(resumed.params, whole.params, "bit-identical weights");
    assert_eq!(resumed.to_run(), whole.to_run());
}

#[test]
fn train_cli_writes_a_resumable_tl_demo_file() {
    let bin = env!("CARGO_BIN_EXE_tlens");
    let dir = std::env::temp_dir().join(format!("tlens-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.pth"), dir.join("b.pth"));
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let common = ["--p", "23", "--checkpoint-every", "10"];
    let (code, err) = run(&[
        &["train", "--out", a.to_str().unwrap(), "--epochs", "40"],
        &common[..],
    ]
    .concat());
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run(&[
        &[
            "train",
            "--out",
            a.to_str().unwrap(),
            "--epochs",
            "60",
            "--resume",
        ],
        &common[..],
    ]
    .concat());
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run(&[
        &["train", "--out", b.to_str().unwrap(), "--epochs", "60"],
        &common[..],
    ]
    .concat());
    assert_eq!(code, Some(0), "{err}");
    let (ra, rb) = (RunFile::open(&a).unwrap(), RunFile::open(&b).unwrap());
    assert_eq!(
        ra.checkpoint_epochs,
        (0..6).map(|i| i * 10 + 9).collect::<Vec<i64>>()
    );
    assert_eq!(ra.train_losses.len(), 60);
    assert_eq!(
        ra.load().unwrap(),
        rb.load().unwrap(),
        "resumed CLI run equals the uninterrupted one"
    );
    // The file is the TL demo layout: config object, indices, losses.
    assert_eq!(
        ra.config_class.as_ref().unwrap().0,
        "transformer_lens.HookedTransformerConfig"
    );
    assert_eq!(
        ra.train_indices.as_ref().unwrap().len(),
        (23.0f64 * 23.0 * 0.3) as usize
    );
    // The same run written as a tlens safetensors run (optimizer state included) resumes to
    // the same result.
    let st = dir.join("c.safetensors");
    for (epochs, resume) in [("40", false), ("60", true)] {
        let mut args = vec!["train", "--out", st.to_str().unwrap(), "--epochs", epochs];
        if resume {
            args.push("--resume");
        }
        let (code, err) = run(&[&args[..], &common[..]].concat());
        assert_eq!(code, Some(0), "{err}");
    }
    let rc = RunFile::open(&st).unwrap();
    assert_eq!(rc.format_name(), "safetensors");
    assert!(rc.has_optimizer_state());
    assert_eq!(
        rc.load().unwrap(),
        rb.load().unwrap(),
        "safetensors run resumed"
    );
    let (code, err) = run(&["train", "--out", a.to_str().unwrap(), "--device", "cuda"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--device cuda: ") && err.contains("cuda"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_pass_for_test_and_next_train_step_gives_separate_passes_numbers() {
    // The trainer evaluates the test loss and the next step's train forward in one pass over
    // train ++ test inputs; every input's numbers must not depend on the rest of the batch.
    let mut t = tlens::train::Trainer::new(tlens::train::TrainConfig::default()).unwrap();
    for _ in 0..3 {
        t.step().unwrap();
    }
    // The test loss recorded by the step equals a pass over the test inputs alone.
    assert_eq!(t.test_losses[2].to_bits(), t.test_loss().unwrap().to_bits());
    // The next step's train loss equals a pass over the train inputs alone.
    let (tokens, labels) = tlens::task::modular_addition(113);
    let mut idx: Vec<usize> = t.train_indices.iter().map(|&i| i as usize).collect();
    idx.sort_unstable();
    let train = tokens.select(ndarray::Axis(0), &idx);
    let train_labels: Vec<u32> = idx.iter().map(|&i| labels[i]).collect();
    let (loss, _) = tlens::train::loss_and_grads(&t.cfg, &t.params, &train, &train_labels).unwrap();
    t.step().unwrap();
    assert_eq!(t.train_losses[3].to_bits(), loss.to_bits());
}
