//! Fault injection for tests: scripted rules (through `/v1/admin/faults`) and seeded random
//! faults (through `--fault-*` flags). Off unless turned on.

use std::sync::Mutex;

use serde::Deserialize;

use crate::config::Config;

/// The route a request came in on, as fault rules and the admin log name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// `POST /v1/ops`.
    Ops,
    /// `POST /v1/op`.
    Op,
    /// `POST /v1/beacon`.
    Beacon,
    /// `GET|HEAD /v1/health`.
    Health,
    /// Rules only: any of the above.
    Any,
}

impl Route {
    /// The name used in rules and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Ops => "ops",
            Route::Op => "op",
            Route::Beacon => "beacon",
            Route::Health => "health",
            Route::Any => "any",
        }
    }
}

/// What an injected fault does to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and nothing applied.
    Status {
        /// 400 to 599.
        status: u16,
        /// `Retry-After` seconds, if any.
        retry_after: Option<u64>,
    },
    /// Wait, then handle the request normally.
    Delay {
        /// How long.
        ms: u64,
    },
    /// Drop the connection; nothing is applied.
    ResetBeforeCommit,
    /// Apply and commit, then drop the connection without an answer.
    DropAfterCommit,
    /// Ops of `kind` (or all) get `rejected` with `reason`.
    Reject {
        /// The rejection reason.
        reason: String,
        /// Only this kind, or all ops.
        kind: Option<String>,
    },
}

impl Fault {
    /// The kind, as logged and counted.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Status { status: 429, .. } => "429",
            Fault::Status { .. } => "status",
            Fault::Delay { .. } => "delay",
            Fault::ResetBeforeCommit => "reset_before_commit",
            Fault::DropAfterCommit => "drop_after_commit",
            Fault::Reject { .. } => "reject",
        }
    }
}

/// A rule as `POST /v1/admin/faults` takes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Which route it matches.
    pub route: Route,
    /// Only this tenant's requests (never matches `health`, which has no tenant).
    #[serde(default)]
    pub tenant: Option<String>,
    /// How many matching requests it affects.
    #[serde(default = "one")]
    pub times: u32,
    /// What it does.
    pub action: ActionSpec,
}

fn one() -> u32 {
    1
}

/// The action of a rule, in its wire forms.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ActionSpec {
    /// `"reset_before_commit"` or `"drop_after_commit"`.
    Named(NamedAction),
    /// `{"status": 503}` or `{"status": 429, "retry_after": 2}`.
    Status {
        /// The status.
        status: u16,
        /// Optional `Retry-After` seconds.
        #[serde(default)]
        retry_after: Option<u64>,
    },
    /// `{"delay_ms": 300}`.
    Delay {
        /// The delay.
        delay_ms: u64,
    },
    /// `{"reject": "reason", "kind": "comment"}`.
    Reject {
        /// The reason.
        reject: String,
        /// Only ops of this kind.
        #[serde(default)]
        kind: Option<String>,
    },
}

/// The bare-string actions.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamedAction {
    /// See [`Fault::ResetBeforeCommit`].
    ResetBeforeCommit,
    /// See [`Fault::DropAfterCommit`].
    DropAfterCommit,
}

impl RuleSpec {
    /// Checks the values serde cannot and turns the rule into a fault.
    pub fn validate(&self) -> Result<Fault, String> {
        if self.times == 0 {
            return Err("times must be at least 1".into());
        }
        Ok(match &self.action {
            ActionSpec::Named(NamedAction::ResetBeforeCommit) => Fault::ResetBeforeCommit,
            ActionSpec::Named(NamedAction::DropAfterCommit) => Fault::DropAfterCommit,
            ActionSpec::Status {
                status,
                retry_after,
            } => {
                if !(400..=599).contains(status) {
                    return Err("status must be between 400 and 599".into());
                }
                Fault::Status {
                    status: *status,
                    retry_after: *retry_after,
                }
            }
            ActionSpec::Delay { delay_ms } => {
                if *delay_ms > 600_000 {
                    return Err("delay_ms must be at most 600000".into());
                }
                Fault::Delay { ms: *delay_ms }
            }
            ActionSpec::Reject { reject, kind } => {
                if self.route == Route::Health {
                    return Err("a reject rule needs a route with ops".into());
                }
                Fault::Reject {
                    reason: reject.clone(),
                    kind: kind.clone(),
                }
            }
        })
    }
}

struct Rule {
    route: Route,
    tenant: Option<String>,
    remaining: u32,
    fault: Fault,
}

/// Seeded probabilities, one draw per request.
struct Seeded {
    rng: SplitMix64,
    p_5xx: f64,
    p_429: f64,
    p_delay: f64,
    delay_ms: u64,
    p_reset: f64,
    p_drop: f64,
}

/// SplitMix64: tiny, seedable, good enough to pick faults.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Where a fault came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A `/v1/admin/faults` rule.
    Scripted,
    /// The `--fault-*` flags.
    Seeded,
}

/// The fault injector.
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
    seeded: Option<Mutex<Seeded>>,
}

impl Faults {
    /// Builds the injector from the flags (seeded part) with no scripted rules.
    pub fn new(config: &Config) -> Self {
        let seeded = config.seeded_faults().then(|| {
            Mutex::new(Seeded {
                rng: SplitMix64(config.fault_seed),
                p_5xx: config.fault_5xx,
                p_429: config.fault_429,
                p_delay: config.fault_delay,
                delay_ms: config.fault_delay_ms,
                p_reset: config.fault_reset,
                p_drop: config.fault_drop_after_commit,
            })
        });
        Faults {
            rules: Mutex::new(Vec::new()),
            seeded,
        }
    }

    /// Appends validated rules.
    pub fn add(&self, rules: Vec<(RuleSpec, Fault)>) {
        let mut all = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        all.extend(rules.into_iter().map(|(spec, fault)| Rule {
            route: spec.route,
            tenant: spec.tenant,
            remaining: spec.times,
            fault,
        }));
    }

    /// Removes every scripted rule.
    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Picks the fault for one request, if any. The first matching scripted rule wins and uses
    /// up one of its `times`; only without one do the seeded probabilities get a draw, and
    /// only on routes that carry ops. `kinds` are the request's op kinds (for reject rules).
    pub fn pick(
        &self,
        route: Route,
        tenant: Option<&str>,
        kinds: &[&str],
    ) -> Option<(Fault, Source)> {
        {
            let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
            let hit = rules.iter().position(|rule| {
                rule.remaining > 0
                    && (rule.route == Route::Any || rule.route == route)
                    && rule.tenant.as_deref().is_none_or(|t| Some(t) == tenant)
                    && match &rule.fault {
                        Fault::Reject { kind, .. } => {
                            !kinds.is_empty() && kind.as_deref().is_none_or(|k| kinds.contains(&k))
                        }
                        _ => true,
                    }
            });
            if let Some(i) = hit {
                rules[i].remaining -= 1;
                let fault = rules[i].fault.clone();
                if rules[i].remaining == 0 {
                    rules.remove(i);
                }
                return Some((fault, Source::Scripted));
            }
        }
        if route == Route::Health {
            return None;
        }
        let mut s = self
            .seeded
            .as_ref()?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let draw = s.rng.next_f64();
        let mut edge = s.p_5xx;
        if draw < edge {
            let status = [500, 502, 503][(s.rng.next_u64() % 3) as usize];
            let retry_after = (status == 503).then_some(1);
            return Some((
                Fault::Status {
                    status,
                    retry_after,
                },
                Source::Seeded,
            ));
        }
        edge += s.p_429;
        if draw < edge {
            return Some((
                Fault::Status {
                    status: 429,
                    retry_after: Some(1),
                },
                Source::Seeded,
            ));
        }
        edge += s.p_delay;
        if draw < edge {
            return Some((Fault::Delay { ms: s.delay_ms }, Source::Seeded));
        }
        edge += s.p_reset;
        if draw < edge {
            return Some((Fault::ResetBeforeCommit, Source::Seeded));
        }
        edge += s.p_drop;
        if draw < edge {
            return Some((Fault::DropAfterCommit, Source::Seeded));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn faults(args: &[&str]) -> Faults {
        let mut all = vec!["outbox-server"];
        all.extend_from_slice(args);
        Faults::new(&Config::parse_from(all))
    }

    fn rule(json: &str) -> (RuleSpec, Fault) {
        let spec: RuleSpec = serde_json::from_str(json).unwrap();
        let fault = spec.validate().unwrap();
        (spec, fault)
    }

    #[test]
    fn scripted_rule_is_used_up_after_times() {
        let f = faults(&[]);
        f.add(vec![rule(
            r#"{"route":"ops","times":2,"action":{"status":503}}"#,
        )]);
        assert!(f.pick(Route::Op, Some("t"), &["k"]).is_none());
        for _ in 0..2 {
            let (fault, source) = f.pick(Route::Ops, Some("t"), &["k"]).unwrap();
            assert_eq!(
                fault,
                Fault::Status {
                    status: 503,
                    retry_after: None
                }
            );
            assert_eq!(source, Source::Scripted);
        }
        assert!(f.pick(Route::Ops, Some("t"), &["k"]).is_none());
    }

    #[test]
    fn rule_forms_parse() {
        for json in [
            r#"{"route":"any","times":1,"action":"reset_before_commit"}"#,
            r#"{"route":"op","times":1,"action":"drop_after_commit"}"#,
            r#"{"route":"ops","tenant":"t","times":1,"action":{"status":429,"retry_after":2}}"#,
            r#"{"route":"beacon","times":1,"action":{"delay_ms":300}}"#,
            r#"{"route":"ops","times":1,"action":{"reject":"no","kind":"comment"}}"#,
        ] {
            rule(json);
        }
        let bad: RuleSpec =
            serde_json::from_str(r#"{"route":"ops","times":1,"action":{"status":200}}"#).unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn seeded_faults_repeat_for_a_seed() {
        let draw = || {
            let f = faults(&[
                "--fault-seed",
                "7",
                "--fault-5xx",
                "0.3",
                "--fault-reset",
                "0.3",
            ]);
            (0..50)
                .map(|_| f.pick(Route::Ops, Some("t"), &[]).map(|(x, _)| x))
                .collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(a.iter().any(Option::is_none));
        assert!(a.contains(&Some(Fault::ResetBeforeCommit)));
    }
}
