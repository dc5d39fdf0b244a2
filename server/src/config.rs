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

    /// The database: a SQLite file, created if missing (WAL mode, so `-wal` and `-shm` files
    /// appear beside it), or a PostgreSQL URL (`postgres://USER@HOST:PORT/DB`), which several
    /// server replicas may share (docs/SERVER.md, *Scaling out*).
    #[arg(long, default_value = "outbox.db", env = "OUTBOX_DB")]
    pub db: PathBuf,

    /// Most connections to PostgreSQL this process keeps open (ignored for SQLite).
    #[arg(long, default_value_t = 16)]
    pub db_pool: usize,

    /// A tenant and its bearer token, as TENANT=TOKEN. Repeatable. For tests and the demo:
    /// the command line is visible to every local user (`ps`), so production uses
    /// --tokens-file or OUTBOX_TOKENS.
    #[arg(long = "token", value_name = "TENANT=TOKEN", value_parser = parse_token)]
    pub tokens: Vec<(String, String)>,

    /// A file of TENANT=TOKEN lines (blank lines and lines starting with `#` are skipped).
    /// Read once at start.
    #[arg(long, value_name = "PATH", env = "OUTBOX_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// TENANT=TOKEN entries from the environment variable OUTBOX_TOKENS (separated by commas
    /// or white space). Not a flag, so that it never shows on the command line.
    #[arg(skip)]
    pub tokens_env: Option<String>,

    /// How long stored op results and Idempotency-Key responses are kept, e.g. 7d, 12h, 30m,
    /// 10s, 500ms. The per-entity `last` seq is kept forever.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub retention: Duration,

    /// Requests per second each client may make (token bucket refill rate). 0 turns the limit
    /// off; otherwise at least 0.001.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,

    /// Token bucket size: how many requests a client may make in a burst.
    #[arg(long, default_value_t = 200.0)]
    pub burst: f64,

    /// Requests per second all clients of one tenant may make together, checked before the
    /// body is read. 0 turns it off. Default: 10 × --rate (so `--rate 0` turns both off).
    #[arg(long)]
    pub tenant_rate: Option<f64>,

    /// The per-tenant bucket size. Default: 10 × --burst.
    #[arg(long)]
    pub tenant_burst: Option<f64>,

    /// Largest request body in bytes; larger ones get 413. A beacon authenticated by a grant
    /// or by a body access_token is capped at 64 KiB (the browsers' keepalive budget) or this,
    /// whichever is smaller.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,

    /// Largest entity state, in bytes of JSON. An op that would grow an entity's state past
    /// it is `rejected`.
    #[arg(long, default_value_t = 256 << 10)]
    pub max_state_bytes: usize,

    /// Most bytes of entity state one answer carries in its conflicts. Past it, and for a
    /// second conflict on the same entity, a conflict carries `"state_omitted": true` instead
    /// of the state.
    #[arg(long, default_value_t = 256 << 10)]
    pub max_answer_state_bytes: usize,

    /// How long a client may take to send a request head: from the connection's start, or
    /// from the first byte of a later request on a kept-alive connection.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// How long a kept-alive connection may sit idle between requests (or make no progress
    /// taking an answer) before it is closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// How long reading one request body may take in all.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// Slowest body a client may send, in bytes per second, averaged from the start of the
    /// body after a 2 s grace. 0 turns the check off (--body-timeout still holds).
    #[arg(long, default_value_t = 1024)]
    pub body_min_rate: u64,

    /// How long a request may take from its head to its answer (body, waiting for storage
    /// and applying included). Past it the answer is 503 `request-timeout`.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Most connections open at once; past it a new connection gets 503 and is closed. Lowered
    /// to the process's fd limit (minus a reserve) when that is smaller.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,

    /// Most connections open at once from one IP address (0: no per-address cap).
    #[arg(long, default_value_t = 256)]
    pub max_connections_per_ip: usize,

    /// The key of beacon grants: a file of at least 32 bytes of secret (its bytes as they are).
    /// Every instance behind one load balancer must share it. Without it (or OUTBOX_GRANT_KEY)
    /// each process draws a random key, and grants die with a restart.
    #[arg(long, value_name = "PATH")]
    pub grant_key_file: Option<PathBuf>,

    /// The grant key from the environment variable OUTBOX_GRANT_KEY, in hex (at least 64 hex
    /// digits). Not a flag, so that it never shows on the command line.
    #[arg(skip)]
    pub grant_key_env: Option<String>,

    /// How long a beacon grant stays valid (1s to 1h).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub grant_ttl: Duration,

    /// Legacy: accept a beacon authenticated by `access_token` in its body, which puts the
    /// user's bearer token into the page. Off by default; use grants (POST /v1/grants).
    #[arg(long)]
    pub beacon_access_token: bool,

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

/// Most bytes a tenant name may have (a grant carries it with a one-byte length).
pub const MAX_TENANT_BYTES: usize = 255;
/// Slowest accepted positive rate: one request per 1,000 s.
pub const MIN_RATE: f64 = 0.001;
/// Largest accepted rate and burst.
pub const MAX_RATE: f64 = 1e9;
/// Shortest and longest accepted connection and request timeouts.
const TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(86_400));

fn check_rate(flag: &str, rate: f64) -> Result<(), String> {
    if rate == 0.0 || (rate.is_finite() && (MIN_RATE..=MAX_RATE).contains(&rate)) {
        Ok(())
    } else {
        Err(format!(
            "{flag} must be 0 (off) or between {MIN_RATE} and {MAX_RATE} requests per second, not {rate}"
        ))
    }
}

fn check_burst(flag: &str, burst: f64) -> Result<(), String> {
    if burst.is_finite() && (1.0..=MAX_RATE).contains(&burst) {
        Ok(())
    } else {
        Err(format!(
            "{flag} must be between 1 and {MAX_RATE}, not {burst}"
        ))
    }
}

impl Config {
    /// Fills in what clap does not read: `OUTBOX_TOKENS` and `OUTBOX_GRANT_KEY`.
    pub fn with_env(mut self) -> Self {
        self.tokens_env = std::env::var("OUTBOX_TOKENS").ok();
        self.grant_key_env = std::env::var("OUTBOX_GRANT_KEY").ok();
        self
    }

    /// Every (tenant, token) pair: `--token` flags, then the tokens file, then
    /// `OUTBOX_TOKENS`.
    pub fn all_tokens(&self) -> Result<Vec<(String, String)>, String> {
        let mut all = self.tokens.clone();
        if let Some(path) = &self.tokens_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--tokens-file {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                all.push(parse_token(line).map_err(|e| {
                    format!("--tokens-file {} line {}: {e}", path.display(), n + 1)
                })?);
            }
        }
        if let Some(list) = &self.tokens_env {
            for entry in list
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|e| !e.is_empty())
            {
                all.push(parse_token(entry).map_err(|e| format!("OUTBOX_TOKENS: {e}"))?);
            }
        }
        Ok(all)
    }

    /// The per-tenant rate: `--tenant-rate`, or 10 × `--rate`.
    pub fn tenant_rate(&self) -> f64 {
        self.tenant_rate.unwrap_or(self.rate * 10.0)
    }

    /// The per-tenant burst: `--tenant-burst`, or 10 × `--burst`.
    pub fn tenant_burst(&self) -> f64 {
        self.tenant_burst.unwrap_or(self.burst * 10.0)
    }

    /// Checks what clap cannot: the fault probabilities are one distribution, so their sum
    /// must not pass 1; rates, timeouts and sizes have ranges; tokens are unique, and the
    /// admin token is nobody's tenant token.
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
        check_rate("--rate", self.rate)?;
        check_burst("--burst", self.burst)?;
        check_rate("--tenant-rate", self.tenant_rate())?;
        check_burst("--tenant-burst", self.tenant_burst())?;
        if self.retention.is_zero() {
            return Err("--retention must be longer than 0".into());
        }
        for (flag, value) in [
            ("--header-timeout", self.header_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--body-timeout", self.body_timeout),
            ("--request-timeout", self.request_timeout),
        ] {
            if !(TIMEOUT_RANGE.0..=TIMEOUT_RANGE.1).contains(&value) {
                return Err(format!("{flag} must be between 100ms and 1d"));
            }
        }
        if self.body_timeout > self.request_timeout {
            return Err("--body-timeout must not be longer than --request-timeout".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.grant_ttl) {
            return Err("--grant-ttl must be between 1s and 1h".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.max_state_bytes < 2 {
            return Err("--max-state-bytes must be at least 2 (the empty state `{}`)".into());
        }
        let all = self.all_tokens()?;
        for (tenant, token) in &all {
            if tenant.len() > MAX_TENANT_BYTES {
                return Err(format!(
                    "tenant `{tenant}` is longer than {MAX_TENANT_BYTES} bytes"
                ));
            }
            if !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err(format!(
                    "the token of tenant `{tenant}` must be visible ASCII without spaces"
                ));
            }
        }
        let mut tokens: Vec<&str> = all.iter().map(|(_, t)| t.as_str()).collect();
        tokens.sort_unstable();
        if tokens.windows(2).any(|w| w[0] == w[1]) {
            return Err("two tenants (or two entries) give the same token".into());
        }
        if let Some(admin) = &self.admin_token
            && tokens.contains(&admin.as_str())
        {
            return Err("--admin-token must differ from every tenant token".into());
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
    match s.split_once('=').map(|(a, b)| (a.trim(), b.trim())) {
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
