//! Broken model directories give an error that names what is wrong (the field, the file, the
//! tensor, the shapes), never a panic; and unusual but valid layouts (tied output projection,
//! sharded files, unaligned f32 data) load and compute the same numbers.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{engine, random_model, rel_err, small_config, tokens};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use yoco_worker::config::SelfMixerKind;
use yoco_worker::engine::{Logits, StepItem};
use yoco_worker::model::Model;

/// A valid small model (f32, gated retention) in a fresh temporary directory.
fn valid_model(tied: bool) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    random_model(&small_config(SelfMixerKind::GatedRetention), 3, tied, &dir);
    (tmp, dir)
}

/// `Model::load`'s error message; fails the test if the directory loads.
fn load_err(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded, but it should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "error {err:?} does not mention {part:?}");
    }
}

/// One tensor of a checkpoint, owned, for rewriting files.
#[derive(Clone)]
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Owned {
    fn f32(shape: Vec<usize>, value: f32) -> Self {
        let n: usize = shape.iter().product();
        Owned { dtype: Dtype::F32, shape, data: value.to_le_bytes().repeat(n) }
    }
}

fn read_tensors(path: &Path) -> BTreeMap<String, Owned> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = Owned { dtype: view.dtype(), shape: view.shape().to_vec(), data: view.data().to_vec() };
            (name, t)
        })
        .collect()
}

fn write_tensors(path: &Path, tensors: &BTreeMap<String, Owned>) {
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, t)| {
            let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap();
            (name.as_str(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Rewrites `dir/model.safetensors` through `edit`.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Owned>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = read_tensors(&path);
    edit(&mut tensors);
    write_tensors(&path, &tensors);
}

/// Rewrites `dir/params.json` through `edit`.
fn edit_params(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("params.json");
    let mut params: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(params.as_object_mut().unwrap());
    std::fs::write(&path, params.to_string()).unwrap();
}

/// Logits of every position of a fixed prompt.
fn prompt_logits(model: &std::sync::Arc<Model>) -> Vec<f32> {
    let mut engine = engine(model, 16);
    engine.add_sequence(1).unwrap();
    let prompt = tokens(40, model.cfg.vocab_size, 11);
    let item = StepItem::prefill(1, &prompt, Logits::All);
    engine.step(&[item]).unwrap().remove(0).logits.into_vec()
}

fn load(dir: &Path) -> std::sync::Arc<Model> {
    std::sync::Arc::new(Model::load(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())))
}

#[test]
fn params_json_errors_name_the_field() {
    let (_tmp, dir) = valid_model(false);
    let original = std::fs::read_to_string(dir.join("params.json")).unwrap();
    type Edit = fn(&mut serde_json::Map<String, Value>);
    let cases: [(&str, Edit, &[&str]); 8] = [
        (
            "missing field",
            |p| {
                p.remove("hidden_dim");
            },
            &["missing field", "hidden_dim"],
        ),
        (
            "wrong type",
            |p| {
                p.insert("dim".into(), json!("64"));
            },
            &["dim", "positive integer", "\"64\""],
        ),
        (
            "fractional",
            |p| {
                p.insert("vocab_size".into(), json!(300.5));
            },
            &["vocab_size", "positive integer"],
        ),
        (
            "zero",
            |p| {
                p.insert("n_attn_heads".into(), json!(0));
            },
            &["n_attn_heads", "positive integer"],
        ),
        (
            "odd layer count",
            |p| {
                p.insert("n_layers".into(), json!(7));
            },
            &["n_layers", "even", "7"],
        ),
        (
            "kv heads do not divide heads",
            |p| {
                p.insert("n_attn_kv_heads".into(), json!(3));
            },
            &["n_attn_kv_heads", "3"],
        ),
        (
            "rope_theta not a number",
            |p| {
                p.insert("rope_theta".into(), json!("large"));
            },
            &["rope_theta", "number"],
        ),
        (
            "sliding_window zero",
            |p| {
                p.insert("sliding_window".into(), json!(0));
            },
            &["sliding_window", "positive integer"],
        ),
    ];
    for (what, edit, parts) in cases {
        std::fs::write(dir.join("params.json"), &original).unwrap();
        edit_params(&dir, edit);
        let err = load_err(&dir);
        assert!(err.contains("params.json"), "{what}: {err}");
        assert_mentions(&err, parts);
    }

    std::fs::write(dir.join("params.json"), "{\"dim\": 64,").unwrap();
    assert_mentions(&load_err(&dir), &["params.json", "not valid JSON"]);
    std::fs::write(dir.join("params.json"), "[64]").unwrap();
    assert_mentions(&load_err(&dir), &["params.json", "JSON object"]);
    std::fs::remove_file(dir.join("params.json")).unwrap();
    assert_mentions(&load_err(&dir), &["cannot read", "params.json"]);
    assert_mentions(&load_err(&dir.join("no-such-dir")), &["cannot read", "no-such-dir"]);
}

#[test]
fn params_json_that_disagrees_with_the_weights_names_tensor_and_shapes() {
    let (_tmp, dir) = valid_model(false);
    edit_params(&dir, |p| {
        p.insert("vocab_size".into(), json!(301));
    });
    let err = load_err(&dir);
    assert_mentions(&err, &["[300, 64]", "[301, 64]", "model.safetensors"]);
    assert!(err.contains("output_projection.weight") || err.contains("embed_tokens.weight"), "{err}");
}

#[test]
fn no_safetensors_file() {
    let (_tmp, dir) = valid_model(false);
    std::fs::rename(dir.join("model.safetensors"), dir.join("model.safetensors.bak")).unwrap();
    assert_mentions(&load_err(&dir), &["no *.safetensors files", &dir.display().to_string()]);
}

#[test]
fn truncated_and_garbage_files_name_the_file() {
    let (_tmp, dir) = valid_model(false);
    let path = dir.join("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut garbage = vec![0u8; 4096];
    let mut x: u32 = 12345;
    for b in &mut garbage {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    let cases: [(&str, Vec<u8>); 7] = [
        ("empty", Vec::new()),
        ("shorter than the length prefix", good[..5].to_vec()),
        ("cut inside the header", good[..header_end / 2].to_vec()),
        ("cut inside the data", good[..(header_end + good.len()) / 2].to_vec()),
        ("missing its last byte", good[..good.len() - 1].to_vec()),
        ("random bytes", garbage),
        ("a huge header length", {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend_from_slice(&good[8..64]);
            b
        }),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(&dir);
        assert!(err.contains(&path.display().to_string()), "{what}: {err} does not name the file");
        assert!(err.contains("not a valid safetensors file"), "{what}: {err}");
    }
    // Garbage beside a good file is reported too, not skipped.
    std::fs::write(&path, &good).unwrap();
    std::fs::write(dir.join("zz-extra.safetensors"), b"not a tensor file").unwrap();
    assert_mentions(&load_err(&dir), &["zz-extra.safetensors", "not a valid safetensors file"]);
}

#[test]
fn missing_tensor_is_named() {
    for name in [
        "cross_decoder.k_proj.weight",
        "self_decoder.layers.3.mixer.gt_proj.weight",
        "layer_norm.weight",
        "embed_tokens.weight",
    ] {
        let (_tmp, dir) = valid_model(false);
        edit_tensors(&dir, |t| {
            t.remove(name).unwrap();
        });
        assert_mentions(&load_err(&dir), &[&format!("`{name}`"), "missing", &dir.display().to_string()]);
    }
}

#[test]
fn wrong_shape_names_tensor_file_and_both_shapes() {
    let (_tmp, dir) = valid_model(false);
    let name = "self_decoder.layers.1.mixer.q_proj.weight";
    edit_tensors(&dir, |t| {
        t.insert(name.into(), Owned::f32(vec![64, 63], 0.5));
    });
    let file = dir.join("model.safetensors").display().to_string();
    assert_mentions(&load_err(&dir), &[&format!("`{name}`"), &file, "[64, 63]", "[64, 64]"]);
    // A norm weight with an extra axis.
    let (_tmp, dir) = valid_model(false);
    let name = "cross_decoder.layers.2.final_layer_norm.weight";
    edit_tensors(&dir, |t| {
        t.insert(name.into(), Owned::f32(vec![1, 64], 1.0));
    });
    assert_mentions(&load_err(&dir), &[&format!("`{name}`"), "[1, 64]", "[64]"]);
}

#[test]
fn unsupported_dtype_is_named() {
    for (dtype, label) in [(Dtype::I32, "I32"), (Dtype::F64, "F64"), (Dtype::U8, "U8")] {
        let (_tmp, dir) = valid_model(false);
        let name = "layer_norm.weight";
        edit_tensors(&dir, |t| {
            t.insert(name.into(), Owned { dtype, shape: vec![64], data: vec![0; 64 * dtype.bitsize() / 8] });
        });
        assert_mentions(&load_err(&dir), &[&format!("`{name}`"), label, "model.safetensors", "F32, BF16"]);
    }
}

#[test]
fn duplicate_tensor_across_files_names_both() {
    let (_tmp, dir) = valid_model(false);
    let name = "cross_decoder.v_proj.weight";
    let tensors = read_tensors(&dir.join("model.safetensors"));
    let extra = BTreeMap::from([(name.to_string(), tensors[name].clone())]);
    write_tensors(&dir.join("extra.safetensors"), &extra);
    assert_mentions(&load_err(&dir), &[&format!("`{name}`"), "both", "model.safetensors", "extra.safetensors"]);
}

#[test]
fn index_json_outside_the_directory_or_broken_is_rejected() {
    let (tmp, dir) = valid_model(false);
    // A real file outside the model directory that the index tries to reach.
    std::fs::copy(dir.join("model.safetensors"), tmp.path().join("x.safetensors")).unwrap();
    let index = dir.join("model.safetensors.index.json");
    for target in ["../x.safetensors", "..", "sub/../../x.safetensors", "/etc/passwd"] {
        let json = json!({"metadata": {}, "weight_map": {"layer_norm.weight": target}});
        std::fs::write(&index, json.to_string()).unwrap();
        assert_mentions(&load_err(&dir), &["outside the model directory", target, "index.json"]);
    }
    let cases = [
        (json!({"metadata": {}}).to_string(), "weight_map"),
        (json!({"weight_map": {"layer_norm.weight": 7}}).to_string(), "not a file name"),
        ("{not json".to_string(), "index.json"),
        (json!({"weight_map": {"layer_norm.weight": "gone.safetensors"}}).to_string(), "gone.safetensors"),
    ];
    for (text, part) in cases {
        std::fs::write(&index, text).unwrap();
        assert_mentions(&load_err(&dir), &[part]);
    }
}

#[test]
fn sharded_checkpoint_with_index_loads_the_same_numbers() {
    let (tmp, dir) = valid_model(false);
    let want = prompt_logits(&load(&dir));
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::copy(dir.join("params.json"), sharded.join("params.json")).unwrap();
    let tensors = read_tensors(&dir.join("model.safetensors"));
    let (first, second): (BTreeMap<_, _>, BTreeMap<_, _>) =
        tensors.into_iter().partition(|(name, _)| name.starts_with("self_decoder."));
    let files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let mut weight_map = serde_json::Map::new();
    for (file, part) in files.iter().zip([&first, &second]) {
        write_tensors(&sharded.join(file), part);
        for name in part.keys() {
            weight_map.insert(name.clone(), json!(file));
        }
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    // A stray file the index does not name is not read.
    std::fs::write(sharded.join("stray.safetensors"), b"garbage").unwrap();
    let got = prompt_logits(&load(&sharded));
    assert_eq!(got, want);
}

#[test]
fn unaligned_f32_data_loads_the_same_numbers() {
    let (_tmp, dir) = valid_model(false);
    let want = prompt_logits(&load(&dir));
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Pad the JSON header by one space, so every tensor starts at an odd file offset.
    let mut moved = (n as u64 + 1).to_le_bytes().to_vec();
    moved.extend_from_slice(&bytes[8..8 + n]);
    moved.push(b' ');
    moved.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, moved).unwrap();
    let model = load(&dir);
    assert_eq!(model.embed_tokens.owned_bytes(), 300 * 64 * 4, "copied");
    assert_eq!(prompt_logits(&model), want);
}

#[test]
fn tied_model_uses_the_embedding_as_output_projection() {
    let (tmp, tied_dir) = valid_model(true);
    let tied = load(&tied_dir);
    assert!(tied.output_projection.is_none());

    // The same weights with output_projection.weight = embed_tokens.weight, written out.
    let copy_dir = tmp.path().join("untied-copy");
    std::fs::create_dir(&copy_dir).unwrap();
    std::fs::copy(tied_dir.join("params.json"), copy_dir.join("params.json")).unwrap();
    let mut tensors = read_tensors(&tied_dir.join("model.safetensors"));
    assert!(!tensors.contains_key("output_projection.weight"));
    let embed = tensors["embed_tokens.weight"].clone();
    tensors.insert("output_projection.weight".into(), embed);
    write_tensors(&copy_dir.join("model.safetensors"), &tensors);
    let copy = load(&copy_dir);
    assert!(copy.output_projection.is_some());

    let (a, b) = (prompt_logits(&tied), prompt_logits(&copy));
    let err = rel_err(&a, &b);
    assert!(err < 1e-6, "tied vs explicit copy: rel err {err}");

    // And the output projection matters: the same seed untied has its own random projection
    // (every other tensor is identical), which gives other logits.
    let untied_dir = tmp.path().join("untied-random");
    let untied = random_model(&small_config(SelfMixerKind::GatedRetention), 3, false, &untied_dir);
    assert!(rel_err(&prompt_logits(&untied), &a) > 0.1);
}

/// A gated-retention checkpoint under a params.json that says sliding window must not load with
/// its gates silently ignored.
#[test]
fn a_checkpoint_of_the_other_mixer_is_refused() {
    use yoco_worker::config::SelfMixerKind;
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::small_config(SelfMixerKind::GatedRetention);
    common::random_model(&cfg, 1, false, dir.path());
    let mut wrong = cfg.clone();
    wrong.mixer = SelfMixerKind::SlidingWindow { window: 4 };
    std::fs::write(dir.path().join("params.json"), wrong.to_json().to_string()).unwrap();
    let err = yoco_worker::model::Model::load(dir.path()).err().expect("must fail").to_string();
    assert!(err.contains("sliding-window") && err.contains("g_proj"), "{err}");
}
