//! The HTTP layer: routes, the request pipeline of the op routes, admin endpoints, metrics.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body::Frame;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::{error, warn};

use crate::config::Config;
use crate::demo::DemoPages;
use crate::faults::{Fault, Faults, Route, RuleSpec};
use crate::grant::{Grant, GrantError, GrantKey, MAX_GRANT_OPS};
use crate::limit::{RateLimiter, retry_after_seconds};
use crate::metrics::Metrics;
use crate::now_ms;
use crate::problem::Problem;
use crate::store::{
    ApplyOutcome, ApplyRequest, Binding, KeyClaim, KeyedRequest, Limits, OpResult, Outcome,
    RejectRule, Store, Window,
};
use crate::wire::{Envelope, parse_envelope};

/// Most entries the admin log keeps per tenant; older ones are dropped first.
const LOG_CAP: usize = 1_000_000;
/// Longest Idempotency-Key.
const MAX_KEY_LEN: usize = 255;

/// The body of a beacon authenticated by a grant or a body access_token: the keepalive
/// budget that browsers share between all such requests in flight.
pub const BEACON_BODY: usize = 64 << 10;
/// Client buckets kept (bounded: strangers can make up client ids).
const CLIENT_BUCKETS: usize = 65_536;
/// Refusal (401) buckets per address: 100 refusals at once, then 10 a second. Past them an
/// address gets 429 before its credentials are even looked at.
const REFUSAL_RATE: f64 = 10.0;
const REFUSAL_BURST: f64 = 100.0;
const REFUSAL_BUCKETS: usize = 16_384;
/// A body may trickle in its first seconds (TCP slow start, a waking radio) before
/// `--body-min-rate` applies.
const BODY_GRACE: Duration = Duration::from_secs(2);

/// Idempotency-Keys running now: (tenant, client, key) → body fingerprint.
type InFlight = Mutex<HashMap<(String, String, String), [u8; 32]>>;

/// How bodies are read: the total time and the slowest rate.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// `--body-timeout`.
    pub timeout: Duration,
    /// `--body-min-rate` in bytes per second; 0 for no rate check.
    pub min_rate: u64,
}

/// Shared state of all handlers.
pub struct AppState<S> {
    store: S,
    /// (tenant, token) pairs.
    tokens: Vec<(String, String)>,
    admin_token: Option<String>,
    max_body: usize,
    body: BodyLimits,
    limits: Limits,
    clients: RateLimiter<(String, String)>,
    tenants: RateLimiter<String>,
    refusals: RateLimiter<IpAddr>,
    grants: GrantKey,
    grant_ttl_ms: i64,
    beacon_access_token: bool,
    faults: Faults,
    metrics: Arc<Metrics>,
    /// Requests with an Idempotency-Key that are running now, with their body fingerprint.
    /// Only this instance's requests: a multi-instance store would keep this in the database.
    inflight: InFlight,
    /// The admin log, kept only when admin endpoints are on.
    log: Option<Mutex<HashMap<String, VecDeque<LogEntry>>>>,
    arrivals: AtomicU64,
}

impl<S: Store> AppState<S> {
    /// Builds the state from the flags, the resolved tenant tokens, the grant key and an open
    /// store.
    pub fn new(config: &Config, tokens: Vec<(String, String)>, grants: GrantKey, store: S) -> Self {
        AppState {
            store,
            tokens,
            admin_token: config.admin_token.clone(),
            max_body: config.max_body,
            body: BodyLimits {
                timeout: config.body_timeout,
                min_rate: config.body_min_rate,
            },
            limits: Limits {
                max_state_bytes: config.max_state_bytes,
                answer_state_bytes: config.max_answer_state_bytes,
                unordered: Some(Window::for_retention(config.retention)),
            },
            clients: RateLimiter::new(config.rate, config.burst, CLIENT_BUCKETS),
            tenants: RateLimiter::new(config.tenant_rate(), config.tenant_burst(), 4_096),
            refusals: RateLimiter::new(REFUSAL_RATE, REFUSAL_BURST, REFUSAL_BUCKETS),
            grants,
            grant_ttl_ms: config.grant_ttl.as_millis().min(i64::MAX as u128) as i64,
            beacon_access_token: config.beacon_access_token,
            faults: Faults::new(config),
            metrics: Arc::new(Metrics::default()),
            inflight: Mutex::new(HashMap::new()),
            log: config
                .admin_token
                .as_ref()
                .map(|_| Mutex::new(HashMap::new())),
            arrivals: AtomicU64::new(0),
        }
    }

    /// The store (for the purge task).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The counters (for the connection layer).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    fn tenant_for(&self, token: &str) -> Option<String> {
        // Compare against every token in constant time so that timing tells nothing.
        let mut found = None;
        for (tenant, known) in &self.tokens {
            if constant_time_eq(known.as_bytes(), token.as_bytes()) {
                found = Some(tenant.clone());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Builds the router with every route, the metrics middleware and CORS.
///
/// With `close_connections`, every answer (CORS preflights included) carries
/// `Connection: close`, so that each request has a connection of its own. The server sets it
/// while fault injection is possible: Chromium silently resends a request that fails on a
/// reused keep-alive connection before any answer arrives (measured here), which would hide a
/// dropped connection from the client and turn `reset_before_commit` into a normal apply.
///
/// With `demo_pages`, `GET /demo/{*path}` serves that directory's files (see [`crate::demo`]).
pub fn router<S: Store>(
    state: Arc<AppState<S>>,
    cors_origins: &[String],
    close_connections: bool,
    demo_pages: Option<DemoPages>,
) -> Result<Router, String> {
    let mut router = Router::new()
        .route("/v1/ops", post(ops::<S>))
        .route("/v1/op", post(op::<S>))
        .route("/v1/beacon", post(beacon::<S>))
        .route("/v1/grants", post(grants::<S>))
        .route("/v1/health", get(health::<S>))
        .route("/v1/entities/{*id}", get(entity::<S>))
        .route("/metrics", get(metrics::<S>));
    if state.admin_token.is_some() {
        router = router
            .route(
                "/v1/admin/faults",
                post(add_faults::<S>).delete(clear_faults::<S>),
            )
            .route("/v1/admin/log", get(admin_log::<S>));
    }
    if let Some(pages) = demo_pages {
        router = router.merge(
            Router::new()
                .route("/demo/{*path}", get(crate::demo::serve))
                .with_state(pages),
        );
    }
    let mut router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests::<S>,
        ))
        .with_state(state);
    if !cors_origins.is_empty() {
        router = router.layer(cors(cors_origins)?);
    }
    if close_connections {
        router = router.layer(middleware::map_response(close_connection));
    }
    Ok(router)
}

fn cors(origins: &[String]) -> Result<CorsLayer, String> {
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).map_err(|_| format!("bad --cors-origin `{o}`")))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    // `Access-Control-Allow-Headers: *` does not cover Authorization, so the headers are
    // named; Retry-After is not a safelisted response header, so it is exposed.
    Ok(CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([header::RETRY_AFTER])
        .max_age(Duration::from_secs(600)))
}

async fn close_connection(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Marks a response whose connection is dropped on purpose.
#[derive(Clone, Copy)]
struct Dropped;

/// A body that fails on its first poll. Hyper then closes the connection before the buffered
/// head is written, so the client sees a connection error and no response at all.
struct Abort;

impl http_body::Body for Abort {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Poll::Ready(Some(Err(io::Error::other(
            "fault injected: connection dropped",
        ))))
    }
}

fn dropped_connection() -> Response {
    let mut response = Response::new(Body::new(Abort));
    response.extensions_mut().insert(Dropped);
    response
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

async fn count_requests<S: Store>(
    State(st): State<Arc<AppState<S>>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    let status = if response.extensions().get::<Dropped>().is_some() {
        "dropped".to_owned()
    } else {
        response.status().as_u16().to_string()
    };
    st.metrics.request(&route, &status);
    response
}

async fn timed<S: Store, T>(st: &AppState<S>, f: impl Future<Output = T>) -> T {
    let start = Instant::now();
    let out = f.await;
    st.metrics.storage(start.elapsed());
    out
}

enum Bearer<'a> {
    Absent,
    Token(&'a str),
    Invalid,
}

fn bearer(headers: &HeaderMap) -> Bearer<'_> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Bearer::Absent;
    };
    let Ok(value) = value.to_str() else {
        return Bearer::Invalid;
    };
    match value.trim().split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Bearer::Token(token.trim())
        }
        _ => Bearer::Invalid,
    }
}

/// The tenant of a request that must carry `Authorization: Bearer`.
fn authenticate<S: Store>(st: &AppState<S>, headers: &HeaderMap) -> Result<String, Problem> {
    match bearer(headers) {
        Bearer::Absent => Err(Problem::unauthorized("no Authorization: Bearer header")),
        Bearer::Invalid => Err(Problem::unauthorized(
            "the Authorization header is not `Bearer <token>`",
        )),
        Bearer::Token(token) => st
            .tenant_for(token)
            .ok_or_else(|| Problem::unauthorized("unknown bearer token")),
    }
}

/// The peer address the connection layer put on the request.
fn peer(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Before credentials are looked at: an address refused too often recently gets 429, so
/// that guessing tokens or grants runs at a bounded rate and costs almost nothing.
fn refusal_gate<S: Store>(st: &AppState<S>, ip: Option<IpAddr>) -> Result<(), Problem> {
    let Some(ip) = ip else { return Ok(()) };
    st.refusals.peek(&ip, Instant::now()).map_err(|wait| {
        let seconds = retry_after_seconds(wait);
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!("too many refused requests from this address; retry in {seconds} s"),
        )
        .retry_after(seconds)
    })
}

/// Answers a refusal (401) and counts it against the address.
fn refuse<S: Store>(st: &AppState<S>, ip: Option<IpAddr>, problem: Problem) -> Response {
    if let Some(ip) = ip
        && problem.status == StatusCode::UNAUTHORIZED
    {
        st.refusals.spend(&ip, Instant::now());
    }
    problem.into_response()
}

/// The tenant's bucket, checked before the body is read.
fn tenant_rate<S: Store>(st: &AppState<S>, tenant: &str) -> Result<(), Problem> {
    st.tenants
        .check(&tenant.to_owned(), Instant::now())
        .map_err(|wait| {
            let seconds = retry_after_seconds(wait);
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                format!("this tenant passed its request rate; retry in {seconds} s"),
            )
            .retry_after(seconds)
        })
}

/// The client's bucket, checked once the body named the client.
fn client_rate<S: Store>(st: &AppState<S>, tenant: &str, client: &str) -> Result<(), Problem> {
    st.clients
        .check(&(tenant.to_owned(), client.to_owned()), Instant::now())
        .map_err(|wait| {
            let seconds = retry_after_seconds(wait);
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                format!("this client passed its request rate; retry in {seconds} s"),
            )
            .retry_after(seconds)
        })
}

/// How a request to an op route is authenticated; all of it is known before the body.
enum Credential {
    /// A bearer token named this tenant.
    Tenant(String),
    /// A beacon grant (tenant, client and ops bound in it).
    Grant(Grant),
    /// A legacy beacon whose token is in its body (`--beacon-access-token`).
    BodyToken,
}

/// `grant` from a query string (percent-decoded), if present.
fn grant_param(query: Option<&str>) -> Option<Result<String, Problem>> {
    let mut found = None;
    for pair in query?.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "grant" {
            continue;
        }
        if found.is_some() {
            return Some(Err(grant_invalid("`grant` appears more than once")));
        }
        found = Some(percent_decode(value).ok_or_else(|| grant_invalid("bad percent-encoding")));
    }
    found
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn grant_invalid(why: &str) -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "grant-invalid",
        "Invalid beacon grant",
        format!("the grant is not valid: {why}"),
    )
}

fn grant_mismatch(detail: String, pointer: &str) -> Problem {
    Problem::new(
        StatusCode::FORBIDDEN,
        "grant-mismatch",
        "Beacon grant does not cover the request",
        detail,
    )
    .with("pointer", pointer)
}

/// Who sends a request to an op route, from its head alone.
fn credential<S: Store>(
    st: &AppState<S>,
    route: Route,
    parts: &Parts,
) -> Result<Credential, Problem> {
    if route == Route::Beacon {
        if let Some(text) = grant_param(parts.uri.query()) {
            return match st.grants.verify(&text?, now_ms()) {
                Ok(grant) => Ok(Credential::Grant(grant)),
                Err(GrantError::Invalid(why)) => Err(grant_invalid(why)),
                Err(GrantError::Expired { expires_at }) => Err(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "grant-expired",
                    "Beacon grant expired",
                    "the grant has expired; ask POST /v1/grants for a new one",
                )
                .with("expires_at", expires_at)),
            };
        }
        if matches!(bearer(&parts.headers), Bearer::Absent) {
            return if st.beacon_access_token {
                Ok(Credential::BodyToken)
            } else {
                // Refused without reading the body: the only other credential a beacon
                // could carry is the legacy body token, which this server does not take.
                Err(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "access-token-disabled",
                    "Beacon needs a grant",
                    "authenticate a beacon with ?grant= (from POST /v1/grants) or an \
                     Authorization header; access_token in the body is a legacy way that this \
                     server does not accept (--beacon-access-token)",
                ))
            };
        }
    }
    authenticate(st, &parts.headers).map(Credential::Tenant)
}

/// Reads `Idempotency-Key`: bare (`k-1`) or an RFC 8941 string (`"k-1"`, parameters ignored).
fn idempotency_key(headers: &HeaderMap) -> Result<String, Problem> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "missing-key",
            "Missing Idempotency-Key",
            "POST /v1/op requires an Idempotency-Key header",
        ));
    };
    if values.next().is_some() {
        return Err(Problem::malformed("Idempotency-Key: sent more than once"));
    }
    let bad = |why: &str| Problem::malformed(format!("Idempotency-Key: {why}"));
    let raw = value.to_str().map_err(|_| bad("not visible ASCII"))?.trim();
    let key = if let Some(rest) = raw.strip_prefix('"') {
        let mut key = String::new();
        let mut chars = rest.chars();
        loop {
            match chars.next() {
                None => return Err(bad("unterminated string")),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some(c @ ('"' | '\\')) => key.push(c),
                    _ => return Err(bad("only \\\" and \\\\ may be escaped")),
                },
                Some(c) if (' '..='~').contains(&c) => key.push(c),
                Some(_) => return Err(bad("not visible ASCII")),
            }
        }
        let after = chars.as_str();
        if !after.is_empty() && !after.starts_with(';') {
            return Err(bad("text after the closing quote"));
        }
        key
    } else {
        if !raw.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(bad(
                "a bare key must be visible ASCII without spaces (or quote it)",
            ));
        }
        raw.to_owned()
    };
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(bad(&format!("must be 1 to {MAX_KEY_LEN} characters")));
    }
    Ok(key)
}

fn too_large(max: usize, close: bool) -> Problem {
    let mut p = Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        "Request body too large",
        format!("the body is larger than {max} bytes"),
    )
    .with("max_bytes", max);
    p.close = close;
    p
}

/// How long an oversized body is read and discarded before the 413 goes out.
const DRAIN_FOR: Duration = Duration::from_secs(5);

fn body_timeout(detail: String) -> Problem {
    let mut p = Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        "body-timeout",
        "Request body too slow",
        detail,
    );
    p.close = true;
    p
}

/// Reads the body, refusing more than `max` bytes: by Content-Length, and while reading for
/// bodies without one (chunked).
///
/// An oversized body is still read and discarded (up to 8 × `max` + 8 MiB, for at most 5 s)
/// before the 413 is sent. Closing on a client that is still writing makes many clients
/// (Node's fetch, measured here) fail with EPIPE and never see the 413.
///
/// The whole body must arrive within `limits.timeout`, and after [`BODY_GRACE`] at no less
/// than `limits.min_rate` bytes per second on average; otherwise 408 `body-timeout` (and the
/// connection closes), so that a stalled or trickled body holds nothing for long.
async fn read_body(
    mut body: Body,
    headers: &HeaderMap,
    max: usize,
    limits: BodyLimits,
) -> Result<Bytes, Problem> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let drain_cap = (max as u64).saturating_mul(8).saturating_add(8 << 20);
    if declared.is_some_and(|n| n > drain_cap) {
        return Err(too_large(max, true));
    }
    let mut over = declared.is_some_and(|n| n > max as u64);
    let mut out = Vec::with_capacity(declared.unwrap_or(0).min(max as u64) as usize);
    let mut seen: u64 = 0;
    let started = tokio::time::Instant::now();
    let drain_until = started + DRAIN_FOR;
    let hard = started + limits.timeout;
    loop {
        // Each byte received buys 1 / min_rate seconds past the grace.
        let by_rate = seen
            .saturating_mul(1000)
            .checked_div(limits.min_rate)
            .and_then(|ms| Duration::from_millis(ms).checked_add(BODY_GRACE))
            .and_then(|d| started.checked_add(d))
            .unwrap_or(hard);
        let deadline = if over {
            drain_until.min(hard)
        } else {
            hard.min(by_rate)
        };
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(frame) => frame,
            Err(_) if over => return Err(too_large(max, true)),
            Err(_) => {
                let elapsed = started.elapsed();
                return Err(body_timeout(
                    if elapsed + Duration::from_millis(5) >= limits.timeout {
                        format!(
                            "the body did not arrive within {} ms (got {seen} bytes)",
                            limits.timeout.as_millis()
                        )
                    } else {
                        format!(
                            "the body arrived slower than {} bytes/s (got {seen} bytes in {} ms)",
                            limits.min_rate,
                            elapsed.as_millis()
                        )
                    },
                ));
            }
        };
        match frame {
            None => break,
            Some(Err(_)) if over => return Err(too_large(max, true)),
            Some(Err(e)) => {
                return Err(Problem::malformed(format!("could not read the body: {e}")));
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                seen += data.len() as u64;
                if !over && out.len() + data.len() > max {
                    over = true;
                    out = Vec::new();
                }
                if over {
                    if seen > drain_cap {
                        return Err(too_large(max, true));
                    }
                } else {
                    out.extend_from_slice(&data);
                }
            }
        }
    }
    if over {
        Err(too_large(max, false))
    } else {
        Ok(Bytes::from(out))
    }
}

/// One line of `GET /v1/admin/log`.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    /// Server arrival time of the request, ms since the epoch.
    pub at: i64,
    /// `ops`, `op` or `beacon`.
    pub route: &'static str,
    /// The client id.
    pub client: String,
    /// The op id.
    pub id: String,
    /// The op's seq.
    pub seq: i64,
    /// The op's entity.
    pub entity: Option<String>,
    /// The op's kind.
    pub kind: String,
    /// The op result status, or `null` when the request ended before a result.
    pub status: Option<&'static str>,
    /// The version of the result, if any.
    pub version: Option<i64>,
    /// Whether the result was a replay.
    pub replayed: bool,
    /// The HTTP status answered, or `null` when the connection was dropped.
    pub http: Option<u16>,
    /// The injected fault's kind, if any.
    pub fault: Option<&'static str>,
    #[serde(skip)]
    order: (u64, usize),
}

/// What is known about an op request while it is handled, for the admin log.
struct Seen {
    at: i64,
    arrival: u64,
    route: Route,
    tenant: String,
    fault: Option<&'static str>,
}

impl Seen {
    fn record<S: Store>(
        &self,
        st: &AppState<S>,
        env: &Envelope,
        results: Option<&[OpResult]>,
        http: Option<u16>,
    ) {
        if let Some(results) = results {
            for r in results {
                st.metrics.result(r.outcome.status());
            }
        }
        let Some(log) = &st.log else { return };
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        let entries = log.entry(self.tenant.clone()).or_default();
        for (i, op) in env.ops.iter().enumerate() {
            let result = results.and_then(|r| r.get(i));
            if entries.len() >= LOG_CAP {
                entries.pop_front();
            }
            entries.push_back(LogEntry {
                at: self.at,
                route: self.route.as_str(),
                client: env.client.clone(),
                id: op.id.clone(),
                seq: op.seq,
                entity: op.entity.clone(),
                kind: op.kind.clone(),
                status: result.map(|r| r.outcome.status()),
                version: result.and_then(|r| r.outcome.version()),
                replayed: result.is_some_and(|r| r.replayed),
                http,
                fault: self.fault,
                order: (self.arrival, i),
            });
        }
    }

    fn problem<S: Store>(&self, st: &AppState<S>, env: &Envelope, problem: Problem) -> Response {
        self.record(st, env, None, Some(problem.status.as_u16()));
        problem.into_response()
    }
}

async fn ops<S: Store>(State(st): State<Arc<AppState<S>>>, req: Request) -> Response {
    submit(&st, Route::Ops, req).await
}

async fn op<S: Store>(State(st): State<Arc<AppState<S>>>, req: Request) -> Response {
    submit(&st, Route::Op, req).await
}

async fn beacon<S: Store>(State(st): State<Arc<AppState<S>>>, req: Request) -> Response {
    submit(&st, Route::Beacon, req).await
}

/// Bodies past this size are parsed on the blocking pool: a large envelope is a millisecond
/// or more of CPU, which on the async workers would delay every small request behind it.
const PARSE_INLINE: usize = 32 << 10;

/// Parses an envelope, large ones off the async workers.
async fn parse(bytes: Bytes, fingerprint: bool) -> Result<Envelope, crate::wire::Malformed> {
    if bytes.len() <= PARSE_INLINE {
        return parse_envelope(&bytes, fingerprint);
    }
    tokio::task::spawn_blocking(move || parse_envelope(&bytes, fingerprint))
        .await
        .unwrap_or_else(|e| {
            Err(crate::wire::Malformed {
                pointer: String::new(),
                detail: format!("body: could not be parsed ({e})"),
            })
        })
}

/// Reads a body under the server's limits, counting body timeouts.
async fn body_of<S: Store>(
    st: &AppState<S>,
    body: Body,
    headers: &HeaderMap,
    max: usize,
) -> Result<Bytes, Problem> {
    let read = read_body(body, headers, max, st.body).await;
    if let Err(problem) = &read
        && problem.slug == "body-timeout"
    {
        st.metrics.timeout("body");
    }
    read
}

/// The pipeline of the op routes. Everything that can be decided from the head comes first,
/// so that a stranger costs no body read: the address's refusal gate, the credential (a
/// bearer token, or a beacon's grant), the tenant's rate, the Idempotency-Key. Then the
/// body, the envelope, what the grant binds, the client binding, the client's rate, faults,
/// apply, answer.
async fn submit<S: Store>(st: &AppState<S>, route: Route, req: Request) -> Response {
    let at = now_ms();
    let arrival = st.arrivals.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let ip = peer(&parts);
    if let Err(problem) = refusal_gate(st, ip) {
        return problem.into_response();
    }
    let credential = match credential(st, route, &parts) {
        Ok(credential) => credential,
        Err(problem) => return refuse(st, ip, problem),
    };
    let (known_tenant, cap) = match &credential {
        Credential::Tenant(tenant) => (Some(tenant.as_str()), st.max_body),
        Credential::Grant(grant) => (Some(grant.tenant.as_str()), st.max_body.min(BEACON_BODY)),
        Credential::BodyToken => (None, st.max_body.min(BEACON_BODY)),
    };
    if let Some(tenant) = known_tenant
        && let Err(problem) = tenant_rate(st, tenant)
    {
        return problem.into_response();
    }
    let key = if route == Route::Op {
        match idempotency_key(&parts.headers) {
            Ok(key) => Some(key),
            Err(problem) => return problem.into_response(),
        }
    } else {
        None
    };
    let bytes = match body_of(st, body, &parts.headers, cap).await {
        Ok(bytes) => bytes,
        Err(problem) => return problem.into_response(),
    };
    let bytes_len = bytes.len();
    let env = match parse(bytes, route == Route::Op).await {
        Ok(env) => env,
        Err(m) => {
            return Problem::malformed(m.detail)
                .with("pointer", m.pointer)
                .into_response();
        }
    };
    if route == Route::Op && env.ops.len() != 1 {
        return Problem::malformed(format!(
            "ops: POST /v1/op takes exactly one op, got {}",
            env.ops.len()
        ))
        .with("pointer", "/ops")
        .into_response();
    }
    let (tenant, grant) = match credential {
        Credential::Tenant(tenant) => (tenant, None),
        Credential::Grant(grant) => (grant.tenant.clone(), Some(grant)),
        Credential::BodyToken => {
            let tenant = match env.access_token.as_deref().and_then(|t| st.tenant_for(t)) {
                Some(tenant) => tenant,
                None if env.access_token.is_some() => {
                    return refuse(st, ip, Problem::unauthorized("unknown access_token"));
                }
                None => {
                    return refuse(
                        st,
                        ip,
                        Problem::unauthorized("no bearer token in the header or in access_token"),
                    );
                }
            };
            if let Err(problem) = tenant_rate(st, &tenant) {
                return problem.into_response();
            }
            (tenant, None)
        }
    };
    let mut seen = Seen {
        at,
        arrival,
        route,
        tenant: tenant.clone(),
        fault: None,
    };
    if let Some(grant) = &grant
        && let Err(problem) = covered(grant, &env)
    {
        return seen.problem(st, &env, problem);
    }

    match timed(st, st.store.bind_client(&tenant, &env.client)).await {
        Ok(Binding::Ours) => {}
        Ok(Binding::OtherTenant) => {
            return seen.problem(st, &env, other_tenant(&env.client));
        }
        Err(e) => {
            error!(error = %e, "storage failed binding a client");
            return seen.problem(st, &env, Problem::unavailable(e.to_string()));
        }
    }
    if let Err(problem) = client_rate(st, &tenant, &env.client) {
        return seen.problem(st, &env, problem);
    }

    // The key is claimed before faults are drawn, so that an injected delay holds it the way
    // a slow request would (tests use that to see `409 in-progress`).
    let _claim = match &key {
        Some(key) => match claim(st, &seen, &env, key) {
            Ok(claim) => Some(claim),
            Err(problem) => return seen.problem(st, &env, problem),
        },
        None => None,
    };

    // Then in the store, for the other replicas that share it (a no-op on SQLite). Released
    // before the answer goes, so that a resend to any replica finds the key free.
    let db_claim = match &key {
        Some(key) => {
            let keyed = KeyedRequest {
                key: key.clone(),
                fingerprint: fingerprint(&env),
            };
            match timed(st, st.store.claim_key(&tenant, &env.client, &keyed)).await {
                Ok(KeyClaim::Claimed(guard)) => Some(guard),
                Ok(KeyClaim::Running { same_body: true }) => {
                    return seen.problem(st, &env, in_progress());
                }
                Ok(KeyClaim::Running { same_body: false }) => {
                    return seen.problem(st, &env, key_reused());
                }
                Err(e) => {
                    error!(error = %e, "storage failed claiming an Idempotency-Key");
                    return seen.problem(st, &env, Problem::unavailable(e.to_string()));
                }
            }
        }
        None => None,
    };
    let response = claimed(st, &mut seen, &env, route, key, bytes_len).await;
    if let Some(guard) = db_claim {
        guard.release().await;
    }
    response
}

/// The rest of [`submit`] once the key (if any) is claimed: faults, apply, answer.
async fn claimed<S: Store>(
    st: &AppState<S>,
    seen: &mut Seen,
    env: &Envelope,
    route: Route,
    key: Option<String>,
    bytes_len: usize,
) -> Response {
    let tenant = seen.tenant.clone();
    let kinds: Vec<&str> = env.ops.iter().map(|o| o.kind.as_str()).collect();
    let mut reject = None;
    let mut drop_after_commit = false;
    if let Some((fault, source)) = st.faults.pick(route, Some(&tenant), &kinds) {
        warn!(kind = fault.kind(), ?source, ?fault, route = route.as_str(), %tenant, client = %env.client, "fault injected");
        st.metrics.fault(fault.kind());
        seen.fault = Some(fault.kind());
        match fault {
            Fault::Status {
                status,
                retry_after,
            } => {
                let problem = injected(status, retry_after, "; nothing was applied");
                return seen.problem(st, env, problem);
            }
            Fault::Delay { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            Fault::ResetBeforeCommit => {
                seen.record(st, env, None, None);
                return dropped_connection();
            }
            Fault::DropAfterCommit => drop_after_commit = true,
            Fault::Reject { reason, kind } => reject = Some(RejectRule { reason, kind }),
        }
    }

    let request = ApplyRequest {
        tenant: tenant.clone(),
        client: env.client.clone(),
        ops: env.ops.clone(),
        reject,
        key: None,
        limits: st.limits,
        body_bytes: bytes_len,
    };
    match key {
        Some(key) => keyed(st, seen, env, request, key, drop_after_commit).await,
        None => match timed(st, st.store.apply(request)).await {
            Ok(ApplyOutcome::Results(results)) => {
                if drop_after_commit {
                    seen.record(st, env, Some(&results), None);
                    return dropped_connection();
                }
                seen.record(st, env, Some(&results), Some(200));
                // Straight to text: a Value tree of 500 results first would double the work.
                #[derive(Serialize)]
                struct Answer<'a> {
                    results: &'a [OpResult],
                }
                json_response(
                    StatusCode::OK,
                    serde_json::to_string(&Answer { results: &results }).unwrap_or_default(),
                )
            }
            Ok(other) => {
                error!(?other, "store answered a batch with a keyed outcome");
                seen.problem(st, env, Problem::unavailable("internal storage error"))
            }
            Err(e) => {
                error!(error = %e, "storage failed applying ops");
                seen.problem(st, env, Problem::unavailable(e.to_string()))
            }
        },
    }
}

fn other_tenant(client: &str) -> Problem {
    Problem::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "Client belongs to another tenant",
        format!("client {client} was first used by another tenant"),
    )
}

/// Whether `grant` covers the envelope: its client, and every op by its digest.
fn covered(grant: &Grant, env: &Envelope) -> Result<(), Problem> {
    if grant.client != env.client {
        return Err(grant_mismatch(
            format!(
                "the grant is for client {}, not {}",
                grant.client, env.client
            ),
            "/client",
        ));
    }
    for (i, op) in env.ops.iter().enumerate() {
        if !grant.digests.contains(&op.digest()) {
            return Err(grant_mismatch(
                format!(
                    "ops[{i}] (id {}) is not covered by the grant: another op id, or the same id \
                     with another body",
                    op.id
                ),
                &format!("/ops/{i}"),
            ));
        }
    }
    Ok(())
}

/// `POST /v1/grants`: a grant for a beacon of up to [`MAX_GRANT_OPS`] ops, for the bearer
/// token's tenant. Nothing is applied; the ops are checked as `/v1/ops` checks them.
async fn grants<S: Store>(State(st): State<Arc<AppState<S>>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let ip = peer(&parts);
    if let Err(problem) = refusal_gate(&st, ip) {
        return problem.into_response();
    }
    let tenant = match authenticate(&st, &parts.headers) {
        Ok(tenant) => tenant,
        Err(problem) => return refuse(&st, ip, problem),
    };
    if let Err(problem) = tenant_rate(&st, &tenant) {
        return problem.into_response();
    }
    let bytes = match body_of(&st, body, &parts.headers, st.max_body).await {
        Ok(bytes) => bytes,
        Err(problem) => return problem.into_response(),
    };
    let env = match parse(bytes, false).await {
        Ok(env) => env,
        Err(m) => {
            return Problem::malformed(m.detail)
                .with("pointer", m.pointer)
                .into_response();
        }
    };
    if env.ops.len() > MAX_GRANT_OPS {
        return Problem::malformed(format!(
            "ops: a grant covers 1 to {MAX_GRANT_OPS} ops, got {}",
            env.ops.len()
        ))
        .with("pointer", "/ops")
        .into_response();
    }
    match timed(&st, st.store.bind_client(&tenant, &env.client)).await {
        Ok(Binding::Ours) => {}
        Ok(Binding::OtherTenant) => return other_tenant(&env.client).into_response(),
        Err(e) => {
            error!(error = %e, "storage failed binding a client");
            return Problem::unavailable(e.to_string()).into_response();
        }
    }
    if let Err(problem) = client_rate(&st, &tenant, &env.client) {
        return problem.into_response();
    }
    let expires_at = now_ms().saturating_add(st.grant_ttl_ms);
    let grant = Grant {
        tenant,
        client: env.client.clone(),
        digests: env.ops.iter().map(|op| op.digest()).collect(),
        expires_at,
    };
    match st.grants.issue(&grant) {
        Some(text) => json_response(
            StatusCode::OK,
            serde_json::json!({ "grant": text, "expires_at": expires_at }).to_string(),
        ),
        None => Problem::malformed("this request cannot be granted").into_response(),
    }
}

/// Removes an in-flight Idempotency-Key when the request ends, however it ends.
struct Claim<'a> {
    inflight: &'a InFlight,
    key: (String, String, String),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// Marks an Idempotency-Key as running, or answers 409 (same body running) or 422 (another
/// body running).
fn claim<'a, S: Store>(
    st: &'a AppState<S>,
    seen: &Seen,
    env: &Envelope,
    key: &str,
) -> Result<Claim<'a>, Problem> {
    let claim_key = (seen.tenant.clone(), env.client.clone(), key.to_owned());
    let mut inflight = st.inflight.lock().unwrap_or_else(|e| e.into_inner());
    let problem = match inflight.get(&claim_key) {
        None => {
            inflight.insert(claim_key.clone(), fingerprint(env));
            return Ok(Claim {
                inflight: &st.inflight,
                key: claim_key,
            });
        }
        Some(running) if *running == fingerprint(env) => in_progress(),
        Some(_) => key_reused(),
    };
    Err(problem)
}

/// The body fingerprint of a keyed request (`/v1/op` always parses with it).
fn fingerprint(env: &Envelope) -> [u8; 32] {
    env.fingerprint.unwrap_or_default()
}

fn in_progress() -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "in-progress",
        "Request in progress",
        "a request with this Idempotency-Key is still running; try again soon",
    )
    .retry_after(1)
}

fn key_reused() -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "key-reused",
        "Idempotency-Key reused",
        "this Idempotency-Key was used with another body",
    )
}

/// `POST /v1/op` after the common pipeline (which claimed the key): apply, answer by outcome.
async fn keyed<S: Store>(
    st: &AppState<S>,
    seen: &Seen,
    env: &Envelope,
    mut request: ApplyRequest,
    key: String,
    drop_after_commit: bool,
) -> Response {
    request.key = Some(KeyedRequest {
        key,
        fingerprint: fingerprint(env),
    });
    let result = match timed(st, st.store.apply(request)).await {
        Ok(ApplyOutcome::KeyReused) => return seen.problem(st, env, key_reused()),
        Ok(ApplyOutcome::KeyReplay(result)) => result,
        Ok(ApplyOutcome::Results(mut results)) if results.len() == 1 => results.remove(0),
        Ok(other) => {
            error!(
                ?other,
                "store answered a keyed request with several results"
            );
            return seen.problem(st, env, Problem::unavailable("internal storage error"));
        }
        Err(e) => {
            error!(error = %e, "storage failed applying an op");
            return seen.problem(st, env, Problem::unavailable(e.to_string()));
        }
    };
    if drop_after_commit {
        seen.record(st, env, Some(std::slice::from_ref(&result)), None);
        return dropped_connection();
    }
    let response = single_result_response(&result);
    seen.record(
        st,
        env,
        Some(std::slice::from_ref(&result)),
        Some(response.status().as_u16()),
    );
    response
}

/// How `/v1/op` answers one result (docs/PROTOCOL.md, the `/v1/op` table).
fn single_result_response(result: &OpResult) -> Response {
    let problem = match &result.outcome {
        Outcome::Applied { .. } | Outcome::Duplicate { .. } => {
            return json_response(
                StatusCode::OK,
                serde_json::to_string(result).unwrap_or_default(),
            );
        }
        Outcome::Conflict { version, state, .. } => {
            let problem = Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                "Version conflict",
                format!("base_version is stale; the entity is at version {version}"),
            )
            .with("version", *version);
            match state {
                Some(state) => problem.with("state", state.clone()),
                None => problem.with("state_omitted", true),
            }
        }
        Outcome::Rejected { reason } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejected",
            "Op rejected",
            reason.clone(),
        )
        .with("reason", reason.clone()),
        Outcome::OutOfOrder { last } => Problem::new(
            StatusCode::TOO_EARLY,
            "out-of-order",
            "Op out of order",
            format!("a predecessor has not arrived; the last applied seq is {last}"),
        )
        .with("last", *last),
    };
    let mut problem = problem
        .with("id", result.id.clone())
        .with("op_status", result.outcome.status());
    if result.replayed {
        problem = problem.with("replayed", true);
    }
    problem.into_response()
}

async fn health<S: Store>(State(st): State<Arc<AppState<S>>>) -> Response {
    if let Some((fault, source)) = st.faults.pick(Route::Health, None, &[]) {
        warn!(
            kind = fault.kind(),
            ?source,
            ?fault,
            route = "health",
            "fault injected"
        );
        st.metrics.fault(fault.kind());
        match fault {
            Fault::Status {
                status,
                retry_after,
            } => {
                return injected(status, retry_after, "").into_response();
            }
            Fault::Delay { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            Fault::ResetBeforeCommit | Fault::DropAfterCommit => return dropped_connection(),
            Fault::Reject { .. } => {}
        }
    }
    match timed(&st, st.store.ping()).await {
        Ok(()) => json_response(StatusCode::OK, r#"{"status":"ok"}"#.to_owned()),
        Err(e) => {
            error!(error = %e, "health check cannot reach storage");
            Problem::unavailable(e.to_string()).into_response()
        }
    }
}

async fn entity<S: Store>(
    State(st): State<Arc<AppState<S>>>,
    parts: Parts,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let ip = peer(&parts);
    if let Err(problem) = refusal_gate(&st, ip) {
        return problem.into_response();
    }
    let tenant = match authenticate(&st, &parts.headers) {
        Ok(tenant) => tenant,
        Err(problem) => return refuse(&st, ip, problem),
    };
    let id = match path {
        Ok(Path(id)) => id,
        Err(e) => return Problem::malformed(format!("entity id: {e}")).into_response(),
    };
    match timed(&st, st.store.entity(&tenant, &id)).await {
        Ok(Some(entity)) => json_response(
            StatusCode::OK,
            serde_json::to_string(&entity).unwrap_or_default(),
        ),
        Ok(None) => Problem::not_found(format!("no entity `{id}`")).into_response(),
        Err(e) => {
            error!(error = %e, "storage failed reading an entity");
            Problem::unavailable(e.to_string()).into_response()
        }
    }
}

async fn metrics<S: Store>(State(st): State<Arc<AppState<S>>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.metrics.render(),
    )
        .into_response()
}

fn authorize_admin<S: Store>(st: &AppState<S>, headers: &HeaderMap) -> Result<(), Problem> {
    let expected = st.admin_token.as_deref().unwrap_or_default();
    match bearer(headers) {
        Bearer::Token(token)
            if !expected.is_empty() && constant_time_eq(token.as_bytes(), expected.as_bytes()) =>
        {
            Ok(())
        }
        _ => Err(Problem::unauthorized(
            "admin endpoints need `Authorization: Bearer <admin token>`",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesBody {
    rules: Vec<RuleSpec>,
}

async fn add_faults<S: Store>(State(st): State<Arc<AppState<S>>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let Err(problem) = authorize_admin(&st, &parts.headers) {
        return problem.into_response();
    }
    let bytes = match body_of(&st, body, &parts.headers, st.max_body).await {
        Ok(bytes) => bytes,
        Err(problem) => return problem.into_response(),
    };
    let body: RulesBody = match serde_json::from_slice(&bytes) {
        Ok(body) => body,
        Err(e) => {
            return Problem::malformed(format!("expected {{\"rules\": [rule, …]}}: {e}"))
                .into_response();
        }
    };
    let mut rules = Vec::with_capacity(body.rules.len());
    for (i, spec) in body.rules.into_iter().enumerate() {
        match spec.validate() {
            Ok(fault) => rules.push((spec, fault)),
            Err(why) => return Problem::malformed(format!("rules[{i}]: {why}")).into_response(),
        }
    }
    let added = rules.len();
    st.faults.add(rules);
    json_response(
        StatusCode::OK,
        serde_json::json!({ "added": added }).to_string(),
    )
}

async fn clear_faults<S: Store>(
    State(st): State<Arc<AppState<S>>>,
    headers: HeaderMap,
) -> Response {
    if let Err(problem) = authorize_admin(&st, &headers) {
        return problem.into_response();
    }
    st.faults.clear();
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct LogQuery {
    tenant: String,
}

async fn admin_log<S: Store>(
    State(st): State<Arc<AppState<S>>>,
    headers: HeaderMap,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Response {
    if let Err(problem) = authorize_admin(&st, &headers) {
        return problem.into_response();
    }
    let Ok(Query(LogQuery { tenant })) = query else {
        return Problem::malformed("expected ?tenant=NAME").into_response();
    };
    let mut entries: Vec<LogEntry> = st
        .log
        .as_ref()
        .and_then(|log| {
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&tenant)
                .cloned()
        })
        .map(Vec::from)
        .unwrap_or_default();
    entries.sort_by_key(|e| e.order);
    json_response(
        StatusCode::OK,
        serde_json::to_string(&entries).unwrap_or_default(),
    )
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    Problem::not_found(format!("no route for {method} {}", uri.path())).into_response()
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
    .into_response()
}

/// The answer of an injected status fault.
fn injected(status: u16, retry_after: Option<u64>, detail: &str) -> Problem {
    let mut problem = Problem::new(
        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        "injected",
        "Injected fault",
        format!("fault injection answered {status}{detail}"),
    );
    problem.retry_after = retry_after;
    problem
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(value: &str) -> Result<String, Problem> {
        let mut headers = HeaderMap::new();
        headers.insert("idempotency-key", HeaderValue::from_str(value).unwrap());
        idempotency_key(&headers)
    }

    #[test]
    fn idempotency_key_accepts_bare_and_rfc8941_strings() {
        assert_eq!(key("k-1").unwrap(), "k-1");
        assert_eq!(key("\"k-1\"").unwrap(), "k-1");
        assert_eq!(key("\"a \\\"b\\\\\"").unwrap(), "a \"b\\");
        assert_eq!(key("\"k-1\";p=1").unwrap(), "k-1");
        assert!(key("\"k-1").is_err());
        assert!(key("\"\"").is_err());
        assert!(key("a b").is_err());
        assert!(key(&"x".repeat(256)).is_err());
        assert_eq!(
            idempotency_key(&HeaderMap::new()).unwrap_err().slug,
            "missing-key"
        );
    }
}
