//! Plain HTTP/1.1 calls for the tests of the HTTP API (no client library: what goes over the
//! wire is what the test wrote), and a strict reader of the Prometheus text format.

use std::time::Duration;

/// `GET path` over plain HTTP/1.1: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"))
}

/// `POST path` with a JSON body.
pub fn http_post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n");
    http(addr, &format!("{head}Content-Length: {}\r\n\r\n{body}", body.len()))
}

pub fn http(addr: &str, request: &str) -> (u16, String) {
    try_http(addr, request).unwrap_or_else(|e| panic!("HTTP to {addr}: {e}"))
}

/// [`http`], with connection errors returned.
pub fn try_http(addr: &str, request: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// `name{labels} value` lines of the Prometheus text format; panics on a malformed line.
pub fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad metrics line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let bare = name.split('{').next().unwrap();
        // Colons are legal but reserved for recording rules; an exporter's names have none.
        assert!(bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad name {line:?}");
        out.insert(name.to_string(), value);
    }
    out
}

/// `POST path` of a streamed (server-sent events) response: the status code and the `data:`
/// payloads in order (comments and keep-alives left out).
pub fn http_post_events(addr: &str, path: &str, body: &str) -> (u16, Vec<String>) {
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n");
    let (code, raw) = http(addr, &format!("{head}Content-Length: {}\r\n\r\n{body}", body.len()));
    let text = dechunk(&raw).unwrap_or(raw);
    let data = text.lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")));
    (code, data.map(str::to_string).collect())
}

/// The body of a `Transfer-Encoding: chunked` response; None if `raw` is not chunked.
fn dechunk(raw: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = raw;
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(after.get(..n)?);
        rest = after.get(n..)?.strip_prefix("\r\n")?;
    }
}
