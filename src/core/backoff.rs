//! Retry delays: exponential backoff with jitter, by one of three strategies.
//!
//! - `proportional` (the default, the research document's schedule): retry `n` waits
//!   `min(cap, base * factor^(n-1))`, moved by up to `± jitter` of itself. With the defaults
//!   (100 ms, 2, 30 s, 25 %) retry 1 waits 100 ms ± 25 %, retry 2 200 ms ± 25 %, and so on up to
//!   30 s ± 25 %. Every client keeps a predictable schedule, and the jitter still spreads a herd
//!   that failed together.
//! - `full` (AWS's "full jitter"): uniform in `0..=min(cap, base * factor^n)`. It spreads a herd
//!   the most, at the price of retries that sometimes come at once.
//! - `decorrelated` (AWS's "decorrelated jitter"): uniform in `base..=3 * previous`, capped. Each
//!   delay depends on the last one, so the op keeps it ([`Op::last_delay_ms`](super::op::Op)).

use serde::{Deserialize, Serialize};

use super::rng::Rng;
use super::time::Millis;

/// How jitter is applied; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub enum Strategy {
    /// `nominal ± jitter * nominal`.
    #[default]
    Proportional,
    /// `uniform(0, min(cap, base * factor^n))`.
    Full,
    /// `min(cap, uniform(base, 3 * previous))`.
    Decorrelated,
}

/// Retry delay parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub struct Backoff {
    /// How jitter is drawn.
    pub strategy: Strategy,
    /// The delay before the first retry, before jitter.
    pub base_ms: Millis,
    /// Growth per retry.
    pub factor: f64,
    /// The largest delay before jitter.
    pub cap_ms: Millis,
    /// For `proportional`: how far a delay may move from its nominal value, as a fraction of it
    /// (0 to 1).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            strategy: Strategy::Proportional,
            base_ms: 100,
            factor: 2.0,
            cap_ms: 30_000,
            jitter: 0.25,
        }
    }
}

impl Backoff {
    /// `min(cap, base * factor^exponent)`, saturating.
    fn grown(&self, exponent: u32) -> Millis {
        let grown = self.base_ms as f64 * self.factor.powi(exponent.min(1024) as i32);
        if grown.is_finite() && grown < self.cap_ms as f64 {
            grown as Millis
        } else {
            self.cap_ms
        }
    }

    /// The nominal delay before retry `retry` (1 is the first retry):
    /// `min(cap, base * factor^(retry - 1))`.
    pub fn nominal(&self, retry: u32) -> Millis {
        self.grown(retry.saturating_sub(1))
    }

    /// The range a delay before retry `retry` is drawn from, given the previous delay (which
    /// only `decorrelated` reads).
    pub fn range(&self, retry: u32, previous: Option<Millis>) -> (Millis, Millis) {
        match self.strategy {
            Strategy::Proportional => {
                let nominal = self.nominal(retry);
                let spread = (nominal as f64 * self.jitter) as Millis;
                (nominal - spread, nominal + spread)
            }
            Strategy::Full => (0, self.grown(retry)),
            Strategy::Decorrelated => {
                let previous = previous.unwrap_or(self.base_ms).max(self.base_ms);
                let high = previous
                    .saturating_mul(3)
                    .min(self.cap_ms)
                    .max(self.base_ms);
                (self.base_ms.min(self.cap_ms), high)
            }
        }
    }

    /// A delay before retry `retry`, drawn uniformly from [`range`](Self::range).
    pub fn delay(&self, retry: u32, previous: Option<Millis>, rng: &mut Rng) -> Millis {
        let (low, high) = self.range(retry, previous);
        low + rng.up_to(high - low)
    }

    /// Checks the parameters; the error names the bad field.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.base_ms == 0 {
            return Err("backoff.baseMs must be at least 1");
        }
        if self.cap_ms < self.base_ms {
            return Err("backoff.capMs must be at least backoff.baseMs");
        }
        if !(1.0..=16.0).contains(&self.factor) {
            return Err("backoff.factor must be between 1 and 16");
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err("backoff.jitter must be between 0 and 1");
        }
        Ok(())
    }
}

// Property tests use proptest, which is a native-only dev-dependency.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::{Backoff, Millis, Strategy};
    use crate::core::rng::Rng;
    use proptest::prelude::{prop_assert, proptest};

    fn draws(backoff: &Backoff, retry: u32, previous: Option<Millis>) -> (Millis, Millis) {
        let mut rng = Rng::from_u64(u64::from(retry));
        let all: Vec<Millis> = (0..4_000)
            .map(|_| backoff.delay(retry, previous, &mut rng))
            .collect();
        (*all.iter().min().unwrap(), *all.iter().max().unwrap())
    }

    #[test]
    fn the_default_is_the_research_schedule_100_ms_doubling_to_30_s_plus_or_minus_a_quarter() {
        let backoff = Backoff::default();
        assert_eq!(backoff.strategy, Strategy::Proportional);
        let expected = [
            (1, 75, 125),
            (2, 150, 250),
            (3, 300, 500),
            (4, 600, 1_000),
            (9, 19_200, 32_000),
            (10, 22_500, 37_500),
            (40, 22_500, 37_500),
            (u32::MAX, 22_500, 37_500),
        ];
        for (retry, low, high) in expected {
            assert_eq!(backoff.range(retry, None), (low, high), "retry {retry}");
            let (min, max) = draws(&backoff, retry, None);
            assert!(min >= low && max <= high, "retry {retry}: {min}..{max}");
            // The draws reach both ends of the range (within 2 %), so the jitter is real.
            let slack = (high - low) / 50;
            assert!(
                min <= low + slack && max >= high - slack,
                "retry {retry}: {min}..{max}"
            );
        }
        assert_eq!(backoff.nominal(1), 100);
        assert_eq!(backoff.nominal(2), 200);
        assert_eq!(backoff.nominal(9), 25_600);
        assert_eq!(backoff.nominal(10), 30_000);
    }

    #[test]
    fn delays_grow_with_each_retry_until_the_cap() {
        let backoff = Backoff::default();
        let nominal: Vec<Millis> = (1..=11).map(|r| backoff.nominal(r)).collect();
        assert!(
            nominal.windows(2).all(|w| w[1] == (w[0] * 2).min(30_000)),
            "{nominal:?}"
        );
        let still = Backoff {
            jitter: 0.0,
            ..backoff
        };
        let mut rng = Rng::from_u64(3);
        assert_eq!(
            still.delay(3, None, &mut rng),
            400,
            "no jitter: exactly nominal"
        );
    }

    #[test]
    fn full_jitter_spans_zero_to_the_grown_ceiling() {
        let backoff = Backoff {
            strategy: Strategy::Full,
            ..Backoff::default()
        };
        assert_eq!(backoff.range(1, None), (0, 200));
        assert_eq!(backoff.range(8, None), (0, 25_600));
        assert_eq!(backoff.range(9, None), (0, 30_000));
        let (min, max) = draws(&backoff, 3, None);
        assert!(min <= 20 && (780..=800).contains(&max), "{min}..{max}");
    }

    #[test]
    fn decorrelated_jitter_stays_between_base_and_three_times_the_last_delay() {
        let backoff = Backoff {
            strategy: Strategy::Decorrelated,
            ..Backoff::default()
        };
        assert_eq!(backoff.range(1, None), (100, 300));
        assert_eq!(backoff.range(5, Some(1_000)), (100, 3_000));
        assert_eq!(backoff.range(5, Some(20_000)), (100, 30_000));
        assert_eq!(backoff.range(5, Some(10)), (100, 300), "never below base");
        let (min, max) = draws(&backoff, 2, Some(1_000));
        assert!(min <= 160 && (2_940..=3_000).contains(&max), "{min}..{max}");
    }

    #[test]
    fn validation_names_the_bad_field() {
        let bad = |b: Backoff| b.validate().unwrap_err();
        assert!(
            bad(Backoff {
                base_ms: 0,
                ..Backoff::default()
            })
            .contains("baseMs")
        );
        assert!(
            bad(Backoff {
                cap_ms: 10,
                ..Backoff::default()
            })
            .contains("capMs")
        );
        assert!(
            bad(Backoff {
                factor: 0.5,
                ..Backoff::default()
            })
            .contains("factor")
        );
        assert!(
            bad(Backoff {
                jitter: 1.5,
                ..Backoff::default()
            })
            .contains("jitter")
        );
        Backoff::default().validate().unwrap();
    }

    proptest! {
        #[test]
        fn every_strategy_draws_inside_its_range(
            seed: u64, retry in 0u32..200, base in 1u64..5_000, cap in 5_000u64..600_000,
            jitter in 0.0f64..=1.0, previous in proptest::option::of(0u64..1_000_000), pick in 0u8..3,
        ) {
            let strategy = [Strategy::Proportional, Strategy::Full, Strategy::Decorrelated][pick as usize];
            let backoff = Backoff { strategy, base_ms: base, factor: 2.0, cap_ms: cap, jitter };
            let mut rng = Rng::from_u64(seed);
            let delay = backoff.delay(retry, previous, &mut rng);
            let nominal = (base as f64 * 2f64.powi(retry.saturating_sub(1) as i32)).min(cap as f64);
            let bound = match strategy {
                Strategy::Proportional => nominal * (1.0 + jitter),
                Strategy::Full => (base as f64 * 2f64.powi(retry as i32)).min(cap as f64),
                Strategy::Decorrelated => cap as f64,
            };
            prop_assert!(delay as f64 <= bound + 1.0, "{delay} > {bound}");
            if strategy == Strategy::Proportional {
                prop_assert!(delay as f64 >= nominal * (1.0 - jitter) - 1.0);
            }
            if strategy == Strategy::Decorrelated {
                prop_assert!(delay >= base.min(cap));
            }
        }
    }
}
