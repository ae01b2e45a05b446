//! API keys for the public endpoints (gRPC and HTTP alike; health probes excepted). Keys come
//! from `--api-key-file` (one per line, `#` comments; re-read when the file changes, so keys
//! rotate without a restart) and from `YOCO_API_KEYS` (comma-separated). Clients send
//! `authorization: Bearer <key>`, as OpenAI's clients do.
//!
//! Only SHA-256 digests of the keys are held, and a presented key is compared by its digest, so
//! neither the comparison's time nor a memory dump gives a key away. A refusal says nothing
//! about the model, the queue or which keys exist.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

/// How often the key file's metadata is looked at for a change.
const RECHECK: Duration = Duration::from_secs(1);
/// Longest key accepted (anything longer is refused unread).
pub const MAX_KEY_BYTES: usize = 512;

type KeyDigest = [u8; 32];

/// A caller that passed the check: the digest of its key (for per-key limits), never the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(KeyDigest);

struct Loaded {
    keys: HashSet<KeyDigest>,
    /// The key file's modification time and length when last read.
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

pub struct ApiKeys {
    file: Option<PathBuf>,
    fixed: HashSet<KeyDigest>,
    state: Mutex<Loaded>,
}

fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The keys of a key file: one per line, blank lines and `#` comments skipped.
fn parse_keys(text: &str) -> Result<HashSet<KeyDigest>, String> {
    let mut keys = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        if key.len() > MAX_KEY_BYTES || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("line {}: a key is up to {MAX_KEY_BYTES} bytes without spaces", i + 1));
        }
        keys.insert(digest(key));
    }
    Ok(keys)
}

impl ApiKeys {
    /// The configured keys, or `None` when no key is configured (the endpoints are open).
    pub fn new(file: Option<PathBuf>, env_keys: Option<&str>) -> anyhow::Result<Option<Arc<Self>>> {
        let fixed = parse_keys(&env_keys.unwrap_or_default().replace(',', "\n"))
            .map_err(|e| anyhow::anyhow!("YOCO_API_KEYS: {e}"))?;
        let (keys, stamp) = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", path.display()))?;
                let keys = parse_keys(&text).map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", path.display()))?;
                (keys, self::stamp(path))
            }
            None => (HashSet::new(), None),
        };
        if file.is_none() && fixed.is_empty() {
            return Ok(None);
        }
        if keys.is_empty() && fixed.is_empty() {
            anyhow::bail!("the API key file has no key: every request would be refused");
        }
        let state = Mutex::new(Loaded { keys, stamp, checked: Instant::now() });
        Ok(Some(Arc::new(ApiKeys { file, fixed, state })))
    }

    /// Checks the value of an `authorization` header.
    pub fn check(&self, authorization: Option<&str>) -> Option<KeyId> {
        let key = authorization?.strip_prefix("Bearer ")?.trim();
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return None;
        }
        let d = digest(key);
        if self.fixed.contains(&d) {
            return Some(KeyId(d));
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.reload_if_changed(&mut state);
        state.keys.contains(&d).then_some(KeyId(d))
    }

    /// Re-reads the key file if it changed. A file that cannot be read or parsed leaves the
    /// keys as they were (a botched edit must not lock everyone out).
    fn reload_if_changed(&self, state: &mut Loaded) {
        let Some(path) = &self.file else { return };
        if state.checked.elapsed() < RECHECK {
            return;
        }
        state.checked = Instant::now();
        let now = stamp(path);
        if now == state.stamp {
            return;
        }
        match std::fs::read_to_string(path).map_err(|e| e.to_string()).and_then(|t| parse_keys(&t)) {
            Ok(keys) => {
                tracing::info!(file = %path.display(), keys = keys.len(), "API keys reloaded");
                state.keys = keys;
                state.stamp = now;
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "API key file unreadable; keeping the old keys")
            }
        }
    }
}

/// The check on the public gRPC services: UNAUTHENTICATED without a valid key; the caller's
/// [`KeyId`] goes into the request's extensions.
pub fn grpc_interceptor(
    keys: Option<Arc<ApiKeys>>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut req: tonic::Request<()>| {
        let Some(keys) = &keys else { return Ok(req) };
        let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match keys.check(header) {
            Some(id) => {
                req.extensions_mut().insert(id);
                Ok(req)
            }
            None => {
                Err(tonic::Status::unauthenticated("invalid or missing API key (send `authorization: Bearer <key>`)"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_the_environment_and_a_file_that_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# team a\nkey-a\n\n key-b \n").unwrap();
        let keys = ApiKeys::new(Some(path.clone()), Some("env-1,env-2")).unwrap().unwrap();
        for ok in ["Bearer key-a", "Bearer key-b", "Bearer env-2"] {
            assert!(keys.check(Some(ok)).is_some(), "{ok}");
        }
        for bad in [None, Some(""), Some("key-a"), Some("Bearer "), Some("Bearer key-c"), Some("Basic key-a")] {
            assert!(keys.check(bad).is_none(), "{bad:?}");
        }
        assert_ne!(keys.check(Some("Bearer key-a")), keys.check(Some("Bearer key-b")));
        // Rotation: key-a goes, key-c comes, without a restart.
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        std::fs::write(&path, "key-b\nkey-c\n").unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(keys.check(Some("Bearer key-a")).is_none());
        assert!(keys.check(Some("Bearer key-c")).is_some());
        // A broken edit keeps the keys that were.
        std::fs::write(&path, "key with spaces\n").unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(keys.check(Some("Bearer key-c")).is_some());
    }

    #[test]
    fn no_keys_means_open_and_an_empty_file_is_refused() {
        assert!(ApiKeys::new(None, None).unwrap().is_none());
        assert!(ApiKeys::new(None, Some("")).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# nothing yet\n").unwrap();
        assert!(ApiKeys::new(Some(path), None).is_err());
        assert!(ApiKeys::new(Some(dir.path().join("missing")), None).is_err());
    }
}
