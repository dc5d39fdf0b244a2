//! Command-line flags of `outbox-server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Everything the server is told at start. `outbox-server --help` prints this.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "outbox-server",
    version,
    about = "Reference backend for the outbox wire protocol (docs/PROTOCOL.md)",
    after_help = "Logs go to stderr (filter with RUST_LOG, e.g. RUST_LOG=debug). On start the \
                  server prints one line, `listening on http://ADDR`, to stdout."
)]
pub struct Config {
    /// Address to listen on. Port 0 picks a free port; the real one is printed.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// SQLite database file, created if missing (WAL mode, so `-wal` and `-shm` files appear
    /// beside it).
    #[arg(long, default_value = "outbox.db")]
    pub db: PathBuf,

    /// A tenant and its bearer token, as TENANT=TOKEN. Repeatable.
    #[arg(long = "token", value_name = "TENANT=TOKEN", value_parser = parse_token)]
    pub tokens: Vec<(String, String)>,

    /// How long stored op results and Idempotency-Key responses are kept, e.g. 7d, 12h, 30m,
    /// 10s, 500ms. The per-entity `last` seq is kept forever.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub retention: Duration,

    /// Requests per second each client may make (token bucket refill rate). 0 turns the limit
    /// off.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,

    /// Token bucket size: how many requests a client may make in a burst.
    #[arg(long, default_value_t = 200.0)]
    pub burst: f64,

    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,

    /// An origin allowed by CORS, e.g. http://127.0.0.1:8000, or `*` for any. Repeatable.
    /// Without it no CORS headers are sent.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,

    /// Enables /v1/admin/faults and /v1/admin/log, authorised with `Bearer <this token>`.
    #[arg(long)]
    pub admin_token: Option<String>,

    /// Serves the files of this directory under /demo/ (GET only), for the demo extension's
    /// fixture pages. Off by default.
    #[arg(long, value_name = "DIR")]
    pub demo_pages: Option<PathBuf>,

    /// SQLite `synchronous` setting. `full` syncs the WAL on every commit, so an
    /// acknowledged op survives power loss. `normal` survives a crash of this process but may
    /// lose the last commits on power loss or an OS crash.
    #[arg(long, value_enum, default_value_t = SyncMode::Full)]
    pub sync: SyncMode,

    /// Seed of the fault-injection random generator.
    #[arg(long, default_value_t = 0)]
    pub fault_seed: u64,

    /// Probability that a request to ops/op/beacon is answered with a 5xx (nothing applied).
    #[arg(long = "fault-5xx", default_value_t = 0.0, value_parser = parse_probability)]
    pub fault_5xx: f64,

    /// Probability of a 429 with `Retry-After: 1` (nothing applied).
    #[arg(long = "fault-429", default_value_t = 0.0, value_parser = parse_probability)]
    pub fault_429: f64,

    /// Probability that a request is delayed by --fault-delay-ms before it is handled.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub fault_delay: f64,

    /// The delay of --fault-delay, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub fault_delay_ms: u64,

    /// Probability that the connection is dropped before anything is applied.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub fault_reset: f64,

    /// Probability that the request is committed and then the connection is dropped without a
    /// response (the crash between apply and ack).
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub fault_drop_after_commit: f64,
}

/// The SQLite `synchronous` pragma; see `--sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncMode {
    /// `PRAGMA synchronous = FULL`.
    Full,
    /// `PRAGMA synchronous = NORMAL`.
    Normal,
}

impl Config {
    /// Checks what clap cannot: the fault probabilities are one distribution, so their sum
    /// must not pass 1.
    pub fn validate(&self) -> Result<(), String> {
        let sum = self.fault_5xx
            + self.fault_429
            + self.fault_delay
            + self.fault_reset
            + self.fault_drop_after_commit;
        if sum > 1.0 + 1e-9 {
            return Err(format!(
                "the --fault-* probabilities add up to {sum}, more than 1"
            ));
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return Err("--rate must be a number ≥ 0".into());
        }
        if !(self.burst >= 1.0 && self.burst.is_finite()) {
            return Err("--burst must be a number ≥ 1".into());
        }
        if self.retention.is_zero() {
            return Err("--retention must be longer than 0".into());
        }
        let mut tokens: Vec<&str> = self.tokens.iter().map(|(_, t)| t.as_str()).collect();
        tokens.sort_unstable();
        if tokens.windows(2).any(|w| w[0] == w[1]) {
            return Err("two --token flags give the same token".into());
        }
        Ok(())
    }

    /// Whether any seeded fault can fire.
    pub fn seeded_faults(&self) -> bool {
        self.fault_5xx
            + self.fault_429
            + self.fault_delay
            + self.fault_reset
            + self.fault_drop_after_commit
            > 0.0
    }
}

fn parse_token(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((tenant, token)) if !tenant.is_empty() && !token.is_empty() => {
            Ok((tenant.to_owned(), token.to_owned()))
        }
        _ => Err("expected TENANT=TOKEN".into()),
    }
}

fn parse_probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("expected a probability between 0 and 1".into()),
    }
}

/// Parses `500ms`, `10s`, `30m`, `12h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}`: expected a number and a unit (ms, s, m, h, d)"))?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use ms, s, m, h or d)"
            ));
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("d").is_err());
    }
}
