//! TLS on every yoco endpoint (rustls): the public gRPC and HTTP APIs, and mutual TLS between
//! coordinators and workers.
//!
//! - A server given `--tls-cert`/`--tls-key` accepts only TLS; with `--tls-client-ca` also only
//!   clients presenting a certificate that CA signed (mutual TLS). A worker with TLS always
//!   requires client certificates: whoever can drive a worker can read every prompt it serves.
//! - Plaintext is served only on loopback unless `--allow-plaintext` says otherwise.
//! - Handshakes run concurrently, each bounded by [`HANDSHAKE_TIMEOUT`], so a client that
//!   opens a connection and sends nothing holds up no one else.
//! - `yoco certs` writes a private CA with server and client certificates signed by it, for
//!   development clusters and the tests; production deployments bring their own (cert-manager).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; beyond it, new connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

/// TLS for a server's listeners.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerTlsArgs {
    /// PEM certificate chain this server presents (with --tls-key): its listeners then take
    /// TLS only.
    #[arg(long, env = "YOCO_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "YOCO_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate one of them signed (mutual TLS).
    #[arg(long, env = "YOCO_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext on addresses other than loopback (refused by default).
    #[arg(long, env = "YOCO_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,
}

/// How a coordinator reaches its workers.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct WorkerTlsArgs {
    /// PEM CA certificates that signed the workers' certificates: talk to workers over TLS.
    #[arg(long, env = "YOCO_WORKER_TLS_CA", requires_all = ["worker_tls_cert", "worker_tls_key"])]
    pub worker_tls_ca: Option<PathBuf>,
    /// PEM certificate this coordinator presents to workers (mutual TLS).
    #[arg(long, env = "YOCO_WORKER_TLS_CERT", requires = "worker_tls_ca")]
    pub worker_tls_cert: Option<PathBuf>,
    /// PEM private key of --worker-tls-cert.
    #[arg(long, env = "YOCO_WORKER_TLS_KEY", requires = "worker_tls_ca")]
    pub worker_tls_key: Option<PathBuf>,
    /// Name the workers' certificates must carry (default: the host of each worker's address);
    /// on Kubernetes, where pod IPs are not known in advance, one DNS name shared by all.
    #[arg(long, env = "YOCO_WORKER_TLS_NAME", requires = "worker_tls_ca")]
    pub worker_tls_name: Option<String>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{what} {}", path.display()))
}

fn certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {}: no PEM certificate in it", path.display());
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration of a server, checked now (bad files fail at startup, not at the
/// first connection). `alpn`: `h2` for gRPC, `http/1.1` for the HTTP API.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = certs(cert, "TLS certificate")?;
    let key =
        PrivateKeyDer::from_pem_slice(&read(key, "TLS key")?).map_err(|e| anyhow!("TLS key {}: {e}", key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca, "client CA")? {
                roots.add(c).with_context(|| format!("client CA {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .with_context(|| format!("client CA {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .with_context(|| format!("TLS certificate {} and its key", cert.display()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

impl ServerTlsArgs {
    /// The server configuration, or None for plaintext, which is refused off loopback unless
    /// allowed. `what` names the listener in errors.
    pub fn for_listener(
        &self,
        addr: SocketAddr,
        what: &str,
        alpn: &[&[u8]],
    ) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(server_config(cert, key, self.tls_client_ca.as_deref(), alpn)?)),
            _ => {
                check_plaintext(addr, what, self.allow_plaintext)?;
                Ok(None)
            }
        }
    }
}

/// Plaintext is for loopback; elsewhere it must be asked for.
pub fn check_plaintext(addr: SocketAddr, what: &str, allowed: bool) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || allowed {
        return Ok(());
    }
    bail!(
        "refusing to serve {what} in plaintext on {addr}, which is not loopback: give --tls-cert and --tls-key, \
         or --allow-plaintext"
    )
}

/// A listener's accepted connections, TLS handshakes done: for tonic's `serve_with_incoming`
/// and, through [`TlsListener`], for axum. Failed handshakes are logged and dropped.
pub fn incoming(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> mpsc::Receiver<TlsStream<TcpStream>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(tls).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// TLS connections for `tonic::transport::Server::serve_with_incoming`.
pub fn incoming_stream(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl tokio_stream::Stream<Item = io::Result<TlsStream<TcpStream>>> {
    let rx = incoming(listener, config);
    tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

/// An axum listener that hands out TLS connections.
pub struct TlsListener {
    rx: mpsc::Receiver<TlsStream<TcpStream>>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(TlsListener { rx: incoming(listener, config), local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.rx.recv().await {
                Some(tls) => {
                    let peer = tls.get_ref().0.peer_addr().unwrap_or(self.local);
                    return (tls, peer);
                }
                // The acceptor task never ends while we hold the receiver; should it, stop
                // accepting instead of spinning.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl WorkerTlsArgs {
    /// tonic's client TLS for worker connections, or None for plaintext.
    pub fn client_config(&self) -> anyhow::Result<Option<WorkerTls>> {
        let (Some(ca), Some(cert), Some(key)) = (&self.worker_tls_ca, &self.worker_tls_cert, &self.worker_tls_key)
        else {
            return Ok(None);
        };
        // Parsed now so that a bad file fails at startup.
        certs(ca, "worker CA")?;
        certs(cert, "worker client certificate")?;
        let key_pem = read(key, "worker client key")?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| anyhow!("worker client key {}: {e}", key.display()))?;
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(ca, "worker CA")?))
            .identity(tonic::transport::Identity::from_pem(read(cert, "worker client certificate")?, key_pem));
        Ok(Some(WorkerTls { config, name: self.worker_tls_name.clone() }))
    }
}

/// Mutual TLS to the workers.
#[derive(Debug, Clone)]
pub struct WorkerTls {
    config: tonic::transport::ClientTlsConfig,
    /// The name every worker certificate carries, if not each one's host.
    name: Option<String>,
}

/// An endpoint for a worker at `addr` (`host:port`): TLS when configured, else plaintext, which
/// is refused for workers off loopback unless allowed.
pub fn worker_endpoint(
    addr: &str,
    tls: Option<&WorkerTls>,
    allow_plaintext: bool,
) -> anyhow::Result<tonic::transport::Endpoint> {
    match tls {
        Some(t) => {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']);
            let name = t.name.clone().unwrap_or_else(|| host.to_string());
            Ok(tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(t.config.clone().domain_name(name))?)
        }
        None => {
            let loopback = addr.parse::<SocketAddr>().map(|a| a.ip().is_loopback()).unwrap_or(false)
                || addr.starts_with("localhost:");
            if !loopback && !allow_plaintext {
                bail!(
                    "refusing to talk to worker {addr} in plaintext (not loopback): give --worker-tls-ca, \
                     --worker-tls-cert and --worker-tls-key, or --allow-plaintext"
                );
            }
            Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?)
        }
    }
}

/// `yoco certs`: a private CA and certificates it signs, PEM files in one directory.
#[derive(clap::Args)]
pub struct CertsArgs {
    /// Directory to write into (created if missing); existing files are not overwritten.
    #[arg(long)]
    out: PathBuf,
    /// Names (DNS names or IP addresses) the server certificate is valid for; repeat or
    /// comma-separate.
    #[arg(long, value_delimiter = ',', default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    name: Vec<String>,
    /// Days the certificates are valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

/// Writes ca.pem/ca.key, server.pem/server.key (for the names given) and client.pem/client.key
/// (a client identity for mutual TLS), all signed by the new CA.
pub fn write_certs(args: CertsArgs) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    if args.days == 0 || args.days > 3650 {
        bail!("--days must be 1 to 3650");
    }
    let files = ["ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"];
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    if let Some(f) = files.iter().find(|f| args.out.join(f).exists()) {
        bail!("{} exists: not overwriting certificates", args.out.join(f).display());
    }
    let now = time::OffsetDateTime::now_utc();
    let validity = |p: &mut CertificateParams| {
        p.not_before = now - Duration::from_secs(86400); // a day of slack for skewed clocks
        p.not_after = now + Duration::from_secs(u64::from(args.days) * 86400);
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "yoco CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key)?;
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| -> anyhow::Result<(String, String)> {
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server, server_key) = leaf(args.name.clone(), "yoco server", ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client, client_key) = leaf(vec!["yoco-client".into()], "yoco client", ExtendedKeyUsagePurpose::ClientAuth)?;
    let contents = [ca.pem(), ca_key_pem, server, server_key, client, client_key];
    for (name, text) in files.iter().zip(contents) {
        write_private(&args.out.join(name), &text)?;
    }
    println!("{}", serde_json::json!({"dir": args.out.display().to_string(), "names": args.name, "files": files}));
    Ok(())
}

/// Keys are readable by their owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
