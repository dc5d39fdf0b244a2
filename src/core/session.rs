//! The session: when a context drains, and everything it does around the [`Drainer`].
//!
//! Any context of an outbox (the service worker, the popup, a dedicated worker) may be woken.
//! Only one drains at a time, under a lock the shell holds for it (a Web Lock in the browser).
//! A [`Session`] decides the whole life of draining in one context: when to ask for the lock,
//! what to tell the others when it is taken, how to start a drainer from the persisted state,
//! when credentials may have been renewed, what to arm before a send could be cut short, which
//! inputs come first while the shell is busy, and what to arm once it stops.
//!
//! It is sans-IO like the drainer: the shell calls [`Session::handle`] with an [`Input`], then
//! performs every [`Action`] from [`Session::poll_action`] in order, and arms a timer for
//! [`Session::poll_timeout`], which it answers with `Input::Wake(WakeReason::Timer)`.
//!
//! **Blocking actions** ([`Action::blocks`]) are performed one at a time: the shell performs
//! one, answers it with its completion input, and only then takes the next action. Inputs that
//! arrive meanwhile (replies, probe results, wakes) may be handed to [`Session::handle`] at any
//! time; the session holds them until the completion is in, then takes replies and probe results
//! first, and all the wakes that came meanwhile as one. Without that, a backlog under a stream of
//! enqueues made every wake a read of up to 400 ops from the store, and replies waited behind
//! them for a minute (issue #17).

use std::collections::VecDeque;

use super::breaker::Breaker;
use super::config::Config;
use super::copy::CopyWrite;
use super::drain::{self, Drainer, Request, RequestId, WakeReason};
use super::event::Event;
use super::op::{Op, OpId};
use super::outcome::Reply;
use super::rng::Rng;
use super::store::Write;
use super::time::{MINUTE, Millis, SECOND};

/// With ops pending but nothing scheduled (paused for credentials, say), the `schedule` hook is
/// asked to wake the context this often, so that a token renewed without `wake("auth")`, or a
/// lost wake, never leaves the queue stranded. (Only the durable hook: an in-memory timer would
/// keep a window busy for nothing, and a service worker is stopped anyway.)
pub const HEARTBEAT_MS: Millis = MINUTE;

/// Most callers' keys purged at the end of one session: a few per session, so no session pays
/// for a backlog at once.
pub const KEY_PURGE_CHUNK: usize = 200;

/// Something that happened, for the session.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Something happened that may make ops deliverable.
    Wake(WakeReason),
    /// The application says the credentials were renewed (`wake("auth")`): a paused queue
    /// resumes, in the running session or the next one.
    AuthRenewed,
    /// The answer to [`Action::AcquireLock`]: the lock is held now.
    LockAcquired,
    /// The answer to [`Action::AcquireLock`] without waiting: another context holds it.
    LockBusy,
    /// The answer to [`Action::AcquireLock`] where the platform has no locks (Web Locks missing,
    /// or refused for an opaque origin). The session drains unguarded: one context is still
    /// correct, and leases keep two drainers from sending one op twice in a row.
    NoLocks,
    /// The answer to [`Action::ReadState`].
    StateRead {
        /// The persisted breaker.
        breaker: Breaker,
        /// Whether delivery is paused for credentials.
        paused: bool,
        /// The checksum of the credentials the server last refused.
        refused: Option<u32>,
    },
    /// The answer to [`Action::CheckCredentials`]: the checksum of what the auth hook gives
    /// now, or `None` when it gives nothing usable.
    CredentialsChecked {
        /// The checksum (see [`credentials_checksum`]).
        checksum: Option<u32>,
    },
    /// The answer to [`Action::Load`].
    Loaded {
        /// Due head ops, earliest first.
        ops: Vec<Op>,
        /// The `next_attempt_at` of the first head not returned.
        next_due: Option<Millis>,
    },
    /// The answer to [`Action::Lease`]: the `seq`s that changed in the store and must not go.
    Leased {
        /// The request.
        request: RequestId,
        /// The ops left out.
        vanished: Vec<u64>,
    },
    /// The answer to [`Action::Persist`]: what [`store::apply`](super::store::apply) did.
    Persisted {
        /// The `seq`s whose writes were stale; their events are dropped.
        stale: Vec<u64>,
        /// What changed in the second copy; it is written next.
        copy: CopyWrite,
    },
    /// The answer to [`Action::Send`], whenever it comes.
    Reply {
        /// The request.
        request: RequestId,
        /// What came back.
        reply: Reply,
        /// The checksum of the credentials the request carried, if any.
        credentials: Option<u32>,
    },
    /// The answer to [`Action::Probe`], whenever it comes.
    ProbeResult {
        /// Whether the health endpoint answered `2xx`.
        healthy: bool,
    },
    /// The answer to [`Action::Finish`]: how many ops are still pending, and the next `seq`.
    Finished {
        /// Pending ops.
        pending: u64,
        /// The `seq` the next op gets.
        next_seq: u64,
    },
    /// A blocking action failed (the store): the session ends here. The store keeps
    /// everything; the leases of ops in flight bring them back.
    Failed,
    /// The outbox is closed: stop everything.
    Close,
}

/// Something the shell must do, in order. See [`Action::blocks`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ask for the drain lock; answer [`Input::LockAcquired`], or [`Input::LockBusy`] when
    /// `wait` is false and another context holds it.
    AcquireLock {
        /// Wait for the lock rather than give up at once.
        wait: bool,
    },
    /// Release the drain lock.
    ReleaseLock,
    /// Tell the other contexts to look at the store (the lock holder will).
    Broadcast,
    /// Read the persisted breaker, pause flag and refused-credentials checksum; answer
    /// [`Input::StateRead`].
    ReadState,
    /// Call the auth hook and answer [`Input::CredentialsChecked`].
    CheckCredentials,
    /// Read the due heads; answer [`Input::Loaded`].
    Load {
        /// The time to compare `next_attempt_at` with.
        due_by: Millis,
        /// The most ops to return.
        limit: usize,
    },
    /// Lease the request's ops ([`store::lease`](super::store::lease)); answer
    /// [`Input::Leased`].
    Lease(Request),
    /// Send these ops (already leased) and answer [`Input::Reply`] when the answer comes;
    /// meanwhile go on with the next action.
    Send {
        /// The request.
        request: RequestId,
        /// Batch or single.
        mode: super::config::SendMode,
        /// The ops to send.
        ops: Vec<Op>,
    },
    /// Probe the health endpoint and answer [`Input::ProbeResult`] when it comes; meanwhile go
    /// on.
    Probe,
    /// Commit these writes in one transaction ([`store::apply`](super::store::apply)); answer
    /// [`Input::Persisted`].
    Persist(Vec<Write>),
    /// Tell the application.
    Emit(Event),
    /// Write these changes to the second copy (see [`copy`](super::copy)); nothing waits for it.
    WriteCopy(CopyWrite),
    /// Remove from the second copy every op entry below `below`: the queue is empty, so such
    /// entries are finished ops whose removal was lost with a crash. (Ops enqueued meanwhile get
    /// a `seq` of at least `below`.) Nothing waits for it.
    SweepCopy {
        /// Entries of ops with a lower `seq` go.
        below: u64,
    },
    /// Set the durable wake-up (`chrome.alarms` through the `schedule` hook) to this time, or
    /// clear it: it replaces whatever was set.
    Schedule(Option<Millis>),
    /// End of a session: purge up to `limit` callers' keys made before `keys_before`, count the
    /// pending ops, and answer [`Input::Finished`].
    Finish {
        /// The cutoff of the key retention.
        keys_before: Millis,
        /// The most keys to purge.
        limit: usize,
    },
    /// A session ended, or could not start here: whoever waits for one may go on. `flushes`
    /// counts the flushes served so far (see [`Session::flushes_asked`]).
    Ended {
        /// Every flush up to this number has been served.
        flushes: u64,
    },
}

impl Action {
    /// Whether the shell must answer this action before it takes the next one.
    pub fn blocks(&self) -> bool {
        matches!(
            self,
            Action::AcquireLock { .. }
                | Action::ReadState
                | Action::CheckCredentials
                | Action::Load { .. }
                | Action::Lease(_)
                | Action::Persist(_)
                | Action::Finish { .. }
        )
    }
}

/// Where the session is in its life.
#[derive(Debug)]
enum Phase {
    /// No lock, nothing running.
    Idle,
    /// The lock was asked for; `reason` is the strongest wake so far.
    Acquiring {
        /// Whether the request waits.
        wait: bool,
        /// Why the session starts.
        reason: WakeReason,
    },
    /// Holding the lock, reading the persisted state.
    Reading {
        /// Why the session starts.
        reason: WakeReason,
    },
    /// Paused for credentials: checking whether the auth hook gives others now.
    CheckingCredentials {
        /// The drainer, started once the check is in.
        drainer: Box<Drainer>,
        /// The checksum of the refused credentials.
        refused: Option<u32>,
        /// Why the session starts.
        reason: WakeReason,
    },
    /// Draining.
    Running(Box<Drainer>),
    /// Counting what is left before the lock goes.
    Ending {
        /// The drainer's last wake-up.
        next_wake: Option<Millis>,
    },
    /// Closed for good.
    Closed,
}

/// The session state machine; see the module docs.
#[derive(Debug)]
pub struct Session {
    config: Config,
    rng: Rng,
    phase: Phase,
    actions: VecDeque<Action>,
    /// A blocking action was handed out and its completion has not come.
    awaiting: bool,
    /// A broadcast is due now, ahead of the queue (a wake while waiting for the lock).
    urgent: bool,
    /// Requests being leased, until [`Input::Leased`] says what to send.
    leasing: Vec<Request>,
    /// The ops of the persist handed out, as (seq, id of the op's events).
    persisting: Vec<(u64, OpId)>,
    /// Replies and probe results that came while a blocking action was out, in order.
    inbox: VecDeque<Input>,
    /// Wakes that no drainer has taken yet, as one: the strongest reason.
    wake: Option<WakeReason>,
    /// `wake("auth")` came and no drainer has taken it yet.
    renewed: bool,
    /// Flushes asked for, and of those the ones a drainer has taken.
    flushes_asked: u64,
    flushes_taken: u64,
    /// The flushes the running session took (reported when it ends).
    flushes_running: u64,
    /// The in-memory timer between sessions: the last drainer's next wake.
    timer: Option<Millis>,
    /// Whether this context has swept the copy of stale entries.
    copy_swept: bool,
    now: Millis,
}

impl Session {
    /// A session of one context. `seed` feeds every drainer it starts (jitter, rebased ids).
    pub fn new(config: Config, seed: [u8; 32]) -> Session {
        Session {
            config,
            rng: Rng::from_seed(seed),
            phase: Phase::Idle,
            actions: VecDeque::new(),
            awaiting: false,
            urgent: false,
            leasing: Vec::new(),
            persisting: Vec::new(),
            inbox: VecDeque::new(),
            wake: None,
            renewed: false,
            flushes_asked: 0,
            flushes_taken: 0,
            flushes_running: 0,
            timer: None,
            copy_swept: false,
            now: 0,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether this context drains now.
    pub fn is_draining(&self) -> bool {
        matches!(self.phase, Phase::Running(_))
    }

    /// Requests in flight from this context.
    pub fn in_flight(&self) -> usize {
        self.drainer().map_or(0, Drainer::in_flight)
    }

    /// The running drainer, if any.
    pub fn drainer(&self) -> Option<&Drainer> {
        match &self.phase {
            Phase::Running(drainer) => Some(drainer),
            _ => None,
        }
    }

    /// Whether the session holds the drain lock (between [`Input::LockAcquired`] and
    /// [`Action::ReleaseLock`]).
    pub fn holds_lock(&self) -> bool {
        matches!(
            self.phase,
            Phase::Reading { .. }
                | Phase::CheckingCredentials { .. }
                | Phase::Running(_)
                | Phase::Ending { .. }
        )
    }

    /// Whether the session waits for nothing but an input: no lock held or asked for, no action
    /// left, nothing held back.
    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle | Phase::Closed)
            && self.actions.is_empty()
            && !self.awaiting
            && self.wake.is_none()
    }

    /// How many flushes were asked for so far. A flush is served once an
    /// [`Action::Ended`] reports `flushes` at least this number.
    pub fn flushes_asked(&self) -> u64 {
        self.flushes_asked
    }

    /// When to call `handle(now, Input::Wake(WakeReason::Timer))` if nothing else comes first.
    /// Call again after every `handle`.
    pub fn poll_timeout(&self) -> Option<Millis> {
        match &self.phase {
            Phase::Running(drainer) => drainer.next_wake(),
            Phase::Idle => self.timer,
            _ => None,
        }
    }

    /// The next thing to do, or `None` until the next input (or, after a blocking action, its
    /// completion).
    pub fn poll_action(&mut self) -> Option<Action> {
        // The one action that does not wait its turn: a broadcast while the lock is awaited.
        if std::mem::take(&mut self.urgent) {
            return Some(Action::Broadcast);
        }
        if self.awaiting {
            return None;
        }
        if self.actions.is_empty() {
            // Inputs are taken only between batches of actions, so everything a reply led to
            // is done before the next wake reads the store.
            self.advance(self.now);
        }
        let action = self.actions.pop_front()?;
        self.awaiting = action.blocks();
        if let Action::Persist(writes) = &action {
            self.persisting = writes
                .iter()
                .filter_map(|write| match write {
                    Write::Update { op, was } => Some((op.seq, *was)),
                    Write::Finish { op, .. } => Some((op.seq, op.id)),
                    _ => None,
                })
                .collect();
        }
        Some(action)
    }

    /// A write another drainer had made stale changed nothing, so its event would report what
    /// did not happen here (the other drainer reports what did): it goes. The events of a
    /// persist follow it up to the next blocking action.
    fn drop_stale_events(&mut self, stale: &[u64]) {
        if stale.is_empty() {
            return;
        }
        let ids: Vec<OpId> = self
            .persisting
            .iter()
            .filter(|(seq, _)| stale.contains(seq))
            .map(|(_, id)| *id)
            .collect();
        let end = self
            .actions
            .iter()
            .position(Action::blocks)
            .unwrap_or(self.actions.len());
        let mut i = 0;
        let mut kept = end;
        while i < kept {
            let is_stale = matches!(&self.actions[i], Action::Emit(event)
                if event.op_id().is_some_and(|id| ids.contains(&id)));
            if is_stale {
                self.actions.remove(i);
                kept -= 1;
            } else {
                i += 1;
            }
        }
    }

    /// Feeds one input. Afterwards, take every action from [`poll_action`](Self::poll_action).
    pub fn handle(&mut self, now: Millis, input: Input) {
        self.now = self.now.max(now);
        let now = self.now;
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        match input {
            Input::Close => self.close(),
            Input::Wake(reason) => {
                if reason == WakeReason::Flush {
                    self.flushes_asked += 1;
                }
                self.wake = Some(self.wake.map_or(reason, |w| w.max(reason)));
                // Waiting for a holder that may drain for long: tell it now, so it takes what
                // this wake is about instead of leaving it until this session starts.
                if matches!(self.phase, Phase::Acquiring { wait: true, .. }) {
                    self.urgent = true;
                }
            }
            Input::AuthRenewed => self.renewed = true,
            Input::Reply { .. } | Input::ProbeResult { .. } => self.inbox.push_back(input),
            completion => {
                if !self.awaiting {
                    // A completion nothing asked for: a shell bug, not something to act on.
                    debug_assert!(false, "{completion:?} answers no action");
                    return;
                }
                self.awaiting = false;
                self.complete(now, completion);
            }
        }
    }

    fn complete(&mut self, now: Millis, completion: Input) {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        self.phase = match (phase, completion) {
            (Phase::Acquiring { reason, .. }, Input::LockAcquired | Input::NoLocks) => {
                self.actions.push_back(Action::ReadState);
                Phase::Reading { reason }
            }
            (Phase::Acquiring { .. }, Input::LockBusy) => {
                // The holder looks at the store when it hears this: it covers every wake so
                // far. A flush must see it done, so it waits for the lock.
                self.actions.push_back(Action::Broadcast);
                self.wake = None;
                if self.flushes_asked > self.flushes_taken {
                    self.actions.push_back(Action::AcquireLock { wait: true });
                    Phase::Acquiring {
                        wait: true,
                        reason: WakeReason::Flush,
                    }
                } else {
                    self.actions.push_back(Action::Ended {
                        flushes: self.flushes_taken,
                    });
                    Phase::Idle
                }
            }
            (
                Phase::Reading { reason },
                Input::StateRead {
                    breaker,
                    paused,
                    refused,
                },
            ) => {
                let seed = self.seed();
                let drainer = Box::new(Drainer::new(self.config.clone(), breaker, paused, seed));
                if paused && !self.renewed {
                    self.actions.push_back(Action::CheckCredentials);
                    Phase::CheckingCredentials {
                        drainer,
                        refused,
                        reason,
                    }
                } else {
                    self.start(now, drainer, reason)
                }
            }
            (
                Phase::CheckingCredentials {
                    mut drainer,
                    refused,
                    reason,
                },
                Input::CredentialsChecked { checksum },
            ) => {
                // Credentials other than those refused are worth a try; none at all are not.
                if checksum.is_some() && checksum != refused {
                    drainer.handle(now, drain::Input::AuthRenewed);
                }
                self.start(now, drainer, reason)
            }
            (Phase::Running(mut drainer), Input::Loaded { ops, next_due }) => {
                drainer.handle(now, drain::Input::Loaded { ops, next_due });
                self.collect(&mut drainer);
                Phase::Running(drainer)
            }
            (Phase::Running(mut drainer), Input::Leased { request, vanished }) => {
                if let Some(at) = self.leasing.iter().position(|r| r.id == request) {
                    let leased = self.leasing.swap_remove(at);
                    let mode = leased.mode;
                    let ops = leased.without(&vanished);
                    // The send goes before anything the drainer decides about the vanished ops.
                    if !ops.is_empty() {
                        self.actions.push_back(Action::Send { request, mode, ops });
                    }
                    if !vanished.is_empty() {
                        drainer.handle(
                            now,
                            drain::Input::Vanished {
                                request,
                                seqs: vanished,
                            },
                        );
                        self.collect(&mut drainer);
                    }
                }
                Phase::Running(drainer)
            }
            (phase @ Phase::Running(_), Input::Persisted { stale, copy }) => {
                self.drop_stale_events(&stale);
                // Right after the persist: the copy follows the database as closely as it can.
                if !copy.is_empty() {
                    self.actions.push_front(Action::WriteCopy(copy));
                }
                phase
            }
            (Phase::Ending { next_wake }, Input::Finished { pending, next_seq }) => {
                self.timer = next_wake;
                // Once per context: a crash can have left removals undone, and an empty queue
                // says which entries are stale without reading the store.
                if pending == 0 && !self.copy_swept {
                    self.copy_swept = true;
                    self.actions
                        .push_back(Action::SweepCopy { below: next_seq });
                }
                let heartbeat = (pending > 0).then(|| now + HEARTBEAT_MS);
                self.actions
                    .push_back(Action::Schedule(next_wake.or(heartbeat)));
                self.actions.push_back(Action::ReleaseLock);
                self.actions.push_back(Action::Ended {
                    flushes: self.flushes_running,
                });
                Phase::Idle
            }
            (phase, Input::Failed) => {
                // The store failed under a blocking action: stop here. The alarm armed at the
                // start of the session brings a new try.
                self.leasing.clear();
                self.inbox.clear();
                if matches!(
                    phase,
                    Phase::Reading { .. }
                        | Phase::CheckingCredentials { .. }
                        | Phase::Running(_)
                        | Phase::Ending { .. }
                ) {
                    self.actions.push_back(Action::ReleaseLock);
                }
                self.actions.push_back(Action::Ended {
                    flushes: self.flushes_running,
                });
                Phase::Idle
            }
            (phase, completion) => {
                debug_assert!(false, "{completion:?} does not answer {phase:?}");
                phase
            }
        };
    }

    /// A drainer starts: arm an alarm for the case this context dies mid-send, then wake it.
    fn start(&mut self, now: Millis, mut drainer: Box<Drainer>, reason: WakeReason) -> Phase {
        // Until the session arms the real next wake, one is due once a send started now would
        // have timed out; a context killed mid-send is then started again.
        let lease = now + 2 * self.config.request_timeout_ms + SECOND;
        self.actions.push_back(Action::Schedule(Some(lease)));
        if std::mem::take(&mut self.renewed) {
            drainer.handle(now, drain::Input::AuthRenewed);
        }
        let reason = self.wake.take().map_or(reason, |w| w.max(reason));
        self.take_flushes();
        drainer.handle(now, drain::Input::Wake(reason));
        self.collect(&mut drainer);
        Phase::Running(drainer)
    }

    /// The running drainer has taken every flush asked for so far.
    fn take_flushes(&mut self) {
        self.flushes_taken = self.flushes_asked;
        self.flushes_running = self.flushes_asked;
    }

    /// Takes what waited, now that nothing blocks: replies and probe results first, then a
    /// credentials renewal, then all the wakes as one; ends a session whose drainer is idle.
    fn advance(&mut self, now: Millis) {
        while !self.awaiting && self.actions.is_empty() {
            let phase = std::mem::replace(&mut self.phase, Phase::Idle);
            let (phase, progressed) = self.step(now, phase);
            self.phase = phase;
            if !progressed {
                return;
            }
        }
    }

    /// One step of [`advance`](Self::advance): the phase after it, and whether it did anything.
    fn step(&mut self, now: Millis, phase: Phase) -> (Phase, bool) {
        match phase {
            Phase::Running(mut drainer) => {
                if let Some(input) = self.inbox.pop_front() {
                    self.reply(now, &mut drainer, input);
                } else if std::mem::take(&mut self.renewed) {
                    drainer.handle(now, drain::Input::AuthRenewed);
                } else if let Some(reason) = self.wake.take() {
                    if reason == WakeReason::Flush || self.flushes_asked > self.flushes_taken {
                        self.take_flushes();
                    }
                    drainer.handle(now, drain::Input::Wake(reason));
                } else if drainer.is_idle() {
                    let next_wake = drainer.next_wake();
                    let keys_before = now.saturating_sub(self.config.key_retention_ms);
                    self.actions.push_back(Action::Finish {
                        keys_before,
                        limit: KEY_PURGE_CHUNK,
                    });
                    return (Phase::Ending { next_wake }, true);
                } else {
                    return (Phase::Running(drainer), false);
                }
                self.collect(&mut drainer);
                (Phase::Running(drainer), true)
            }
            Phase::Idle => {
                // Replies of a session that failed have nobody to go to.
                self.inbox.clear();
                match self.wake.take() {
                    Some(reason) => {
                        // Whatever the timer was for, this session (or the holder it tells)
                        // now looks at the store.
                        self.timer = None;
                        let wait = self.flushes_asked > self.flushes_taken;
                        // A wait may be long if another context drains: tell it at once.
                        self.urgent |= wait;
                        self.actions.push_back(Action::AcquireLock { wait });
                        (Phase::Acquiring { wait, reason }, true)
                    }
                    None => (Phase::Idle, false),
                }
            }
            Phase::Acquiring { wait, reason } => {
                // The session's first load (or, if the lock is busy, the broadcast) covers the
                // wakes that come while the lock is asked for.
                let reason = self.wake.take().map_or(reason, |w| w.max(reason));
                (Phase::Acquiring { wait, reason }, false)
            }
            // The phases that end in a drainer take the wakes when it starts; a wake while
            // ending starts the next session once this one is over.
            other => (other, false),
        }
    }

    fn reply(&mut self, now: Millis, drainer: &mut Drainer, input: Input) {
        match input {
            Input::Reply {
                request,
                reply,
                credentials,
            } => {
                if let (Reply::Http { status: 401, .. }, Some(checksum)) = (&reply, credentials) {
                    // Before the pause: a pause is never stored without what tells a renewal
                    // from the refused credentials after a restart.
                    self.actions
                        .push_back(Action::Persist(vec![Write::Refused(checksum)]));
                }
                drainer.handle(now, drain::Input::Reply { request, reply });
            }
            Input::ProbeResult { healthy } => {
                drainer.handle(now, drain::Input::ProbeResult { healthy });
            }
            _ => {}
        }
    }

    /// Moves the drainer's actions into the session's, leasing before every send.
    fn collect(&mut self, drainer: &mut Drainer) {
        while let Some(action) = drainer.poll_action() {
            self.actions.push_back(match action {
                drain::Action::Load { due_by, limit } => Action::Load { due_by, limit },
                drain::Action::Send(request) => {
                    self.leasing.push(request.clone());
                    Action::Lease(request)
                }
                drain::Action::Persist(writes) => Action::Persist(writes),
                drain::Action::Probe => Action::Probe,
                drain::Action::Emit(event) => Action::Emit(event),
            });
        }
    }

    fn seed(&mut self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        seed[..16].copy_from_slice(&self.rng.bytes16());
        seed[16..].copy_from_slice(&self.rng.bytes16());
        seed
    }

    fn close(&mut self) {
        let held = self.holds_lock();
        self.phase = Phase::Closed;
        self.actions.clear();
        self.awaiting = false;
        self.urgent = false;
        self.inbox.clear();
        self.leasing.clear();
        self.wake = None;
        self.timer = None;
        if held {
            self.actions.push_back(Action::ReleaseLock);
        }
        self.actions.push_back(Action::Ended {
            flushes: self.flushes_asked,
        });
    }
}

/// A 32-bit FNV-1a checksum of the credentials a request carried (their JSON text), stored when
/// they are refused. It tells whether later credentials differ and cannot give a token back:
/// secrets never reach the store, but a paused queue must know after a restart whether to try
/// again.
pub fn credentials_checksum(credentials: Option<&str>) -> u32 {
    credentials
        .unwrap_or("")
        .bytes()
        .fold(0x811c_9dc5, |hash, byte| {
            (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::breaker::Breaker;
    use crate::core::config::BatchConfig;
    use crate::core::memory::{MemoryStore, run_now};
    use crate::core::op::{Draft, Priority};
    use crate::core::store::{self, QueueTxn};
    use crate::core::wire;

    /// A shell over a [`MemoryStore`] that answers every action at once, except a load it is
    /// told to hold, and records what it did.
    struct Shell {
        store: MemoryStore,
        session: Session,
        now: Millis,
        log: Vec<String>,
        sent: Vec<(RequestId, Vec<Op>)>,
        hold_loads: bool,
        held: Option<(Millis, usize)>,
        next_id: u8,
    }

    impl Shell {
        fn new(config: Config) -> Shell {
            Shell {
                store: MemoryStore::default(),
                session: Session::new(config, [7; 32]),
                now: 1_000_000,
                log: Vec::new(),
                sent: Vec::new(),
                hold_loads: false,
                held: None,
                next_id: 0,
            }
        }

        fn enqueue(&mut self, entity: &str) {
            let draft = Draft {
                entity: Some(entity.into()),
                kind: "comment".into(),
                payload: "{}".into(),
                base_version: None,
                priority: Priority::User,
            };
            self.next_id = self.next_id.wrapping_add(1);
            let mut bytes = [self.next_id; 16];
            bytes[0] = self.store.counters_record().next_seq as u8;
            bytes[1] = (self.store.counters_record().next_seq >> 8) as u8;
            let id = crate::core::OpId::from_random_bytes(bytes);
            let config = self.session.config().clone();
            run_now(store::enqueue(
                &mut self.store,
                &config,
                draft,
                id,
                None,
                self.now,
            ))
            .unwrap();
        }

        fn input(&mut self, input: Input) {
            self.session.handle(self.now, input);
            self.pump();
        }

        fn count(&self, what: &str) -> usize {
            self.log.iter().filter(|l| l.as_str() == what).count()
        }

        /// Performs actions until there is none (or a load is held).
        fn pump(&mut self) {
            while let Some(action) = self.session.poll_action() {
                let answer = match action {
                    Action::AcquireLock { .. } => Some(Input::LockAcquired),
                    Action::ReadState => Some(Input::StateRead {
                        breaker: self.store.breaker,
                        paused: self.store.paused,
                        refused: self.store.refused,
                    }),
                    Action::CheckCredentials => Some(Input::CredentialsChecked {
                        checksum: Some(credentials_checksum(Some("new"))),
                    }),
                    Action::Load { due_by, limit } => {
                        self.log.push("load".into());
                        if self.hold_loads {
                            self.held = Some((due_by, limit));
                            None
                        } else {
                            let (ops, next_due) =
                                run_now(self.store.due_heads(due_by, limit)).unwrap();
                            Some(Input::Loaded { ops, next_due })
                        }
                    }
                    Action::Lease(request) => {
                        let vanished =
                            run_now(store::lease(&mut self.store, &request.ops)).unwrap();
                        Some(Input::Leased {
                            request: request.id,
                            vanished,
                        })
                    }
                    Action::Send { request, ops, .. } => {
                        self.log.push("send".into());
                        self.sent.push((request, ops));
                        None
                    }
                    Action::Persist(writes) => {
                        self.log.push("persist".into());
                        let applied =
                            run_now(store::apply(&mut self.store, &writes, self.now)).unwrap();
                        Some(Input::Persisted {
                            stale: applied.stale,
                            copy: applied.copy,
                        })
                    }
                    Action::Finish { .. } => {
                        self.log.push("finish".into());
                        Some(Input::Finished {
                            pending: self.store.counters_record().pending,
                            next_seq: self.store.counters_record().next_seq,
                        })
                    }
                    Action::Schedule(at) => {
                        self.log
                            .push(format!("schedule {:?}", at.map(|t| t - self.now)));
                        None
                    }
                    Action::Emit(event) => {
                        self.log.push(format!("emit {}", event.name()));
                        None
                    }
                    Action::ReleaseLock => {
                        self.log.push("release".into());
                        None
                    }
                    Action::Broadcast => {
                        self.log.push("broadcast".into());
                        None
                    }
                    Action::Probe | Action::WriteCopy(_) | Action::SweepCopy { .. } => None,
                    Action::Ended { .. } => {
                        self.log.push("ended".into());
                        None
                    }
                };
                if let Some(answer) = answer {
                    self.session.handle(self.now, answer);
                }
            }
        }

        fn answer_held_load(&mut self) {
            let (due_by, limit) = self.held.take().expect("a load is held");
            let (ops, next_due) = run_now(self.store.due_heads(due_by, limit)).unwrap();
            self.session
                .handle(self.now, Input::Loaded { ops, next_due });
            self.pump();
        }

        /// Answers the oldest request in flight: every op applied.
        fn reply_applied(&mut self) -> Input {
            let (request, ops) = self.sent.remove(0);
            let results: Vec<String> = ops
                .iter()
                .map(|op| format!(r#"{{"id":"{}","status":"applied","version":1}}"#, op.id))
                .collect();
            let body = format!(r#"{{"results":[{}]}}"#, results.join(","));
            assert!(wire::decode_results(&body, &ops).is_ok());
            Input::Reply {
                request,
                reply: Reply::Http {
                    status: 200,
                    retry_after: None,
                    body,
                },
                credentials: None,
            }
        }
    }

    fn config() -> Config {
        Config {
            batch: BatchConfig {
                max_ops: 100,
                ..BatchConfig::default()
            },
            max_in_flight: 2,
            limits: crate::core::config::Limits {
                max_pending: 1_000_000,
                max_bytes: 1 << 30,
                ..Default::default()
            },
            ..Config::default()
        }
    }

    /// The regression of issue #17: a backlog, a stream of enqueues, each waking the session.
    /// Replies are taken before the wakes, and the store is read when the window runs out, not
    /// once per wake.
    #[test]
    fn under_a_backlog_and_a_stream_of_enqueues_replies_come_first_and_loads_stay_few() {
        let mut shell = Shell::new(config());
        for n in 0..2_000 {
            shell.enqueue(&format!("e/{n}"));
        }
        shell.input(Input::Wake(WakeReason::Start));
        assert_eq!(shell.count("load"), 1);
        assert_eq!(shell.sent.len(), 2, "both request slots in use");
        let mut replies = 0;
        for round in 0..40 {
            // Twenty enqueues, each waking the session, while two requests are out.
            for i in 0..20 {
                shell.enqueue(&format!("new/{round}/{i}"));
                shell.input(Input::Wake(WakeReason::Enqueued));
            }
            let reply = shell.reply_applied();
            let before = shell.log.len();
            shell.input(reply);
            replies += 1;
            // The reply's write is the first thing done after it.
            assert_eq!(
                shell.log[before],
                "persist",
                "round {round}: {:?}",
                &shell.log[before..]
            );
        }
        let loads = shell.count("load");
        // A window holds 400 ops and a reply frees 100: about one load per four replies.
        let compact: Vec<&str> = shell
            .log
            .iter()
            .map(String::as_str)
            .filter(|l| matches!(*l, "load" | "send"))
            .collect();
        // Every read of the store led to a send: the 800 wakes caused none of their own. While
        // the backlog lasts, a window of 400 ops serves four requests.
        assert!(
            !compact.windows(2).any(|w| w == ["load", "load"]) && loads <= replies + 2,
            "{loads} loads for {replies} replies and 800 wakes: {compact:?}"
        );
        let backlog = &compact[..20];
        assert_eq!(
            backlog.iter().filter(|l| **l == "load").count(),
            4,
            "{backlog:?}"
        );
        assert_eq!(shell.count("send"), 2 + replies);
    }

    #[test]
    fn inputs_that_come_while_a_load_is_out_wait_and_replies_go_before_wakes() {
        let mut shell = Shell::new(config());
        for n in 0..300 {
            shell.enqueue(&format!("e/{n}"));
        }
        shell.input(Input::Wake(WakeReason::Start));
        assert_eq!(shell.sent.len(), 2);
        // The next load is held: meanwhile a burst of wakes and a reply arrive.
        shell.hold_loads = true;
        let reply = shell.reply_applied();
        shell.input(reply);
        let reply = shell.reply_applied();
        shell.input(reply);
        assert!(shell.held.is_some(), "the window ran out: a load is out");
        let mark = shell.log.len();
        for _ in 0..50 {
            shell
                .session
                .handle(shell.now, Input::Wake(WakeReason::Alarm));
        }
        assert!(
            shell.session.poll_action().is_none(),
            "nothing while the load is out"
        );
        shell.hold_loads = false;
        shell.answer_held_load();
        // Fifty wakes came as one: at most one more load after the held one.
        let loads_after = shell.log[mark..].iter().filter(|l| *l == "load").count();
        assert!(loads_after <= 1, "{:?}", &shell.log[mark..]);
    }

    /// A trigger from outside (an alarm, a sync, a start) may come after another context changed
    /// the store, so it reads it again at once; an enqueue's wake waits for the window to run out.
    #[test]
    fn an_outside_trigger_reads_the_store_at_once_and_an_enqueue_does_not() {
        let mut shell = Shell::new(config());
        for n in 0..300 {
            shell.enqueue(&format!("e/{n}"));
        }
        shell.input(Input::Wake(WakeReason::Start));
        assert_eq!(shell.count("load"), 1);
        shell.input(Input::Wake(WakeReason::Enqueued));
        assert_eq!(shell.count("load"), 1, "the window still has ops");
        shell.input(Input::Wake(WakeReason::Alarm));
        assert_eq!(shell.count("load"), 2);
    }

    #[test]
    fn online_and_flush_end_an_open_breaker_at_once_and_an_alarm_does_not() {
        for (reason, probes) in [
            (WakeReason::Online, true),
            (WakeReason::Flush, true),
            (WakeReason::Alarm, false),
        ] {
            let mut shell = Shell::new(Config::default());
            shell.enqueue("e/1");
            shell.store.breaker = Breaker::Open {
                until: shell.now + 60_000,
                open_ms: 30_000,
                since: shell.now,
            };
            let mut session = Session::new(Config::default(), [3; 32]);
            std::mem::swap(&mut session, &mut shell.session);
            shell.input(Input::Wake(reason));
            let probing = shell.session.drainer().is_some_and(|d| !d.is_idle());
            assert_eq!(probing, probes, "{reason:?}");
        }
    }

    #[test]
    fn a_busy_lock_makes_a_broadcast_and_a_flush_waits_for_it_telling_the_holder() {
        let mut session = Session::new(Config::default(), [1; 32]);
        session.handle(0, Input::Wake(WakeReason::Message));
        assert_eq!(
            session.poll_action(),
            Some(Action::AcquireLock { wait: false })
        );
        assert_eq!(session.poll_action(), None, "the lock request blocks");
        session.handle(0, Input::LockBusy);
        assert_eq!(session.poll_action(), Some(Action::Broadcast));
        assert_eq!(session.poll_action(), Some(Action::Ended { flushes: 0 }));
        assert!(session.is_idle());

        session.handle(1, Input::Wake(WakeReason::Flush));
        assert_eq!(session.flushes_asked(), 1);
        assert_eq!(
            session.poll_action(),
            Some(Action::AcquireLock { wait: true })
        );
        assert_eq!(
            session.poll_action(),
            Some(Action::Broadcast),
            "the holder hears at once"
        );
        // While it waits, a new wake is passed on to the holder too.
        session.handle(2, Input::Wake(WakeReason::Enqueued));
        assert_eq!(session.poll_action(), Some(Action::Broadcast));
        assert_eq!(session.poll_action(), None);
        session.handle(3, Input::LockAcquired);
        assert_eq!(session.poll_action(), Some(Action::ReadState));
    }

    #[test]
    fn a_session_arms_a_lease_long_alarm_first_and_a_heartbeat_when_paused_ops_remain() {
        let mut shell = Shell::new(Config::default());
        shell.enqueue("e/1");
        shell.store.paused = true;
        shell.store.refused = Some(credentials_checksum(Some("new")));
        shell.input(Input::Wake(WakeReason::Start));
        let timeout = Config::default().request_timeout_ms;
        let lease = format!("schedule {:?}", Some(2 * timeout + SECOND));
        assert_eq!(shell.log.first(), Some(&lease), "{:?}", shell.log);
        assert!(shell.sent.is_empty(), "the same credentials stay paused");
        let heartbeat = format!("schedule {:?}", Some(HEARTBEAT_MS));
        assert!(shell.log.contains(&heartbeat), "{:?}", shell.log);
        assert_eq!(shell.log.last().map(String::as_str), Some("ended"));
        assert_eq!(
            shell.session.poll_timeout(),
            None,
            "paused: only an input resumes"
        );

        // Credentials other than the refused ones resume it.
        shell.store.refused = Some(credentials_checksum(Some("old")));
        shell.input(Input::Wake(WakeReason::Alarm));
        assert_eq!(shell.sent.len(), 1);
        assert!(!shell.store.paused);
    }

    #[test]
    fn a_401_stores_the_refused_credentials_before_the_pause() {
        let mut shell = Shell::new(Config::default());
        shell.enqueue("e/1");
        shell.input(Input::Wake(WakeReason::Start));
        let (request, _) = shell.sent.remove(0);
        let checksum = credentials_checksum(Some("old"));
        shell.input(Input::Reply {
            request,
            reply: Reply::Http {
                status: 401,
                retry_after: None,
                body: String::new(),
            },
            credentials: Some(checksum),
        });
        assert!(shell.store.paused);
        assert_eq!(shell.store.refused, Some(checksum));
        let persists = shell.log.iter().filter(|l| *l == "persist").count();
        assert!(
            persists >= 2,
            "the checksum's write, then the pause: {:?}",
            shell.log
        );
    }

    #[test]
    fn renewed_credentials_resume_without_asking_the_hook() {
        let mut shell = Shell::new(Config::default());
        shell.enqueue("e/1");
        shell.store.paused = true;
        shell.store.refused = Some(credentials_checksum(Some("new")));
        shell.input(Input::AuthRenewed);
        shell.input(Input::Wake(WakeReason::Message));
        assert_eq!(shell.sent.len(), 1, "{:?}", shell.log);
    }

    #[test]
    fn closing_releases_a_held_lock_and_ends() {
        let mut shell = Shell::new(Config::default());
        shell.enqueue("e/1");
        shell.input(Input::Wake(WakeReason::Start));
        assert!(shell.session.holds_lock());
        shell.input(Input::Close);
        assert_eq!(&shell.log[shell.log.len() - 2..], ["release", "ended"]);
        shell.input(Input::Wake(WakeReason::Alarm));
        assert_eq!(
            shell.log.last().map(String::as_str),
            Some("ended"),
            "closed for good"
        );
    }

    #[test]
    fn events_of_stale_writes_are_dropped() {
        let mut shell = Shell::new(Config::default());
        shell.enqueue("e/1");
        shell.input(Input::Wake(WakeReason::Start));
        // Another drainer finished the op meanwhile.
        let seq = shell.sent[0].1[0].seq;
        run_now(shell.store.delete_op(seq)).unwrap();
        let reply = shell.reply_applied();
        shell.input(reply);
        assert!(
            !shell.log.contains(&"emit delivered".to_owned()),
            "a finish that found nothing reports nothing: {:?}",
            shell.log
        );
    }
}
