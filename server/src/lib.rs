//! `outbox-server`: the reference backend of the outbox wire protocol (docs/PROTOCOL.md).
//!
//! An axum router over SQLite, served by its own connection layer ([`conn`]) so that every
//! phase of a connection has a timeout. [`run`] starts it from a [`config::Config`]; the
//! storage sits behind [`store::Store`] so that another engine can replace SQLite.
#![deny(missing_docs)]

pub mod app;
pub mod config;
pub mod conn;
pub mod demo;
pub mod faults;
pub mod grant;
pub mod limit;
pub mod merge;
pub mod metrics;
pub mod pg;
pub mod problem;
pub mod recent;
pub mod store;
pub mod wire;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::app::AppState;
use crate::config::Config;
use crate::conn::ConnLimits;
use crate::grant::GrantKey;
use crate::pg::PgStore;
use crate::store::{SqliteStore, Store};

/// File descriptors kept for the database, the listener and logs when `--max-connections`
/// is fitted under the fd limit.
const FD_RESERVE: u64 = 64;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Starts the server and runs it until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    config.validate()?;
    let tokens = config.all_tokens()?;
    if tokens.is_empty() {
        warn!("no tokens given: every authenticated request will get 401");
    }
    if !config.tokens.is_empty() {
        warn!(
            "--token puts bearer tokens on the command line, where every local user can read \
             them (ps, /proc); use --tokens-file or OUTBOX_TOKENS in production"
        );
    }
    let grant_key = match (&config.grant_key_file, &config.grant_key_env) {
        (Some(path), _) => GrantKey::from_file(path)?,
        (None, Some(hex)) => GrantKey::from_hex(hex)?,
        (None, None) => {
            info!(
                "no --grant-key-file or OUTBOX_GRANT_KEY: beacon grants use a random key and \
                 stop working when this process ends (or on another instance)"
            );
            GrantKey::random()?
        }
    };
    if config.beacon_access_token {
        warn!(
            "--beacon-access-token: beacons may carry the bearer token in their body, which \
             puts it in the page (legacy; use grants)"
        );
    }
    let db = config.db.to_string_lossy().into_owned();
    if pg::is_postgres_url(&db) {
        let store = PgStore::open(&db, config.db_pool, config.request_timeout).await?;
        info!("storage: PostgreSQL");
        serve(config, tokens, grant_key, store).await
    } else {
        let store = SqliteStore::open(&config.db, config.sync)?;
        serve(config, tokens, grant_key, store).await
    }
}

/// Serves on an open store until SIGINT or SIGTERM.
async fn serve<S: Store>(
    config: Config,
    tokens: Vec<(String, String)>,
    grant_key: GrantKey,
    store: S,
) -> Result<(), Box<dyn std::error::Error>> {
    let max_connections = fit_connections(config.max_connections);
    let state = Arc::new(AppState::new(&config, tokens.clone(), grant_key, store));
    let close_connections = config.admin_token.is_some() || config.seeded_faults();
    let demo_pages = config
        .demo_pages
        .as_deref()
        .map(demo::DemoPages::new)
        .transpose()?;
    let app = app::router(
        state.clone(),
        &config.cors_origins,
        close_connections,
        demo_pages,
    )?;
    let metrics = state.metrics();
    tokio::spawn(purge_loop(state, config.retention));

    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    {
        // Scripts and tests wait for this exact line; flush so that a pipe gets it now.
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    info!(%addr, db = %redact(&config.db.to_string_lossy()), tenants = tokens.len(), max_connections, "listening");
    let limits = ConnLimits {
        header_timeout: config.header_timeout,
        idle_timeout: config.idle_timeout,
        request_timeout: config.request_timeout,
        max_connections,
        max_per_ip: config.max_connections_per_ip,
    };
    conn::serve(listener, app, limits, metrics, shutdown()).await?;
    info!("stopped");
    Ok(())
}

/// The database named for a log line: a URL without its password.
fn redact(db: &str) -> String {
    match (db.find("://"), db.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &db[scheme + 3..at];
            let user = user.split(':').next().unwrap_or_default();
            format!("{}{user}@{}", &db[..scheme + 3], &db[at + 1..])
        }
        _ => db.to_owned(),
    }
}

/// Raises the soft fd limit to the hard one and fits `wanted` connections under it, so that
/// a connection flood meets the 503 of the cap rather than `accept` failing for everyone.
fn fit_connections(wanted: usize) -> usize {
    let Some(limit) = raise_fd_limit() else {
        return wanted;
    };
    let room = limit.saturating_sub(FD_RESERVE).max(1);
    if (wanted as u64) > room {
        warn!(
            wanted,
            fd_limit = limit,
            "--max-connections lowered to fit the fd limit"
        );
        room as usize
    } else {
        wanted
    }
}

/// The soft fd limit after raising it to the hard limit, if it can be read.
#[cfg(unix)]
// `rlim_t` is u64 on Linux but not on every unix, hence the casts.
#[allow(clippy::unnecessary_cast)]
fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = raised.rlim_cur;
            }
        }
    }
    Some(lim.rlim_cur as u64)
}

#[cfg(not(unix))]
fn raise_fd_limit() -> Option<u64> {
    None
}

/// Purges expired results at start and then every tenth of the retention (between 1 s and
/// 1 h), so that nothing outlives the retention by more than about a tenth of it. The store
/// deletes in bounded chunks between other work.
async fn purge_loop<S: Store>(state: Arc<AppState<S>>, retention: Duration) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let retention_ms = retention.as_millis().min(i64::MAX as u128) as i64;
    loop {
        if let Err(e) = state
            .store()
            .purge(now_ms().saturating_sub(retention_ms))
            .await
        {
            error!(error = %e, "purge failed");
        }
        tokio::time::sleep(every).await;
    }
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    info!("shutting down");
}
