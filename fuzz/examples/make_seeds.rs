//! Writes the seed corpus, `corpus/<target>/seed-*`: valid inputs made by the production
//! encoders (protobuf messages, frames from the collective's writer, `params.json` and
//! `model.safetensors` as `yoco init-model` writes them, snapshot files as a worker's disk tier
//! writes them), and runs each through its target once.
//!
//!     cd fuzz && cargo run --release --example make_seeds
//!
//! New seeds are committed with `git add -f` (fuzz/.gitignore keeps libFuzzer's own finds out).

use std::path::{Path, PathBuf};

use prost::Message;
use yoco_proto::v1 as api;
use yoco_proto::worker::v1 as wpb;
use yoco_worker::config::{ModelConfig, SelfMixerKind};
use yoco_worker::fuzzing;
use yoco_worker::plan::{DecodeWork, Plan, PrefillWork, SeqSpec};
use yoco_worker::presets::{write_random_model, Preset, StoreDtype};
use yoco_worker::sampling::SamplingParams;
use yoco_worker::service::convert;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| seeds.push((target, name.to_string(), bytes));

    // generate_request: [flags = cl100k vocabulary, protobuf mode][max_request_tokens: u16] + message.
    let header = [0x00u8, 0xff, 0x0f];
    let text = |t: &str| Some(api::generate_request::Prompt::Text(t.into()));
    let requests = [
        ("text", api::GenerateRequest { prompt: text("Hello, world!"), ..Default::default() }),
        (
            "ids-sampling",
            api::GenerateRequest {
                prompt: Some(api::generate_request::Prompt::TokenIds(api::TokenIds { ids: vec![15339, 1917, 0] })),
                max_tokens: Some(32),
                sampling: Some(api::SamplingParams {
                    temperature: 0.7,
                    top_p: Some(0.9),
                    top_k: 40,
                    min_p: 0.05,
                    seed: Some(7),
                    repetition_penalty: Some(1.1),
                    presence_penalty: 0.5,
                    frequency_penalty: -0.5,
                }),
                logprobs: 5,
                prompt_logprobs: true,
                request_id: "req-1".into(),
                ..Default::default()
            },
        ),
        (
            "stops",
            api::GenerateRequest {
                prompt: text("Grüße — 你好 🦀 <|endoftext|>"),
                max_tokens: Some(4),
                stop: vec!["\n\n".into(), "END".into()],
                stop_token_ids: vec![100257, 13],
                ignore_eos: true,
                ..Default::default()
            },
        ),
    ];
    for (name, req) in &requests {
        add("generate_request", name, [&header[..], &req.encode_to_vec()].concat());
    }

    // worker_step: [0] + StepRequest, [1] + StepResponse.
    let plan = Plan {
        add: vec![SeqSpec {
            seq: 3,
            sampling: SamplingParams { temperature: 0.5, top_k: 4, top_p: 0.9, seed: 7, ..Default::default() },
            top_logprobs: 2,
            prompt_logprobs: true,
            request_id: "req-3".into(),
            resume_from: Some(11),
            resumed_tokens: vec![5, 6],
        }],
        prefill: vec![PrefillWork {
            seq: 3,
            tokens: vec![1, 2, 3, 4],
            chunk_starts: vec![0, 2],
            sample: true,
            next_token: None,
            snapshot: Some(12),
        }],
        decode: vec![DecodeWork { seq: 9, token: 5 }],
        free: vec![4],
        drop_snapshots: vec![10],
    };
    add("worker_step", "plan", [&[0u8][..], &convert::plan_to_pb(1, &plan).encode_to_vec()].concat());
    let response = wpb::StepResponse {
        step_id: 1,
        results: vec![
            wpb::SequenceResult {
                seq_id: 3,
                token: Some(17),
                logprob: -0.25,
                top_logprobs: vec![wpb::TokenLogprob { token: 17, logprob: -0.25 }],
                prompt_logprobs: vec![-1.0, -2.0],
                shard_tokens: 2,
                ..Default::default()
            },
            wpb::SequenceResult { seq_id: 9, token: None, ..Default::default() },
        ],
        cache_used_bytes: 4096,
        step_seconds: 0.01,
        collective_seconds: 0.001,
        ..Default::default()
    };
    add("worker_step", "response", [&[1u8][..], &response.encode_to_vec()].concat());

    // collective_frames: [0] + a stream of frames, [1] + [world] + hello, [2] + structured.
    let mut frames = Vec::new();
    fuzzing::write_frame(&mut frames, 0, &[1.5, -2.0, f32::NAN]).unwrap();
    fuzzing::write_frame(&mut frames, 1, &[]).unwrap();
    fuzzing::write_frame(&mut frames, 2, &[0.25; 8]).unwrap();
    add("collective_frames", "stream", [&[0u8][..], &frames].concat());
    add("collective_frames", "hello", [&[1u8, 4][..], &fuzzing::hello(2, 4, 7), &7u32.to_le_bytes()].concat());
    // (Any bytes are a list of frames to write for the round trip; these are a stream's.)
    add("collective_frames", "round-trip", [&[2u8][..], &frames].concat());

    // model_config: params.json as `yoco init-model` writes it, for each preset and a window.
    let pretty = |cfg: &ModelConfig| (serde_json::to_string_pretty(&cfg.to_json()).unwrap() + "\n").into_bytes();
    for (name, preset) in [("tiny", Preset::Tiny), ("small", Preset::Small), ("3b", Preset::ThreeB)] {
        add("model_config", name, pretty(&preset.config()));
    }
    let mut window = Preset::Tiny.config();
    window.mixer = SelfMixerKind::SlidingWindow { window: 64 };
    add("model_config", "sliding-window", pretty(&window));

    // safetensors: a micro model written by `write_random_model` (what init-model runs), per
    // dtype, as one file ([0]) and cut in two ([1][cut: u16]); and a shard index.
    let micro = ModelConfig {
        dim: 4,
        n_layers: 2,
        hidden_dim: 8,
        n_self_heads: 2,
        n_attn_heads: 2,
        n_attn_kv_heads: 1,
        vocab_size: 8,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        mixer: SelfMixerKind::GatedRetention,
    };
    let tmp = std::env::temp_dir().join(format!("yoco-fuzz-seeds-{}", std::process::id()));
    for (name, dtype) in [("f32", StoreDtype::F32), ("bf16", StoreDtype::Bf16), ("f16", StoreDtype::F16)] {
        let dir = tmp.join(name);
        write_random_model(&micro, dtype, 1, name == "bf16", &dir).unwrap();
        let file = std::fs::read(dir.join("model.safetensors")).unwrap();
        if name == "f32" {
            add("model_config", "micro", std::fs::read(dir.join("params.json")).unwrap());
            let cut = (file.len() / 2) as u16;
            add("safetensors", "split-f32", [&[1u8][..], &cut.to_le_bytes(), &file].concat());
        }
        add("safetensors", name, [&[0u8][..], &file].concat());
    }
    std::fs::remove_dir_all(&tmp).unwrap();
    let index = serde_json::json!({
        "metadata": {"total_size": 1024},
        "weight_map": {"embed_tokens.weight": "model-00001-of-00002.safetensors",
                       "layer_norm.weight": "model-00002-of-00002.safetensors"}
    });
    add("safetensors", "index", serde_json::to_vec_pretty(&index).unwrap());

    // tokenizer: [0] + text, [1] + structured (stop strings, then token ids).
    for (name, t) in [
        ("ascii", "Hello, world! The quick brown fox."),
        ("unicode", "Grüße — 你好 🦀🦀 naïve café a\u{301}b 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 龘"),
        ("special", "<|endoftext|> <|fim_prefix|>x<|fim_suffix|>"),
        ("whitespace", "\n\n\t  code:\n    fn main() {}\r\n"),
    ] {
        add("tokenizer", name, [&[0u8][..], t.as_bytes()].concat());
    }
    let mut ids = vec![1u8, 1, 3, b'E', b'N', b'D'];
    for id in [15339u32, 1917, 100257, 100261, 100287, 0xffff_ffff] {
        ids.extend(id.to_le_bytes());
    }
    add("tokenizer", "ids", ids);

    // snapshot_file: [mode] + a file `SnapshotStore::encode` writes: a retention state and a
    // window's, two blocks beyond a parent; mode 1 recomputes the checksum of a mutated file.
    {
        use yoco_worker::engine::{ParentShape, SnapshotImage, StateImage};
        let image = SnapshotImage {
            pos: 14,
            states: vec![
                StateImage::Retention((0..16).map(|i| i as f32 * 0.25).collect()),
                StateImage::Window { keys: vec![1.5; 16], values: vec![-2.0; 16], rows: 2 },
            ],
            runs: vec![(4, 4), (12, 2)],
            rows: 6,
            lens: vec![8, 6],
            parent: Some(ParentShape { pos: 8, rows: 4, lens: vec![4, 4] }),
            blocks: vec![vec![3u8; 256], vec![9u8; 256]],
        };
        let store = yoco_fuzz::snapshot_file::store();
        let mut file = Vec::new();
        store.encode(&yoco_fuzz::snapshot_file::HASH, Some(&[5; 32]), &image, &mut file).unwrap();
        add("snapshot_file", "file", [&[0u8][..], &file].concat());
        add("snapshot_file", "rehash", [&[1u8][..], &file].concat());
    }

    for (target, name, bytes) in seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        let path: PathBuf = dir.join(format!("seed-{name}"));
        run(target, &bytes);
        std::fs::write(&path, &bytes).unwrap();
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
}

fn run(target: &str, data: &[u8]) {
    match target {
        "generate_request" => yoco_fuzz::generate_request::run(data),
        "worker_step" => yoco_fuzz::worker_step::run(data),
        "collective_frames" => yoco_fuzz::collective_frames::run(data),
        "model_config" => yoco_fuzz::model_config::run(data),
        "safetensors" => yoco_fuzz::safetensors::run(data),
        "tokenizer" => yoco_fuzz::tokenizer::run(data),
        "snapshot_file" => yoco_fuzz::snapshot_file::run(data),
        _ => unreachable!("{target}"),
    }
}
