//! `yoco serve` end to end: a real coordinator and two real worker processes on loopback, called
//! over gRPC. Streams must equal `yoco generate`; batching must not change tokens; a short
//! request must not wait for a long prefill; cancelling frees the cache on every rank; invalid
//! fields are named; SIGTERM drains; health and reflection work; `yoco coordinator` drives
//! workers started on their own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_stream::StreamExt;
use yoco_e2e::http::{http_get, http_post, parse_prometheus};
use yoco_e2e::server::{command, drain, generate, ids_prompt, ready_line, Outcome, Server, SERVICE};
use yoco_e2e::yoco;
use yoco_proto::v1 as pb;

const VOCAB: usize = 2000;

fn init_model(home: &Path) -> PathBuf {
    yoco_e2e::init_tiny_model(home, VOCAB)
}

fn prompt(n: usize, salt: usize) -> Vec<u32> {
    yoco_e2e::prompt_ids(n, salt, VOCAB)
}

fn request(ids: &[u32], max_tokens: u32, sampling: pb::SamplingParams) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: ids_prompt(ids),
        max_tokens: Some(max_tokens),
        sampling: Some(sampling),
        ignore_eos: true,
        ..Default::default()
    }
}

fn sampled(seed: u64) -> pb::SamplingParams {
    pb::SamplingParams { temperature: 0.9, top_p: Some(0.95), seed: Some(seed), ..Default::default() }
}

async fn serve(home: &Path, model: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["serve", "--model", model.to_str().unwrap(), "--workers", "2"];
    args.extend_from_slice(extra);
    Server::start(home, &args).await
}

/// Sends every request at once, each on its own stream; their outcomes, in order.
async fn concurrently(
    client: &pb::generation_client::GenerationClient<tonic::transport::Channel>,
    reqs: &[pb::GenerateRequest],
) -> Vec<Outcome> {
    let handles: Vec<_> = reqs
        .iter()
        .map(|r| {
            let (mut c, r) = (client.clone(), r.clone());
            tokio::spawn(async move { generate(&mut c, r).await.unwrap() })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_equal_yoco_generate_and_batching_changes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let server = serve(home.path(), &model, &["--max-batch-tokens", "512", "--prefill-chunk", "128"]).await;
    let mut client = server.client().await;

    // Greedy and seeded sampling, against the command line on the same model and workers.
    let ids = prompt(300, 0);
    let ids_arg = ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    for (sampling, flags) in [
        (pb::SamplingParams::default(), vec![]),
        (sampled(7), vec!["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"]),
    ] {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--workers", "2", "--json"];
        args.extend_from_slice(&["--prompt-ids", &ids_arg, "--max-tokens", "12", "--ignore-eos"]);
        args.extend_from_slice(&flags);
        let cli = yoco(home.path(), &args).ok().json();
        let o = generate(&mut client, request(&ids, 12, sampling)).await.unwrap();
        assert_eq!(o.tokens, u32s(&cli["tokens"]), "{flags:?}");
        assert_eq!(o.text, cli["text"].as_str().unwrap());
        for (a, b) in o.logprobs.iter().zip(cli["logprobs"].as_array().unwrap()) {
            let b = b.as_f64().unwrap() as f32;
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert_eq!(o.reason(), pb::FinishReason::Length);
        let f = o.finished.as_ref().unwrap();
        assert_eq!(f.usage.unwrap().prompt_tokens, 300);
        assert_eq!(f.usage.unwrap().completion_tokens, 12);
        assert!(o.status.is_none());
    }

    // 16 concurrent streams, mixed lengths and sampling, each equal to the same request alone.
    let reqs: Vec<pb::GenerateRequest> = (0..16)
        .map(|i| {
            let s = if i % 2 == 0 { pb::SamplingParams::default() } else { sampled(i as u64) };
            request(&prompt(10 + 83 * i, i + 1), 5 + (i % 4) as u32, s)
        })
        .collect();
    let mut alone = Vec::new();
    for r in &reqs {
        alone.push(generate(&mut client, r.clone()).await.unwrap());
    }
    for (i, (together, a)) in concurrently(&client, &reqs).await.iter().zip(&alone).enumerate() {
        assert_eq!(together.tokens, a.tokens, "request {i}");
        assert_eq!(together.text, a.text, "request {i}");
    }
    let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.world, 2);
    assert_eq!(info.vocab_size as usize, VOCAB);
    assert_eq!(info.ranks.len(), 2);
    assert!(info.cache_bytes_per_token > 0 && info.cache_capacity_tokens > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_request_gets_its_first_token_before_a_long_prefill_ends() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let server = serve(home.path(), &model, &["--max-batch-tokens", "1024", "--prefill-chunk", "512"]).await;
    let mut client = server.client().await;
    // ~60 steps of 1024 tokens: several seconds of prefill.
    let mut long = client.generate(request(&prompt(60_000, 3), 2, Default::default())).await.unwrap().into_inner();
    // Wait until the long prompt is under way.
    let first = long.next().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(pb::generate_response::Event::Progress(_))), "{first:?}");
    let short = generate(&mut client, request(&prompt(20, 4), 3, Default::default())).await.unwrap();
    let short_done = Instant::now();
    let long = drain(long).await;
    assert_eq!(short.tokens.len(), 3);
    let long_first = long.first_token.expect("the long request generated");
    assert!(short_done < long_first, "the short request waited for the long prefill");
    assert!(long.progress.len() >= 10, "progress: {:?}", long.progress);
    assert_eq!(long.reason(), pb::FinishReason::Length);
}

async fn cache_used(
    client: &mut yoco_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
) -> (Vec<u64>, u32) {
    let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    (info.ranks.iter().map(|r| r.cache_used_bytes).collect(), info.ranks.iter().map(|r| r.sequences).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_mid_stream_frees_the_sequence_on_every_rank() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let server = serve(home.path(), &model, &[]).await;
    let mut client = server.client().await;
    let (baseline, seqs) = cache_used(&mut client).await;
    assert_eq!(seqs, 0);
    let mut stream =
        client.generate(request(&prompt(3000, 5), 100_000, Default::default())).await.unwrap().into_inner();
    let mut tokens = 0;
    while tokens < 5 {
        if let Some(pb::generate_response::Event::Tokens(c)) = stream.next().await.unwrap().unwrap().event {
            tokens += c.tokens.len();
        }
    }
    let (during, seqs) = cache_used(&mut client).await;
    assert_eq!(seqs, 2, "the sequence lives on both ranks");
    assert!(during.iter().zip(&baseline).all(|(d, b)| d > b), "both ranks hold a shard: {during:?}");
    drop(stream);
    let started = Instant::now();
    loop {
        let (now, seqs) = cache_used(&mut client).await;
        if now == baseline && seqs == 0 {
            break;
        }
        // The prefix cache keeps snapshots of the prompt: the sequence is freed, they are not.
        if seqs == 0 {
            client.flush_prefix_cache(pb::FlushPrefixCacheRequest {}).await.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "not freed: {now:?}, {seqs} sequences");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A deadline cancels too.
    let mut req = tonic::Request::new(request(&prompt(100, 6), 100_000, Default::default()));
    req.set_timeout(Duration::from_millis(500));
    let r = client.generate(req).await;
    if let Ok(stream) = r {
        let o = drain(stream.into_inner()).await;
        assert!(o.finished.is_none() || o.reason() == pb::FinishReason::Cancelled);
    }
    let started = Instant::now();
    while cache_used(&mut client).await != (baseline.clone(), 0) {
        client.flush_prefix_cache(pb::FlushPrefixCacheRequest {}).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "deadline did not free the sequence");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_field_is_named_and_the_server_keeps_serving() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    // A small cache: 64 MiB per rank.
    let server = serve(home.path(), &model, &["--cache-mib", "64"]).await;
    let mut client = server.client().await;
    let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    let cap = info.max_request_tokens as u32;
    let ok = request(&[1, 2, 3], 4, Default::default());
    let s = |s: pb::SamplingParams| pb::GenerateRequest { sampling: Some(s), ..ok.clone() };
    let d = pb::SamplingParams::default;
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (pb::GenerateRequest { prompt: None, ..ok.clone() }, "prompt"),
        (pb::GenerateRequest { prompt: ids_prompt(&[]), ..ok.clone() }, "prompt"),
        (
            pb::GenerateRequest { prompt: Some(pb::generate_request::Prompt::Text(String::new())), ..ok.clone() },
            "prompt",
        ),
        (pb::GenerateRequest { prompt: ids_prompt(&[1, VOCAB as u32]), ..ok.clone() }, "prompt.token_ids"),
        (pb::GenerateRequest { max_tokens: Some(0), ..ok.clone() }, "max_tokens"),
        (pb::GenerateRequest { max_tokens: Some(cap), ..ok.clone() }, "max_tokens"),
        (pb::GenerateRequest { prompt: ids_prompt(&prompt(cap as usize + 1, 0)), ..ok.clone() }, "capacity"),
        (s(pb::SamplingParams { temperature: -0.5, ..d() }), "temperature"),
        (s(pb::SamplingParams { temperature: 1e6, ..d() }), "temperature"),
        (s(pb::SamplingParams { top_p: Some(1.5), ..d() }), "top_p"),
        (s(pb::SamplingParams { top_k: 1_000_000, ..d() }), "top_k"),
        (s(pb::SamplingParams { min_p: -0.1, ..d() }), "min_p"),
        (s(pb::SamplingParams { repetition_penalty: Some(-1.0), ..d() }), "repetition_penalty"),
        (s(pb::SamplingParams { presence_penalty: 5.0, ..d() }), "presence_penalty"),
        (s(pb::SamplingParams { frequency_penalty: f32::NAN, ..d() }), "frequency_penalty"),
        (pb::GenerateRequest { stop: vec![String::new()], ..ok.clone() }, "stop[0]"),
        (pb::GenerateRequest { stop_token_ids: vec![VOCAB as u32 + 5], ..ok.clone() }, "stop_token_ids"),
        (pb::GenerateRequest { logprobs: 100, ..ok.clone() }, "logprobs"),
        (pb::GenerateRequest { request_id: "x".repeat(1000), ..ok.clone() }, "request_id"),
    ];
    for (req, field) in cases {
        let e = client.generate(req.clone()).await.err().unwrap_or_else(|| panic!("{field}: accepted {req:?}"));
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {}", e.message());
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    // The same over HTTP: OpenAI-style 400s naming the field; no chat template, a clear 400.
    let (code, body) = http_post(&server.http, "/v1/completions", r#"{"prompt": [1, 2], "max_tokens": 0}"#);
    assert_eq!(code, 400, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["param"], "max_tokens");
    assert_eq!(err["error"]["type"], "invalid_request_error");
    // `param` as this API spells the field (gRPC's `sampling.temperature`, `prompt.token_ids`).
    for (body, param) in [
        (r#"{"prompt": [1, 2], "temperature": -1}"#, "temperature"),
        (r#"{"prompt": [1, 2], "top_k": 100000}"#, "top_k"),
        (r#"{"prompt": [1, 99999]}"#, "prompt"),
        (r#"{"prompt": [1, 2], "stop": ["a", ""]}"#, "stop"),
    ] {
        let (code, reply) = http_post(&server.http, "/v1/completions", body);
        assert_eq!(code, 400, "{reply}");
        let err: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(err["error"]["param"], param, "{body}: {reply}");
    }
    let (code, body) = http_post(&server.http, "/v1/completions", r#"{"prompt": [1], "model": "gpt-4"}"#);
    assert_eq!(code, 404, "{body}");
    let (code, body) = http_post(&server.http, "/v1/completions", "{not json");
    assert_eq!(code, 400, "{body}");
    // A body of several MB (a long prompt) is read, not refused by size: here its 1.2M tokens
    // are more than this small cache holds, which validation says.
    let long = format!(r#"{{"prompt": [{}1], "max_tokens": 1}}"#, "1,".repeat(1_200_000));
    assert!(long.len() > 2 << 20);
    let (code, body) = http_post(&server.http, "/v1/completions", &long);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("cache capacity"), "{body}");
    let (code, body) =
        http_post(&server.http, "/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "hi"}]}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("no chat template"), "{body}");
    let e = client.detokenize(pb::DetokenizeRequest { ids: vec![VOCAB as u32] }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Still serving, and right.
    let o = generate(&mut client, ok.clone()).await.unwrap();
    assert_eq!(o.tokens.len(), 4);
    let text = client.detokenize(pb::DetokenizeRequest { ids: o.tokens.clone() }).await.unwrap().into_inner().text;
    assert_eq!(text, o.text);
    let ids = client.tokenize(pb::TokenizeRequest { text: "hello world".into() }).await.unwrap().into_inner().ids;
    assert_eq!(ids, vec![15339, 1917]);
    assert!(!server.stderr().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let server = serve(home.path(), &model, &[]).await;
    let mut r = ServerReflectionClient::new(server.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = r.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = replies.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [SERVICE, "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    // With the plaintext health port too (as deploy/ runs it): each server must stop.
    let mut server = serve(home.path(), &model, &["--drain-timeout", "60", "--health-listen", "127.0.0.1:0"]).await;
    let mut client = server.client().await;
    let mut stream = client.generate(request(&prompt(50, 8), 40, Default::default())).await.unwrap().into_inner();
    // The request is running when the signal comes.
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(pb::generate_response::Event::Tokens(_))));
    server.terminate();
    let o = drain(stream).await;
    assert_eq!(o.reason(), pb::FinishReason::Length, "{:?}", o.finished);
    assert_eq!(o.tokens.len(), 39);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}:\n{}", server.stderr());
}

/// `yoco coordinator` for two `yoco worker` processes started on their own gives what `yoco
/// serve` gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_drives_workers_started_separately() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let mut workers = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let (mut cmd, _) = command(home.path(), &["worker", "--model", model.to_str().unwrap()]);
        let mut child = cmd.spawn().unwrap();
        addrs.push(ready_line(&mut child, "grpc"));
        workers.push(KillOnDrop(child));
    }
    let coordinator = Server::start(home.path(), &["coordinator", "--worker", &addrs.join(",")]).await;
    let served = serve(home.path(), &model, &[]).await;
    let req = request(&prompt(500, 9), 8, sampled(3));
    let a = generate(&mut coordinator.client().await, req.clone()).await.unwrap();
    let b = generate(&mut served.client().await, req).await.unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.reason(), pb::FinishReason::Length);
    let info = coordinator.client().await.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.ranks.iter().map(|r| r.address.clone()).collect::<Vec<_>>(), addrs);
}

/// `serve --tp 2 --cp 2`: four worker processes as a 2 × 2 grid serve concurrent streams with
/// the in-process engine's greedy tokens, and report the grid and each rank's weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_by_two_grid_serves_what_one_process_computes() {
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let m = model.to_str().unwrap();
    let args = ["serve", "--model", m, "--tp", "2", "--cp", "2", "--prefill-chunk", "64", "--max-batch-tokens", "512"];
    let server = Server::start(home.path(), &args).await;
    let mut client = server.client().await;
    let reqs: Vec<pb::GenerateRequest> =
        (0..4).map(|i| request(&prompt(40 + 150 * i, 20 + i), 6, pb::SamplingParams::default())).collect();
    for (i, (got, r)) in concurrently(&client, &reqs).await.iter().zip(&reqs).enumerate() {
        let ids = match &r.prompt {
            Some(pb::generate_request::Prompt::TokenIds(t)) => t.ids.iter().map(u32::to_string).collect::<Vec<_>>(),
            _ => unreachable!(),
        };
        let args = ["generate", "--model", m, "--json", "--max-tokens", "6", "--ignore-eos", "--prompt-ids"];
        let mut args = args.to_vec();
        let ids = ids.join(",");
        args.push(&ids);
        let one = yoco(home.path(), &args).ok().json();
        assert_eq!(got.tokens, u32s(&one["tokens"]), "request {i}");
        for (a, b) in got.logprobs.iter().zip(one["logprobs"].as_array().unwrap()) {
            let b = b.as_f64().unwrap() as f32;
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "request {i}: {a} vs {b}");
        }
    }
    let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.world, info.tp, info.cp, info.ranks.len()), (4, 2, 2, 4));
    // Each rank holds about half the weights (the norms and its copy of the one KV head are
    // not split).
    let (w0, w1) = (info.ranks[0].weight_bytes as f64, info.ranks[1].weight_bytes as f64);
    let one =
        yoco(home.path(), &["generate", "--model", m, "--json", "--max-tokens", "1", "--prompt-ids", "1"]).ok().json();
    let whole = one["weights"]["bytes"].as_f64().unwrap();
    for w in [w0, w1] {
        assert!(w > 0.5 * whole && w < 0.52 * whole, "a rank holds {w} of {whole} bytes");
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The API works from the official Python gRPC library: `examples/python/yoco_client.py`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_grpcio_client_works() {
    let python = yoco_e2e::python();
    let home = tempfile::tempdir().unwrap();
    let model = init_model(home.path());
    let server = serve(home.path(), &model, &[]).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/yoco_client.py");
    let ids = prompt(40, 10);
    let ids_arg = ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--addr", &server.addr, "generate", "--prompt-ids", &ids_arg, "--max-tokens", "6"])
        .args(["--temperature", "0.9", "--seed", "11", "--ignore-eos", "--json"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "python client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let py: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mine: Outcome = generate(
        &mut server.client().await,
        request(&ids, 6, pb::SamplingParams { temperature: 0.9, seed: Some(11), ..Default::default() }),
    )
    .await
    .unwrap();
    assert_eq!(u32s(&py["tokens"]), mine.tokens);
    assert_eq!(py["text"].as_str().unwrap(), mine.text);
    assert_eq!(py["finish_reason"], "length");
    // Health and model info through Python too.
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--addr", &server.addr, "info"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["health"], "SERVING");
    assert_eq!(info["world"], 2);
}

/// The HTTP API works from the official `openai` Python client: models, a completion equal to
/// the gRPC one, the same streamed, and an OpenAI-style 400 for a bad field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works() {
    let python = yoco_e2e::python();
    let home = tempfile::tempdir().unwrap();
    // The full cl100k vocabulary, so that chat text tokenizes into it, and a chat template.
    let model = home.path().join("m");
    yoco(home.path(), &["init-model", "--preset", "tiny", "--out", model.to_str().unwrap()]).ok();
    let template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";
    std::fs::write(model.join("tokenizer_config.json"), serde_json::json!({"chat_template": template}).to_string())
        .unwrap();
    let server = serve(home.path(), &model, &[]).await;
    assert_eq!(http_get(&server.http, "/health").0, 200);
    let (code, body) = http_get(&server.http, "/ready");
    assert_eq!((code, body.contains("true")), (200, true), "{body}");
    assert_eq!(http_get(&server.http, "/v1/chat/completions").0, 405, "chat is POST only");
    let ids = prompt(30, 12);
    let ids_arg = ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/openai_client.py");
    let base = format!("http://{}/v1", server.http);
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--base-url", &base, "--prompt-ids", &ids_arg, "--max-tokens", "7", "--chat", "Hi there"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "openai client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let py: Value = serde_json::from_slice(&out.stdout).unwrap();
    let grpc = generate(&mut server.client().await, request(&ids, 7, Default::default())).await.unwrap();
    assert_eq!(py["model"], "m");
    assert_eq!(py["text"].as_str().unwrap(), grpc.text);
    assert_eq!(py["streamed_text"].as_str().unwrap(), grpc.text);
    assert_eq!(py["finish_reason"], "length");
    assert_eq!(py["streamed_finish_reason"], "length");
    assert_eq!(py["usage"]["completion_tokens"], 7);
    // `stream_options.include_usage`, as the client reads it from the last chunk.
    assert_eq!(py["streamed_usage"], py["usage"]);
    assert_eq!(py["chat"]["streamed_usage"]["completion_tokens"], 7);
    assert!(py["chat"]["streamed_usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let lps: Vec<f32> = py["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    for (a, b) in lps.iter().zip(&grpc.logprobs) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
    }
    assert_eq!(py["error"]["status"], 400);
    assert!(py["error"]["message"].as_str().unwrap().contains("max_tokens"));
    // The chat reply is the completion of the rendered template.
    let rendered = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text("user: Hi there\nassistant:".into())),
        ..request(&[], 7, Default::default())
    };
    let want = generate(&mut server.client().await, rendered).await.unwrap();
    assert_eq!(py["chat"]["content"].as_str().unwrap(), want.text);
    assert_eq!(py["chat"]["streamed"].as_str().unwrap(), want.text);
    assert_eq!(py["chat"]["role"], "assistant");

    // /metrics is Prometheus text, and its counters moved with the three requests.
    let (code, text) = http_get(&server.http, "/metrics");
    assert_eq!(code, 200);
    let metrics = parse_prometheus(&text);
    let get = |k: &str| *metrics.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
    // Completion, streamed completion, gRPC; two chats and their gRPC twin: 6 × 7 tokens.
    assert_eq!(get("yoco_generation_tokens_total"), 42.0);
    assert_eq!(get("yoco_request_success_total{finished_reason=\"length\"}"), 6.0);
    assert_eq!(get("yoco_time_to_first_token_seconds_count"), 6.0);
    assert_eq!(get("yoco_inter_token_latency_seconds_count"), 36.0);
    assert!(get("yoco_prompt_tokens_total") >= 90.0);
    for rank in 0..2 {
        assert!(get(&format!("yoco_cache_capacity_bytes{{group=\"local\",rank=\"{rank}\"}}")) > 0.0);
    }
    // The last request's cache is freed in the step after its final message; what the prefix
    // cache kept of the prompts goes with a reset (vLLM's admin call).
    let (code, body) = http_post(&server.http, "/reset_prefix_cache", "");
    assert_eq!(code, 200, "{body}");
    // The gauges follow the scheduler's step after the final messages: read until they settle.
    let started = Instant::now();
    let running = loop {
        let m = parse_prometheus(&http_get(&server.http, "/metrics").1);
        let used: f64 = (0..2).map(|r| m[&format!("yoco_cache_used_bytes{{group=\"local\",rank=\"{r}\"}}")]).sum();
        let running = m["yoco_num_requests_running"];
        if used == 0.0 && running == 0.0 {
            break running;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "cache not freed: {used} bytes, {running} running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(running, 0.0);
    assert!(get("yoco_collective_seconds_count") >= 6.0 && get("yoco_collective_seconds_sum") > 0.0);
    // Logs carry request ids, never prompt text (unless --log-prompts).
    let logs = server.stderr();
    assert!(logs.contains("request=gen-"), "{logs}");
    assert!(!logs.contains("Hi there"), "prompt text in the logs:\n{logs}");
}

/// Until the worker group has formed, health says NOT_SERVING and `/ready` 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_group_forms() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let home = tempfile::tempdir().unwrap();
    // A "worker" that accepts connections and never answers: the group never forms.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let worker = silent.local_addr().unwrap().to_string();
    let args = ["coordinator", "--worker", &worker, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"];
    let (mut cmd, _) = command(home.path(), &args);
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let line = yoco_e2e::server::ready_json(&mut child.0);
    let (grpc, http) = (line["grpc"].as_str().unwrap().to_string(), line["http"].as_str().unwrap().to_string());
    let (code, body) = http_get(&http, "/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("starting"), "{body}");
    assert_eq!(http_get(&http, "/health").0, 200, "alive while starting");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await.unwrap();
    let status = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: SERVICE.into() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    let e = yoco_proto::v1::generation_client::GenerationClient::new(channel)
        .generate(request(&[1, 2], 2, Default::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    drop(silent);
}
