//! Shared parts of the fairness and slow-client benchmarks: start the release binary, raise
//! the fd limit, ids, percentiles.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running server, killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `outbox-server` on 127.0.0.1:0 over `db` with `args`; its log goes to `log`.
pub fn start(db: &Path, log_path: &Path, args: &[&str]) -> Server {
    // `OUTBOX_BENCH_LOG=DIR` keeps the server's log there (with `RUST_LOG` passed through),
    // to look into a run.
    let kept = std::env::var_os("OUTBOX_BENCH_LOG")
        .map(|dir| Path::new(&dir).join(log_path.file_name().unwrap_or_default()));
    let log_path = kept.as_deref().unwrap_or(log_path);
    let log = std::fs::File::create(log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-server"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--db")
        .arg(db)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn outbox-server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            panic!("no listening line: {line:?}; server log:\n{log}")
        })
        .to_owned();
    let addr = url.trim_start_matches("http://").to_owned();
    Server { child, url, addr }
}

/// Raises the soft fd limit to `want` (or the hard limit, if lower) and returns (soft, hard)
/// after the change. Children (the server) inherit it.
// `rlim_t` is u64 on Linux but not on every target, hence the casts.
#[allow(clippy::unnecessary_cast)]
pub fn raise_fd_limit(want: u64) -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (0, 0);
        }
        if (lim.rlim_cur as u64) < want {
            let target = want.min(lim.rlim_max as u64);
            let raised = libc::rlimit {
                rlim_cur: target as libc::rlim_t,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = raised.rlim_cur;
            }
        }
    }
    (lim.rlim_cur as u64, lim.rlim_max as u64)
}

/// A canonical lowercase UUID built from two numbers.
pub fn uuid(a: u64, b: u64) -> String {
    format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        (a >> 16) & 0xffff_ffff,
        a & 0xffff,
        b & 0xffff_ffff_ffff
    )
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The `q` quantile (0..=1) of `samples`, by nearest rank.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// `--flag VALUE` from the bench's arguments.
pub fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}
