//! A circuit breaker sized for small volumes.
//!
//! An extension sends a handful of requests a minute, so the usual breakers (which want hundreds
//! of calls to decide) never open. This one looks at the last `window` calls, opens once at least
//! `min_calls` of them were made and `failure_rate` of them failed, stays open for `open_ms`,
//! then lets one probe of the health endpoint decide whether to close. Each failed probe opens
//! it again for half the time the outage has lasted so far (at least `open_ms`, at most
//! `max_open_ms`): probes thin out as an outage drags on, yet delivery resumes within a third
//! of the whole outage (or `open_ms`, if more; never more than `max_open_ms`) after the server
//! is back.

use serde::{Deserialize, Serialize};

use super::time::{MINUTE, Millis, SECOND};

/// Breaker thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(target_arch = "wasm32", derive(tsify::Tsify))]
pub struct BreakerConfig {
    /// How many recent calls are remembered (at most 64).
    pub window: u32,
    /// Calls needed in the window before the breaker may open.
    pub min_calls: u32,
    /// Share of failed calls in the window that opens the breaker.
    pub failure_rate: f64,
    /// How long the first opening lasts, and the shortest one.
    pub open_ms: Millis,
    /// The longest opening, however long the outage.
    pub max_open_ms: Millis,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: 20,
            min_calls: 10,
            failure_rate: 0.5,
            open_ms: 30 * SECOND,
            max_open_ms: 10 * MINUTE,
        }
    }
}

impl BreakerConfig {
    /// Checks the thresholds; the error names the bad field.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(1..=64).contains(&self.window) || !(1..=self.window).contains(&self.min_calls) {
            return Err("breaker.window must be 1 to 64 and breaker.minCalls 1 to window");
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err("breaker.failureRate must be in (0, 1]");
        }
        if self.open_ms == 0 || self.max_open_ms < self.open_ms {
            return Err("breaker.openMs must be at least 1 and at most breaker.maxOpenMs");
        }
        Ok(())
    }
}

/// The breaker's persisted state. (Externally tagged on purpose: an internally tagged enum makes
/// serde buffer the input, which costs kilobytes of wasm for one small record.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Breaker {
    /// Requests flow. `failures` holds one bit per remembered call (1 = failed), newest lowest.
    Closed {
        /// The outcome bits.
        failures: u64,
        /// How many bits of `failures` are real calls.
        calls: u32,
    },
    /// No requests until `until`.
    Open {
        /// When to probe.
        until: Millis,
        /// How long this opening lasts.
        open_ms: Millis,
        /// When the outage began: the breaker first opened.
        #[serde(default)]
        since: Millis,
    },
    /// Waiting for the one probe to answer.
    HalfOpen {
        /// The length of the opening before this probe.
        open_ms: Millis,
        /// When the outage began.
        #[serde(default)]
        since: Millis,
    },
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::Closed {
            failures: 0,
            calls: 0,
        }
    }
}

/// A change of breaker state that the outside world hears about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerChange {
    /// The breaker opened; no requests until the given time.
    Opened {
        /// When the probe will be sent.
        until: Millis,
    },
    /// A probe succeeded and requests flow again.
    Closed,
}

impl Breaker {
    /// Whether ordinary requests may be sent.
    pub fn is_closed(&self) -> bool {
        matches!(self, Breaker::Closed { .. })
    }

    /// Records the outcome of one request. Outcomes of requests that were already in flight when
    /// the breaker opened are ignored: the probe decides.
    pub fn record(
        &mut self,
        config: &BreakerConfig,
        now: Millis,
        ok: bool,
    ) -> Option<BreakerChange> {
        let Breaker::Closed { failures, calls } = self else {
            return None;
        };
        let window_mask = if config.window >= 64 {
            u64::MAX
        } else {
            (1u64 << config.window) - 1
        };
        *failures = ((*failures << 1) | u64::from(!ok)) & window_mask;
        *calls = (*calls + 1).min(config.window);
        let failed = failures.count_ones();
        if *calls >= config.min_calls
            && f64::from(failed) >= config.failure_rate * f64::from(*calls)
        {
            let until = now.saturating_add(config.open_ms);
            *self = Breaker::Open {
                until,
                open_ms: config.open_ms,
                since: now,
            };
            return Some(BreakerChange::Opened { until });
        }
        None
    }

    /// Whether the open period is over and a probe should be sent now. Moves to half-open.
    pub fn take_probe(&mut self, now: Millis) -> bool {
        match *self {
            Breaker::Open {
                until,
                open_ms,
                since,
            } if now >= until => {
                *self = Breaker::HalfOpen { open_ms, since };
                true
            }
            _ => false,
        }
    }

    /// Ends the open period early, for a hint that the network is back (`online`).
    pub fn expire(&mut self, now: Millis) {
        if let Breaker::Open { until, .. } = self {
            *until = (*until).min(now);
        }
    }

    /// Records the probe's answer.
    pub fn probe_result(
        &mut self,
        config: &BreakerConfig,
        now: Millis,
        ok: bool,
    ) -> Option<BreakerChange> {
        let Breaker::HalfOpen { since, .. } = *self else {
            return None;
        };
        if ok {
            *self = Breaker::default();
            Some(BreakerChange::Closed)
        } else {
            // Half the outage so far: the wait after the server comes back is at most a third of
            // the whole outage, so a probe never holds recovery back for long.
            let half = now.saturating_sub(since) / 2;
            let open_ms = half.clamp(config.open_ms, config.max_open_ms);
            let until = now.saturating_add(open_ms);
            *self = Breaker::Open {
                until,
                open_ms,
                since,
            };
            Some(BreakerChange::Opened { until })
        }
    }

    /// After a restart a probe that was in flight is lost; ask for a new one at once.
    pub fn after_restart(&mut self, now: Millis) {
        if let Breaker::HalfOpen { open_ms, since } = *self {
            *self = Breaker::Open {
                until: now,
                open_ms,
                since,
            };
        }
    }

    /// When the breaker next needs attention (the end of the open period).
    pub fn next_wake(&self) -> Option<Millis> {
        match self {
            Breaker::Open { until, .. } => Some(*until),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig::default()
    }

    #[test]
    fn breaker_stays_closed_below_min_calls_even_if_all_fail() {
        let mut breaker = Breaker::default();
        for _ in 0..9 {
            assert_eq!(breaker.record(&config(), 0, false), None);
        }
        assert!(breaker.is_closed());
    }

    #[test]
    fn breaker_opens_at_half_failures_after_ten_calls() {
        let mut breaker = Breaker::default();
        for i in 0..9 {
            assert_eq!(breaker.record(&config(), 0, i % 2 == 0), None);
        }
        // 10 calls, 5 failures: 50 %.
        assert_eq!(
            breaker.record(&config(), 1_000, false),
            Some(BreakerChange::Opened { until: 31_000 })
        );
        assert!(!breaker.is_closed());
    }

    #[test]
    fn window_forgets_calls_older_than_twenty() {
        let mut breaker = Breaker::default();
        for _ in 0..4 {
            breaker.record(&config(), 0, false);
        }
        for _ in 0..20 {
            assert_eq!(breaker.record(&config(), 0, true), None);
        }
        // The four failures have left the window; nine new ones are 45 % of 20.
        for _ in 0..9 {
            assert_eq!(breaker.record(&config(), 0, false), None);
        }
        assert!(breaker.record(&config(), 0, false).is_some());
    }

    #[test]
    fn failed_probes_wait_half_the_outage_so_far_between_open_ms_and_the_max() {
        let mut breaker = Breaker::Open {
            until: 30_000,
            open_ms: 30_000,
            since: 0,
        };
        let mut now = 30_000;
        let mut periods = vec![];
        for _ in 0..12 {
            assert!(breaker.take_probe(now));
            let Some(BreakerChange::Opened { until }) = breaker.probe_result(&config(), now, false)
            else {
                panic!("probe failure must reopen");
            };
            periods.push(until - now);
            assert!(!breaker.take_probe(until - 1));
            now = until;
        }
        assert_eq!(
            periods,
            [
                30_000, 30_000, 45_000, 67_500, 101_250, 151_875, 227_812, 341_718, 512_577,
                600_000, 600_000, 600_000
            ]
        );
        assert!(breaker.take_probe(now));
        assert_eq!(
            breaker.probe_result(&config(), now, true),
            Some(BreakerChange::Closed)
        );
        assert!(breaker.is_closed());
    }

    /// The recovery property the probe schedule exists for: whenever the server comes back
    /// during an outage, the next probe (which closes the breaker) comes at most a third of the
    /// whole outage later, or within `open_ms` while the outage is short.
    #[test]
    fn recovery_lags_the_servers_return_by_at_most_a_third_of_the_outage() {
        let config = config();
        for back in (1_000..3_600_000u64).step_by(7_919) {
            let mut breaker = Breaker::Open {
                until: config.open_ms,
                open_ms: config.open_ms,
                since: 0,
            };
            let mut now = config.open_ms;
            loop {
                assert!(breaker.take_probe(now));
                let healthy = now >= back;
                let change = breaker.probe_result(&config, now, healthy);
                if healthy {
                    assert_eq!(change, Some(BreakerChange::Closed));
                    let lag = now - back;
                    assert!(
                        lag <= (now / 3).max(config.open_ms).min(config.max_open_ms),
                        "back at {back}, closed at {now}: lag {lag}"
                    );
                    break;
                }
                now = breaker.next_wake().expect("open");
            }
        }
    }

    #[test]
    fn validation_bounds_are_inclusive() {
        let ok = |c: BreakerConfig| c.validate().is_ok();
        let base = BreakerConfig::default();
        assert!(ok(BreakerConfig {
            window: 64,
            min_calls: 64,
            ..base
        }));
        assert!(!ok(BreakerConfig { window: 65, ..base }));
        assert!(!ok(BreakerConfig {
            window: 0,
            min_calls: 0,
            ..base
        }));
        assert!(ok(BreakerConfig {
            window: 1,
            min_calls: 1,
            ..base
        }));
        assert!(!ok(BreakerConfig {
            window: 5,
            min_calls: 6,
            ..base
        }));
        assert!(!ok(BreakerConfig {
            min_calls: 0,
            ..base
        }));
        assert!(ok(BreakerConfig {
            failure_rate: 1.0,
            ..base
        }));
        assert!(!ok(BreakerConfig {
            failure_rate: 1.01,
            ..base
        }));
        assert!(!ok(BreakerConfig {
            failure_rate: 0.0,
            ..base
        }));
        assert!(ok(BreakerConfig {
            open_ms: 1,
            max_open_ms: 1,
            ..base
        }));
        assert!(!ok(BreakerConfig { open_ms: 0, ..base }));
        assert!(!ok(BreakerConfig {
            open_ms: 10,
            max_open_ms: 9,
            ..base
        }));
    }

    #[test]
    fn a_hint_that_the_network_is_back_ends_the_open_period_now() {
        let mut breaker = Breaker::Open {
            until: 60_000,
            open_ms: 30_000,
            since: 30_000,
        };
        assert!(!breaker.take_probe(40_000));
        breaker.expire(40_000);
        assert_eq!(breaker.next_wake(), Some(40_000));
        assert!(breaker.take_probe(40_000), "the probe goes at once");
        let mut closed = Breaker::default();
        closed.expire(5);
        assert_eq!(closed, Breaker::default(), "nothing to end when closed");
    }

    #[test]
    fn a_probe_lost_with_a_restart_is_asked_for_again_at_once() {
        let mut breaker = Breaker::HalfOpen {
            open_ms: 30_000,
            since: 7,
        };
        breaker.after_restart(99);
        assert_eq!(
            breaker,
            Breaker::Open {
                until: 99,
                open_ms: 30_000,
                since: 7
            }
        );
        assert!(breaker.take_probe(99));
        let mut closed = Breaker::default();
        closed.after_restart(99);
        assert!(closed.is_closed());
    }

    #[test]
    fn outcomes_while_open_are_ignored() {
        let mut breaker = Breaker::Open {
            until: 10,
            open_ms: 10,
            since: 0,
        };
        assert_eq!(breaker.record(&config(), 0, true), None);
        assert!(!breaker.is_closed());
    }
}
