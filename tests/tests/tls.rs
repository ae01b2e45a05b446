//! TLS end to end, with certificates from `yoco certs`: the public gRPC and HTTP APIs over TLS
//! and mutual TLS, coordinator-to-worker mutual TLS, the plaintext health port, and plaintext
//! refused off loopback.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use yoco_e2e::server::{command, drain, ids_prompt, ready_json, Server, SERVICE};
use yoco_e2e::yoco;
use yoco_proto::v1 as pb;
use yoco_proto::v1::generation_client::GenerationClient;

const VOCAB: usize = 2000;

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

fn certs(home: &Path) -> std::path::PathBuf {
    let dir = home.join("certs");
    yoco(home, &["certs", "--out", dir.to_str().unwrap()]).ok();
    dir
}

/// A TLS channel to `addr` checked against the test CA, presenting the client certificate when
/// `mutual`.
async fn tls_channel(addr: &str, certs: &Path, mutual: bool) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(certs, "ca.pem")));
    if mutual {
        tls = tls.identity(Identity::from_pem(read(certs, "client.pem"), read(certs, "client.key")));
    }
    Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls.domain_name("localhost"))?.connect().await
}

async fn health(addr: &str) -> Option<ServingStatus> {
    let channel = Endpoint::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
    let r = HealthClient::new(channel).check(HealthCheckRequest { service: SERVICE.into() }).await.ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

async fn wait_serving(health_addr: &str, server: &Server) {
    let started = Instant::now();
    while health(health_addr).await != Some(ServingStatus::Serving) {
        assert!(started.elapsed() < Duration::from_secs(120), "not SERVING:\n{}", server.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn generate(channel: Channel) -> Result<String, tonic::Status> {
    let ids = yoco_e2e::prompt_ids(12, 1, VOCAB);
    let req = pb::GenerateRequest { prompt: ids_prompt(&ids), max_tokens: Some(4), ..Default::default() };
    let stream = GenerationClient::new(channel).generate(req).await?.into_inner();
    let out = drain(stream).await;
    match out.status {
        Some(s) => Err(s),
        None => Ok(out.text),
    }
}

/// An HTTPS request with the system Python's ssl module (the CA, and the client certificate when
/// `mutual`); the status code, or the error's text.
fn https_get(addr: &str, path: &str, certs: &Path, mutual: bool) -> String {
    let script = r#"
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])
if sys.argv[4] == "1":
    ctx.load_cert_chain(sys.argv[3] + "/client.pem", sys.argv[3] + "/client.key")
try:
    r = urllib.request.urlopen(sys.argv[1], context=ctx, timeout=10)
    print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception as e:
    print("error:", e)
"#;
    let port = addr.rsplit_once(':').unwrap().1;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &format!("https://localhost:{port}{path}")])
        .arg(certs.join("ca.pem"))
        .arg(certs)
        .arg(if mutual { "1" } else { "0" })
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Starts a server on loopback port 0: it, and its plaintext health address.
fn spawn(home: &Path, args: &[&str]) -> (Server, String) {
    let mut all = args.to_vec();
    all.extend(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]);
    let (mut cmd, stderr_path) = command(home, &all);
    let mut child = cmd.spawn().unwrap();
    let line = ready_json(&mut child);
    assert_eq!(line["tls"], true, "{line}");
    let field = |k: &str| line[k].as_str().unwrap_or_else(|| panic!("no {k} in {line}")).to_string();
    (Server { addr: field("grpc"), http: field("http"), child, stderr_path }, field("health"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_api_over_tls_and_mutual_tls() {
    let home = tempfile::tempdir().unwrap();
    let certs = certs(home.path());
    let model = yoco_e2e::init_tiny_model(home.path(), VOCAB);
    let (cert, key, ca) = (certs.join("server.pem"), certs.join("server.key"), certs.join("ca.pem"));
    let tls_args = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let base = ["serve", "--workers", "1", "--model", model.to_str().unwrap(), "--health-listen", "127.0.0.1:0"];

    // TLS: a client that checks the server against the CA is served, gRPC and HTTP alike.
    let args: Vec<&str> = base.iter().chain(&tls_args).copied().collect();
    let (server, health_addr) = spawn(home.path(), &args);
    wait_serving(&health_addr, &server).await;
    let text = generate(tls_channel(&server.addr, &certs, false).await.unwrap()).await.unwrap();
    assert!(!text.is_empty());
    assert_eq!(https_get(&server.http, "/v1/models", &certs, false), "200");
    // A plaintext client gets nothing: the connection fails (no HTTP/2 over a TLS port).
    let plain = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    assert!(generate(plain).await.is_err());
    let (code, _) =
        yoco_e2e::http::try_http(&server.http, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_or((0, String::new()));
    assert_ne!(code, 200, "plaintext HTTP must not be served on the TLS port");
    // A client that does not trust the server's CA refuses it.
    let untrusted = Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(ClientTlsConfig::new().domain_name("localhost"))
        .unwrap()
        .connect()
        .await;
    assert!(untrusted.is_err());
    // The CLI: `yoco client --tls-ca`.
    let port = server.addr.rsplit_once(':').unwrap().1.to_string();
    let addr = format!("https://localhost:{port}");
    let info = yoco(home.path(), &["client", "--addr", &addr, "--tls-ca", ca.to_str().unwrap(), "info"]).ok();
    assert!(info.stdout().contains("\"model\""), "{}", info.stdout());
    yoco(home.path(), &["client", "--addr", &addr, "info"]).fails_with(&["UnknownIssuer"]);
    drop(server);

    // Mutual TLS: without a client certificate, neither gRPC nor HTTP serves.
    let mut args: Vec<&str> = args.clone();
    args.extend(["--tls-client-ca", ca.to_str().unwrap()]);
    let (server, health_addr) = spawn(home.path(), &args);
    wait_serving(&health_addr, &server).await;
    let anonymous = match tls_channel(&server.addr, &certs, false).await {
        Ok(c) => generate(c).await.map(|_| ()),
        Err(_) => Err(tonic::Status::unavailable("handshake refused")),
    };
    assert!(anonymous.is_err(), "a client without a certificate was served");
    assert!(https_get(&server.http, "/v1/models", &certs, false).starts_with("error:"));
    let text = generate(tls_channel(&server.addr, &certs, true).await.unwrap()).await.unwrap();
    assert!(!text.is_empty());
    assert_eq!(https_get(&server.http, "/v1/models", &certs, true), "200");
}

/// Starts `yoco worker` with `extra` flags on loopback; its gRPC address.
fn worker(home: &Path, model: &Path, extra: &[&str]) -> (std::process::Child, String) {
    let mut args = vec!["worker", "--model", model.to_str().unwrap(), "--exit-on-stdin-close"];
    args.extend_from_slice(extra);
    let (mut cmd, _) = command(home, &args);
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let line = ready_json(&mut child);
    (child, line["grpc"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_workers_use_mutual_tls() {
    let home = tempfile::tempdir().unwrap();
    let certs = certs(home.path());
    let model = yoco_e2e::init_tiny_model(home.path(), VOCAB);
    let p = |n: &str| certs.join(n).to_str().unwrap().to_string();
    let worker_tls = ["--tls-cert", &p("server.pem"), "--tls-key", &p("server.key"), "--tls-client-ca", &p("ca.pem")];
    let (mut w0, a0) = worker(home.path(), &model, &worker_tls);
    let (mut w1, a1) = worker(home.path(), &model, &worker_tls);
    let workers = format!("{a0},{a1}");

    // Without a client certificate (plaintext, or TLS with the wrong identity) the workers refuse
    // the coordinator, and it says which worker.
    let run = yoco(
        home.path(),
        &["coordinator", "--worker", &workers, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
    );
    run.fails_with(&["forming the worker group", &a0]);
    let server_as_client =
        ["--worker-tls-ca", &p("ca.pem"), "--worker-tls-cert", &p("server.pem"), "--worker-tls-key", &p("server.key")];
    let mut args = vec!["coordinator", "--worker", &workers, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"];
    args.extend_from_slice(&server_as_client);
    yoco(home.path(), &args).fails_with(&["forming the worker group", &a0]);

    // With the client certificate, the group forms and serves, context-parallel over 2 ranks.
    let client_tls = [
        "--worker-tls-ca",
        &p("ca.pem"),
        "--worker-tls-cert",
        &p("client.pem"),
        "--worker-tls-key",
        &p("client.key"),
        "--worker-tls-name",
        "localhost",
    ];
    let mut args = vec!["coordinator", "--worker", &workers];
    args.extend_from_slice(&client_tls);
    let server = Server::start(home.path(), &args).await;
    let text = generate(server.channel().await).await.unwrap();
    assert!(!text.is_empty());
    let info = server.client().await.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.groups.iter().map(|g| g.world).sum::<u32>(), 2, "{info:?}");
    drop(server);
    let _ = (w0.kill(), w1.kill(), w0.wait(), w1.wait());
}

#[test]
fn plaintext_is_refused_off_loopback_unless_allowed() {
    let home = tempfile::tempdir().unwrap();
    let model = yoco_e2e::init_tiny_model(home.path(), VOCAB);
    let m = model.to_str().unwrap();
    yoco(home.path(), &["serve", "--model", m, "--listen", "0.0.0.0:0", "--http-listen", "127.0.0.1:0"]).fails_with(&[
        "refusing to serve the gRPC API in plaintext on 0.0.0.0:0",
        "--tls-cert",
        "--allow-plaintext",
    ]);
    yoco(home.path(), &["serve", "--model", m, "--listen", "127.0.0.1:0", "--http-listen", "0.0.0.0:0"])
        .fails_with(&["refusing to serve the HTTP API in plaintext on 0.0.0.0:0"]);
    yoco(home.path(), &["worker", "--model", m, "--listen", "0.0.0.0:0"])
        .fails_with(&["refusing to serve the worker's gRPC in plaintext on 0.0.0.0:0"]);
    yoco(home.path(), &["worker", "--model", m, "--collective-listen", "0.0.0.0:0"]).fails_with(&[
        "the collective",
        "is not encrypted",
        "--allow-plaintext",
    ]);
    yoco(
        home.path(),
        &["coordinator", "--worker", "10.1.2.3:50061", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
    )
    .fails_with(&["refusing to talk to worker 10.1.2.3:50061 in plaintext", "--worker-tls-ca"]);
    let certs = certs(home.path());
    let c = |n: &str| certs.join(n).to_str().unwrap().to_string();
    yoco(home.path(), &["worker", "--model", m, "--tls-cert", &c("server.pem"), "--tls-key", &c("server.key")])
        .fails_with(&["a worker with TLS needs --tls-client-ca"]);
    // Certificates are checked at startup: a key that is not one fails before anything listens.
    yoco(home.path(), &["serve", "--model", m, "--tls-cert", &c("server.pem"), "--tls-key", &c("ca.pem")])
        .fails_with(&["TLS key", "ca.pem"]);

    // Allowed explicitly, it starts (and is stopped at once).
    let (mut cmd, _) = command(home.path(), &["worker", "--model", m, "--listen", "0.0.0.0:0", "--allow-plaintext"]);
    let mut child = cmd.spawn().unwrap();
    let line = ready_json(&mut child);
    assert!(line["grpc"].as_str().unwrap().starts_with("0.0.0.0:"), "{line}");
    let _ = (child.kill(), child.wait());
}
