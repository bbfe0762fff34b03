//! The analyses against the TL Grokking demo's own code (fixtures/demo_analysis.py, run by
//! fixtures/generate.py section 10) on demo_p113.pth (300 epochs, the demo's key frequencies
//! 17, 25, 32, 47) and the shipped grokked run (key frequencies found automatically).
//! Tolerances: ≤ 1e-4 relative on every scalar, ≤ 1e-4 absolute on every array.

mod common;

use common::fixture;
use ndarray::ArrayD;
use serde_json::Value as Json;
use std::sync::OnceLock;
use tlens::analysis::{analyze_run, Analysis, AnalysisArrays, Options};
use tlens::io::npz::NpzReader;
use tlens::RunFile;

fn python(name: &str) -> (Json, NpzReader) {
    let json = std::fs::read_to_string(fixture(&format!("analysis_{name}.json"))).unwrap();
    let npz = NpzReader::open(fixture(&format!("activations/analysis_{name}.npz"))).unwrap();
    (serde_json::from_str(&json).unwrap(), npz)
}

fn ours(file: &str, keys: Option<Vec<usize>>) -> (Analysis, AnalysisArrays) {
    let run = RunFile::open(fixture(file)).unwrap();
    let opts = Options {
        key_freqs: keys,
        ..Options::default()
    };
    analyze_run(&run, &opts).unwrap()
}

fn grokked() -> &'static (Analysis, AnalysisArrays) {
    static CELL: OnceLock<(Analysis, AnalysisArrays)> = OnceLock::new();
    CELL.get_or_init(|| ours("grokked_p113.pth", None))
}

fn demo() -> &'static (Analysis, AnalysisArrays) {
    static CELL: OnceLock<(Analysis, AnalysisArrays)> = OnceLock::new();
    CELL.get_or_init(|| ours("demo_p113.pth", Some(vec![17, 25, 32, 47])))
}

fn close_rel(what: &str, ours: f64, theirs: f64, rel: f64) {
    let err = (ours - theirs).abs() / theirs.abs().max(1e-30);
    assert!(
        err <= rel,
        "{what}: tlens {ours:e} vs Python {theirs:e} (relative {err:e} > {rel:e})"
    );
}

fn close_arr(what: &str, ours: &[f64], theirs: &ArrayD<f64>, abs: f64) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let worst = ours
        .iter()
        .zip(theirs.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst <= abs, "{what}: max abs diff {worst:e} > {abs:e}");
}

fn arr32(npz: &mut NpzReader, name: &str) -> ArrayD<f64> {
    npz.array::<f32>(name).unwrap().mapv(|x| x as f64)
}

fn arr64(npz: &mut NpzReader, name: &str) -> ArrayD<f64> {
    npz.array::<f64>(name).unwrap()
}

fn check_scalars(a: &Analysis, py: &Json, npz: &mut NpzReader) {
    let fin = &py["final"];
    let f = &a.final_;
    for (name, ours) in [
        ("train_loss", f.train_loss),
        ("test_loss", f.test_loss),
        ("restricted_loss", f.restricted_loss),
        ("excluded_loss", f.excluded_loss),
        ("gini_W_E", f.gini_w_e),
        ("gini_W_L", f.gini_w_l),
        ("sum_sq_weights", f.sum_sq_weights),
        ("accuracy", f.accuracy),
        ("logit_residual_fraction_key", f.logit_residual_fraction_key),
        ("logit_residual_fraction_all", f.logit_residual_fraction_all),
        ("key_freq_logits_loss", f.key_freq_logits_loss),
    ] {
        close_rel(
            &format!("final.{name}"),
            ours,
            fin[name].as_f64().unwrap(),
            1e-4,
        );
    }
    // frac_neurons_explained is a count / d_mlp: exact (a neuron on the 0.85 edge would show).
    assert_eq!(
        f.frac_neurons_explained,
        fin["frac_neurons_explained"].as_f64().unwrap()
    );
    let chain = &fin["key_freq_power_fraction"];
    let k = &f.key_freq_power_fraction;
    for (name, ours) in [("W_E", k.w_e), ("x1", k.x1), ("x2", k.x2), ("W_L", k.w_l)] {
        close_rel(
            &format!("signal chain {name}"),
            ours,
            chain[name].as_f64().unwrap(),
            1e-4,
        );
    }
    // Every checkpoint's progress measures.
    let cks = py["checkpoints"].as_array().unwrap();
    assert_eq!(a.checkpoints.len(), cks.len());
    let epochs: Vec<i64> = py["checkpoint_epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_i64().unwrap())
        .collect();
    for (i, (m, c)) in a.checkpoints.iter().zip(cks).enumerate() {
        assert_eq!(m.epoch, epochs[i]);
        for (name, ours) in [
            ("train_loss", m.train_loss),
            ("test_loss", m.test_loss),
            ("restricted_loss", m.restricted_loss),
            ("excluded_loss", m.excluded_loss),
            ("gini_W_E", m.gini_w_e),
            ("gini_W_L", m.gini_w_l),
            ("sum_sq_weights", m.sum_sq_weights),
        ] {
            close_rel(
                &format!("checkpoint {} {name}", m.epoch),
                ours,
                c[name].as_f64().unwrap(),
                1e-4,
            );
        }
    }
    // Neurons: dominant frequency and fraction of every neuron. Where several frequencies tie
    // (a neuron with a flat spectrum), either is the maximum: the fraction must then agree.
    let nfn = arr32(npz, "neuron_freq_norm");
    let neurons = py["neurons"].as_array().unwrap();
    assert_eq!(a.neurons.len(), neurons.len());
    let mut ties = 0;
    for (n, pn) in a.neurons.iter().zip(neurons) {
        let theirs = pn["freq"].as_u64().unwrap() as usize;
        let frac = pn["frac_explained"].as_f64().unwrap();
        assert!(
            (n.frac_explained - frac).abs() <= 1e-4,
            "neuron {}",
            n.index
        );
        if n.freq != theirs {
            ties += 1;
            assert!(
                (nfn[[n.freq - 1, n.index]] - frac).abs() <= 1e-4,
                "neuron {}: frequency {} vs Python's {theirs}",
                n.index,
                n.freq
            );
        }
    }
    assert!(ties <= 2, "{ties} neurons with another dominant frequency");
    let pc: Vec<usize> = py["embed_pc_freq"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        a.embedding.pc_freq, pc,
        "dominant frequency of W_E's principal components"
    );
}

fn check_arrays(a: &Analysis, arr: &AnalysisArrays, npz: &mut NpzReader) {
    let v32 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    close_arr(
        "fourier_basis",
        &v32(arr.fourier_basis.as_slice().unwrap()),
        &arr32(npz, "fourier_basis"),
        1e-5,
    );
    close_arr(
        "embed_fourier_norms",
        &v32(arr.embed_fourier_norms.as_slice().unwrap()),
        &arr32(npz, "embed_fourier_norms"),
        1e-4,
    );
    close_arr(
        "W_L_fourier_norms",
        &v32(arr.w_l_fourier_norms.as_slice().unwrap()),
        &arr32(npz, "W_L_fourier_norms"),
        1e-4,
    );
    close_arr(
        "neuron_freq_norm",
        &v32(arr.neuron_freq_norm.as_slice().unwrap()),
        &arr32(npz, "neuron_freq_norm"),
        1e-4,
    );
    close_arr(
        "attention_patterns",
        &v32(arr.attention_patterns.as_slice().unwrap()),
        &arr32(npz, "attention_patterns"),
        1e-4,
    );
    close_arr(
        "attention_fourier",
        &v32(arr.attention_fourier.as_slice().unwrap()),
        &arr32(npz, "attention_fourier"),
        1e-4,
    );
    // Coefficients are sums over p³ logits (scale ~1e3): relative.
    let theirs = arr64(npz, "logit_cos_coeffs");
    for (k, (o, t)) in arr.logit_cos_coeffs.iter().zip(theirs.iter()).enumerate() {
        assert!(
            (o - t).abs() <= 1e-4 * theirs.iter().map(|x| x.abs()).fold(0.0, f64::max),
            "coeff {k}: {o} vs {t}"
        );
    }
    close_arr(
        "logit_cos_sim_final",
        arr.logit_cos_sim_final.as_slice().unwrap(),
        &arr64(npz, "logit_cos_sim_final"),
        1e-4,
    );
    close_arr(
        "logit_cos_sim (every checkpoint)",
        arr.logit_cos_sim.as_slice().unwrap(),
        &arr64(npz, "logit_cos_sim"),
        1e-4,
    );
    close_arr(
        "embed_singular_values",
        arr.embed_singular_values.as_slice().unwrap(),
        &arr32(npz, "embed_singular_values"),
        1e-4,
    );
    for (name, spec) in &arr.spectra {
        let theirs = arr64(npz, &format!("spectrum_{name}"));
        let scale = theirs.iter().copied().fold(0.0, f64::max);
        for (k, (o, t)) in spec.iter().zip(theirs.iter()).enumerate() {
            assert!(
                (o - t).abs() <= 1e-4 * scale,
                "spectrum {name}[{k}]: {o} vs {t}"
            );
        }
    }
    let _ = a;
}

#[test]
fn grokked_run_matches_the_demo_analysis() {
    let (py, mut npz) = python("grokked_p113");
    let (a, arr) = grokked();
    check_scalars(a, &py, &mut npz);
    check_arrays(a, arr, &mut npz);
}

#[test]
fn demo_p113_matches_the_demo_analysis_with_the_demos_key_freqs() {
    let (py, mut npz) = python("demo_p113");
    let (a, arr) = demo();
    assert_eq!(a.key_freqs_source, "given");
    check_scalars(a, &py, &mut npz);
    check_arrays(a, arr, &mut npz);
}

#[test]
fn key_freqs_found_automatically_are_pythons() {
    let (py, _) = python("grokked_p113");
    let want: Vec<usize> = py["key_freqs_auto"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (a, _) = grokked();
    assert_eq!(a.key_freqs_source, "auto");
    assert_eq!(a.key_freqs, want);
    assert_eq!(a.key_freqs, vec![9, 36, 38, 55]);
    // Every cluster is one of them, and the share explained is reported.
    assert!(a.clusters.iter().all(|c| a.key_freqs.contains(&c.freq)));
    assert!(a.final_.frac_neurons_explained > 0.5);
    // The 300-epoch run has no structure yet: the rule finds nothing, as Python's did.
    let (py, _) = python("demo_p113");
    assert_eq!(py["key_freqs_auto"].as_array().unwrap().len(), 0);
    let run = RunFile::open(fixture("demo_p113.pth")).unwrap();
    let (auto, _) = analyze_run(
        &run,
        &Options {
            skip_checkpoints: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(auto.key_freqs.is_empty());
}

#[test]
fn phases_of_the_grokked_run() {
    let (a, _) = grokked();
    let ph = a.phases;
    // Test loss peaks at epoch 1388 in the shipped run (its per-epoch losses are in the file).
    let run = RunFile::open(fixture("grokked_p113.pth")).unwrap();
    let peak = run
        .test_losses
        .iter()
        .enumerate()
        .fold((0, f64::MIN), |b, (i, &l)| if l > b.1 { (i, l) } else { b })
        .0 as i64;
    assert_eq!(ph.memorization_end, Some(peak));
    let (c, e) = (ph.circuit_formation_end.unwrap(), ph.cleanup_end.unwrap());
    assert!(peak < c && c < e, "{ph:?}");
    // The run's test loss: > 1 before circuit formation ends, < 1e-4 after clean-up.
    assert!(run.test_losses[c as usize - 1] > 1.0);
    assert!(run.test_losses[e as usize] < 1e-4);
}

#[test]
fn unsupported_models_and_bad_key_freqs_are_typed_errors() {
    let run = RunFile::open(fixture("grokked_p113.pth")).unwrap();
    let bad = Options {
        key_freqs: Some(vec![0, 9]),
        ..Options::default()
    };
    assert!(matches!(
        analyze_run(&run, &bad).unwrap_err().root(),
        tlens::Error::Invalid { .. }
    ));
    // A 2-layer LN model of 8 positions is not a modular-arithmetic model at all.
    let run = RunFile::open(fixture("models/ln_gelu_2l.pth")).unwrap();
    let err = tlens::analysis::Task::for_run(&run).unwrap_err();
    assert!(
        matches!(err.root(), tlens::Error::NotModularArithmetic(_)),
        "{err}"
    );
}

/// The restricted/excluded losses use a rank-(1 + 2·|keys|) factorisation and, for the excluded
/// loss, `logits − b_U − b_out·W_U − V·(C·W_L)` in place of the demo's dense
/// `((acts − P)·W_out + resid_mid)·W_U`. The demo's runs have all biases at zero, so here the
/// small run gets non-zero biases and both losses are recomputed the demo's dense way from
/// `run_with_cache` activations (in f64).
#[test]
fn factorised_losses_equal_the_dense_demo_computation_with_biases() {
    use ndarray::{Array1, Array2, Axis};
    use tlens::analysis::{ablation, Task, Weights};
    use tlens::{HookedTransformer, Tensor};

    let run = RunFile::open(fixture("demo_small.pth")).unwrap();
    let mut sd = run.model().unwrap();
    let mut seed = 7u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.4
    };
    for name in [
        "blocks.0.mlp.b_out",
        "unembed.b_U",
        "blocks.0.mlp.b_in",
        "blocks.0.attn.b_O",
    ] {
        let n = sd.array::<f32>(name, None).unwrap().len();
        let v: Vec<f32> = (0..n).map(|_| rnd()).collect();
        sd.insert(name, Tensor::F32(Array1::from(v).into_dyn()));
    }
    let model = HookedTransformer::new(run.config.clone().unwrap(), sd).unwrap();
    let task = Task::for_run(&run).unwrap();
    let p = task.p;
    let keys = [3usize, 7];
    let (logits, cache) = model.run_with_cache(&task.tokens, None).unwrap();
    let last = |x: &ndarray::ArrayD<f32>| -> Array2<f64> {
        x.index_axis(Axis(1), 2)
            .to_owned()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap()
            .mapv(|v| v as f64)
    };
    let acts = last(&cache["blocks.0.mlp.hook_post"]);
    let resid_mid = last(&cache["blocks.0.hook_resid_mid"]);
    let lg = last(&logits);
    let f64_of = |name: &str| {
        let a = model.state_dict.array::<f32>(name, None).unwrap();
        a.mapv(|v| v as f64)
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap()
    };
    let (w_out, w_u) = (f64_of("blocks.0.mlp.W_out"), f64_of("unembed.W_U"));
    // The demo's dense computation: projections onto the normalised key directions.
    let v = ablation::apb_vectors(p, &keys);
    let mut proj = Array2::<f64>::zeros(acts.dim());
    for col in v.axis_iter(Axis(1)) {
        let c = col.dot(&acts); // [d_mlp]
        for (i, mut row) in proj.outer_iter_mut().enumerate() {
            row.scaled_add(col[i], &c);
        }
    }
    let mean = acts.mean_axis(Axis(0)).unwrap();
    let loss_rows = |m: &Array2<f64>, idx: &[i64]| {
        let rows: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
        let ys: Vec<u32> = rows.iter().map(|&i| task.labels[i]).collect();
        tlens::task::loss(m.select(Axis(0), &rows).mapv(|x| x as f32).view(), &ys)
    };
    let mut restricted = (&proj + &mean).dot(&w_out).dot(&w_u);
    let shift = lg.mean_axis(Axis(0)).unwrap() - restricted.mean_axis(Axis(0)).unwrap();
    restricted += &shift;
    let excluded = ((&acts - &proj).dot(&w_out) + &resid_mid).dot(&w_u);
    let want_r = loss_rows(&restricted, &task.test);
    let want_e = loss_rows(&excluded, &task.train);

    let w = Weights::new(&model).unwrap();
    let acts32 = acts.mapv(|x| x as f32);
    let lg32 = lg.mapv(|x| x as f32);
    let got_r = ablation::restricted_loss(
        acts32.view(),
        lg32.view(),
        &w,
        p,
        &keys,
        &task.test,
        &task.labels,
    );
    let got_e = ablation::excluded_loss(
        acts32.view(),
        lg32.view(),
        &w,
        p,
        &keys,
        &task.train,
        &task.labels,
    );
    assert!(
        (got_r - want_r).abs() <= 1e-5 * want_r,
        "restricted {got_r} vs {want_r}"
    );
    assert!(
        (got_e - want_e).abs() <= 1e-5 * want_e,
        "excluded {got_e} vs {want_e}"
    );
    // The biases matter: without b_U and b_out·W_U the excluded loss would differ.
    assert!(w.bias_logit.iter().any(|b| b.abs() > 0.01));
}

#[test]
fn line_chart_writes_png_and_svg() {
    let dir = std::env::temp_dir().join(format!("tlens-line-{}", std::process::id()));
    let files = tlens::analysis::plots::line_chart(
        &dir.join("curve"),
        "a curve",
        "epoch",
        &[(
            "loss",
            (1..50).map(|e| (e as f64, 1.0 / e as f64)).collect(),
        )],
        true,
    )
    .unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(&std::fs::read(&files[0]).unwrap()[..4], b"\x89PNG");
    assert!(std::fs::read_to_string(&files[1])
        .unwrap()
        .contains("a curve"));
    std::fs::remove_dir_all(&dir).ok();
}

/// The 2022 original's split (`random.seed(seed); random.shuffle(pairs)`), as Python made it
/// (fixtures/generate.py records three cases, one with a seed wider than 32 bits).
#[test]
fn original_split_equals_pythons_random_shuffle() {
    let m = common::manifest();
    let cases = m["analysis"]["original_splits"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let p = c["p"].as_u64().unwrap() as usize;
        let (seed, frac) = (
            c["seed"].as_u64().unwrap(),
            c["frac_train"].as_f64().unwrap(),
        );
        let (tr, te) = tlens::task::python_shuffle_split(p, frac, seed);
        assert_eq!(tr, common::i64s(&c["train"]), "p {p} seed {seed}: train");
        assert_eq!(te, common::i64s(&c["test"]), "p {p} seed {seed}: test");
    }
    // A 2022 run without stored indices gets its own split, not the TL demo's.
    let run = RunFile::open(fixture("original_small.pth")).unwrap();
    assert!(run.train_indices.is_none());
    let split = run.split(17, tlens::run::SplitChoice::Auto).unwrap();
    assert_eq!(split.train, common::i64s(&cases[0]["train"]));
    // And its analysis runs on the p answer logits (the 2022 model also has one for `=`).
    let (a, arr) = analyze_run(&run, &Options::default()).unwrap();
    assert_eq!(a.p, 17);
    assert_eq!(arr.logit_cos_coeffs.len(), 8);
    assert!(a.final_.restricted_loss.is_finite() && a.final_.excluded_loss.is_finite());
    // Its test loss is logged every 10 epochs only: no phases are claimed.
    assert_eq!(a.phases.memorization_end, None);
}
