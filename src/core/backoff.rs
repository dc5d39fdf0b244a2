//! Exponential backoff with full jitter.
//!
//! `delay = uniform(0, min(cap, base * factor^attempts))`. Full jitter (rather than equal or
//! decorrelated jitter) spreads a herd of clients that failed together over the whole window,
//! which is what stops a recovering server from being knocked over again.

use serde::{Deserialize, Serialize};

use super::rng::Rng;
use super::time::Millis;

/// Retry delay parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// The window after the first attempt, before growth.
    pub base_ms: Millis,
    /// Growth per attempt.
    pub factor: f64,
    /// The largest window.
    pub cap_ms: Millis,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base_ms: 100,
            factor: 2.0,
            cap_ms: 30_000,
        }
    }
}

impl Backoff {
    /// The upper end of the jitter window after `attempts` attempts:
    /// `min(cap, base * factor^attempts)`.
    pub fn ceiling(&self, attempts: u32) -> Millis {
        let grown = self.base_ms as f64 * self.factor.powi(attempts.min(1024) as i32);
        if grown.is_finite() && grown < self.cap_ms as f64 {
            grown as Millis
        } else {
            self.cap_ms
        }
    }

    /// A delay drawn uniformly from `0..=ceiling(attempts)`.
    pub fn delay(&self, attempts: u32, rng: &mut Rng) -> Millis {
        rng.up_to(self.ceiling(attempts))
    }
}

// Property tests use proptest, which is a native-only dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::core::rng::Rng;
    use proptest::prelude::*;

    #[test]
    fn ceiling_doubles_from_base_until_the_cap() {
        let backoff = Backoff::default();
        assert_eq!(backoff.ceiling(0), 100);
        assert_eq!(backoff.ceiling(1), 200);
        assert_eq!(backoff.ceiling(8), 25_600);
        assert_eq!(backoff.ceiling(9), 30_000);
        assert_eq!(backoff.ceiling(u32::MAX), 30_000);
    }

    proptest! {
        #[test]
        fn delay_is_within_zero_and_the_capped_ceiling(
            seed: u64, attempts in 0u32..200, base in 1u64..5_000, cap in 5_000u64..600_000,
        ) {
            let backoff = Backoff { base_ms: base, factor: 2.0, cap_ms: cap };
            let mut rng = Rng::from_u64(seed);
            let delay = backoff.delay(attempts, &mut rng);
            let bound = (base as f64 * 2f64.powi(attempts as i32)).min(cap as f64) as u64;
            prop_assert!(delay <= bound);
        }
    }
}
