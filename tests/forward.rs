//! The hooked forward pass against TransformerLens: every cached activation of several configs,
//! hook order, hooks (ablation, patching) against TL's run_with_hooks, the full-dataset logits
//! and losses of the p=113 run, and torch's randperm.

mod common;

use common::{fixture, manifest};
use ndarray::{Array2, ArrayD, Axis, Ix2};
use tlens::io::npz::NpzReader;
use tlens::model::tabulated::{last_logits_fast, last_logits_general};
use tlens::task::evaluate;
use tlens::{Hook, HookedTransformer, RunFile};

const CASES: [&str; 8] = [
    "ln_gelu_2l",
    "attn_only_lnpre_bidir",
    "rms_solu_split",
    "rmspre_silu_attn_in",
    "none_gelu_new_inv_idx",
    "ln_gelu_fast_solu_noscale",
    "lnpre_solu_ln",
    "ln_gelu_tanh",
];

fn load_model(path: &str) -> HookedTransformer {
    let run = RunFile::open(fixture(path)).unwrap();
    HookedTransformer::new(run.config.clone().unwrap(), run.model().unwrap()).unwrap()
}

fn tokens_of(npz: &mut NpzReader, name: &str) -> Array2<u32> {
    npz.array::<i64>(name)
        .unwrap()
        .mapv(|t| t as u32)
        .into_dimensionality::<Ix2>()
        .unwrap()
}

/// max |a − b| / max(1, |b|) over finite entries; infinities must coincide.
fn max_rel_diff(a: &ArrayD<f32>, b: &ArrayD<f32>, what: &str) -> f32 {
    assert_eq!(a.shape(), b.shape(), "{what}: shape");
    let mut worst = 0f32;
    for (&x, &y) in a.iter().zip(b.iter()) {
        if y.is_infinite() || x.is_infinite() {
            assert_eq!(x, y, "{what}: infinities differ");
            continue;
        }
        worst = worst.max((x - y).abs() / y.abs().max(1.0));
    }
    worst
}

fn check_case(name: &str, model_file: &str) {
    let m = manifest();
    let model = load_model(model_file);
    let mut npz = NpzReader::open(fixture(&format!("activations/{name}.npz"))).unwrap();
    let tokens = tokens_of(&mut npz, "tokens");
    let (logits, cache) = model.run_with_cache(&tokens, None).unwrap();
    let want_names: Vec<String> =
        serde_json::from_value(m["forward"][name]["hook_names"].clone()).unwrap();
    let got_names: Vec<&str> = cache.names().collect();
    assert_eq!(got_names, want_names, "{name}: hook names in firing order");
    assert_eq!(model.hook_names(), want_names, "{name}: hook_names()");
    for hook in &want_names {
        let want = npz.array::<f32>(hook).unwrap();
        let d = max_rel_diff(
            cache.get(hook.as_str()).unwrap(),
            &want,
            &format!("{name} {hook}"),
        );
        assert!(d <= 1e-5, "{name} {hook}: max diff {d:e}");
    }
    let d = max_rel_diff(
        &logits,
        &npz.array::<f32>("logits").unwrap(),
        &format!("{name} logits"),
    );
    assert!(d <= 1e-5, "{name} logits: max diff {d:e}");
}

#[test]
fn grokking_model_matches_transformer_lens_at_every_hook() {
    check_case("demo_p113", "demo_p113.pth");
}

#[test]
fn other_configs_match_transformer_lens_at_every_hook() {
    for case in CASES {
        check_case(case, &format!("models/{case}.pth"));
    }
}

#[test]
fn cache_lookups_use_tl_shorthand() {
    let model = load_model("models/ln_gelu_2l.pth");
    let mut npz = NpzReader::open(fixture("activations/ln_gelu_2l.npz")).unwrap();
    let tokens = tokens_of(&mut npz, "tokens");
    let (_, cache) = model.run_with_cache(&tokens, None).unwrap();
    let pattern = npz.array::<f32>("blocks.0.attn.hook_pattern").unwrap();
    assert_eq!(cache[("pattern", 0)].shape(), pattern.shape());
    assert_eq!(
        cache[("pattern", 0)].shape(),
        &[3, 4, 8, 8],
        "[batch, head, query, key]"
    );
    assert_eq!(&cache[("attn", 0)], &cache["blocks.0.attn.hook_pattern"]);
    assert_eq!(&cache[("post", 0, "mlp")], &cache["blocks.0.mlp.hook_post"]);
    assert_eq!(&cache[("resid_mid", -1)], &cache["blocks.1.hook_resid_mid"]);
    assert_eq!(&cache["k1"], &cache["blocks.1.attn.hook_k"]);
    assert_eq!(&cache["scale1ln2"], &cache["blocks.1.ln2.hook_scale"]);
    assert_eq!(&cache["scale"], &cache["ln_final.hook_scale"]);
    assert_eq!(&cache["embed"], &cache["hook_embed"]);
    assert!(cache.get(("pattern", 5)).is_err());
    // A names filter caches only what it accepts.
    let only_attn = |n: &str| n.contains("attn.");
    let (_, small) = model.run_with_cache(&tokens, Some(&only_attn)).unwrap();
    assert!(small.names().all(only_attn));
    assert_eq!(small.len(), 2 * 6);
}

#[test]
fn hooks_ablate_and_patch_like_transformer_lens() {
    let model = load_model("models/ln_gelu_2l.pth");
    let mut npz = NpzReader::open(fixture("activations/ln_gelu_2l.npz")).unwrap();
    let tokens = tokens_of(&mut npz, "tokens");
    let tokens2 = tokens_of(&mut npz, "tokens2");

    // Zero-ablate head 1 of layer 0's z.
    let mut hooks = [Hook::new("blocks.0.attn.hook_z", |z, _| {
        let mut z = z.clone();
        z.index_axis_mut(Axis(2), 1).fill(0.0);
        Some(z)
    })];
    let ablated = model.run_with_hooks(&tokens, &mut hooks).unwrap();
    let want = npz.array::<f32>("logits_ablate_l0_head1_z").unwrap();
    assert!(max_rel_diff(&ablated, &want, "ablation") <= 1e-5);
    let clean = model.forward(&tokens).unwrap();
    assert!(max_rel_diff(&ablated, &clean, "ablation changed something") > 1e-3);

    // Activation patching: resid_mid of layer 1 at position 2 from the second batch.
    let (_, cache2) = model.run_with_cache(&tokens2, None).unwrap();
    let src = cache2["blocks.1.hook_resid_mid"].clone();
    let mut hooks = [Hook::new("blocks.1.hook_resid_mid", move |x, _| {
        let mut x = x.clone();
        x.index_axis_mut(Axis(1), 2)
            .assign(&src.index_axis(Axis(1), 2));
        Some(x)
    })];
    let patched = model.run_with_hooks(&tokens, &mut hooks).unwrap();
    let want = npz.array::<f32>("logits_patch_l1_resid_mid_pos2").unwrap();
    assert!(max_rel_diff(&patched, &want, "patching") <= 1e-5);

    // Hooks are scoped to the call: the next forward is clean again.
    assert_eq!(model.forward(&tokens).unwrap(), clean);
    // A hook that reads without replacing changes nothing; one with a wrong shape is an error.
    let mut seen = 0;
    let mut hooks = [Hook::filtered(
        |n| n.ends_with("hook_pattern"),
        |_, _| {
            seen += 1;
            None
        },
    )];
    assert_eq!(model.run_with_hooks(&tokens, &mut hooks).unwrap(), clean);
    drop(hooks);
    assert_eq!(seen, 2);
    let mut hooks = [Hook::new("hook_embed", |_, _| {
        Some(ArrayD::zeros(ndarray::IxDyn(&[1])))
    })];
    assert!(matches!(
        model.run_with_hooks(&tokens, &mut hooks),
        Err(tlens::Error::Shape { .. })
    ));
}

#[test]
fn replacing_ln_scale_changes_the_division_as_in_tl() {
    // Freezing hook_scale (a common interpretability intervention) must feed the new scale into
    // the normalisation, as TL's `x / scale` does.
    let model = load_model("models/ln_gelu_2l.pth");
    let mut npz = NpzReader::open(fixture("activations/ln_gelu_2l.npz")).unwrap();
    let tokens = tokens_of(&mut npz, "tokens");
    let (_, cache) = model.run_with_cache(&tokens, None).unwrap();
    let scale = cache["blocks.0.ln2.hook_scale"].clone();
    let mut hooks = [Hook::new("blocks.0.ln2.hook_scale", |s, _| Some(s * 2.0))];
    let (_, hooked) = model
        .run_with_hooks_and_cache(&tokens, &mut hooks, None)
        .unwrap();
    let normalized = &cache["blocks.0.ln2.hook_normalized"];
    let w = model
        .state_dict
        .array::<f32>("blocks.0.ln2.w", None)
        .unwrap();
    let b = model
        .state_dict
        .array::<f32>("blocks.0.ln2.b", None)
        .unwrap();
    // (x̂·w + b) with x̂ halved: ((n − b)/w)/2·w + b
    let want = (((normalized - b) / w) / 2.0) * w + b;
    assert!(max_rel_diff(&hooked["blocks.0.ln2.hook_normalized"], &want, "scale hook") <= 1e-5);
    assert_eq!(hooked["blocks.0.ln2.hook_scale"], scale * 2.0);
}

#[test]
fn full_dataset_logits_and_losses_match_transformer_lens() {
    let m = manifest();
    let run = RunFile::open(fixture("demo_p113.pth")).unwrap();
    let model = HookedTransformer::new(run.config.clone().unwrap(), run.model().unwrap()).unwrap();
    let (tokens, _) = tlens::task::modular_addition(113);
    let mut npz = NpzReader::open(fixture("activations/demo_p113_full.npz")).unwrap();
    let rows: Vec<usize> = npz
        .array::<i64>("sample_rows")
        .unwrap()
        .iter()
        .map(|&r| r as usize)
        .collect();
    let sample = npz.array::<f32>("sample_logits").unwrap();
    let row_max = npz.array::<f32>("row_max").unwrap();
    let argmax = npz.array::<i64>("argmax").unwrap();
    for (path, logits) in [
        ("fast", last_logits_fast(&model, &tokens).unwrap()),
        ("general", last_logits_general(&model, &tokens).unwrap()),
    ] {
        // Logits here reach ±66, where one f32 ulp is 7.6e-6: the tolerance is 1e-5 relative to
        // each row's scale (both paths sit 1–2 ulp of the row's largest logit from torch's sgemm).
        let got = logits.select(Axis(0), &rows);
        for (r, (g, w)) in got.outer_iter().zip(sample.outer_iter()).enumerate() {
            let scale = w.iter().fold(1f32, |m, &x| m.max(x.abs()));
            let d = g
                .iter()
                .zip(w.iter())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                d <= 1e-5 * scale,
                "{path} sampled row {r}: {d:e} (row scale {scale})"
            );
        }
        for (i, row) in logits.outer_iter().enumerate() {
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert!(
                (mx - row_max[i]).abs() <= 1e-5 * row_max[i].abs().max(1.0),
                "{path} row {i} max"
            );
            // The prediction is PyTorch's argmax on every input (no near-ties here).
            assert_eq!(
                tlens::task::argmax(row.as_slice().unwrap()) as i64,
                argmax[i],
                "{path} row {i}"
            );
        }
    }
    // Losses and accuracies of the final model and every checkpoint, vs TL's float64 values.
    let check = |ev: tlens::task::Evaluation, want: &serde_json::Value, what: &str| {
        let got = serde_json::to_value(ev).unwrap();
        for k in common::EVAL_KEYS {
            let (g, w) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
            assert!((g - w).abs() <= 1e-6 * w.abs(), "{what} {k}: {g} vs {w}");
        }
    };
    let (tr, te) = (
        run.train_indices.as_ref().unwrap(),
        run.test_indices.as_ref().unwrap(),
    );
    check(
        evaluate(&model, tr, te).unwrap(),
        &m["forward"]["demo_p113_eval"]["final"],
        "final",
    );
    for i in 0..run.n_checkpoints() {
        let ck = HookedTransformer::new(run.config.clone().unwrap(), run.checkpoint(i).unwrap())
            .unwrap();
        check(
            evaluate(&ck, tr, te).unwrap(),
            &m["forward"]["demo_p113_eval"]["checkpoints"][i],
            "checkpoint",
        );
    }
}

#[test]
fn fast_path_equals_general_path_on_every_1_layer_fixture() {
    for case in [
        "rmspre_silu_attn_in",
        "ln_gelu_fast_solu_noscale",
        "lnpre_solu_ln",
        "ln_gelu_tanh",
    ] {
        let model = load_model(&format!("models/{case}.pth"));
        let v = model.cfg.d_vocab() as u32;
        let n_ctx = model.cfg.n_ctx();
        let tokens =
            Array2::from_shape_fn((200, n_ctx), |(i, j)| ((i * 7 + j * 3 + i / 5) as u32) % v);
        if !tlens::model::tabulated::fast_path_applies(&model) {
            assert!(
                model.cfg.use_attn_in,
                "{case}: only split-input models fall back"
            );
            continue;
        }
        let a = last_logits_fast(&model, &tokens).unwrap().into_dyn();
        let b = last_logits_general(&model, &tokens).unwrap().into_dyn();
        assert!(max_rel_diff(&a, &b, case) <= 1e-5, "{case}");
    }
}

#[test]
fn first_layer_tables_equal_the_direct_products_bit_for_bit() {
    // With many repeated tokens (and no hooks), the first layer's q, k, v come from tables
    // over (distinct token, position); a no-op hook turns the tables off. Every activation and
    // the logits must be identical, for every config (LN, RMS, split inputs, …).
    for case in CASES {
        let model = load_model(&format!("models/{case}.pth"));
        let n_ctx = model.cfg.n_ctx();
        let tokens =
            Array2::from_shape_fn((256, n_ctx), |(i, j)| ((i * 7 + j * 3 + i / 5) % 9) as u32);
        let (logits, cache) = model.run_with_cache(&tokens, None).unwrap();
        let mut hooks = [Hook::new("blocks.0.hook_resid_post", |_, _| None)];
        let (logits2, cache2) = model
            .run_with_hooks_and_cache(&tokens, &mut hooks, None)
            .unwrap();
        assert_eq!(logits, logits2, "{case}: logits");
        assert_eq!(cache.len(), cache2.len(), "{case}");
        for (name, a) in cache.iter() {
            assert_eq!(a, cache2.get(name).unwrap(), "{case}: {name}");
        }
    }
}

#[test]
fn randperm_matches_torch() {
    let mut npz = NpzReader::open(fixture("activations/randperm.npz")).unwrap();
    for name in npz.names() {
        let parts: Vec<u64> = name
            .split('_')
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        let (seed, n) = (parts[0], parts[1] as usize);
        let want: Vec<i64> = npz.array::<i64>(&name).unwrap().iter().copied().collect();
        assert_eq!(tlens::task::torch_randperm(n, seed), want, "{name}");
    }
    // The demo split (seed 598) equals the indices stored in the run.
    let run = RunFile::open(fixture("demo_p113.pth")).unwrap();
    let (tr, te) = tlens::task::demo_split(113, 0.3, 598);
    assert_eq!(Some(&tr), run.train_indices.as_ref());
    assert_eq!(Some(&te), run.test_indices.as_ref());
}

#[test]
fn unsupported_configs_are_rejected_at_construction() {
    let run = RunFile::open(fixture("demo_p113.pth")).unwrap();
    let sd = run.model().unwrap();
    for (field, value) in [
        ("positional_embedding_type", serde_json::json!("rotary")),
        ("gated_mlp", serde_json::json!(true)),
        ("parallel_attn_mlp", serde_json::json!(true)),
        ("act_fn", serde_json::json!("xielu")),
    ] {
        let mut j = run.config.as_ref().unwrap().to_json();
        j[field] = value;
        let cfg = tlens::HookedTransformerConfig::from_json(j).unwrap();
        match HookedTransformer::new(cfg, sd.clone()) {
            Err(tlens::Error::Unsupported(msg)) => assert!(msg.contains(field), "{msg}"),
            Err(e) => panic!("{field}: {e}"),
            Ok(_) => panic!("{field}: accepted"),
        }
    }
    // A wrong shape names the tensor.
    let mut bad = sd.clone();
    bad.insert(
        "blocks.0.attn.W_Q",
        tlens::Tensor::F32(ArrayD::zeros(ndarray::IxDyn(&[4, 128, 31]))),
    );
    match HookedTransformer::new(run.config.clone().unwrap(), bad) {
        Err(tlens::Error::Shape { name, .. }) => assert_eq!(name, "blocks.0.attn.W_Q"),
        other => panic!("{:?}", other.err()),
    }
    let mut extra = sd;
    extra.insert(
        "blocks.0.attn.W_X",
        tlens::Tensor::F32(ArrayD::zeros(ndarray::IxDyn(&[1]))),
    );
    assert!(matches!(
        HookedTransformer::new(run.config.clone().unwrap(), extra),
        Err(tlens::Error::Invalid { .. })
    ));
}

/// `forward_last` (the final block at the last position only, as training and evaluation use
/// it) gives the last position of `forward` bit for bit, on every fixture config: layers,
/// normalizations, activations, attention-only, bidirectional, split-QKV/attn-in hooks.
#[test]
fn forward_last_is_the_last_position_of_forward() {
    for case in CASES {
        let model = load_model(&format!("models/{case}.pth"));
        let mut npz = NpzReader::open(fixture(&format!("activations/{case}.npz"))).unwrap();
        let tokens = tokens_of(&mut npz, "tokens");
        let full = model.forward(&tokens).unwrap();
        let p = full.shape()[1];
        let last = model.forward_last(&tokens).unwrap();
        assert_eq!(
            last.shape(),
            &[full.shape()[0], 1, full.shape()[2]],
            "{case}"
        );
        assert_eq!(
            *last,
            full.slice_axis(ndarray::Axis(1), ndarray::Slice::from(p - 1..p)),
            "{case}"
        );
    }
}
