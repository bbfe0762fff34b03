//! TL's initial weights reproduced bit for bit: torch's MT19937 + normal_ (Box–Muller with
//! avx_mathfun's polynomials), in TL's named_parameters() order.

mod common;

use common::fixture;
use tlens::io::npz::NpzReader;
use tlens::RunFile;

/// (elements that differ, largest difference in ulps) between two f32 slices.
fn ulp_diff(a: &[f32], b: &[f32]) -> (usize, u32) {
    let mut n = 0;
    let mut worst = 0;
    for (&x, &y) in a.iter().zip(b) {
        if x.to_bits() != y.to_bits() {
            n += 1;
            worst = worst.max((x.to_bits() as i64 - y.to_bits() as i64).unsigned_abs() as u32);
        }
    }
    (n, worst)
}

#[test]
fn torch_normal_matches_torch_bit_for_bit() {
    let mut npz = NpzReader::open(fixture("init/normal.npz")).unwrap();
    for (seed, n, std) in [
        (5u64, 16usize, 1.0f32),
        (5, 37, 1.0),
        (7, 1000, 0.25),
        (11, 17, 2.0),
    ] {
        let want = npz.array::<f32>(&format!("normal_{seed}_{n}")).unwrap();
        let mut g = tlens::task::Mt19937::new(seed);
        let got = tlens::train::torch_normal(&mut g, n, 0.0, std).unwrap();
        let (diff, ulps) = ulp_diff(&got, want.as_slice().unwrap());
        assert_eq!(
            (diff, ulps),
            (0, 0),
            "seed {seed}, n {n}: {diff} elements differ by ≤ {ulps} ulp"
        );
    }
}

#[test]
fn tl_initial_weights_are_reproduced_bit_for_bit() {
    for name in ["demo_seed999", "small_seed1"] {
        let file = RunFile::open(fixture(&format!("init/{name}.safetensors"))).unwrap();
        let cfg = file.config.clone().unwrap();
        let want = file.model().unwrap();
        let got = tlens::train::init_weights(&cfg).unwrap();
        let names: Vec<&str> = got.names().collect();
        assert_eq!(
            names,
            want.names().collect::<Vec<_>>(),
            "{name}: TL's state dict order"
        );
        for (k, t) in want.iter() {
            let (a, b) = (got.get(k).unwrap(), t);
            assert_eq!(a.shape(), b.shape(), "{name} {k}");
            match (a.array::<f32>(), b.array::<f32>()) {
                (Some(x), Some(y)) => {
                    let (diff, ulps) = ulp_diff(x.as_slice().unwrap(), y.as_slice().unwrap());
                    assert_eq!(
                        (diff, ulps),
                        (0, 0),
                        "{name} {k}: {diff} elements differ by ≤ {ulps} ulp"
                    );
                }
                _ => assert_eq!(a, b, "{name} {k}"),
            }
        }
    }
}

#[test]
fn init_refuses_what_it_cannot_reproduce() {
    // LayerNorm and the other architectures are TL's init too (tests/general.rs); solu_ln's
    // extra LayerNorm and other init modes are refused.
    let mut cfg = tlens::HookedTransformerConfig::grokking_demo(113);
    cfg.act_fn = Some("solu_ln".into());
    assert!(matches!(
        tlens::train::init_weights(&cfg),
        Err(tlens::Error::Unsupported(_))
    ));
    let mut cfg = tlens::HookedTransformerConfig::grokking_demo(113);
    cfg.init_mode = "xavier_uniform".into();
    assert!(matches!(
        tlens::train::init_weights(&cfg),
        Err(tlens::Error::Unsupported(_))
    ));
    let mut cfg = tlens::HookedTransformerConfig::grokking_demo(113);
    cfg.seed = None;
    assert!(matches!(
        tlens::train::init_weights(&cfg),
        Err(tlens::Error::Invalid { .. })
    ));
    let mut g = tlens::task::Mt19937::new(0);
    assert!(tlens::train::torch_normal(&mut g, 15, 0.0, 1.0).is_err());
}

#[test]
fn epoch_zero_loss_from_tlens_init_equals_pytorchs() {
    // fixtures/demo_p113.pth was trained by the TL demo from seed 999 (data seed 598): its first
    // recorded train loss is the loss of TL's initial weights on the train split.
    let m = common::manifest();
    let want = m["demo_p113"]["train_losses"][0].as_f64().unwrap();
    let want_test = m["demo_p113"]["test_losses"][0].as_f64().unwrap();
    let cfg = tlens::HookedTransformerConfig::grokking_demo(113);
    let model =
        tlens::HookedTransformer::new(cfg.clone(), tlens::train::init_weights(&cfg).unwrap())
            .unwrap();
    let (tr, te) = tlens::task::demo_split(113, 0.3, 598);
    let ev = tlens::task::evaluate(&model, &tr, &te).unwrap();
    assert!(
        (ev.train_loss - want).abs() <= 1e-7 * want,
        "{} vs {want}",
        ev.train_loss
    );
    // The recorded test loss is after the first AdamW step, so it differs (sanity: both ≈ ln 113).
    assert!((ev.test_loss - (113f64).ln()).abs() < 0.1 && (want_test - (113f64).ln()).abs() < 0.1);
}
