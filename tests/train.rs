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
    // A small model and batch: central finite differences (h = 1e-3) of the loss on a few
    // weights of every matrix. The loss is computed from f32 activations, so the difference
    // quotient carries ~1e-4 of noise; the tolerance is 1% + 5e-4.
    let run = RunFile::open(fixture("init/small_seed1.safetensors")).unwrap();
    let cfg = run.config.clone().unwrap();
    let sd = run.model().unwrap();
    let (tokens, labels) = tlens::task::modular_addition(23);
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
