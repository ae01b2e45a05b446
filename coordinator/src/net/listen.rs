//! Accepting plaintext connections: every socket yoco accepts gets TCP_NODELAY (the TLS
//! listeners of [`crate::net::tls`] set it too, and yoco's own outgoing gRPC channels and
//! collectives set it where they connect).
//!
//! Streamed tokens are small writes. With Nagle's algorithm a small write waits for the ACK of
//! the one before it, and the peer delays its ACKs: with enough concurrent streams the workers'
//! responses fall into that rhythm and throughput collapses (docs/benchmarks.md has the sweep).
//! tonic's `Server::tcp_nodelay` applies to `serve`, not to `serve_with_incoming`, and axum's
//! `serve` leaves the sockets as accepted, so it is set here.

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// A gRPC server's connections (`Server::serve_with_incoming*`).
pub fn grpc(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// An HTTP server's connections (`axum::serve`).
pub fn http(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    })
}
