//! A real `yoco serve` (or `yoco coordinator`) process for end-to-end tests: started on port 0,
//! its address read from the line it prints, its health polled until SERVING (never slept on),
//! and a gRPC client for the public API.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use yoco_proto::v1 as pb;
use yoco_proto::v1::generation_client::GenerationClient;

use crate::yoco_bin;

pub const SERVICE: &str = "yoco.v1.Generation";

/// A running server process; killed when dropped.
pub struct Server {
    pub child: Child,
    /// `host:port` of the public gRPC API.
    pub addr: String,
    /// `host:port` of the HTTP API.
    pub http: String,
    pub stderr_path: std::path::PathBuf,
}

/// A `yoco` command with a clean environment (no `YOCO_*` from the caller), stderr to a file.
pub fn command(home: &Path, args: &[&str]) -> (Command, std::path::PathBuf) {
    let mut cmd = Command::new(yoco_bin());
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("YOCO_") {
            cmd.env_remove(&key);
        }
    }
    let log = home.join(format!("stderr-{}-{}.log", args[0], unique()));
    cmd.env("YOCO_HOME", home)
        .env("RUST_LOG", "info")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("stderr log"));
    (cmd, log)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Reads the first stdout line of `child`, a JSON object.
pub fn ready_json(child: &mut Child) -> serde_json::Value {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line).expect("read the ready line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line {line:?} is not JSON: {e}"))
}

/// `field` of the first stdout line of `child`.
pub fn ready_line(child: &mut Child, field: &str) -> String {
    let v = ready_json(child);
    v[field].as_str().unwrap_or_else(|| panic!("no {field} in {v}")).to_string()
}

impl Server {
    /// Starts `yoco serve --listen 127.0.0.1:0 args…` (or another subcommand given as
    /// `args[0]`) and waits until it is SERVING.
    pub async fn start(home: &Path, args: &[&str]) -> Server {
        let server = Self::spawn(home, args);
        server.wait_serving(Duration::from_secs(120)).await;
        server
    }

    /// Like [`Server::start`], without waiting for SERVING (it may be NOT_SERVING for long).
    pub fn spawn(home: &Path, args: &[&str]) -> Server {
        Self::spawn_with_env(home, args, &[])
    }

    /// Like [`Server::spawn`], with these variables set (the `YOCO_*` ones of the caller are not
    /// passed on, these are).
    pub fn spawn_with_env(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]);
        let (mut cmd, stderr_path) = command(home, &all);
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("start yoco");
        let line = ready_json(&mut child);
        let field = |k: &str| line[k].as_str().unwrap_or_else(|| panic!("no {k} in {line}")).to_string();
        Server { addr: field("grpc"), http: field("http"), child, stderr_path }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn health(&self) -> Option<ServingStatus> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).ok()?.connect().await.ok()?;
        let r = HealthClient::new(channel).check(HealthCheckRequest { service: SERVICE.into() }).await.ok()?;
        ServingStatus::try_from(r.into_inner().status).ok()
    }

    pub async fn wait_serving(&self, limit: Duration) {
        let started = Instant::now();
        loop {
            if self.health().await == Some(ServingStatus::Serving) {
                return;
            }
            assert!(started.elapsed() < limit, "the server did not become SERVING:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM (the shell's builtin kill: no procps needed).
    pub fn terminate(&self) {
        Command::new("sh").args(["-c", &format!("kill -TERM {}", self.child.id())]).status().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything one Generate stream said.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub request_id: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub text: String,
    pub progress: Vec<u64>,
    pub prompt_logprobs: Option<Vec<f32>>,
    pub finished: Option<pb::Finished>,
    pub status: Option<tonic::Status>,
    pub first_token: Option<Instant>,
}

impl Outcome {
    pub fn reason(&self) -> pb::FinishReason {
        pb::FinishReason::try_from(self.finished.as_ref().expect("a final message").reason).unwrap()
    }
}

/// Runs one Generate call to its end.
pub async fn generate(
    client: &mut GenerationClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Outcome, tonic::Status> {
    let stream = client.generate(req).await?.into_inner();
    Ok(drain(stream).await)
}

pub async fn drain(mut stream: tonic::Streaming<pb::GenerateResponse>) -> Outcome {
    let mut o = Outcome::default();
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(s) => {
                o.status = Some(s);
                break;
            }
        };
        o.request_id = msg.request_id;
        match msg.event {
            Some(pb::generate_response::Event::Progress(p)) => o.progress.push(p.prefilled_tokens),
            Some(pb::generate_response::Event::PromptLogprobs(p)) => o.prompt_logprobs = Some(p.logprobs),
            Some(pb::generate_response::Event::Tokens(c)) => {
                o.first_token.get_or_insert_with(Instant::now);
                o.tokens.extend(c.tokens.iter().map(|t| t.id));
                o.logprobs.extend(c.tokens.iter().map(|t| t.logprob));
                o.text.push_str(&c.text);
            }
            Some(pb::generate_response::Event::Finished(f)) => o.finished = Some(f),
            None => {}
        }
    }
    o
}

pub fn ids_prompt(ids: &[u32]) -> Option<pb::generate_request::Prompt> {
    Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: ids.to_vec() }))
}

/// Prompt tokens the prefix cache served for the request.
pub fn cached(o: &Outcome) -> u64 {
    o.finished.as_ref().expect("finished").usage.expect("usage").cached_prompt_tokens
}

/// The same answer: tokens, and log-probabilities (prompt ones too) within 1e-4 — what a request
/// served from a cache must give against one that was not.
pub fn assert_same(a: &Outcome, b: &Outcome, what: &str) {
    assert!(a.status.is_none() && b.status.is_none(), "{what}: {:?} {:?}", a.status, b.status);
    assert_eq!(a.tokens, b.tokens, "{what}: tokens");
    assert_eq!(a.logprobs.len(), b.logprobs.len());
    for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
        assert!((x - y).abs() <= 1e-4, "{what}: logprob {x} vs {y}");
    }
    let (pa, pb) = (a.prompt_logprobs.as_deref().unwrap_or(&[]), b.prompt_logprobs.as_deref().unwrap_or(&[]));
    assert_eq!(pa.len(), pb.len(), "{what}: prompt log-probabilities");
    for (x, y) in pa.iter().zip(pb) {
        assert!((x - y).abs() <= 1e-4 || (x.is_nan() && y.is_nan()), "{what}: prompt logprob {x} vs {y}");
    }
}
