//! Request rates: token buckets per (tenant, client), per tenant, and per address for
//! refused requests.

use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::recent::Recent;

/// The longest wait a refusal names; a bucket that refills slower than that still answers
/// with a finite `Retry-After`.
pub const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// Token buckets, one per key, kept in memory in a bounded map ([`Recent`]): a bucket that
/// is forgotten starts full again, which the per-tenant bucket bounds. Several server
/// instances would each limit on their own; that is an accepted looseness of the reference
/// server.
pub struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<Recent<K, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `rate` tokens per second refill a bucket of `burst`; `rate == 0` turns limiting off.
    /// At most `cap` buckets are kept.
    pub fn new(rate: f64, burst: f64, cap: usize) -> Self {
        RateLimiter {
            rate,
            burst,
            buckets: Mutex::new(Recent::new(cap)),
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.take(key, now, true)
    }

    /// Whether a token is there, without taking it; the wait if not.
    pub fn peek(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.take(key, now, false)
    }

    /// Takes one token if there is one (for counting refusals after the fact).
    pub fn spend(&self, key: &K, now: Instant) {
        let _ = self.take(key, now, true);
    }

    fn take(&self, key: &K, now: Instant, take: bool) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.get_mut(key).is_none() {
            buckets.insert(
                key.clone(),
                Bucket {
                    tokens: self.burst,
                    at: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(key) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            if take {
                bucket.tokens -= 1.0;
            }
            Ok(())
        } else {
            Err(wait((1.0 - bucket.tokens) / self.rate))
        }
    }
}

/// A wait in seconds as a Duration, clamped to [`MAX_WAIT`]. `Duration::from_secs_f64`
/// panics past its range, and with `panic = "abort"` a tiny `--rate` once ended the server on
/// its second request.
fn wait(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds)
        .unwrap_or(MAX_WAIT)
        .min(MAX_WAIT)
}

/// Whole seconds for `Retry-After`: at least 1, at most [`MAX_WAIT`].
pub fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().clamp(1.0, MAX_WAIT.as_secs_f64()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(client: &str) -> (String, String) {
        ("t".to_owned(), client.to_owned())
    }

    #[test]
    fn burst_then_refill() {
        let limiter = RateLimiter::new(2.0, 3.0, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check(&key("c"), t0).is_ok());
        }
        let wait = limiter.check(&key("c"), t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(
            limiter.check(&key("other"), t0).is_ok(),
            "buckets are per key"
        );
        assert!(
            limiter
                .check(&key("c"), t0 + Duration::from_millis(500))
                .is_ok()
        );
    }

    #[test]
    fn a_tiny_rate_gives_a_bounded_wait_instead_of_a_panic() {
        let limiter = RateLimiter::new(1e-20, 1.0, 100);
        let t0 = Instant::now();
        assert!(limiter.check(&key("c"), t0).is_ok());
        let wait = limiter.check(&key("c"), t0).unwrap_err();
        assert_eq!(wait, MAX_WAIT);
        assert_eq!(retry_after_seconds(wait), 86_400);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
    }

    #[test]
    fn peek_does_not_take_and_the_map_stays_bounded() {
        let limiter = RateLimiter::new(1.0, 1.0, 10);
        let t0 = Instant::now();
        assert!(limiter.peek(&key("c"), t0).is_ok());
        assert!(limiter.peek(&key("c"), t0).is_ok());
        limiter.spend(&key("c"), t0);
        assert!(limiter.peek(&key("c"), t0).is_err());
        for i in 0..1000 {
            let _ = limiter.check(&key(&i.to_string()), t0);
        }
        assert!(limiter.buckets.lock().unwrap().len() <= 10);
    }
}
