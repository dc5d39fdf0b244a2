//! Counters for `GET /metrics`, rendered in the Prometheus text format by hand (a handful of
//! series does not need a metrics crate).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the storage latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// All the server's counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String), u64>>,
    results: Mutex<BTreeMap<&'static str, u64>>,
    faults: Mutex<BTreeMap<&'static str, u64>>,
    timeouts: Mutex<BTreeMap<&'static str, u64>>,
    refused_connections: Mutex<BTreeMap<&'static str, u64>>,
    storage_buckets: [AtomicU64; BUCKETS.len()],
    storage_count: AtomicU64,
    storage_micros: AtomicU64,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K, by: u64) {
    *map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default() += by;
}

impl Metrics {
    /// Counts one answered request; `status` is the code, or `dropped` for a dropped
    /// connection.
    pub fn request(&self, route: &str, status: &str) {
        bump(&self.requests, (route.to_owned(), status.to_owned()), 1);
    }

    /// Counts one op result by status.
    pub fn result(&self, status: &'static str) {
        bump(&self.results, status, 1);
    }

    /// Counts one injected fault by kind.
    pub fn fault(&self, kind: &'static str) {
        bump(&self.faults, kind, 1);
    }

    /// Counts one timeout by kind (`header`, `idle`, `body`, `request`).
    pub fn timeout(&self, kind: &'static str) {
        bump(&self.timeouts, kind, 1);
    }

    /// Counts one connection refused at a cap (`total` or `per_ip`).
    pub fn connection_refused(&self, reason: &'static str) {
        bump(&self.refused_connections, reason, 1);
    }

    /// Records how long one storage call took.
    pub fn storage(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.storage_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.storage_count.fetch_add(1, Ordering::Relaxed);
        self.storage_micros.fetch_add(
            took.as_micros().try_into().unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP outbox_http_requests_total Requests answered, by route and status.\n");
        out.push_str("# TYPE outbox_http_requests_total counter\n");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "outbox_http_requests_total{{route=\"{}\",status=\"{}\"}} {n}",
                escape(route),
                escape(status)
            );
        }
        out.push_str("# HELP outbox_op_results_total Op results, by status.\n");
        out.push_str("# TYPE outbox_op_results_total counter\n");
        for (status, n) in self
            .results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "outbox_op_results_total{{status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP outbox_faults_injected_total Faults injected, by kind.\n");
        out.push_str("# TYPE outbox_faults_injected_total counter\n");
        for (kind, n) in self.faults.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "outbox_faults_injected_total{{kind=\"{kind}\"}} {n}");
        }
        out.push_str("# HELP outbox_timeouts_total Timeouts, by kind.\n");
        out.push_str("# TYPE outbox_timeouts_total counter\n");
        for (kind, n) in self
            .timeouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "outbox_timeouts_total{{kind=\"{kind}\"}} {n}");
        }
        out.push_str(
            "# HELP outbox_connections_refused_total Connections refused at a cap, by cap.\n",
        );
        out.push_str("# TYPE outbox_connections_refused_total counter\n");
        for (reason, n) in self
            .refused_connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "outbox_connections_refused_total{{reason=\"{reason}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP outbox_storage_seconds Latency of storage calls, queueing included.\n",
        );
        out.push_str("# TYPE outbox_storage_seconds histogram\n");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let n = self.storage_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "outbox_storage_seconds_bucket{{le=\"{bound}\"}} {n}");
        }
        let count = self.storage_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "outbox_storage_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.storage_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "outbox_storage_seconds_sum {sum}");
        let _ = writeln!(out, "outbox_storage_seconds_count {count}");
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
