//! When a server stops: a signal (SIGTERM, Ctrl-C) or, for a worker its parent started, the
//! end of standard input.

use tokio::io::AsyncReadExt;

/// Resolves on SIGTERM, Ctrl-C, or (when asked) the end of standard input.
pub async fn shutdown(watch_stdin: bool) {
    let stdin_closed = async {
        if watch_stdin {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        #[cfg(unix)]
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
        _ = stdin_closed => {}
    }
}
