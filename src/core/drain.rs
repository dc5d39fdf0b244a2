//! The delivery state machine.
//!
//! A [`Drainer`] decides what to send and what each reply means. It is driven in the manner of
//! quinn-proto: feed it an [`Input`] with [`Drainer::handle`], then take every [`Action`] from
//! [`Drainer::poll_action`] until there are none, performing each in order, then arm a timer for
//! [`Drainer::next_wake`]. It reads no clock, performs no I/O and draws randomness only from the
//! seed it was given. The [`Session`](super::session::Session) drives it in the browser shell and
//! in the simulator alike.
//!
//! The store stays the source of truth. The drainer holds only a window of due ops (loaded on
//! request through the due index), the requests in flight, the breaker and the pause flag. It can
//! be dropped at any moment (a service worker killed at an `await`) and rebuilt from the store:
//! every decision is persisted before the action that depends on it (an attempt is leased before
//! its request is sent; a result is written before its event is emitted).
//!
//! The two decisions with the most rules are free functions over plain data, so they can be read
//! and tested on their own: [`select_batch`] (what goes into the next request) and [`decide`]
//! (what one reply means for one op).

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WakeReason {
    /// A timer armed for [`Drainer::next_wake`] fired.
    Timer,
    /// An op was enqueued (here or in another context).
    Enqueued,
    /// A runtime message from another context.
    Message,
    /// The context started (service worker start, event page load, `Outbox.open`).
    Start,
    /// A `chrome.alarms` alarm fired.
    Alarm,
    /// A Background Sync `sync` event.
    Sync,
    /// The `online` event: also ends an open breaker early.
    Online,
    /// The application called `flush()`: also ends an open breaker early.
    Flush,
}

impl WakeReason {
    /// Whether this wake says only "something new may be due": the store is read once the
    /// window runs out, not at once. Every enqueue wakes the drainer, and reading a batch of due
    /// ops per enqueue starved replies under a stream of them; the window never misses a new op,
    /// since ops join the due index behind every op already in it.
    fn is_lazy(self) -> bool {
        matches!(
            self,
            WakeReason::Timer | WakeReason::Enqueued | WakeReason::Message
        )
    }

    /// Whether this wake is a hint that the server or the network is back.
    fn ends_outage(self) -> bool {
        matches!(self, WakeReason::Online | WakeReason::Flush)
    }
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

/// The due head ops this drainer knows of, and what it knows of the rest of the store.
#[derive(Debug, Default)]
struct Window {
    /// Due head ops loaded from the store and not in flight, earliest first.
    ops: VecDeque<Op>,
    /// The earliest `next_attempt_at` in the store outside the window, as far as is known.
    next_due: Option<Millis>,
    /// The store may have changed under the window: decide on what a load returns.
    load_wanted: bool,
    /// A load was asked for and has not been answered.
    load_pending: bool,
}

impl Window {
    /// Something in the store is due at `at` (a successor promoted, a retry scheduled, an op
    /// enqueued).
    fn due_at(&mut self, at: Millis) {
        self.next_due = Some(self.next_due.map_or(at, |t| t.min(at)));
    }
}

/// The requests this drainer has in flight.
#[derive(Debug, Default)]
struct Flights {
    /// At most `max_in_flight` entries, so a Vec: a BTreeMap instantiation costs kilobytes of wasm.
    requests: Vec<(RequestId, Vec<Op>)>,
    /// Entities with an op in flight: at most one per entity.
    busy: EntitySet,
    next_id: u64,
}

impl Flights {
    fn ops(&self) -> impl Iterator<Item = &Op> {
        self.requests.iter().flat_map(|(_, ops)| ops)
    }

    fn take(&mut self, request: RequestId) -> Option<Vec<Op>> {
        let at = self.requests.iter().position(|(id, _)| *id == request)?;
        let (_, ops) = self.requests.swap_remove(at);
        for op in &ops {
            if let Some(entity) = &op.entity {
                self.busy.remove(entity);
            }
        }
        Some(ops)
    }
}

/// The credential pause.
#[derive(Debug, Default)]
struct Auth {
    /// Delivery waits for new credentials.
    paused: bool,
    /// The first request sent with the credentials of the last [`Input::AuthRenewed`]: a `401`
    /// for an earlier request refused credentials that are already replaced, and must not pause
    /// the queue again.
    renewed_from: u64,
}

/// The delivery state machine. See the module docs for how to drive it.
#[derive(Debug)]
pub struct Drainer {
    config: Config,
    rng: Rng,
    breaker: Breaker,
    /// Whether a probe is out, whose answer the drainer waits for.
    probing: bool,
    auth: Auth,
    window: Window,
    flights: Flights,
    actions: VecDeque<Action>,
    /// The latest `now` seen, or `None` before the first input.
    now: Option<Millis>,
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
            probing: false,
            auth: Auth {
                paused,
                renewed_from: 0,
            },
            window: Window {
                load_wanted: true,
                ..Window::default()
            },
            flights: Flights::default(),
            actions: VecDeque::new(),
            now: None,
            quiet: false,
        }
    }

    /// Whether delivery waits for new credentials.
    pub fn is_paused(&self) -> bool {
        self.auth.paused
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.flights.requests.len()
    }

    fn now(&self) -> Millis {
        self.now.unwrap_or(0)
    }

    /// Whether the drainer waits on nothing: no request in flight, no load asked for, no action
    /// left to take. Then only [`next_wake`](Self::next_wake) or a new input moves it.
    pub fn is_idle(&self) -> bool {
        // A wanted load that a pause or an open breaker holds back waits for the next wake, not
        // for an input: the drainer is idle all the same.
        let blocked = self.auth.paused || !self.breaker.is_closed();
        self.flights.requests.is_empty()
            && !self.window.load_pending
            && (!self.window.load_wanted || blocked)
            && !self.probing
            && self.actions.is_empty()
    }

    /// Feeds one input. Afterwards, take every action from [`poll_action`](Self::poll_action).
    pub fn handle(&mut self, now: Millis, input: Input) {
        if self.now.is_none() {
            // A probe that was in flight when the last context died is lost: probe again now.
            self.breaker.after_restart(now);
        }
        self.now = Some(self.now().max(now));
        match input {
            Input::Wake(reason) => {
                if reason.ends_outage() {
                    self.breaker.expire(now);
                }
                if reason.is_lazy() {
                    self.window.due_at(now);
                } else {
                    self.window.load_wanted = true;
                }
            }
            Input::Loaded { ops, next_due } => self.loaded(ops, next_due),
            Input::Vanished { request, seqs } => {
                if let Some((_, ops)) = self
                    .flights
                    .requests
                    .iter_mut()
                    .find(|(id, _)| *id == request)
                {
                    for op in ops.iter().filter(|op| seqs.contains(&op.seq)) {
                        if let Some(entity) = &op.entity {
                            self.flights.busy.remove(entity);
                        }
                    }
                    ops.retain(|op| !seqs.contains(&op.seq));
                }
                // A request with nothing left is over: no reply will come for it.
                self.flights.requests.retain(|(_, ops)| !ops.is_empty());
                // Something changed underneath: the store knows what.
                self.window.load_wanted = true;
            }
            Input::Reply { request, reply } => {
                if let Some(ops) = self.flights.take(request) {
                    self.settle(now, request, ops, &reply);
                }
            }
            Input::ProbeResult { healthy } => {
                self.probing = false;
                if let Some(change) = self
                    .breaker
                    .probe_result(&self.config.breaker, now, healthy)
                {
                    self.actions
                        .push_back(Action::Persist(vec![Write::Breaker(self.breaker)]));
                    self.breaker_changed(change);
                }
            }
            Input::AuthRenewed => {
                self.auth.renewed_from = self.flights.next_id;
                if self.auth.paused {
                    self.auth.paused = false;
                    self.actions
                        .push_back(Action::Persist(vec![Write::Paused(false)]));
                    self.window.load_wanted = true;
                }
            }
        }
        self.pump(now);
    }

    fn loaded(&mut self, ops: Vec<Op>, next_due: Option<Millis>) {
        self.window.load_pending = false;
        let mut in_flight: Vec<u64> = self.flights.ops().map(|op| op.seq).collect();
        in_flight.sort_unstable();
        self.window.ops = ops
            .into_iter()
            .filter(|op| in_flight.binary_search(&op.seq).is_err())
            .collect();
        self.window.next_due = next_due;
        if self.window.ops.is_empty()
            && next_due.is_none()
            && self.flights.requests.is_empty()
            && !self.quiet
        {
            self.quiet = true;
            self.actions.push_back(Action::Emit(Event::Drained));
        }
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
        if self.auth.paused {
            return None;
        }
        match self.breaker {
            Breaker::Open { until, .. } => return Some(until),
            Breaker::HalfOpen { .. } => return None,
            Breaker::Closed { .. } => {}
        }
        let now = self.now();
        // A lease already past means a reply is overdue; the shell's timeout brings it. Waking
        // for it would only spin.
        let leases = self.flights.ops().filter_map(|op| op.next_attempt_at);
        let window = self.window.ops.iter().filter_map(|op| op.next_attempt_at);
        leases
            .chain(window)
            .chain(self.window.next_due)
            .filter(|&at| at > now)
            .min()
    }

    fn pump(&mut self, now: Millis) {
        if self.auth.paused {
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
        // A wanted load means the store may have changed under the window: decide on what the
        // load returns, not on stale copies.
        while !self.window.load_wanted && self.flights.requests.len() < self.config.max_in_flight {
            let selection =
                select_batch(&self.config, &mut self.window.ops, &self.flights.busy, now);
            expired.extend(selection.expired);
            if selection.batch.is_empty() {
                break;
            }
            self.send(now, selection.batch);
        }
        if !expired.is_empty() {
            // Expiries must be durable before anything else happens; put them first.
            let mut writes = Vec::new();
            let mut events = Vec::new();
            for (op, reason) in expired {
                let decision = dead(op, reason, None, DeadCause::Expired);
                self.apply(decision, &mut writes, &mut events);
            }
            // Their events follow the write at once, so a write found stale takes them along
            // (see the session's `Persisted`).
            for event in events.into_iter().rev() {
                self.actions.push_front(Action::Emit(event));
            }
            self.actions.push_front(Action::Persist(writes));
        }
        let busy = &self.flights.busy;
        let sendable = self.window.ops.iter().any(|op| can_send(op, busy, now));
        let more_due = self.window.next_due.is_some_and(|at| at <= now);
        if !sendable && more_due && self.flights.requests.len() < self.config.max_in_flight {
            self.window.load_wanted = true;
        }
        if self.window.load_wanted && !self.window.load_pending {
            self.window.load_wanted = false;
            self.window.load_pending = true;
            let limit = self.config.batch.max_ops.max(1) * self.config.max_in_flight * 2;
            self.actions.push_back(Action::Load { due_by: now, limit });
        }
    }

    fn send(&mut self, now: Millis, mut ops: Vec<Op>) {
        for op in &mut ops {
            op.attempts += 1;
            // The lease: if this context dies before the reply, the op is due again after the
            // request could have timed out twice over plus its backoff.
            let backoff = self
                .config
                .backoff
                .delay(op.attempts, op.last_delay_ms, &mut self.rng);
            let lease = now + 2 * self.config.request_timeout_ms + backoff;
            op.next_attempt_at = Some(lease);
            if let Some(entity) = &op.entity {
                self.flights.busy.insert(entity.clone());
            }
        }
        let id = RequestId(self.flights.next_id);
        self.flights.next_id += 1;
        self.flights.requests.push((id, ops.clone()));
        self.quiet = false;
        self.actions.push_back(Action::Send(Request {
            id,
            mode: self.config.batch.mode,
            ops,
        }));
    }

    fn settle(&mut self, now: Millis, request: RequestId, ops: Vec<Op>, reply: &Reply) {
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
        let mut pause = false;
        for (op, verdict) in ops.into_iter().zip(verdicts) {
            let decision = decide(&self.config, &mut self.rng, now, op, verdict);
            pause |= decision.pause;
            self.apply(decision, &mut writes, &mut events);
        }
        if pause && !self.auth.paused && request.0 >= self.auth.renewed_from {
            self.auth.paused = true;
            writes.push(Write::Paused(true));
            events.push(Event::AuthRequired);
        }
        if self.flights.requests.is_empty() && self.window.ops.is_empty() && !self.quiet {
            // Only the store knows whether that was the last op: look, so `drained` is reported
            // even when the last op had no entity (whose finish promotes nothing).
            self.window.load_wanted = true;
        }
        // The breaker's memory of recent calls is persisted with every answer: the next
        // session (the worker stops between them) must go on counting where this one stopped.
        let before = self.breaker;
        let change = self.breaker.record(&self.config.breaker, now, healthy);
        if self.breaker != before {
            writes.push(Write::Breaker(self.breaker));
        }
        if !writes.is_empty() {
            self.actions.push_back(Action::Persist(writes));
        }
        self.actions.extend(events.into_iter().map(Action::Emit));
        if let Some(change) = change {
            self.breaker_changed(change);
        }
    }

    /// Takes one op's decision into the batch of writes and events, and notes when the store
    /// has something due because of it.
    fn apply(&mut self, decision: Decision, writes: &mut Vec<Write>, events: &mut Vec<Event>) {
        match &decision.write {
            // The store promotes the entity's next op, which this window has not seen.
            Write::Finish { op, .. } if op.entity.is_some() => self.window.due_at(self.now()),
            Write::Update { op, .. } => {
                if let Some(at) = op.next_attempt_at {
                    self.window.due_at(at);
                }
            }
            _ => {}
        }
        writes.push(decision.write);
        events.extend(decision.event);
    }

    /// Reports a change of breaker state, which the caller has persisted.
    fn breaker_changed(&mut self, change: BreakerChange) {
        let event = match change {
            BreakerChange::Opened { until } => Event::BreakerOpened { until },
            BreakerChange::Closed => {
                self.window.load_wanted = true;
                Event::BreakerClosed
            }
        };
        self.actions.push_back(Action::Emit(event));
    }
}

fn can_send(op: &Op, busy: &EntitySet, now: Millis) -> bool {
    op.next_attempt_at.is_some_and(|at| at <= now)
        && op.entity.as_ref().is_none_or(|e| !busy.contains(e))
}

/// What [`select_batch`] took out of the window.
#[derive(Debug, Default)]
pub struct Selection {
    /// The next request's ops.
    pub batch: Vec<Op>,
    /// Ops found past their max age on the way, with the reason; they become dead letters.
    pub expired: Vec<(Op, String)>,
}

/// Takes the next batch out of `window`: due ops, at most one per entity and none of an entity
/// in `busy`, within the size limits, an isolated (`solo`) op alone. Expired ops are taken out on
/// the way. Ops left behind keep their order.
pub fn select_batch(
    config: &Config,
    window: &mut VecDeque<Op>,
    busy: &EntitySet,
    now: Millis,
) -> Selection {
    let max_ops = match config.batch.mode {
        SendMode::Single => 1,
        SendMode::Batch => config.batch.max_ops,
    };
    let mut selection = Selection::default();
    let mut bytes = 0;
    let mut entities = EntitySet::default();
    let mut i = 0;
    while i < window.len() && selection.batch.len() < max_ops {
        let op = &window[i];
        let taken = op.entity.as_ref().is_some_and(|e| entities.contains(e));
        if !can_send(op, busy, now) || taken || (op.solo && !selection.batch.is_empty()) {
            i += 1;
            continue;
        }
        let max_age = config.limits_for(op.priority).max_age_ms;
        if now >= op.created_at.saturating_add(max_age) {
            let op = window.remove(i).expect("index in range");
            let reason = format!("expired: not delivered within {max_age} ms");
            selection.expired.push((op, reason));
            continue;
        }
        if !selection.batch.is_empty() && bytes + op.size() > config.batch.max_bytes {
            break;
        }
        let op = window.remove(i).expect("index in range");
        bytes += op.size();
        if let Some(entity) = &op.entity {
            entities.insert(entity.clone());
        }
        let alone = op.solo;
        selection.batch.push(op);
        if alone {
            break;
        }
    }
    selection
}

/// What one reply means for one op: the write that records it, the event that reports it, and
/// whether it asks the whole queue to pause for credentials.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The op's new record, or its way out of the queue.
    pub write: Write,
    /// What the application hears, if anything.
    pub event: Option<Event>,
    /// The server refused the credentials.
    pub pause: bool,
}

/// What a retry verdict asks of [`reschedule`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reschedule {
    /// Whether the failure counts toward `max_attempts`.
    pub counts: bool,
    /// The least wait (`Retry-After`).
    pub floor: Millis,
    /// Wait one short delay instead of the growing backoff.
    pub soon: bool,
    /// Why, for the op's `last_error` and the event.
    pub error: String,
}

/// Applies one verdict of the outcome table to one op (docs/DELIVERY.md). Pure but for the
/// random draws (jitter, rebased ids), which come from `rng`.
pub fn decide(
    config: &Config,
    rng: &mut Rng,
    now: Millis,
    mut op: Op,
    verdict: Verdict,
) -> Decision {
    match verdict {
        Verdict::Done { version, duplicate } => {
            let event = Event::Delivered {
                id: op.id,
                entity: op.entity.clone(),
                kind: op.kind.clone(),
                version,
                duplicate,
            };
            Decision {
                write: Write::Finish {
                    op,
                    fate: Fate::Delivered { duplicate },
                },
                event: Some(event),
                pause: false,
            }
        }
        Verdict::Retry {
            counts,
            floor,
            soon,
            error,
        } => reschedule(
            config,
            rng,
            now,
            op,
            Reschedule {
                counts,
                floor,
                soon,
                error,
            },
        ),
        Verdict::Conflict {
            version,
            state,
            state_omitted,
        } => conflict(config, rng, now, op, version, state, state_omitted),
        Verdict::Dead { reason, status } => dead(op, reason, status, DeadCause::Rejected),
        Verdict::Ambiguous { reason } => dead(op, reason, Some(422), DeadCause::Ambiguous),
        Verdict::Pause { reason } => {
            op.last_error = Some(reason);
            op.next_attempt_at = Some(now);
            Decision {
                write: update(op),
                event: None,
                pause: true,
            }
        }
        Verdict::OutOfOrder { last, error } => {
            // Only an entity's head is ever sent, so every op before it on the entity has left
            // the queue and will not be sent again: a predecessor the server lacks is one that
            // never arrived and never will (lost with a dropped database, say). Waiting would
            // be for ever; relink past it to what the server has, and send again.
            match last.filter(|&last| last < op.prev) {
                Some(last) => {
                    op.prev = last;
                    op.last_error =
                        Some(format!("{error}; relinked to the server's last seq {last}"));
                    op.next_attempt_at = Some(now);
                    Decision {
                        write: update(op),
                        event: None,
                        pause: false,
                    }
                }
                // Without the server's last (or with one at or past `prev`, which contradicts
                // it), retry like a server failure.
                None => reschedule(
                    config,
                    rng,
                    now,
                    op,
                    Reschedule {
                        counts: true,
                        floor: 0,
                        soon: false,
                        error,
                    },
                ),
            }
        }
        Verdict::Isolate => {
            op.solo = true;
            op.next_attempt_at = Some(now);
            Decision {
                write: update(op),
                event: None,
                pause: false,
            }
        }
    }
}

fn dead(op: Op, reason: String, status: Option<u16>, cause: DeadCause) -> Decision {
    let event = Event::DeadLettered {
        id: op.id,
        entity: op.entity.clone(),
        kind: op.kind.clone(),
        reason: reason.clone(),
    };
    Decision {
        write: Write::Finish {
            op,
            fate: Fate::DeadLettered {
                reason,
                status,
                cause,
            },
        },
        event: Some(event),
        pause: false,
    }
}

/// A failed attempt: give up (attempts exhausted or too old), or wait and try again.
pub fn reschedule(
    config: &Config,
    rng: &mut Rng,
    now: Millis,
    mut op: Op,
    retry: Reschedule,
) -> Decision {
    op.failures += u32::from(retry.counts);
    op.last_error = Some(retry.error.clone());
    let limits = config.limits_for(op.priority);
    if op.failures >= limits.max_attempts {
        let reason = format!(
            "gave up after {} failed attempts: {}",
            op.failures, retry.error
        );
        return dead(op, reason, None, DeadCause::Exhausted);
    }
    if now >= op.created_at.saturating_add(limits.max_age_ms) {
        let reason = format!("expired after {} ms: {}", limits.max_age_ms, retry.error);
        return dead(op, reason, None, DeadCause::Expired);
    }
    // `soon`: the first retry's delay, whatever the count (the same request is still running).
    let nth = if retry.soon { 1 } else { op.attempts };
    let previous = if retry.soon { None } else { op.last_delay_ms };
    let jittered = config.backoff.delay(nth, previous, rng);
    let delay = jittered.max(retry.floor);
    op.last_delay_ms = Some(jittered);
    op.next_attempt_at = Some(now + delay);
    let event = Event::RetryScheduled {
        id: op.id,
        entity: op.entity.clone(),
        attempt: op.attempts,
        delay_ms: delay,
        error: retry.error,
    };
    Decision {
        write: update(op),
        event: Some(event),
        pause: false,
    }
}

/// An update of an op that keeps its id.
fn update(op: Op) -> Write {
    let was = op.id;
    Write::Update { op, was }
}

fn conflict(
    config: &Config,
    rng: &mut Rng,
    now: Millis,
    mut op: Op,
    version: Option<u64>,
    state: Option<String>,
    state_omitted: bool,
) -> Decision {
    let event = |resolution, rebased_as: Option<OpId>, op: &Op| Event::Conflict {
        id: op.id,
        entity: op.entity.clone(),
        kind: op.kind.clone(),
        resolution,
        server_version: version,
        server_state: state.clone(),
        state_omitted,
        rebased_as,
    };
    let finish = |op: Op, fate: Fate, event: Event| Decision {
        write: Write::Finish { op, fate },
        event: Some(event),
        pause: false,
    };
    match config.kind(&op.kind).conflict {
        ConflictPolicy::ServerWins => {
            let event = event(ConflictOutcome::ServerWins, None, &op);
            finish(op, Fate::Dropped, event)
        }
        ConflictPolicy::Manual => {
            let event = event(ConflictOutcome::Parked, None, &op);
            let fate = Fate::Parked {
                server_version: version,
                server_state: state.clone(),
                server_state_omitted: state_omitted,
            };
            finish(op, fate, event)
        }
        ConflictPolicy::ClientWins => {
            let max_attempts = config.limits_for(op.priority).max_attempts;
            op.failures += 1;
            let Some(version) = version.filter(|_| op.failures < max_attempts) else {
                let reason = match version {
                    None => "conflict, and the server did not say its version".to_owned(),
                    Some(_) => format!("still conflicting after {} rebases", op.failures),
                };
                return dead(op, reason, Some(409), DeadCause::Rejected);
            };
            // The old id's conflict is stored on the server, so the rebased copy needs a new
            // one. It keeps `seq` and `prev`: it is the same step in the entity's history.
            let rebased = OpId::from_random_bytes(rng.bytes16());
            let event = event(ConflictOutcome::Rebased, Some(rebased), &op);
            let was = std::mem::replace(&mut op.id, rebased);
            op.base_version = Some(version);
            op.last_error = Some(format!("conflict: rebased on version {version}"));
            op.next_attempt_at = Some(now);
            Decision {
                write: Write::Update { op, was },
                event: Some(event),
                pause: false,
            }
        }
    }
}

/// A set of entity names, kept sorted in a Vec. It holds at most a few hundred names, and a
/// `BTreeSet<String>` would add kilobytes of wasm for nothing.
#[derive(Debug, Default)]
pub struct EntitySet(Vec<String>);

impl EntitySet {
    /// Whether `entity` is in the set.
    pub fn contains(&self, entity: &str) -> bool {
        self.0.binary_search_by(|e| e.as_str().cmp(entity)).is_ok()
    }

    /// Adds `entity`.
    pub fn insert(&mut self, entity: String) {
        if let Err(at) = self.0.binary_search(&entity) {
            self.0.insert(at, entity);
        }
    }

    /// Removes `entity`.
    pub fn remove(&mut self, entity: &str) {
        if let Ok(at) = self.0.binary_search_by(|e| e.as_str().cmp(entity)) {
            self.0.remove(at);
        }
    }
}
