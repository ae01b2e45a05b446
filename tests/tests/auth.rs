//! API keys end to end: with `--api-key-file` (and `YOCO_API_KEYS`), every public gRPC and HTTP
//! endpoint refuses a missing or wrong key with UNAUTHENTICATED / 401 and says nothing more,
//! health probes stay open, the command-line client sends `--api-key`, and editing the key file
//! rotates the keys without a restart.

use std::path::Path;
use std::time::{Duration, Instant};

use tonic::Code;
use yoco_e2e::http::http;
use yoco_e2e::server::{ids_prompt, Server};
use yoco_e2e::yoco;
use yoco_proto::v1 as pb;

fn with_key<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(k) = key {
        r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

fn get(addr: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"))
}

fn generate_request() -> pb::GenerateRequest {
    pb::GenerateRequest { prompt: ids_prompt(&[1, 2, 3]), max_tokens: Some(2), ..Default::default() }
}

async fn start(home: &Path, keys: &Path) -> Server {
    let model = home.join("m");
    yoco(home, &["init-model", "--preset", "tiny", "--vocab-size", "500", "--out", model.to_str().unwrap()]).ok();
    let args =
        ["serve", "--model", model.to_str().unwrap(), "--workers", "1", "--api-key-file", keys.to_str().unwrap()];
    let limits = ["--max-streams-per-key", "1", "--max-prompt-tokens", "100", "--request-timeout", "3"];
    let server = Server::spawn_with_env(home, &[&args[..], &limits].concat(), &[("YOCO_API_KEYS", "env-key")]);
    server.wait_serving(Duration::from_secs(60)).await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_endpoint_needs_a_key_and_keys_rotate() {
    let home = tempfile::tempdir().unwrap();
    let keys = home.path().join("keys");
    std::fs::write(&keys, "# clients\nkey-one\n").unwrap();
    let server = start(home.path(), &keys).await;
    let mut client = server.client().await;

    // gRPC: refused without a key or with a wrong one, and the refusal tells nothing.
    for key in [None, Some("nope")] {
        let e = client.generate(with_key(generate_request(), key)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(!e.message().contains("model") && !e.message().contains("queue"), "{}", e.message());
        assert_eq!(
            client.model_info(with_key(pb::ModelInfoRequest {}, key)).await.unwrap_err().code(),
            Code::Unauthenticated
        );
        let t = client.tokenize(with_key(pb::TokenizeRequest { text: "a".into() }, key)).await;
        assert_eq!(t.unwrap_err().code(), Code::Unauthenticated);
    }
    // The command-line client without a key; reflection is guarded too; health is not.
    let info = yoco(home.path(), &["client", "--addr", &format!("http://{}", server.addr), "info"]);
    assert!(!info.output.status.success(), "info without a key should fail");
    assert!(info.stderr().contains("Unauthenticated"), "{}", info.stderr());
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut r = ServerReflectionClient::new(server.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let e = r.server_reflection_info(tokio_stream::iter([req])).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    assert!(server.health().await.is_some());
    // With either key: served.
    for key in ["key-one", "env-key"] {
        let mut s = client.generate(with_key(generate_request(), Some(key))).await.unwrap().into_inner();
        let mut n = 0;
        while let Some(m) = s.message().await.unwrap() {
            if let Some(pb::generate_response::Event::Tokens(c)) = m.event {
                n += c.tokens.len();
            }
        }
        assert_eq!(n, 2, "{key}");
    }
    // The command-line client with --api-key.
    let run =
        yoco(home.path(), &["client", "--addr", &format!("http://{}", server.addr), "--api-key", "key-one", "info"])
            .ok();
    assert!(run.stdout().contains("\"world\""), "{}", run.stdout());

    // HTTP: 401 with an OpenAI error body on every route but the probes.
    for path in ["/v1/models", "/metrics"] {
        let (code, body) = get(&server.http, path, None);
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body.contains("invalid_request_error") && !body.contains("yoco:"), "{body}");
        assert_eq!(get(&server.http, path, Some("wrong")).0, 401);
        assert_eq!(get(&server.http, path, Some("key-one")).0, 200, "{path}");
    }
    assert_eq!(get(&server.http, "/health", None).0, 200);
    assert_eq!(get(&server.http, "/ready", None).0, 200);

    // Limits: one stream per key at a time, 100 prompt tokens, 3 s per request.
    let big = pb::GenerateRequest { prompt: ids_prompt(&[1; 101]), ..generate_request() };
    let e = client.generate(with_key(big, Some("env-key"))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("--max-prompt-tokens"), "{}", e.message());
    let long = pb::GenerateRequest { max_tokens: Some(100_000), ignore_eos: true, ..generate_request() };
    let started = Instant::now();
    let mut open = client.generate(with_key(long.clone(), Some("key-one"))).await.unwrap().into_inner();
    let second = client.generate(with_key(generate_request(), Some("key-one"))).await.unwrap_err();
    assert_eq!(second.code(), Code::ResourceExhausted);
    assert!(second.message().contains("--max-streams-per-key"), "{}", second.message());
    let other_key = client.generate(with_key(generate_request(), Some("env-key"))).await;
    assert!(other_key.is_ok(), "another key has its own streams");
    drop(other_key);
    let mut last = None;
    while let Some(m) = open.message().await.unwrap() {
        if let Some(pb::generate_response::Event::Finished(f)) = m.event {
            last = Some(f);
        }
    }
    let last = last.expect("a final message");
    assert_eq!(last.reason, pb::FinishReason::Cancelled as i32);
    assert!(last.error.contains("deadline"), "{}", last.error);
    assert!(started.elapsed() < Duration::from_secs(3 + 3), "the server's timeout took {:?}", started.elapsed());
    // The slot came back with the request's end.
    let started = Instant::now();
    loop {
        match client.generate(with_key(generate_request(), Some("key-one"))).await {
            Ok(_) => break,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the stream slot was not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Rotation: key-one goes, key-two comes; no restart.
    std::fs::write(&keys, "key-two\n").unwrap();
    let started = Instant::now();
    while get(&server.http, "/v1/models", Some("key-two")).0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(10), "the new key was not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&server.http, "/v1/models", Some("key-one")).0, 401);
    let e = client.model_info(with_key(pb::ModelInfoRequest {}, Some("key-one"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(client.model_info(with_key(pb::ModelInfoRequest {}, Some("key-two"))).await.is_ok());
}
