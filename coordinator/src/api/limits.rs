//! Server-wide request limits beyond what the cache allows: prompt tokens, a deadline for every
//! request, and streams open at once per API key. Each exceeded limit is its own clear error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::auth::KeyId;
use crate::scheduler::request::RequestError;

#[derive(Debug, Clone, Default)]
pub struct RequestLimits {
    /// Longest prompt, in tokens (`None`: what the cache holds).
    pub max_prompt_tokens: Option<usize>,
    /// Deadline of a request that sets none, and the longest one it may set.
    pub request_timeout: Option<Duration>,
    /// Streams one API key may have open at once.
    pub max_streams_per_key: Option<usize>,
}

impl RequestLimits {
    /// The request's deadline: the client's, capped by the server's timeout.
    pub fn deadline(&self, arrived: Instant, client: Option<Instant>) -> Option<Instant> {
        let server = self.request_timeout.and_then(|t| arrived.checked_add(t));
        match (client, server) {
            (Some(c), Some(s)) => Some(c.min(s)),
            (c, s) => c.or(s),
        }
    }

    pub fn check_prompt(&self, tokens: usize) -> Result<(), RequestError> {
        match self.max_prompt_tokens {
            Some(max) if tokens > max => Err(RequestError::invalid(
                "prompt",
                format!("{tokens} tokens, more than this server takes ({max}, --max-prompt-tokens)"),
            )),
            _ => Ok(()),
        }
    }
}

/// Open streams per API key.
#[derive(Debug, Default)]
pub struct StreamCounts {
    open: Mutex<HashMap<KeyId, usize>>,
}

/// One open stream of a key; the count goes down when it is dropped (the request ended, however).
#[derive(Debug)]
pub struct StreamSlot {
    counts: Arc<StreamCounts>,
    key: KeyId,
}

impl StreamCounts {
    /// A slot for one more stream of `key`, or [`RequestError::Busy`] at the limit.
    pub fn open(self: &Arc<Self>, key: KeyId, limit: usize) -> Result<StreamSlot, RequestError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_default();
        if *n >= limit {
            return Err(RequestError::Busy(format!(
                "this API key has {limit} streams open, its limit (--max-streams-per-key); retry when one ends"
            )));
        }
        *n += 1;
        Ok(StreamSlot { counts: self.clone(), key })
    }

    #[cfg(test)]
    fn open_for(&self, key: &KeyId) -> usize {
        self.open.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_prompts_and_streams() {
        let now = Instant::now();
        let l = RequestLimits {
            max_prompt_tokens: Some(10),
            request_timeout: Some(Duration::from_secs(5)),
            max_streams_per_key: Some(2),
        };
        assert_eq!(l.deadline(now, None), Some(now + Duration::from_secs(5)));
        assert_eq!(l.deadline(now, Some(now + Duration::from_secs(1))), Some(now + Duration::from_secs(1)));
        assert_eq!(l.deadline(now, Some(now + Duration::from_secs(60))), Some(now + Duration::from_secs(5)));
        assert_eq!(RequestLimits::default().deadline(now, None), None);
        assert!(l.check_prompt(10).is_ok());
        assert!(l.check_prompt(11).unwrap_err().to_string().contains("--max-prompt-tokens"));

        let counts = Arc::new(StreamCounts::default());
        let keys = crate::api::auth::ApiKeys::new(None, Some("a,b")).unwrap().unwrap();
        let (a, b) = (keys.check(Some("Bearer a")).unwrap(), keys.check(Some("Bearer b")).unwrap());
        let s1 = counts.open(a, 2).unwrap();
        let _s2 = counts.open(a, 2).unwrap();
        assert!(matches!(counts.open(a, 2).unwrap_err(), RequestError::Busy(_)));
        let _other = counts.open(b, 2).unwrap();
        drop(s1);
        assert_eq!(counts.open_for(&a), 1);
        assert!(counts.open(a, 2).is_ok());
    }
}
