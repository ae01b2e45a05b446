//! `yoco serve` as third-party clients see it, on its defaults: the socket options of every
//! connection, what evaluation harnesses and load generators send over HTTP (echoed prompt
//! log-probabilities with their alternatives, lists of prompts, `stream_options`), grpcio's
//! reflection client, and `promtool` on the metrics.

use std::path::Path;

use serde_json::{json, Value};
use yoco_e2e::http::{http, http_get, http_post, http_post_events};
use yoco_e2e::server::{generate, ids_prompt, Server};
use yoco_e2e::sockets::{process_tree, tcp_connections};
use yoco_proto::v1 as pb;

const VOCAB: usize = 2000;

async fn serve(home: &Path) -> Server {
    let model = yoco_e2e::init_tiny_model(home, VOCAB);
    Server::start(home, &["serve", "--model", model.to_str().unwrap()]).await
}

fn prompt(n: usize, salt: usize) -> Vec<u32> {
    yoco_e2e::prompt_ids(n, salt, VOCAB)
}

fn greedy(ids: &[u32], max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: ids_prompt(ids),
        max_tokens: Some(max_tokens),
        sampling: Some(pb::SamplingParams::default()),
        ignore_eos: true,
        ..Default::default()
    }
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Every TCP connection of the server and its workers (public gRPC and HTTP accepted, the
/// coordinator's channels to the workers, the workers' accepted gRPC, the collectives) has
/// TCP_NODELAY: without it, streamed tokens wait on delayed ACKs (16 streams gave 0.23× the
/// tokens/s of 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_has_nodelay() {
    let home = tempfile::tempdir().unwrap();
    let server = serve(home.path()).await;
    // A gRPC channel and a kept-alive HTTP connection stay open while the sockets are read.
    let mut client = server.client().await;
    generate(&mut client, greedy(&prompt(20, 1), 3)).await.unwrap();
    let mut keep = std::net::TcpStream::connect(&server.http).unwrap();
    {
        use std::io::{Read, Write};
        write!(keep, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 256];
        let n = keep.read(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("HTTP/1.1 200"));
    }
    let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    let conns: Vec<_> = process_tree(server.child.id()).into_iter().flat_map(tcp_connections).collect();
    let slow: Vec<_> = conns.iter().filter(|c| !c.nodelay).collect();
    assert!(slow.is_empty(), "connections without TCP_NODELAY: {slow:#?}");
    // The sockets looked at include each kind named above.
    let local = |addr: &str| conns.iter().any(|c| c.local.to_string() == addr);
    let peer = |addr: &str| conns.iter().any(|c| c.peer.to_string() == addr);
    assert!(local(&server.addr) && local(&server.http), "{conns:#?}");
    for rank in &info.ranks {
        assert!(local(&rank.address) && peer(&rank.address), "rank {}: {conns:#?}", rank.address);
    }
    let pids: std::collections::HashSet<u32> = conns.iter().map(|c| c.pid).collect();
    assert_eq!(pids.len(), 1 + info.ranks.len(), "{conns:#?}");
    drop(keep);
}

/// How lm-evaluation-harness scores a continuation: `echo` + `logprobs: k` + `max_tokens: 1`.
/// Each prompt token after the first has its log-probability (equal to the gRPC API's prompt
/// log-probabilities) and a `{token: logprob}` dict of the k most likely tokens plus the actual
/// one; on a greedy continuation the actual token is the dict's maximum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_prompts_score_as_eval_harnesses_read_them() {
    let home = tempfile::tempdir().unwrap();
    let server = serve(home.path()).await;
    let mut client = server.client().await;
    // Context, then the model's own greedy continuation of it.
    let context = prompt(30, 2);
    let cont = generate(&mut client, greedy(&context, 6)).await.unwrap().tokens;
    let full: Vec<u32> = context.iter().chain(&cont).copied().collect();
    let want = generate(&mut client, pb::GenerateRequest { prompt_logprobs: true, ..greedy(&full, 1) })
        .await
        .unwrap()
        .prompt_logprobs
        .unwrap();

    let k = 3;
    let body =
        json!({"prompt": full, "max_tokens": 1, "echo": true, "logprobs": k, "temperature": 0, "ignore_eos": true});
    let body = body.to_string();
    let (code, body) = http_post(&server.http, "/v1/completions", &body);
    assert_eq!(code, 200, "{body}");
    let v = json_of(&body);
    let lp = &v["choices"][0]["logprobs"];
    let (lps, tops) = (lp["token_logprobs"].as_array().unwrap(), lp["top_logprobs"].as_array().unwrap());
    let tokens = lp["tokens"].as_array().unwrap();
    // The prompt, then the one generated token.
    assert_eq!((lps.len(), tops.len(), tokens.len()), (full.len() + 1, full.len() + 1, full.len() + 1));
    assert!(lps[0].is_null() && tops[0].is_null(), "nothing predicts the first token: {lp}");
    for i in 1..=full.len() {
        let got = lps[i].as_f64().unwrap() as f32;
        if i < full.len() {
            assert_eq!(got, want[i - 1], "position {i}");
        }
        let top = tops[i].as_object().unwrap_or_else(|| panic!("position {i}: {}", tops[i]));
        assert!(top.len() == k || top.len() == k + 1, "position {i}: {top:?}");
        let actual = tokens[i].as_str().unwrap();
        assert_eq!(top[actual].as_f64().unwrap() as f32, got, "position {i}: the actual token is in the dict");
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max) as f32;
        assert!(best >= got, "position {i}");
        // The harness's greedy check: over the continuation (and the generated token, sampled
        // greedily) the actual token is the most likely.
        if i >= context.len() {
            assert_eq!(best, got, "position {i} of a greedy continuation: {top:?}");
        }
    }
    // What the harness sums: the continuation's log-likelihood.
    let sum: f32 = lps[context.len()..full.len()].iter().map(|v| v.as_f64().unwrap() as f32).sum();
    let want_sum: f32 = want[context.len() - 1..].iter().sum();
    assert!((sum - want_sum).abs() <= 1e-5 * (1.0 + want_sum.abs()), "{sum} vs {want_sum}");

    // Streamed: the echoed prompt comes in one chunk with the same log-probabilities.
    let body = json!({"prompt": full, "max_tokens": 1, "echo": true, "logprobs": k, "temperature": 0, "stream": true, "ignore_eos": true});
    let (code, events) = http_post_events(&server.http, "/v1/completions", &body.to_string());
    assert_eq!(code, 200);
    let first = json_of(&events[0]);
    assert_eq!(first["choices"][0]["logprobs"]["token_logprobs"], json!(lps[..full.len()]));
    assert_eq!(first["choices"][0]["logprobs"]["top_logprobs"], json!(tops[..full.len()]));
    assert_eq!(events.last().unwrap(), "[DONE]");
}

/// A list of prompts gives one choice per prompt, in order, each what the prompt alone gives;
/// streamed, each chunk names its choice, and `stream_options.include_usage` adds a last chunk
/// with the usage of all (every other chunk has `usage: null`); vLLM's
/// `continuous_usage_stats` puts the usage so far in every chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_of_prompts_and_streamed_usage() {
    let home = tempfile::tempdir().unwrap();
    let server = serve(home.path()).await;
    let mut client = server.client().await;
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(10 + 7 * i, 3 + i)).collect();
    let mut want = Vec::new();
    for p in &prompts {
        want.push(generate(&mut client, greedy(p, 5)).await.unwrap().text);
    }
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();

    let body = json!({"prompt": prompts, "max_tokens": 5, "temperature": 0, "ignore_eos": true}).to_string();
    let (code, body) = http_post(&server.http, "/v1/completions", &body);
    assert_eq!(code, 200, "{body}");
    let v = json_of(&body);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!((c["index"].as_u64(), c["text"].as_str()), (Some(i as u64), Some(want[i].as_str())));
    }
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], 15);

    for continuous in [false, true] {
        let body = json!({"prompt": prompts, "max_tokens": 5, "temperature": 0, "ignore_eos": true, "stream": true,
                          "stream_options": {"include_usage": true, "continuous_usage_stats": continuous}});
        let (code, events) = http_post_events(&server.http, "/v1/completions", &body.to_string());
        assert_eq!(code, 200);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| json_of(e)).collect();
        let (last, rest) = chunks.split_last().unwrap();
        assert_eq!(last["choices"], json!([]), "{last}");
        assert_eq!(last["usage"]["prompt_tokens"], prompt_tokens);
        assert_eq!(last["usage"]["completion_tokens"], 15);
        assert_eq!(last["usage"]["total_tokens"], prompt_tokens + 15);
        let mut texts = vec![String::new(); 3];
        let mut finished = 0;
        for c in rest {
            let choice = &c["choices"][0];
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["text"].as_str().unwrap());
            finished += usize::from(!choice["finish_reason"].is_null());
            if continuous {
                assert_eq!(c["usage"]["prompt_tokens"], prompts[i].len(), "{c}");
                assert!(c["usage"]["completion_tokens"].as_u64().unwrap() <= 5, "{c}");
            } else {
                assert!(c["usage"].is_null() && c.get("usage").is_some(), "{c}");
            }
        }
        assert_eq!((texts, finished), (want.clone(), 3));
    }
    // Without the option no chunk has a usage field; with it but without streaming, a 400.
    let body = json!({"prompt": prompts[0], "max_tokens": 2, "stream": true});
    let (_, events) = http_post_events(&server.http, "/v1/completions", &body.to_string());
    assert!(events[..events.len() - 1].iter().all(|e| json_of(e).get("usage").is_none()), "{events:?}");
    let body = json!({"prompt": prompts[0], "stream_options": {"include_usage": true}});
    let (code, body) = http_post(&server.http, "/v1/completions", &body.to_string());
    assert_eq!(code, 400, "{body}");
    assert_eq!(json_of(&body)["error"]["param"], "stream_options");
    // A list with one bad prompt is refused whole, naming the field; the server goes on.
    let bad = json!({"prompt": [prompts[0].clone(), vec![VOCAB as u32 + 5]], "max_tokens": 2}).to_string();
    let (code, body) = http_post(&server.http, "/v1/completions", &bad);
    assert_eq!(code, 400, "{body}");
    let (code, body) = http_post(&server.http, "/v1/completions", r#"{"prompt": []}"#);
    assert_eq!(code, 400, "{body}");
    let (code, body) = http_post(&server.http, "/v1/completions", r#"{"prompt": ["a b", "c"], "max_tokens": 1}"#);
    assert_eq!((code, json_of(&body)["choices"].as_array().map(Vec::len)), (200, Some(2)), "{body}");
    assert!(!server.stderr().contains("panicked"));
}

/// grpcio's reflection client (v1alpha, the only one Python has) lists the services and reads
/// their descriptors; `promtool check metrics` finds nothing to say about `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_reflection_and_promtool_accept_the_server() {
    let python = yoco_e2e::python();
    let home = tempfile::tempdir().unwrap();
    let server = serve(home.path()).await;
    generate(&mut server.client().await, greedy(&prompt(20, 4), 3)).await.unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/yoco_client.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--addr", &server.addr, "reflect"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "grpcio reflection failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for s in ["yoco.v1.Generation", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"] {
        assert!(v["services"].as_array().unwrap().iter().any(|n| n == s), "{s} not in {v}");
    }
    assert!(v["methods"].as_array().unwrap().iter().any(|m| m == "Generate"), "{v}");
    assert!(v["generate_request_fields"].as_array().unwrap().iter().any(|f| f == "prompt_logprobs"), "{v}");

    let (code, metrics) = http_get(&server.http, "/metrics");
    assert_eq!(code, 200);
    let Some(promtool) = yoco_e2e::promtool() else { return };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}\n{metrics}");
    // A request with a bad method still gets an HTTP answer, not a dropped connection.
    let (code, _) = http(&server.http, "PUT /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(code, 405);
}
