//! `outbox-server`: the reference backend of the outbox wire protocol (docs/PROTOCOL.md).
//!
//! An axum server over SQLite. [`run`] starts it from a [`config::Config`]; the storage sits
//! behind [`store::Store`] so that another engine can replace SQLite.
#![deny(missing_docs)]

pub mod app;
pub mod config;
pub mod demo;
pub mod faults;
pub mod limit;
pub mod merge;
pub mod metrics;
pub mod problem;
pub mod store;
pub mod wire;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::app::{AppState, now_ms};
use crate::config::Config;
use crate::store::{SqliteStore, Store};

/// Starts the server and runs it until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    config.validate()?;
    if config.tokens.is_empty() {
        warn!("no --token given: every authenticated request will get 401");
    }
    let store = SqliteStore::open(&config.db, config.sync)?;
    let state = Arc::new(AppState::new(&config, store));
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
    tokio::spawn(purge_loop(state, config.retention));

    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    {
        // Scripts and tests wait for this exact line; flush so that a pipe gets it now.
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    info!(%addr, db = %config.db.display(), tenants = config.tokens.len(), "listening");
    let listener = listener.tap_io(|tcp| {
        // Small JSON answers must not wait for Nagle and delayed ACKs.
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await?;
    info!("stopped");
    Ok(())
}

/// Purges expired results at start and then every tenth of the retention (between 1 s and
/// 1 h), so that nothing outlives the retention by more than about a tenth of it.
async fn purge_loop<S: Store>(state: Arc<AppState<S>>, retention: Duration) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let retention_ms = retention.as_millis().min(i64::MAX as u128) as i64;
    loop {
        match state
            .store()
            .purge(now_ms().saturating_sub(retention_ms))
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(rows = n, "purged expired results"),
            Err(e) => error!(error = %e, "purge failed"),
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
