//! The 2022 code's saved files and the format variants torch reads, against what PyTorch and
//! the 2022 code's own forward pass recorded (`fixtures/generate.py --only-saved-runs` →
//! `fixtures/saved_runs/manifest.json`).

mod common;

use common::{check_tensor, num, tlens};
use serde_json::Value as Json;
use tlens::io::tree::{self, AnyFile};
use tlens::io::Format;
use tlens::run::{Layout, SplitChoice, SplitRule};
use tlens::task::Operation;
use tlens::{Error, HookedTransformer, RunFile};

fn saved(name: &str) -> std::path::PathBuf {
    common::fixture(&format!("saved_runs/{name}"))
}

fn manifest() -> Json {
    let text = std::fs::read_to_string(saved("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

const SINGLE_RUNS: [(&str, &str); 5] = [
    ("run_add.pth", "run_add"),
    ("run_noconfig.pth", "run_noconfig"),
    ("run_subtract.pth", "run_subtract"),
    ("run_x2xyy2.pth", "run_x2xyy2"),
    ("run_rand.pth", "run_rand"),
];

/// Every tensor of a file by dotted path, read, against the manifest's description.
fn tree_tensors(name: &str) -> Vec<(String, tlens::Tensor)> {
    tree::read_tensors(&AnyFile::open(&saved(name)).unwrap()).unwrap()
}

#[test]
fn single_runs_of_the_2022_code_open_with_their_contents() {
    let m = manifest();
    for (file, key) in SINGLE_RUNS {
        let d = &m[key];
        let run = RunFile::open(saved(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(run.layout, Layout::Original, "{file}");
        assert!(run.description.starts_with("2022 single run"), "{file}");
        // The stored (2022-layout) model, read raw, equals what torch saved.
        let raw = tree_tensors(file);
        for (name, desc) in d["model"].as_object().unwrap() {
            let (_, t) = raw
                .iter()
                .find(|(p, _)| p == &format!("model.{name}"))
                .unwrap_or_else(|| panic!("{file}: model.{name} missing"));
            check_tensor(&format!("{file}:{name}"), t, desc);
        }
        // ... and its TL-layout conversion has the TL names.
        let model = run.model().unwrap();
        assert_eq!(model.get("embed.W_E").unwrap().shape(), &[24, 32]);
        assert_eq!(model.get("blocks.0.attn.W_O").unwrap().shape(), &[4, 8, 32]);
        assert_eq!(
            run.train_losses.len() as u64,
            d["n_train_losses"].as_u64().unwrap()
        );
        assert_eq!(
            run.test_losses.len() as u64,
            d["n_test_losses"].as_u64().unwrap()
        );
        assert_eq!(
            run.train_losses[..5],
            common::f64s(&d["train_losses_head"])[..]
        );
        assert_eq!(
            run.test_losses[..5],
            common::f64s(&d["test_losses_head"])[..]
        );
        let (tr, te) = run.final_losses.unwrap();
        assert_eq!(tr, num(&d["train_loss"]), "{file}: train_loss tensor");
        assert_eq!(te, num(&d["test_loss"]), "{file}: test_loss tensor");
        assert_eq!(run.epoch, d["epoch"].as_i64());
        let opt = run.torch_optimizer.as_ref().unwrap();
        assert_eq!(opt["n_params_with_state"], d["n_optimizer_params"]);
        assert_eq!(
            opt["param_groups"].as_array().unwrap().len() as u64,
            d["optimizer_param_groups"].as_u64().unwrap()
        );
        assert_eq!(opt["param_groups"][0]["weight_decay"], 1.0);
        let sched = run.scheduler.as_ref().unwrap();
        assert_eq!(sched["last_epoch"], d["scheduler_last_epoch"]);
        // The 2022 config is kept whole (or absent).
        let oc = run.original_config();
        assert_eq!(oc.is_some(), d["has_config"].as_bool().unwrap(), "{file}");
        if let Some(oc) = oc {
            assert_eq!(oc["fn_name"], d["fn_name"]);
            assert_eq!(oc["p"], d["p"]);
        }
    }
}

#[test]
fn the_split_is_the_one_the_2022_code_made_never_the_demos() {
    let m = manifest();
    for (file, key) in SINGLE_RUNS {
        let d = &m[key];
        let run = RunFile::open(saved(file)).unwrap();
        let p = run.modular_p().unwrap();
        assert_eq!(p as u64, d["p"].as_u64().unwrap());
        let s = run.split(p, SplitChoice::Auto).unwrap();
        assert_eq!(s.train, common::i64s(&d["train_indices"]), "{file}: train");
        assert_eq!(s.test.len() as u64, d["n_test"].as_u64().unwrap());
        assert_eq!(s.test[..20], common::i64s(&d["test_indices_head"])[..]);
        let SplitRule::Python2022 {
            seed,
            frac_train,
            from_defaults,
        } = s.rule
        else {
            panic!("{file}: {:?}", s.rule)
        };
        assert_eq!(seed, d["seed"].as_u64().unwrap());
        assert_eq!(frac_train, d["frac_train"].as_f64().unwrap());
        // Only the run without a config falls back to the Config defaults, and says so.
        assert_eq!(from_defaults, !d["has_config"].as_bool().unwrap(), "{file}");
        // The TL demo's rule is available only when asked for, and differs.
        let demo = run.split(p, SplitChoice::Demo).unwrap();
        assert_ne!(demo.train, s.train);
    }
}

#[test]
fn eval_equals_the_2022_models_own_forward_pass() {
    let m = manifest();
    for (file, key) in SINGLE_RUNS.iter().take(4) {
        let d = &m[*key];
        let run = RunFile::open(saved(file)).unwrap();
        let op = run.operation().unwrap();
        assert_eq!(op.name(), d["fn_name"].as_str().unwrap());
        let p = run.modular_p().unwrap();
        // The labels are the operation's.
        let (_, labels) = tlens::task::dataset(p, op).unwrap();
        let want: Vec<u32> = d["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(labels, want, "{file}: labels");
        let s = run.split(p, SplitChoice::Auto).unwrap();
        let model =
            HookedTransformer::new(run.config.clone().unwrap(), run.model().unwrap()).unwrap();
        let ev = tlens::task::evaluate_op(&model, op, None, &s.train, &s.test).unwrap();
        let e = &d["eval_2022"];
        for (got, name) in [
            (ev.train_loss, "train_loss"),
            (ev.test_loss, "test_loss"),
            (ev.full_loss, "full_loss"),
        ] {
            let want = num(&e[name]);
            let rel = (got - want).abs() / want.abs();
            println!("{file} {name}: tlens {got} 2022 code {want} rel {rel:.2e}");
            assert!(want < 1e-3 || rel <= 1e-6, "{file} {name}: {got} vs {want}");
        }
        assert_eq!(ev.train_accuracy, num(&e["train_accuracy"]), "{file}");
        assert_eq!(ev.test_accuracy, num(&e["test_accuracy"]), "{file}");
        assert_eq!(ev.accuracy, num(&e["full_accuracy"]), "{file}");
    }
}

#[test]
fn eval_cli_on_a_2022_run_prints_the_2022_numbers() {
    let m = manifest();
    let path = saved("run_add.pth");
    let (code, out, err) = tlens(&["eval", path.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let j: Json = serde_json::from_str(&out).unwrap();
    let e = &m["run_add"]["eval_2022"];
    for k in ["train_loss", "test_loss", "full_loss"] {
        let (got, want) = (j[k].as_f64().unwrap(), num(&e[k]));
        assert!((got - want).abs() <= 1e-6 * want, "{k}: {got} vs {want}");
    }
    assert_eq!(j["operation"], "add");
    assert!(j["split"].as_str().unwrap().contains("seed 3"), "{j}");
    // The text report names the task and the rule.
    let (code, out, _) = tlens(&["eval", saved("run_subtract.pth").to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        out.contains("(a - b) mod 23") && out.contains("random.shuffle (seed 1"),
        "{out}"
    );
}

#[test]
fn analyze_runs_on_2022_runs_and_says_what_assumes_addition() {
    use tlens::analysis::{analyze_run, Options};
    let opts = Options {
        skip_checkpoints: true,
        ..Default::default()
    };
    let run = RunFile::open(saved("run_add.pth")).unwrap();
    let (a, _) = analyze_run(&run, &opts).unwrap();
    assert_eq!((a.p, a.operation), (23, Operation::Add));
    assert!(a.skipped.is_empty());
    assert!(a.final_.restricted_loss.is_finite() && a.final_.excluded_loss.is_finite());
    // The analysis drops the `=` logit as the paper does; with 24 logits it is not the argmax
    // here, so the accuracies are the 2022 forward pass's.
    let e = &manifest()["run_add"]["eval_2022"];
    assert_eq!(a.final_.train_accuracy, num(&e["train_accuracy"]));
    let sub = RunFile::open(saved("run_subtract.pth")).unwrap();
    let (a, _) = analyze_run(&sub, &opts).unwrap();
    assert_eq!(a.operation, Operation::Subtract);
    // Subtraction is analysed in (a, −b) coordinates: the cos/sin k(a − b) analyses run, and
    // the split (re-indexed) gives the 2022 forward pass's accuracies.
    assert!(a.skipped.is_empty());
    assert!(a.final_.restricted_loss.is_finite() && a.final_.excluded_loss.is_finite());
    let e = &manifest()["run_subtract"]["eval_2022"];
    assert_eq!(a.final_.train_accuracy, num(&e["train_accuracy"]));
    assert_eq!(a.final_.test_accuracy, num(&e["test_accuracy"]));
    // The CLI says which analyses it skipped.
    let path = saved("run_x2xyy2.pth");
    let (code, out, err) = tlens(&["analyze", path.to_str().unwrap(), "--no-checkpoints"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("skipped (they assume addition"), "{out}");
    let path = saved("run_add.pth");
    let (code, out, err) = tlens(&["analyze", path.to_str().unwrap(), "--no-checkpoints"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("skipped"), "{out}");
}

#[test]
fn a_rand_run_has_unknown_labels_and_says_so() {
    let run = RunFile::open(saved("run_rand.pth")).unwrap();
    assert_eq!(run.operation().unwrap(), Operation::Rand);
    let err = tlens::task::dataset(23, Operation::Rand).unwrap_err();
    assert!(matches!(err, Error::UnknownData(_)), "{err}");
    let (code, _, err) = tlens(&["eval", saved("run_rand.pth").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("'rand'") && err.lines().count() == 1, "{err}");
}

#[test]
fn a_tl_layout_file_without_indices_has_no_guessed_split() {
    // The demo_small run's model alone: no indices, not a 2022 run.
    let full = RunFile::open(common::fixture("demo_small.pth")).unwrap();
    let mut run = full.load().unwrap();
    run.train_indices = None;
    run.test_indices = None;
    let bytes = run.to_pth_bytes(tlens::ConfigStyle::Tl2Object, 2).unwrap();
    let dir = std::env::temp_dir().join(format!("tlens-nosplit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("no_indices.pth");
    std::fs::write(&path, &bytes).unwrap();
    let r = RunFile::open(&path).unwrap();
    let err = r.split(23, SplitChoice::Auto).unwrap_err();
    assert!(matches!(err, Error::UnknownData(_)), "{err}");
    // Named rules are the documented ones.
    let demo = r.split(23, SplitChoice::Demo).unwrap();
    assert_eq!(
        (demo.train, demo.test),
        tlens::task::demo_split(23, 0.3, 598)
    );
    let orig = r.split(23, SplitChoice::Original2022).unwrap();
    assert_eq!(
        (orig.train, orig.test),
        tlens::task::python_shuffle_split(23, 0.3, 0)
    );
    // eval says the split is unknown and gives the full-data figures only.
    let (code, out, err) = tlens(&["eval", path.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("train/test data unknown"), "{err}");
    let j: Json = serde_json::from_str(&out).unwrap();
    assert!(j["train_loss"].is_null() && j["full_loss"].is_f64(), "{j}");
    // ... unless a rule is named; analyze refuses without one.
    let (code, out, _) = tlens(&["eval", path.to_str().unwrap(), "--split", "demo"]);
    assert_eq!(code, 0);
    assert!(out.contains("torch.randperm"), "{out}");
    let (code, _, err) = tlens(&["analyze", path.to_str().unwrap(), "--no-checkpoints"]);
    assert_eq!(code, 1);
    assert!(err.contains("--split demo"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inspect_lists_every_tensor_path_of_every_layout() {
    let m = manifest();
    let files: Vec<(&str, &Json)> = vec![
        ("run_add.pth", &m["run_add"]["tensor_paths"]),
        ("run_noconfig.pth", &m["run_noconfig"]["tensor_paths"]),
        ("run_subtract.pth", &m["run_subtract"]["tensor_paths"]),
        ("run_x2xyy2.pth", &m["run_x2xyy2"]["tensor_paths"]),
        ("run_rand.pth", &m["run_rand"]["tensor_paths"]),
        (
            "sweep_frac_train.pth",
            &m["sweep_frac_train"]["tensor_paths"],
        ),
        (
            "five_digit_addition.pth",
            &m["five_digit_addition"]["tensor_paths"],
        ),
        ("induction_heads.pth", &m["induction_heads"]["tensor_paths"]),
        ("skip_trigram.pth", &m["skip_trigram"]["tensor_paths"]),
        ("legacy_proto1.pth", &m["legacy"]["tensor_paths"]),
        ("legacy_proto4.pth", &m["legacy"]["tensor_paths"]),
        ("legacy_proto5.pth", &m["legacy"]["tensor_paths"]),
    ];
    let others = [
        "optimizer_only.pth",
        "tensor_list.pth",
        "bare_tensor.pth",
        "other_key.pth",
        "whole_module.pth",
    ];
    let files: Vec<(&str, &Json)> = files
        .into_iter()
        .chain(
            others
                .iter()
                .map(|f| (*f, &m["others"][*f]["tensor_paths"])),
        )
        .collect();
    for (file, paths) in files {
        let d = tree::describe(&AnyFile::open(&saved(file)).unwrap(), Default::default()).unwrap();
        let got: Vec<&String> = d["tensors"].as_object().unwrap().keys().collect();
        let want: Vec<&String> = paths.as_object().unwrap().keys().collect();
        assert_eq!(got, want, "{file}: tensor paths");
        for (p, t) in paths.as_object().unwrap() {
            assert_eq!(d["tensors"][p]["shape"], t["shape"], "{file}: {p}");
            assert_eq!(d["tensors"][p]["dtype"], t["dtype"], "{file}: {p}");
        }
        // The CLI exits 0 and names them all, as text and as JSON.
        let path = saved(file);
        let (code, out, err) = tlens(&["inspect", path.to_str().unwrap(), "--tree"]);
        assert_eq!(code, 0, "{file}: {err}");
        assert!(!paths.as_object().unwrap().is_empty(), "{file}");
        for p in paths.as_object().unwrap().keys() {
            let leaf = p.rsplit('.').next().unwrap();
            assert!(out.contains(leaf), "{file}: {p} not printed");
        }
        let (code, out, _) = tlens(&["inspect", path.to_str().unwrap(), "--json"]);
        assert_eq!(code, 0);
        serde_json::from_str::<Json>(&out).unwrap();
    }
}

#[test]
fn files_that_are_not_runs_are_trees_never_layout_errors() {
    let m = manifest();
    for (file, why) in [
        ("sweep_frac_train.pth", "a list of 3 training runs"),
        ("losses_only.pth", "losses only"),
        ("width_scan.pth", "losses only"),
        ("loss_list.pth", "a list of 20 numbers"),
        ("numpy_array.pth", "a numpy array"),
        ("torchscript_2022.pt", "TorchScript module"),
    ] {
        let path = saved(file);
        let err = RunFile::open(&path).err().unwrap();
        assert!(matches!(err.root(), Error::NotARun(_)), "{file}: {err}");
        assert!(err.to_string().contains(why), "{file}: {err}");
        let (code, out, stderr) = tlens(&["inspect", path.to_str().unwrap(), "--json"]);
        assert_eq!(code, 0, "{file}: {stderr}");
        let j: Json = serde_json::from_str(&out).unwrap();
        assert_eq!(j["kind"], "tree", "{file}");
        assert!(j["not_a_run"].as_str().unwrap().contains(why), "{file}");
        // Commands that need a run refuse in one line.
        let (code, _, stderr) = tlens(&["eval", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{file}");
        assert!(
            stderr.contains("not a training run") && stderr.lines().count() == 1,
            "{stderr}"
        );
    }
    // Losses are shown with their length and ends.
    let (_, out, _) = tlens(&[
        "inspect",
        saved("losses_only.pth").to_str().unwrap(),
        "--json",
    ]);
    let j: Json = serde_json::from_str(&out).unwrap();
    let tl = &j["tree"]["items"]["train_losses"];
    let want = common::f64s(&m["losses_only"]["train_losses"]);
    assert_eq!(tl["len"], want.len());
    assert_eq!(tl["last"].as_f64().unwrap(), *want.last().unwrap());
    assert_eq!(tl["head"][0].as_f64().unwrap(), want[0]);
    let (_, out, _) = tlens(&[
        "inspect",
        saved("width_scan.pth").to_str().unwrap(),
        "--json",
    ]);
    let j: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(
        j["tree"]["items"]["d_models"]["items"],
        m["width_scan"]["d_models"]
    );
    // A numpy array is decoded with its values.
    let t = tree_tensors("numpy_array.pth");
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].1.shape(), &[3, 4]);
    assert_eq!(
        t[0].1.to_f64_vec(),
        common::f64s(&m["numpy_array"]["values"])
    );
    let (_, out, _) = tlens(&[
        "inspect",
        saved("numpy_array.pth").to_str().unwrap(),
        "--json",
        "--values",
    ]);
    let j: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(j["tree"]["max"].as_f64().unwrap(), 11.0 / 7.0);
    assert_eq!(j["tree"]["min"].as_f64().unwrap(), 0.0);
}

#[test]
fn models_of_other_tasks_are_described_converted_and_refused() {
    let m = manifest();
    for (file, why) in [
        ("five_digit_addition.pth", "n_ctx is 18"),
        ("induction_heads.pth", "model_config"),
        ("skip_trigram.pth", "n_ctx is 8"),
    ] {
        let path = saved(file);
        let run = RunFile::open(&path).unwrap();
        let err = run.modular_p().unwrap_err();
        assert!(
            matches!(err, Error::NotModularArithmetic(_)),
            "{file}: {err}"
        );
        assert!(err.to_string().contains(why), "{file}: {err}");
        for cmd in [
            vec!["eval", path.to_str().unwrap()],
            vec!["predict", path.to_str().unwrap(), "1", "2"],
        ] {
            let (code, _, err) = tlens(&cmd);
            assert_eq!(code, 1, "{file} {cmd:?}");
            assert!(
                err.contains("not a modular-arithmetic model") && err.lines().count() == 1,
                "{err}"
            );
        }
    }
    // Induction heads: attn_blocks → blocks, TL layout, and the converted weights give the
    // 2022 model's logits in a TL forward pass.
    let run = RunFile::open(saved("induction_heads.pth")).unwrap();
    assert!(run.notes.iter().any(|n| n.contains("attn_blocks")));
    let cfg = run.config.clone().unwrap();
    assert!(cfg.attn_only);
    assert_eq!(cfg.n_layers(), 2);
    let model = HookedTransformer::new(cfg, run.model().unwrap()).unwrap();
    let d = &m["induction_heads"];
    let tokens: Vec<u32> = d["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
        })
        .collect();
    let tokens = ndarray::Array2::from_shape_vec((5, 12), tokens).unwrap();
    let logits = model.forward(&tokens).unwrap();
    let mut max_diff = 0f64;
    for (b, row) in d["logits_last"].as_array().unwrap().iter().enumerate() {
        for (v, want) in row.as_array().unwrap().iter().enumerate() {
            let got = logits[[b, 11, v]] as f64;
            max_diff = max_diff.max((got - want.as_f64().unwrap()).abs());
        }
    }
    println!("induction heads: max |TL-layout logits - 2022 logits| = {max_diff:.2e}");
    assert!(max_diff < 1e-4, "{max_diff}");
    // convert writes the TL layout.
    let out = std::env::temp_dir().join(format!("tlens-ind-{}.safetensors", std::process::id()));
    let (code, _, err) = tlens(&[
        "convert",
        saved("induction_heads.pth").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let st = tlens::io::safetensors::SafetensorsFile::open(&out).unwrap();
    let names = st.names();
    assert!(names.iter().any(|n| n == "blocks.1.attn.W_Q"));
    assert!(!names.iter().any(|n| n.starts_with("attn_blocks")));
    assert_eq!(st.info("blocks.1.attn.W_Q").unwrap().1, vec![4, 32, 8]);
    std::fs::remove_file(&out).ok();
}

#[test]
fn legacy_files_of_pickle_protocols_1_4_and_5_read_with_the_right_values() {
    let m = manifest();
    for proto in [1, 4, 5] {
        let file = format!("legacy_proto{proto}.pth");
        let bytes = std::fs::read(saved(&file)).unwrap();
        let head: Vec<u8> = m["legacy"][format!("head_proto{proto}")]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(&bytes[..12], &head[..], "{file}: header recorded by torch");
        assert_eq!(
            Format::detect(&bytes).unwrap(),
            Format::TorchLegacy,
            "{file}"
        );
        let t = tree_tensors(&file);
        for (name, desc) in m["legacy"]["model"].as_object().unwrap() {
            let (_, x) = t
                .iter()
                .find(|(p, _)| p == &format!("model.{name}"))
                .unwrap();
            check_tensor(&format!("{file}:{name}"), x, desc);
        }
        // It is the 2022 run's model: a run that evaluates.
        let run = RunFile::open(saved(&file)).unwrap();
        assert_eq!(run.format, Format::TorchLegacy);
        assert_eq!(run.modular_p().unwrap(), 23);
    }
}

#[test]
fn torchscript_archives_read_their_weights_and_are_refused_by_eval() {
    let m = manifest();
    let d = &m["torchscript"];
    assert!(
        d["n_deflated"].as_u64().unwrap() > 0,
        "the archive has deflated entries"
    );
    let t = tree_tensors("torchscript_2022.pt");
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    let want: Vec<&String> = d["state_dict"].as_object().unwrap().keys().collect();
    assert_eq!(names, want, "the module's state-dict names, in order");
    for (name, desc) in d["state_dict"].as_object().unwrap() {
        let (_, x) = t.iter().find(|(p, _)| p == name).unwrap();
        check_tensor(name, x, desc);
    }
    let path = saved("torchscript_2022.pt");
    let (code, _, err) = tlens(&["eval", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("TorchScript module"), "{err}");
    let (code, out, err) = tlens(&["inspect", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("object __torch__.OrigTransformer"), "{out}");
}

#[test]
fn unsigned_tensors_read_from_safetensors_and_torch_files() {
    let m = manifest();
    for file in ["unsigned.safetensors", "unsigned.pth"] {
        let t = tree_tensors(file);
        for (name, d) in m["unsigned"].as_object().unwrap() {
            let (_, x) = t.iter().find(|(p, _)| p == name).unwrap();
            assert_eq!(
                x.dtype().torch_name(),
                d["dtype"].as_str().unwrap(),
                "{file}"
            );
            let shape: Vec<usize> = serde_json::from_value(d["shape"].clone()).unwrap();
            assert_eq!(x.shape(), &shape[..]);
            match x {
                tlens::Tensor::U64(a) => {
                    let want: Vec<u64> = d["values"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap())
                        .collect();
                    assert_eq!(a.iter().copied().collect::<Vec<_>>(), want, "{file}");
                }
                x => assert_eq!(x.to_f64_vec(), common::f64s(&d["values"]), "{file} {name}"),
            }
        }
    }
    // tlens writes them as torch does (untyped storage + _rebuild_tensor_v3) and reads them back.
    let t = tree_tensors("unsigned.pth");
    let dir = std::env::temp_dir().join(format!("tlens-uint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("u.pth");
    let (code, _, err) = tlens(&[
        "convert",
        saved("unsigned.pth").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let back = tree::read_tensors(&AnyFile::open(&out).unwrap()).unwrap();
    let model: Vec<_> = back
        .iter()
        .filter(|(n, _)| n.starts_with("model."))
        .collect();
    for (name, x) in &t {
        let (_, y) = model
            .iter()
            .find(|(n, _)| n == &format!("model.{name}"))
            .unwrap();
        assert_eq!(x, y, "{name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn one_unsupported_safetensors_dtype_does_not_hide_the_others() {
    let m = manifest();
    let path = saved("one_unsupported.safetensors");
    let f = tlens::io::safetensors::SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.names().len(), 3);
    assert!(matches!(f.info("f8").unwrap_err(), Error::Unsupported(_)));
    assert_eq!(
        f.tensor("w").unwrap().to_f64_vec(),
        common::f64s(&m["one_unsupported"]["w"])
    );
    assert_eq!(
        f.tensor("c").unwrap().to_f64_vec(),
        common::f64s(&m["one_unsupported"]["c"])
    );
    let run = RunFile::open(&path).unwrap();
    assert_eq!(run.unreadable.len(), 1);
    let (code, out, err) = tlens(&["inspect", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("f8") && out.contains("not readable") && out.contains("w "),
        "{out}"
    );
}
