//! The per-client request rate: a token bucket per (tenant, client).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets, one per (tenant, client), kept in memory. Several server instances would
/// each limit on their own; that is an accepted looseness of the reference server.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<(String, String), Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Past this many buckets, full ones (idle clients) are forgotten.
const PRUNE_AT: usize = 10_000;

impl RateLimiter {
    /// `rate` tokens per second refill a bucket of `burst`; `rate == 0` turns limiting off.
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn check(&self, tenant: &str, client: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= PRUNE_AT {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets
            .entry((tenant.to_owned(), client.to_owned()))
            .or_insert(Bucket {
                tokens: self.burst,
                at: now,
            });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let limiter = RateLimiter::new(2.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("t", "c", t0).is_ok());
        }
        let wait = limiter.check("t", "c", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(
            limiter.check("t", "other", t0).is_ok(),
            "buckets are per client"
        );
        assert!(
            limiter
                .check("t", "c", t0 + Duration::from_millis(500))
                .is_ok()
        );
    }
}
