//! The built-in default model (trained by `tools/train/`), served by `yoco serve` with two worker
//! processes, against what PyTorch's float64 reference computed from the same files
//! (`tests/fixtures/default_model.json`, written by `tools/train/evaluate.py`): the tokenizer
//! gives the same ids, the held-out perplexity matches within 1e-3 relative, and greedy
//! continuations — of short English prompts and of a ~1K-token passkey prompt — are the same
//! tokens, and the passkey answer is the key.

use yoco_e2e::server::{generate, Server};
use yoco_proto::v1 as pb;

fn fixture() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/default_model.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read the fixture")).expect("fixture JSON")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("an id array").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

fn text_request(text: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(text.to_string())),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_model_matches_the_pytorch_reference_served_by_two_workers() {
    let fx = fixture();
    let home = tempfile::tempdir().unwrap();
    let server = Server::start(home.path(), &["serve", "--workers", "2"]).await;
    let mut client = server.client().await;

    // The tokenizer: yoco's `tokenizers` reads tokenizer.json as Python's did.
    let held = &fx["heldout"];
    let text = held["text"].as_str().unwrap();
    let want_ids = ids(&held["ids"]);
    let got = client.tokenize(pb::TokenizeRequest { text: text.into() }).await.unwrap().into_inner();
    assert_eq!(got.ids, want_ids, "tokenizer ids differ from Python's");

    // Held-out perplexity from prompt log-probabilities (cross-decoder on every position,
    // context-parallel over the two workers).
    let mut req = text_request(text, 1);
    req.prompt_logprobs = true;
    let out = generate(&mut client, req).await.unwrap();
    assert!(out.status.is_none(), "{:?}\n{}", out.status, server.stderr());
    let lps = out.prompt_logprobs.expect("prompt log-probabilities");
    assert_eq!(lps.len(), want_ids.len() - 1);
    let nll = -lps.iter().map(|&x| f64::from(x)).sum::<f64>() / lps.len() as f64;
    let ppl = nll.exp();
    let ref_ppl = held["perplexity"].as_f64().unwrap();
    let rel = (ppl / ref_ppl - 1.0).abs();
    eprintln!("held-out perplexity: yoco {ppl:.5}, PyTorch {ref_ppl:.5}, relative difference {rel:.2e}");
    assert!(rel < 1e-3, "perplexity {ppl} vs reference {ref_ppl} ({rel:.2e} relative)");

    // Greedy continuations of short English prompts: the reference's tokens exactly.
    for c in fx["continuations"].as_array().unwrap() {
        let prompt = c["prompt"].as_str().unwrap();
        let want = ids(&c["greedy_ids"]);
        let out = generate(&mut client, text_request(prompt, want.len() as u32)).await.unwrap();
        assert_eq!(out.tokens, want, "greedy continuation of {prompt:?}: yoco said {:?}", out.text);
        eprintln!("{prompt:?} -> {:?}", out.text);
    }

    // The passkey prompt (~1K tokens, context-parallel prefill over the two ranks).
    let pk = &fx["passkey"];
    let want = ids(&pk["greedy_ids"]);
    let out = generate(&mut client, text_request(pk["prompt"].as_str().unwrap(), want.len() as u32)).await.unwrap();
    assert_eq!(out.tokens, want, "passkey answer: yoco said {:?}", out.text);
    eprintln!("passkey {} -> {:?}", pk["key"], out.text);
    // And that answer is the key: the model retrieves it from the sharded global cache.
    let key = pk["key"].as_str().unwrap();
    assert!(out.text.trim_start().starts_with(key), "passkey {key}: yoco answered {:?}", out.text);
    assert_eq!(out.finished.unwrap().usage.unwrap().prompt_tokens, pk["prompt_tokens"].as_u64().unwrap());
}
