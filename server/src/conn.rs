//! The connection layer: the accept loop, caps on open connections, and the timeouts of a
//! connection's phases, in front of the router.
//!
//! `axum::serve` arms none of hyper's timeouts, so a client that trickles a request head,
//! stalls a body or keeps a connection idle held its socket for as long as it liked. Here
//! every connection is watched through its phases:
//!
//! - **head**: from the connection's start, or from the first byte of a later request, until
//!   the request head is complete: at most `--header-timeout`, then the socket is closed;
//! - **handler**: from the head to the answer, at most `--request-timeout` (503
//!   `request-timeout`); the body inside it is bounded by `--body-timeout` and
//!   `--body-min-rate` (see `app::read_body`);
//! - **idle**: from the answer until the next request starts, and while the answer is
//!   written: at most `--idle-timeout` without progress, then the connection is closed.
//!
//! Past `--max-connections` open connections, or `--max-connections-per-ip` from one address,
//! a new connection gets a canned 503 problem with `Retry-After` and is closed. hyper's own
//! answers to requests it cannot parse (400, 414, 431, with empty bodies) are rewritten on
//! their way out into problem+json, like every other error of the server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::problem::Problem;

/// The bounds of the connection layer (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// `--header-timeout`.
    pub header_timeout: Duration,
    /// `--idle-timeout`.
    pub idle_timeout: Duration,
    /// `--request-timeout`.
    pub request_timeout: Duration,
    /// `--max-connections` (after the fd limit).
    pub max_connections: usize,
    /// `--max-connections-per-ip`; 0 for none.
    pub max_per_ip: usize,
}

/// Largest request head hyper buffers; past it, 431.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// Most connections being refused (answered 503) at once; past it a refused connection is
/// simply closed, so that refusing stays cheap under a flood.
const MAX_REFUSING: usize = 256;
/// How long a refused connection is read (and its bytes thrown away) after the 503, so that
/// closing on unread bytes does not reset the connection before the client reads the answer.
const REFUSE_LINGER: Duration = Duration::from_secs(1);
/// How long shutdown waits for running requests past `--request-timeout`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` and serves `router` on them until `shutdown` resolves;
/// then stops accepting, lets running requests finish (at most the request timeout), and
/// returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let open = Arc::new(Open::default());
    let refusing = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Small JSON answers must not wait for Nagle and delayed ACKs.
                    let _ = tcp.set_nodelay(true);
                    match open.admit(peer.ip(), &limits) {
                        Ok(guard) => {
                            tasks.spawn(connection(
                                tcp,
                                peer,
                                guard,
                                router.clone(),
                                limits,
                                metrics.clone(),
                                stop_rx.clone(),
                            ));
                        }
                        Err(reason) => {
                            metrics.connection_refused(reason);
                            if refusing.fetch_add(1, Ordering::Relaxed) < MAX_REFUSING {
                                let refusing = refusing.clone();
                                tokio::spawn(async move {
                                    refuse(tcp, reason).await;
                                    refusing.fetch_sub(1, Ordering::Relaxed);
                                });
                            } else {
                                refusing.fetch_sub(1, Ordering::Relaxed);
                                drop(tcp);
                            }
                        }
                    }
                }
                Err(e) => {
                    // Out of fds (EMFILE) and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.request_timeout + SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            left = tasks.len(),
            "connections still open at shutdown; closing them"
        );
        tasks.shutdown().await;
    }
    Ok(())
}

/// Open connections, in all and per address.
#[derive(Default)]
struct Open {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds a place among the open connections until dropped.
struct Admitted {
    open: Arc<Open>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.open.total.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = self.open.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl Open {
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &ConnLimits) -> Result<Admitted, &'static str> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= limits.max_connections {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err("total");
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if limits.max_per_ip > 0 && *n >= limits.max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err("per_ip");
        }
        *n += 1;
        Ok(Admitted {
            open: self.clone(),
            ip,
        })
    }
}

/// Answers a connection past a cap with 503 and closes it.
async fn refuse(mut tcp: TcpStream, reason: &'static str) {
    let detail = if reason == "per_ip" {
        "too many connections from this address; retry later"
    } else {
        "too many connections; retry later"
    };
    let body = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too-many-connections",
        "Too many connections",
        detail,
    )
    .body()
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        if tcp.write_all(answer.as_bytes()).await.is_ok() {
            let _ = tcp.shutdown().await;
            let mut sink = [0u8; 4096];
            let mut left = 64usize << 10;
            while left > 0 {
                match tcp.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        }
    })
    .await;
}

/// A connection's phase, for its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Handler,
    Idle,
}

/// Where a connection is and since when; written by its IO and its service, read by its
/// watchdog, which a change of phase wakes (a new phase may end sooner than the old one).
struct Watch {
    state: Mutex<(Phase, Instant)>,
    changed: tokio::sync::Notify,
}

impl Watch {
    fn new() -> Arc<Self> {
        Arc::new(Watch {
            state: Mutex::new((Phase::Head, Instant::now())),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn set(&self, phase: Phase) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (phase, Instant::now());
        self.changed.notify_one();
    }

    fn get(&self) -> (Phase, Instant) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: an idle connection starts a new request head.
    fn read(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 == Phase::Idle {
            *state = (Phase::Head, Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Bytes of an answer left: writing is progress, not idleness.
    fn wrote(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 == Phase::Idle {
            state.1 = Instant::now();
        }
    }

    /// When the current phase runs out.
    fn deadline(&self, limits: &ConnLimits) -> (Phase, Instant) {
        let (phase, since) = self.get();
        let limit = match phase {
            Phase::Head => limits.header_timeout,
            Phase::Idle => limits.idle_timeout,
            // The request timeout answers inside the service; this is a backstop.
            Phase::Handler => limits.request_timeout + SHUTDOWN_GRACE,
        };
        (phase, since + limit)
    }
}

/// Marks the handler phase over when the service future ends, however it ends.
struct InHandler(Arc<Watch>);

impl Drop for InHandler {
    fn drop(&mut self) {
        self.0.set(Phase::Idle);
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    _admitted: Admitted,
    router: Router,
    limits: ConnLimits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let watch = Watch::new();
    let io = TokioIo::new(Watched {
        inner: tcp,
        watch: watch.clone(),
        pending: Vec::new(),
    });
    let service = {
        let watch = watch.clone();
        let metrics = metrics.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            watch.set(Phase::Handler);
            let guard = InHandler(watch.clone());
            let router = router.clone();
            let metrics = metrics.clone();
            req.extensions_mut().insert(ConnectInfo(peer));
            async move {
                let _guard = guard;
                let req = req.map(Body::new);
                let response =
                    match tokio::time::timeout(limits.request_timeout, router.oneshot(req)).await {
                        Ok(Ok(response)) => response,
                        Ok(Err(never)) => match never {},
                        Err(_) => {
                            metrics.timeout("request");
                            request_timeout(limits.request_timeout)
                        }
                    };
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        // The head timeout is ours (it must not count the idle time between requests, which
        // hyper's does), so hyper's is off.
        .header_read_timeout(None)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES.max(8192) * 4)
        // One buffer per write, so that hyper's automatic error answers can be recognised.
        .writev(false)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let (phase, deadline) = watch.deadline(&limits);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(error = %e, %peer, "connection ended with an error");
                }
                return;
            }
            () = watch.changed.notified() => continue,
            () = tokio::time::sleep_until(deadline) => {
                // The phase may have moved on since the deadline was taken.
                let (now_phase, now_deadline) = watch.deadline(&limits);
                if now_phase != phase || now_deadline > Instant::now() {
                    continue;
                }
                match phase {
                    Phase::Idle if !closing => {
                        metrics.timeout("idle");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                        // Give it a moment to close cleanly, then drop it.
                        watch.set(Phase::Idle);
                    }
                    Phase::Head => {
                        metrics.timeout("header");
                        debug!(%peer, "request head too slow; closing");
                        return;
                    }
                    _ => return,
                }
            }
            changed = stop.changed(), if !closing => {
                if changed.is_err() || *stop.borrow() {
                    // A head still arriving is no running request: close it now rather than
                    // wait for its timeout. Otherwise let hyper finish the request in hand.
                    if watch.get().0 == Phase::Head {
                        return;
                    }
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// The answer when a request ran past `--request-timeout`.
fn request_timeout(limit: Duration) -> Response<Body> {
    let mut problem = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "request-timeout",
        "Request timed out",
        format!(
            "the request took longer than {} ms; if it carried ops, some may have been applied \
             (a resend replays them)",
            limit.as_millis()
        ),
    )
    .retry_after(1);
    problem.close = true;
    problem.into_response()
}

/// The socket, watched: reads and writes move the connection's phase, and hyper's automatic
/// error answers (a bare head with `content-length: 0`) are rewritten into problem+json.
struct Watched {
    inner: TcpStream,
    watch: Arc<Watch>,
    /// Bytes of a rewritten answer not yet written.
    pending: Vec<u8>,
}

impl Watched {
    fn flush_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.pending.drain(..n);
                    self.watch.wrote();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.watch.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.flush_pending(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        if let Some(answer) = rewrite_automatic_answer(buf) {
            self.pending = answer;
            // The rewritten bytes go out on the next flush (or now, if the socket takes them).
            let _ = self.flush_pending(cx);
            return Poll::Ready(Ok(buf.len()));
        }
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.watch.wrote();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.flush_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.flush_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

/// If `buf` is one of hyper's automatic answers to a request it could not parse, the same
/// answer as problem+json. Those are a bare head, status 4xx or 5xx, `content-length: 0`;
/// every answer of the router has a problem body, so none of them looks like that.
fn rewrite_automatic_answer(buf: &[u8]) -> Option<Vec<u8>> {
    if !buf.starts_with(b"HTTP/1.1 ") || !buf.ends_with(b"\r\n\r\n") || buf.len() > 1024 {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    if !head
        .to_ascii_lowercase()
        .contains("\r\ncontent-length: 0\r\n")
    {
        return None;
    }
    let status: u16 = head.get(9..12)?.parse().ok()?;
    if !(400..=599).contains(&status) {
        return None;
    }
    let status = StatusCode::from_u16(status).ok()?;
    let problem = match status.as_u16() {
        431 => Problem::new(
            status,
            "headers-too-large",
            "Request headers too large",
            format!(
                "the request head is larger than {MAX_HEAD_BYTES} bytes or has too many headers"
            ),
        ),
        414 => Problem::new(
            status,
            "uri-too-long",
            "URI too long",
            "the request target is too long",
        ),
        400 => Problem::malformed(
            "the request could not be parsed as HTTP/1.1 (request line, a header, \
             Content-Length or Transfer-Encoding)",
        ),
        _ => Problem::new(
            status,
            "bad-request",
            "Request refused",
            "the request could not be handled",
        ),
    };
    let body = problem.body().to_string();
    let date = head
        .split("\r\n")
        .find(|l| l.to_ascii_lowercase().starts_with("date:"))
        .map(|l| format!("{l}\r\n"))
        .unwrap_or_default();
    let line = head.split("\r\n").next()?;
    let mut out = format!(
        "{line}\r\ncontent-type: application/problem+json\r\nconnection: close\r\n{date}content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bare_error_heads_are_rewritten() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 13:59:48 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite_automatic_answer(hyper).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(out.contains("content-type: application/problem+json"));
        assert!(out.contains("date: Wed, 02 Dec 2026"));
        let body = out.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["status"], 431);
        assert!(out.contains(&format!("content-length: {}\r\n", body.len())));
        for keep in [
            &b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{\"x\":1}",
            b"{\"results\":[]}",
        ] {
            assert!(rewrite_automatic_answer(keep).is_none());
        }
    }
}
