//! The delivery state machine.
//!
//! A [`Drainer`] decides what to send and what each reply means. It is driven in the manner of
//! quinn-proto: feed it an [`Input`] with [`Drainer::handle`], then take every [`Action`] from
//! [`Drainer::poll_action`] until there are none, performing each in order, then arm a timer for
//! [`Drainer::next_wake`]. It reads no clock, performs no I/O and draws randomness only from the
//! seed it was given.
//!
//! The store stays the source of truth. The drainer holds only a window of due ops (loaded on
//! request through the due index), the requests in flight, the breaker and the pause flag. It can
//! be dropped at any moment (a service worker killed at an `await`) and rebuilt from the store:
//! every decision is persisted before the action that depends on it (an attempt is leased before
//! its request is sent; a result is written before its event is emitted).

use std::collections::VecDeque;

use super::breaker::{Breaker, BreakerChange};
use super::config::{Config, ConflictPolicy, SendMode};
use super::event::{ConflictOutcome, Event};
use super::op::{Op, OpId};
use super::outcome::{Classified, Reply, Verdict, classify};
use super::records::DeadCause;
use super::rng::Rng;
use super::store::{Fate, Write};
use super::time::Millis;

/// Names one request while it is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// A request to send: the ops, already carrying their new attempt count and lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Echo this in [`Input::Reply`] and [`Input::Vanished`].
    pub id: RequestId,
    /// Batch (`/v1/ops`) or single (`/v1/op` with `Idempotency-Key`).
    pub mode: SendMode,
    /// The ops. Lease them with [`store::lease`](super::store::lease) before sending.
    pub ops: Vec<Op>,
}

impl Request {
    /// The request's ops but those the lease found changed (`vanished`): what to send. When it
    /// is empty, nothing is sent, and [`Input::Vanished`] has told the drainer so.
    pub fn without(self, vanished: &[u64]) -> Vec<Op> {
        let mut ops = self.ops;
        ops.retain(|op| !vanished.contains(&op.seq));
        ops
    }
}

/// Why the drainer is being woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeReason {
    /// The context started (service worker start, event page load, `Outbox.open`).
    Start,
    /// A timer armed for [`Drainer::next_wake`] fired.
    Timer,
    /// A `chrome.alarms` alarm fired.
    Alarm,
    /// The `online` event: also ends an open breaker early.
    Online,
    /// A Background Sync `sync` event.
    Sync,
    /// A runtime message from another context.
    Message,
    /// An op was enqueued (here or in another context).
    Enqueued,
    /// The application called `flush()`: also ends an open breaker early.
    Flush,
}

/// Something that happened outside the drainer.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Look at the store again.
    Wake(WakeReason),
    /// The answer to [`Action::Load`].
    Loaded {
        /// Due head ops, earliest first.
        ops: Vec<Op>,
        /// The `next_attempt_at` of the first head not returned.
        next_due: Option<Millis>,
    },
    /// Some ops of a request changed in the store before it was sent (see
    /// [`store::lease`](super::store::lease)) and were left out of it
    /// ([`Request::without`]).
    Vanished {
        /// The request.
        request: RequestId,
        /// The `seq`s left out.
        seqs: Vec<u64>,
    },
    /// The answer to [`Action::Send`]. Every request that was sent gets exactly one; a request
    /// whose ops all vanished was not sent and gets none.
    Reply {
        /// The request.
        request: RequestId,
        /// What came back.
        reply: Reply,
    },
    /// The answer to [`Action::Probe`]: whether the health endpoint answered `2xx`.
    ProbeResult {
        /// Whether the server looked healthy.
        healthy: bool,
    },
    /// The auth hook yields credentials other than those refused: resume after a pause.
    AuthRenewed,
}

/// Something the shell must do. Perform actions in the order they come.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Read the due heads (`next_attempt_at <= due_by`, at most `limit`) and answer with
    /// [`Input::Loaded`].
    Load {
        /// The time to compare `next_attempt_at` with.
        due_by: Millis,
        /// The most ops to return.
        limit: usize,
    },
    /// Lease the request's ops, then send those that were leased; answer with [`Input::Reply`].
    Send(Request),
    /// Commit these writes in one transaction before performing any later action.
    Persist(Vec<Write>),
    /// `GET` the health endpoint and answer with [`Input::ProbeResult`].
    Probe,
    /// Tell the application.
    Emit(Event),
}

/// The delivery state machine. See the module docs for how to drive it.
#[derive(Debug)]
pub struct Drainer {
    config: Config,
    rng: Rng,
    breaker: Breaker,
    paused: bool,
    /// Due head ops loaded from the store and not in flight, earliest first.
    window: VecDeque<Op>,
    /// At most `max_in_flight` entries, so a Vec: a BTreeMap instantiation costs kilobytes of wasm.
    in_flight: Vec<(RequestId, Vec<Op>)>,
    /// Entities with an op in flight: at most one per entity.
    busy: EntitySet,
    load_wanted: bool,
    load_pending: bool,
    /// The earliest `next_attempt_at` in the store outside the window, as far as is known.
    next_due: Option<Millis>,
    actions: VecDeque<Action>,
    next_request: u64,
    /// The first request sent with the credentials of the last [`Input::AuthRenewed`]: a `401`
    /// for an earlier request refused credentials that are already replaced, and must not pause
    /// the queue again.
    auth_from: u64,
    /// Whether a probe is out, whose answer the drainer waits for.
    probing: bool,
    /// The latest `now` seen.
    now: Millis,
    started: bool,
    /// Whether `drained` was reported and nothing was sent since.
    quiet: bool,
}

impl Drainer {
    /// A drainer resuming from persisted state. `seed` feeds jitter and rebased op ids; the shell
    /// draws it from `crypto.getRandomValues`.
    pub fn new(config: Config, breaker: Breaker, paused: bool, seed: [u8; 32]) -> Self {
        Drainer {
            config,
            rng: Rng::from_seed(seed),
            breaker,
            paused,
            window: VecDeque::new(),
            in_flight: Vec::new(),
            busy: EntitySet::default(),
            load_wanted: true,
            load_pending: false,
            next_due: None,
            actions: VecDeque::new(),
            next_request: 0,
            auth_from: 0,
            probing: false,
            now: 0,
            started: false,
            quiet: false,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The breaker's state.
    pub fn breaker(&self) -> Breaker {
        self.breaker
    }

    /// Whether delivery waits for new credentials.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Ops in flight.
    pub fn ops_in_flight(&self) -> impl Iterator<Item = &Op> {
        self.in_flight.iter().flat_map(|(_, ops)| ops)
    }

    /// Whether the drainer waits on nothing: no request in flight, no load asked for, no action
    /// left to take. Then only [`next_wake`](Self::next_wake) or a new input moves it.
    pub fn is_idle(&self) -> bool {
        // A wanted load that a pause or an open breaker holds back waits for the next wake, not
        // for an input: the drainer is idle all the same.
        let blocked = self.paused || !self.breaker.is_closed();
        self.in_flight.is_empty()
            && !self.load_pending
            && (!self.load_wanted || blocked)
            && !self.probing
            && self.actions.is_empty()
    }

    /// Feeds one input. Afterwards, take every action from [`poll_action`](Self::poll_action).
    pub fn handle(&mut self, now: Millis, input: Input) {
        self.now = self.now.max(now);
        if !self.started {
            self.started = true;
            // A probe that was in flight when the last context died is lost: probe again now.
            self.breaker.after_restart(now);
        }
        match input {
            Input::Wake(reason) => {
                if matches!(reason, WakeReason::Online | WakeReason::Flush) {
                    self.breaker.expire(now);
                }
                self.load_wanted = true;
            }
            Input::Loaded { ops, next_due } => {
                self.load_pending = false;
                let mut in_flight: Vec<u64> = self.ops_in_flight().map(|op| op.seq).collect();
                in_flight.sort_unstable();
                self.window = ops
                    .into_iter()
                    .filter(|op| in_flight.binary_search(&op.seq).is_err())
                    .collect();
                self.next_due = next_due;
                if self.window.is_empty()
                    && next_due.is_none()
                    && self.in_flight.is_empty()
                    && !self.quiet
                {
                    self.quiet = true;
                    self.actions.push_back(Action::Emit(Event::Drained));
                }
            }
            Input::Vanished { request, seqs } => {
                if let Some((_, ops)) = self.in_flight.iter_mut().find(|(id, _)| *id == request) {
                    for op in ops.iter().filter(|op| seqs.contains(&op.seq)) {
                        if let Some(entity) = &op.entity {
                            self.busy.remove(entity);
                        }
                    }
                    ops.retain(|op| !seqs.contains(&op.seq));
                }
                // A request with nothing left is over: no reply will come for it.
                self.in_flight.retain(|(_, ops)| !ops.is_empty());
                // Something changed underneath: the store knows what.
                self.load_wanted = true;
            }
            Input::Reply { request, reply } => {
                if let Some(at) = self.in_flight.iter().position(|(id, _)| *id == request) {
                    let (_, ops) = self.in_flight.swap_remove(at);
                    self.settle(now, request, ops, &reply);
                }
            }
            Input::ProbeResult { healthy } => {
                self.probing = false;
                if let Some(change) = self
                    .breaker
                    .probe_result(&self.config.breaker, now, healthy)
                {
                    self.breaker_changed(change, Vec::new());
                }
            }
            Input::AuthRenewed => {
                self.auth_from = self.next_request;
                if self.paused {
                    self.paused = false;
                    self.actions
                        .push_back(Action::Persist(vec![Write::Paused(false)]));
                    self.load_wanted = true;
                }
            }
        }
        self.pump(now);
    }

    /// The next thing to do, or `None` once there is nothing until the next input or wake.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to wake the drainer (with [`WakeReason::Timer`]) if no input comes first, or `None`
    /// when only an input can move it (paused for credentials, waiting for a probe, or an empty
    /// queue). Call again after every `handle`. The shell arms a short timer for it and, in an
    /// extension, a `chrome.alarms` alarm that survives the worker.
    ///
    /// Requests in flight contribute their lease, so an alarm is armed even if the context dies
    /// before the reply. Store ops that are due already are not a reason to wake: they wait for a
    /// free request slot or a load, which a reply or the load's answer brings.
    pub fn next_wake(&self) -> Option<Millis> {
        if self.paused {
            return None;
        }
        match self.breaker {
            Breaker::Open { until, .. } => return Some(until),
            Breaker::HalfOpen { .. } => return None,
            Breaker::Closed { .. } => {}
        }
        // A lease already past means a reply is overdue; the shell's timeout brings it. Waking
        // for it would only spin.
        let leases = self
            .ops_in_flight()
            .filter_map(|op| op.next_attempt_at)
            .filter(|&at| at > self.now)
            .min();
        let store = self.next_due.filter(|&at| at > self.now);
        let window = self
            .window
            .iter()
            .filter_map(|op| op.next_attempt_at)
            .filter(|&at| at > self.now)
            .min();
        [leases, store, window].into_iter().flatten().min()
    }

    fn pump(&mut self, now: Millis) {
        if self.paused {
            return;
        }
        if self.breaker.take_probe(now) {
            self.probing = true;
            self.actions.push_back(Action::Probe);
            return;
        }
        if !self.breaker.is_closed() {
            return;
        }
        let mut expired = Vec::new();
        // A wanted load means the store may have changed under the window (an enqueue can replace
        // a window op by coalescing): decide on what the load returns, not on stale copies.
        while !self.load_wanted && self.in_flight.len() < self.config.max_in_flight {
            let batch = self.select(now, &mut expired);
            if batch.is_empty() {
                break;
            }
            self.send(now, batch);
        }
        if !expired.is_empty() {
            // Expiries must be durable before anything else happens; put them first.
            let mut writes = Vec::new();
            let mut events = Vec::new();
            for (op, reason) in expired {
                self.finish_dead(
                    op,
                    reason,
                    None,
                    DeadCause::Expired,
                    &mut writes,
                    &mut events,
                );
            }
            self.actions.push_front(Action::Persist(writes));
            self.actions.extend(events.into_iter().map(Action::Emit));
        }
        let sendable = self.window.iter().any(|op| self.can_send(op, now));
        let more_due = self.next_due.is_some_and(|at| at <= now);
        if !sendable && more_due && self.in_flight.len() < self.config.max_in_flight {
            self.load_wanted = true;
        }
        if self.load_wanted && !self.load_pending {
            self.load_wanted = false;
            self.load_pending = true;
            let limit = self.config.batch.max_ops.max(1) * self.config.max_in_flight * 2;
            self.actions.push_back(Action::Load { due_by: now, limit });
        }
    }

    fn can_send(&self, op: &Op, now: Millis) -> bool {
        op.next_attempt_at.is_some_and(|at| at <= now)
            && op.entity.as_ref().is_none_or(|e| !self.busy.contains(e))
    }

    /// Takes the next batch out of the window: due ops, one per entity, within the size limits,
    /// an isolated op alone. Expired ops are moved to `expired` on the way.
    fn select(&mut self, now: Millis, expired: &mut Vec<(Op, String)>) -> Vec<Op> {
        let max_ops = match self.config.batch.mode {
            SendMode::Single => 1,
            SendMode::Batch => self.config.batch.max_ops,
        };
        let mut batch: Vec<Op> = Vec::new();
        let mut bytes = 0;
        let mut entities = EntitySet::default();
        let mut i = 0;
        while i < self.window.len() && batch.len() < max_ops {
            let op = &self.window[i];
            let taken = op.entity.as_ref().is_some_and(|e| entities.contains(e));
            if !self.can_send(op, now) || taken || (op.solo && !batch.is_empty()) {
                i += 1;
                continue;
            }
            let max_age = self.config.limits_for(op.priority).max_age_ms;
            if now >= op.created_at.saturating_add(max_age) {
                let op = self.window.remove(i).expect("index in range");
                let reason = format!("expired: not delivered within {max_age} ms");
                expired.push((op, reason));
                continue;
            }
            if !batch.is_empty() && bytes + op.size() > self.config.batch.max_bytes {
                break;
            }
            let op = self.window.remove(i).expect("index in range");
            bytes += op.size();
            if let Some(entity) = &op.entity {
                entities.insert(entity.clone());
            }
            let alone = op.solo;
            batch.push(op);
            if alone {
                break;
            }
        }
        batch
    }

    fn send(&mut self, now: Millis, mut ops: Vec<Op>) {
        for op in &mut ops {
            op.attempts += 1;
            // The lease: if this context dies before the reply, the op is due again after the
            // request could have timed out twice over plus its backoff.
            let backoff = self.config.backoff.delay(op.attempts, &mut self.rng);
            let lease = now + 2 * self.config.request_timeout_ms + backoff;
            op.next_attempt_at = Some(lease);
            if let Some(entity) = &op.entity {
                self.busy.insert(entity.clone());
            }
        }
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.in_flight.push((id, ops.clone()));
        self.quiet = false;
        self.actions.push_back(Action::Send(Request {
            id,
            mode: self.config.batch.mode,
            ops,
        }));
    }

    fn settle(&mut self, now: Millis, request: RequestId, ops: Vec<Op>, reply: &Reply) {
        for op in &ops {
            if let Some(entity) = &op.entity {
                self.busy.remove(entity);
            }
        }
        if ops.is_empty() {
            return;
        }
        let Classified { verdicts, healthy } = classify(
            self.config.batch.mode,
            &ops,
            reply,
            now,
            self.config.max_retry_after_ms,
        );
        let mut writes = Vec::new();
        let mut events = Vec::new();
        for (mut op, verdict) in ops.into_iter().zip(verdicts) {
            match verdict {
                Verdict::Done { version, duplicate } => {
                    events.push(Event::Delivered {
                        id: op.id,
                        entity: op.entity.clone(),
                        kind: op.kind.clone(),
                        version,
                        duplicate,
                    });
                    self.finish(op, Fate::Delivered { duplicate }, &mut writes);
                }
                Verdict::Retry {
                    counts,
                    floor,
                    soon,
                    error,
                } => self.reschedule(
                    now,
                    op,
                    counts,
                    floor,
                    soon,
                    error,
                    &mut writes,
                    &mut events,
                ),
                Verdict::Conflict { version, state } => {
                    self.conflict(now, op, version, state, &mut writes, &mut events)
                }
                Verdict::Dead { reason, status } => self.finish_dead(
                    op,
                    reason,
                    status,
                    DeadCause::Rejected,
                    &mut writes,
                    &mut events,
                ),
                Verdict::Ambiguous { reason } => self.finish_dead(
                    op,
                    reason,
                    Some(422),
                    DeadCause::Ambiguous,
                    &mut writes,
                    &mut events,
                ),
                Verdict::Pause { reason } => {
                    op.last_error = Some(reason);
                    self.retry_now(now, op, &mut writes);
                    if !self.paused && request.0 >= self.auth_from {
                        self.paused = true;
                        writes.push(Write::Paused(true));
                        events.push(Event::AuthRequired);
                    }
                }
                Verdict::Isolate => {
                    op.solo = true;
                    self.retry_now(now, op, &mut writes);
                }
            }
        }
        if self.in_flight.is_empty() && self.window.is_empty() && !self.quiet {
            // Only the store knows whether that was the last op: look, so `drained` is reported
            // even when the last op had no entity (whose finish promotes nothing).
            self.load_wanted = true;
        }
        match self.breaker.record(&self.config.breaker, now, healthy) {
            Some(change) => {
                self.actions.push_back(Action::Persist(writes));
                self.actions.extend(events.into_iter().map(Action::Emit));
                self.breaker_changed(change, Vec::new());
            }
            None => {
                if !writes.is_empty() {
                    self.actions.push_back(Action::Persist(writes));
                }
                self.actions.extend(events.into_iter().map(Action::Emit));
            }
        }
    }

    fn breaker_changed(&mut self, change: BreakerChange, mut writes: Vec<Write>) {
        writes.push(Write::Breaker(self.breaker));
        self.actions.push_back(Action::Persist(writes));
        let event = match change {
            BreakerChange::Opened { until } => Event::BreakerOpened { until },
            BreakerChange::Closed => {
                self.load_wanted = true;
                Event::BreakerClosed
            }
        };
        self.actions.push_back(Action::Emit(event));
    }

    fn finish(&mut self, op: Op, fate: Fate, writes: &mut Vec<Write>) {
        if op.entity.is_some() {
            // The store promotes the entity's next op, which this window has not seen.
            self.next_due = Some(self.next_due.map_or(self.now, |at| at.min(self.now)));
        }
        writes.push(Write::Finish { op, fate });
    }

    fn finish_dead(
        &mut self,
        op: Op,
        reason: String,
        status: Option<u16>,
        cause: DeadCause,
        writes: &mut Vec<Write>,
        events: &mut Vec<Event>,
    ) {
        events.push(Event::DeadLettered {
            id: op.id,
            entity: op.entity.clone(),
            kind: op.kind.clone(),
            reason: reason.clone(),
        });
        self.finish(
            op,
            Fate::DeadLettered {
                reason,
                status,
                cause,
            },
            writes,
        );
    }

    fn retry_now(&mut self, now: Millis, mut op: Op, writes: &mut Vec<Write>) {
        op.next_attempt_at = Some(now);
        self.next_due = Some(self.next_due.map_or(now, |at| at.min(now)));
        writes.push(Write::Update(op));
    }

    #[allow(clippy::too_many_arguments)]
    fn reschedule(
        &mut self,
        now: Millis,
        mut op: Op,
        counts: bool,
        floor: Millis,
        soon: bool,
        error: String,
        writes: &mut Vec<Write>,
        events: &mut Vec<Event>,
    ) {
        op.failures += u32::from(counts);
        op.last_error = Some(error.clone());
        let limits = *self.config.limits_for(op.priority);
        if op.failures >= limits.max_attempts {
            let reason = format!("gave up after {} failed attempts: {error}", op.failures);
            return self.finish_dead(op, reason, None, DeadCause::Exhausted, writes, events);
        }
        if now >= op.created_at.saturating_add(limits.max_age_ms) {
            let reason = format!("expired after {} ms: {error}", limits.max_age_ms);
            return self.finish_dead(op, reason, None, DeadCause::Expired, writes, events);
        }
        let jitter = if soon {
            self.config.backoff.delay(0, &mut self.rng)
        } else {
            self.config.backoff.delay(op.attempts, &mut self.rng)
        };
        let delay = jitter.max(floor);
        let at = now + delay;
        op.next_attempt_at = Some(at);
        self.next_due = Some(self.next_due.map_or(at, |t| t.min(at)));
        events.push(Event::RetryScheduled {
            id: op.id,
            entity: op.entity.clone(),
            attempt: op.attempts,
            delay_ms: delay,
            error,
        });
        writes.push(Write::Update(op));
    }

    fn conflict(
        &mut self,
        now: Millis,
        mut op: Op,
        version: Option<u64>,
        state: Option<String>,
        writes: &mut Vec<Write>,
        events: &mut Vec<Event>,
    ) {
        let event = |resolution, rebased_as: Option<OpId>, op: &Op| Event::Conflict {
            id: op.id,
            entity: op.entity.clone(),
            kind: op.kind.clone(),
            resolution,
            server_version: version,
            server_state: state.clone(),
            rebased_as,
        };
        match self.config.kind(&op.kind).conflict {
            ConflictPolicy::ServerWins => {
                events.push(event(ConflictOutcome::ServerWins, None, &op));
                self.finish(op, Fate::Dropped, writes);
            }
            ConflictPolicy::Manual => {
                events.push(event(ConflictOutcome::Parked, None, &op));
                let fate = Fate::Parked {
                    server_version: version,
                    server_state: state.clone(),
                };
                self.finish(op, fate, writes);
            }
            ConflictPolicy::ClientWins => {
                let max_attempts = self.config.limits_for(op.priority).max_attempts;
                op.failures += 1;
                let Some(version) = version.filter(|_| op.failures < max_attempts) else {
                    let reason = match version {
                        None => "conflict, and the server did not say its version".to_owned(),
                        Some(_) => format!("still conflicting after {} rebases", op.failures),
                    };
                    let status = Some(409);
                    return self.finish_dead(
                        op,
                        reason,
                        status,
                        DeadCause::Rejected,
                        writes,
                        events,
                    );
                };
                // The old id's conflict is stored on the server, so the rebased copy needs a new
                // one. It keeps `seq` and `prev`: it is the same step in the entity's history.
                let rebased = OpId::from_random_bytes(self.rng.bytes16());
                events.push(event(ConflictOutcome::Rebased, Some(rebased), &op));
                op.id = rebased;
                op.base_version = Some(version);
                op.last_error = Some(format!("conflict: rebased on version {version}"));
                self.retry_now(now, op, writes);
            }
        }
    }
}

/// A set of entity names, kept sorted in a Vec. It holds at most a few hundred names, and a
/// `BTreeSet<String>` would add kilobytes of wasm for nothing.
#[derive(Debug, Default)]
struct EntitySet(Vec<String>);

impl EntitySet {
    fn contains(&self, entity: &str) -> bool {
        self.0.binary_search_by(|e| e.as_str().cmp(entity)).is_ok()
    }

    fn insert(&mut self, entity: String) {
        if let Err(at) = self.0.binary_search(&entity) {
            self.0.insert(at, entity);
        }
    }

    fn remove(&mut self, entity: &str) {
        if let Ok(at) = self.0.binary_search_by(|e| e.as_str().cmp(entity)) {
            self.0.remove(at);
        }
    }
}
