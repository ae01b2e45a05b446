//! A real etcd server for the membership tests: Debian's `etcd-server` (`etcd` on PATH, or
//! `YOCO_TEST_ETCD`), one member on loopback ports picked free, its data in a test folder so
//! that it can be killed and restarted with the same state.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    starts: usize,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The etcd binary: `YOCO_TEST_ETCD`, else `etcd` on PATH, else Debian's /usr/bin/etcd.
fn etcd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("YOCO_TEST_ETCD") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!("no etcd server: install Debian's etcd-server (scripts/test.sh does) or set YOCO_TEST_ETCD")
    })
}

impl Etcd {
    /// Starts etcd with its data under `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Etcd {
        let mut e = Etcd {
            child: None,
            endpoint: String::new(),
            dir: dir.join("etcd"),
            client_port: free_port(),
            peer_port: free_port(),
            starts: 0,
        };
        e.endpoint = format!("http://127.0.0.1:{}", e.client_port);
        e.launch();
        e
    }

    fn launch(&mut self) {
        let (client, peer) =
            (format!("http://127.0.0.1:{}", self.client_port), format!("http://127.0.0.1:{}", self.peer_port));
        self.starts += 1;
        let log = std::fs::File::create(self.dir.with_extension(format!("log.{}", self.starts))).unwrap();
        let child = Command::new(etcd_bin())
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(30));
    }

    fn wait_healthy(&self, limit: Duration) {
        let started = Instant::now();
        loop {
            let addr = format!("127.0.0.1:{}", self.client_port);
            let req = "GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n";
            if let Ok((200, body)) = crate::http::try_http(&addr, req) {
                if body.contains("true") {
                    return;
                }
            }
            assert!(started.elapsed() < limit, "etcd did not become healthy (logs in {})", self.dir.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: as sudden as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
