//! Plumbing between the core's [`Session`] and the browser: it performs the session's actions
//! (IndexedDB, `fetch`, the Web Lock, `BroadcastChannel`, timers, the `schedule` hook, events)
//! and feeds their outcomes back. Every decision is the session's (`src/core/session.rs`); this
//! file only carries them out.
//!
//! One task at a time drives the session ([`Shared::drive`]): it takes an action, performs it
//! (awaiting a store transaction in place), answers it, and goes on until there is none. Sends,
//! probes and the lock request run in tasks of their own and answer when they finish; inputs
//! from outside (API calls, other contexts, timers) are handed to the session at once, which
//! holds them until it can take them.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use js_sys::{Function, Promise};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{BroadcastChannel, MessageEvent};

use super::backup::Backup;
use super::error::ErrorCode;
use super::error::{Error, Result, js_error};
use super::idb::Durability;
use super::platform::{LockGrant, acquire_lock, now, random};
use super::store::Store;
use super::transport::{Transport, timer_ms};
use crate::core::copy::{CopyWrite, Incident, IncidentCode};
use crate::core::json::ToJson;
use crate::core::store::{QueueTxn, apply, lease};
use crate::core::{
    Config, Event, Session, SessionAction, SessionInput, WakeReason, credentials_checksum,
};

/// Listeners registered with `on`.
#[derive(Default)]
pub struct Listeners {
    entries: RefCell<Vec<(String, Function)>>,
}

impl Listeners {
    /// Adds a listener.
    pub fn add(&self, name: String, callback: Function) {
        self.entries.borrow_mut().push((name, callback));
    }

    /// Removes a listener added with the same name and function.
    pub fn remove(&self, name: &str, callback: &Function) {
        self.entries
            .borrow_mut()
            .retain(|(n, f)| !(n == name && f == callback));
    }

    /// Calls every listener of `name` with `value`.
    pub fn dispatch(&self, name: &str, value: &JsValue) {
        // Clone first: a listener may call `on` or `off`.
        let targets: Vec<Function> = self
            .entries
            .borrow()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, f)| f.clone())
            .collect();
        for callback in targets {
            if let Err(error) = callback.call1(&JsValue::NULL, value) {
                // A broken listener must not stop delivery; it is reported, not swallowed.
                web_sys::console::error_2(&"outbox: an event listener threw".into(), &error);
            }
        }
    }
}

/// Someone waiting for a session to end: a `flush()` (which needs its flush served) or a
/// `wake()`.
struct Waiter {
    /// For a flush: the flush number that must be served.
    flush: Option<u64>,
    resolve: Function,
}

/// The channel to the other contexts and its message handler.
type Channel = (BroadcastChannel, Closure<dyn Fn(MessageEvent)>);

/// Handlers this outbox set on browser objects, removed by `close()` so nothing is leaked.
#[derive(Default)]
struct Handlers {
    channel: Option<Channel>,
    database: Vec<Closure<dyn Fn()>>,
}

/// Everything one open `Outbox` shares between its API calls and its session.
pub struct Shared {
    /// The database name, which also names the lock and the broadcast channel.
    pub name: String,
    /// The store.
    pub store: Store,
    /// The HTTP side.
    pub transport: Transport,
    /// The `schedule(atMs | null)` hook, which the extension glue maps to `chrome.alarms`.
    pub schedule: Option<Function>,
    /// Event listeners.
    pub listeners: Listeners,
    /// The second copy's storage, if the application gave one.
    pub backup: Option<Backup>,
    /// Whether a failure of the copy was reported already (once per context is enough).
    copy_failed: Cell<bool>,
    session: RefCell<Session>,
    config: Config,
    driving: Cell<bool>,
    lock: RefCell<Option<Function>>,
    timer: RefCell<Option<gloo_timers::callback::Timeout>>,
    waiters: RefCell<Vec<Waiter>>,
    handlers: RefCell<Handlers>,
    closed: Cell<Option<&'static str>>,
}

/// What contexts of the same outbox broadcast to each other: this word, for "someone enqueued
/// or was woken but could not take the lock, so the holder should look"; or an event's JSON, for
/// listeners everywhere. Plain strings, parsed by the browser's own JSON.
const WAKE_MESSAGE: &str = "wake";

impl Shared {
    /// Puts together an outbox around an open store.
    pub fn new(
        name: String,
        store: Store,
        config: Config,
        transport: Transport,
        schedule: Option<Function>,
        backup: Option<Backup>,
    ) -> Result<Rc<Self>> {
        let session = Session::new(config.clone(), random()?);
        let shared = Rc::new(Shared {
            name,
            store,
            transport,
            schedule,
            listeners: Listeners::default(),
            backup,
            copy_failed: Cell::new(false),
            session: RefCell::new(session),
            config,
            driving: Cell::new(false),
            lock: RefCell::new(None),
            timer: RefCell::new(None),
            waiters: RefCell::new(Vec::new()),
            handlers: RefCell::new(Handlers::default()),
            closed: Cell::new(None),
        });
        shared.listen();
        Ok(shared)
    }

    /// The delivery policy.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn listen(self: &Rc<Self>) {
        let Ok(channel) = BroadcastChannel::new(&format!("outbox:{}", self.name)) else {
            // Without BroadcastChannel, contexts still converge through the store and alarms.
            return;
        };
        let weak: Weak<Self> = Rc::downgrade(self);
        let on_message = Closure::<dyn Fn(MessageEvent)>::new(move |event: MessageEvent| {
            let Some(this) = weak.upgrade() else { return };
            let Some(text) = event.data().as_string() else {
                return;
            };
            if text == WAKE_MESSAGE {
                this.feed(SessionInput::Wake(WakeReason::Message));
            } else if let Ok(value) = js_sys::JSON::parse(&text) {
                let name = js_sys::Reflect::get(&value, &"type".into())
                    .ok()
                    .and_then(|n| n.as_string());
                if let Some(name) = name {
                    this.listeners.dispatch(&name, &value);
                }
            }
        });
        channel.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        self.handlers.borrow_mut().channel = Some((channel, on_message));
    }

    /// Keeps a database handler alive until `close()` removes it.
    pub fn keep_database_handler(&self, handler: Closure<dyn Fn()>) {
        self.handlers.borrow_mut().database.push(handler);
    }

    fn broadcast(&self, message: &str) {
        if let Some((channel, _)) = self.handlers.borrow().channel.as_ref() {
            // Posting fails only if the channel is closed, and then nobody is listening.
            let _ = channel.post_message(&message.into());
        }
    }

    /// Fails with `CLOSED` once the outbox is closed.
    pub fn check_open(&self) -> Result<()> {
        match self.closed.get() {
            Some(why) => Err(Error::Closed(why)),
            None => Ok(()),
        }
    }

    /// Whether a session drains in this context now.
    pub fn is_draining(&self) -> bool {
        self.session.borrow().is_draining()
    }

    /// Requests in flight from this context.
    pub fn in_flight(&self) -> usize {
        self.session.borrow().in_flight()
    }

    /// Emits an event to local listeners and to the other contexts.
    pub fn emit(&self, event: &Event) {
        let json = event.to_json();
        if let Ok(value) = js_sys::JSON::parse(&json) {
            self.listeners.dispatch(event.name(), &value);
        }
        self.broadcast(&json);
    }

    /// Reports a failure to the console and to `error` listeners.
    pub fn report(&self, error: &Error) {
        let js = js_error(error.code(), &error.to_string());
        web_sys::console::error_2(&"outbox:".into(), &js);
        self.listeners.dispatch("error", &js);
    }

    /// A copy write that failed: the op is safe in IndexedDB, but would not survive the
    /// database being dropped. Reported once per context, not per op.
    pub fn report_copy_failure(&self, error: &Error) {
        if !self.copy_failed.replace(true) {
            self.report(error);
        }
    }

    /// Tells the application, shortly after `open` resolves (so that listeners added right
    /// after it hear it), what happened to the database.
    pub fn report_incident(self: &Rc<Self>, incident: Incident) {
        let code = match incident.code {
            IncidentCode::StorageRecovered => ErrorCode::StorageRecovered,
            IncidentCode::StorageLost => ErrorCode::StorageLost,
        };
        let weak = Rc::downgrade(self);
        gloo_timers::callback::Timeout::new(0, move || {
            if let Some(this) = weak.upgrade() {
                let error = js_error(code.as_str(), &incident.message());
                web_sys::console::warn_2(&"outbox:".into(), &error);
                this.listeners.dispatch("error", &error);
            }
        })
        .forget();
    }

    /// A handle to write the second copy of one API call's transaction.
    pub fn copying(&self) -> Copying<'_> {
        Copying {
            shared: self,
            started: RefCell::new(None),
        }
    }

    /// The browser closed the database under us (site data cleared, storage evicted, a backend
    /// failure): nothing works any more, and the application must hear it.
    pub fn lost_database(self: &Rc<Self>) {
        if self.closed.get().is_none() {
            self.close("the browser closed the database (site data cleared or storage evicted)");
            self.report(&Error::Closed("the browser closed the database"));
        }
    }

    /// Hands an input to the session and makes sure something performs what follows.
    pub fn feed(self: &Rc<Self>, input: SessionInput) {
        if self.closed.get().is_some() && input != SessionInput::Close {
            return;
        }
        self.session.borrow_mut().handle(now(), input);
        self.kick();
    }

    /// Something happened that may make ops deliverable. Resolves when the session this wake
    /// started, if any, has ended.
    pub fn wake(self: &Rc<Self>, reason: WakeReason) -> JsFuture {
        let was_idle = self.session.borrow().is_idle();
        let done = self.wait_for_end(None, !was_idle);
        self.feed(SessionInput::Wake(reason));
        done
    }

    /// The application renewed the credentials (`wake("auth")`): resume a paused queue, in the
    /// running session or the next one.
    pub fn renew_auth(self: &Rc<Self>) -> JsFuture {
        self.session
            .borrow_mut()
            .handle(now(), SessionInput::AuthRenewed);
        self.wake(WakeReason::Message)
    }

    /// Delivers everything due now; resolves once a session served this flush (waiting for
    /// another context's to end first, if one drains).
    pub async fn flush(self: Rc<Self>) -> Result<()> {
        self.check_open()?;
        self.feed(SessionInput::Wake(WakeReason::Flush));
        let ticket = self.session.borrow().flushes_asked();
        // Ignored: a waiter is only ever resolved.
        let _ = self.wait_for_end(Some(ticket), false).await;
        self.check_open()
    }

    fn wait_for_end(&self, flush: Option<u64>, now: bool) -> JsFuture {
        let mut resolve = None;
        let promise = Promise::new(&mut |r, _| resolve = Some(r));
        if let Some(resolve) = resolve {
            if now {
                let _ = resolve.call0(&JsValue::NULL);
            } else {
                self.waiters.borrow_mut().push(Waiter { flush, resolve });
            }
        }
        JsFuture::from(promise)
    }

    /// Wakes without waiting for the session to end.
    pub fn spawn_wake(self: &Rc<Self>, reason: WakeReason) {
        self.feed(SessionInput::Wake(reason));
    }

    /// Starts the driving task unless it runs already.
    fn kick(self: &Rc<Self>) {
        if self.driving.replace(true) {
            return;
        }
        wasm_bindgen_futures::spawn_local(self.clone().drive());
    }

    /// Performs the session's actions until there is none, then arms the timer it asks for.
    async fn drive(self: Rc<Self>) {
        loop {
            let action = self.session.borrow_mut().poll_action();
            let Some(action) = action else { break };
            if let Some(answer) = self.perform(action).await {
                self.session.borrow_mut().handle(now(), answer);
            }
        }
        self.driving.set(false);
        self.arm_timer();
    }

    fn arm_timer(self: &Rc<Self>) {
        if self.closed.get().is_some() {
            return;
        }
        let at = self.session.borrow().poll_timeout();
        let weak = Rc::downgrade(self);
        *self.timer.borrow_mut() = at.map(|at| {
            gloo_timers::callback::Timeout::new(timer_ms(at.saturating_sub(now())), move || {
                if let Some(this) = weak.upgrade() {
                    this.feed(SessionInput::Wake(WakeReason::Timer));
                }
            })
        });
    }

    /// Performs one action; returns its answer if it has one now.
    async fn perform(self: &Rc<Self>, action: SessionAction) -> Option<SessionInput> {
        match action {
            SessionAction::AcquireLock { wait } => {
                // In a task of its own: waiting for another context must not stop this one from
                // telling the holder about new wakes.
                let this = self.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    let lock = format!("outbox-drain:{}", this.name);
                    let answer = match acquire_lock(&lock, wait).await {
                        LockGrant::Held(release) => {
                            *this.lock.borrow_mut() = Some(release);
                            SessionInput::LockAcquired
                        }
                        LockGrant::Busy => SessionInput::LockBusy,
                        LockGrant::Unavailable => SessionInput::NoLocks,
                    };
                    if this.closed.get().is_some() {
                        this.release_lock();
                    }
                    this.feed(answer);
                });
                None
            }
            SessionAction::ReleaseLock => {
                self.release_lock();
                None
            }
            SessionAction::Broadcast => {
                self.broadcast(WAKE_MESSAGE);
                None
            }
            SessionAction::ReadState => {
                let state = self.store.read(async |t| t.drainer_state().await).await;
                Some(self.answer(
                    state.map(|(breaker, paused, refused)| SessionInput::StateRead {
                        breaker,
                        paused,
                        refused,
                    }),
                ))
            }
            SessionAction::CheckCredentials => {
                let checksum = match self.transport.credentials().await {
                    Ok(fingerprint) => Some(credentials_checksum(fingerprint.as_deref())),
                    Err(_) => None,
                };
                Some(SessionInput::CredentialsChecked { checksum })
            }
            SessionAction::Load { due_by, limit } => {
                let loaded = self
                    .store
                    .read(async |t| t.due_heads(due_by, limit).await)
                    .await;
                Some(
                    self.answer(
                        loaded.map(|(ops, next_due)| SessionInput::Loaded { ops, next_due }),
                    ),
                )
            }
            SessionAction::Lease(request) => {
                let vanished = self
                    .store
                    .write(Durability::Relaxed, async |t| lease(t, &request.ops).await)
                    .await;
                Some(self.answer(vanished.map(|vanished| SessionInput::Leased {
                    request: request.id,
                    vanished,
                })))
            }
            SessionAction::Send { request, mode, ops } => {
                let this = self.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    let sent = this.transport.send(mode, &ops).await;
                    this.feed(SessionInput::Reply {
                        request,
                        reply: sent.reply,
                        credentials: Some(credentials_checksum(sent.credentials.as_deref())),
                    });
                });
                None
            }
            SessionAction::Probe => {
                let this = self.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    let healthy = this.transport.probe().await;
                    this.feed(SessionInput::ProbeResult { healthy });
                });
                None
            }
            SessionAction::Persist(writes) => {
                let at = now();
                let stale = self
                    .store
                    .write(Durability::Relaxed, async |t| apply(t, &writes, at).await)
                    .await;
                Some(self.answer(stale.map(|applied| SessionInput::Persisted {
                    stale: applied.stale,
                    copy: applied.copy,
                })))
            }
            SessionAction::Emit(event) => {
                self.emit(&event);
                None
            }
            SessionAction::WriteCopy(copy) => {
                if self.backup.is_some() {
                    let this = self.clone();
                    wasm_bindgen_futures::spawn_local(async move {
                        let Some(backup) = &this.backup else { return };
                        if let Err(error) = backup.write(this.transport.client(), &copy).await {
                            this.report_copy_failure(&error);
                        }
                    });
                }
                None
            }
            SessionAction::SweepCopy { below } => {
                if self.backup.is_some() {
                    let this = self.clone();
                    wasm_bindgen_futures::spawn_local(async move {
                        let Some(backup) = &this.backup else { return };
                        if let Err(error) = backup.sweep(below).await {
                            this.report_copy_failure(&error);
                        }
                    });
                }
                None
            }
            SessionAction::Schedule(at) => {
                self.call_schedule(at);
                None
            }
            SessionAction::Finish { keys_before, limit } => {
                let counters = self
                    .store
                    .write(Durability::Relaxed, async |t| {
                        t.purge_keys(keys_before, limit).await?;
                        t.counters().await
                    })
                    .await;
                Some(self.answer(counters.map(|c| SessionInput::Finished {
                    pending: c.pending,
                    next_seq: c.next_seq,
                })))
            }
            SessionAction::Ended { flushes } => {
                self.waiters.borrow_mut().retain(|waiter| {
                    let served = waiter.flush.is_none_or(|ticket| ticket <= flushes);
                    if served {
                        let _ = waiter.resolve.call0(&JsValue::NULL);
                    }
                    !served
                });
                None
            }
        }
    }

    /// A store transaction's outcome as the session's input: a failure ends the session (and is
    /// reported, unless it is the outbox being closed).
    fn answer(&self, outcome: Result<SessionInput>) -> SessionInput {
        match outcome {
            Ok(input) => input,
            Err(Error::Closed(_)) => SessionInput::Failed,
            Err(error) => {
                self.report(&error);
                SessionInput::Failed
            }
        }
    }

    fn release_lock(&self) {
        if let Some(release) = self.lock.borrow_mut().take() {
            let _ = release.call0(&JsValue::NULL);
        }
    }

    /// Calls the `schedule` hook, which keeps one alarm: `at` replaces whatever was armed.
    fn call_schedule(&self, at: Option<crate::core::Millis>) {
        if let Some(schedule) = &self.schedule {
            let arg = at.map_or(JsValue::NULL, |at| JsValue::from_f64(at as f64));
            if let Err(error) = schedule.call1(&JsValue::NULL, &arg) {
                web_sys::console::error_2(&"outbox: the schedule hook threw".into(), &error);
            }
        }
    }

    /// Stops everything: no more sessions, timers or broadcasts, no handler left on the
    /// browser's objects; the connection closes once running transactions end. Requests in
    /// flight are abandoned; their leases bring them back.
    pub fn close(self: &Rc<Self>, why: &'static str) {
        if self.closed.get().is_some() {
            return;
        }
        self.feed(SessionInput::Close);
        self.closed.set(Some(why));
        self.timer.borrow_mut().take();
        let handlers = std::mem::take(&mut *self.handlers.borrow_mut());
        if let Some((channel, _on_message)) = handlers.channel {
            channel.set_onmessage(None);
            channel.close();
        }
        self.store.clear_handlers();
        drop(handlers.database);
        self.store.close();
    }
}

/// The second copy of one API call's transaction: started inside it (so the copy is written
/// while IndexedDB commits), finished after it.
pub struct Copying<'a> {
    shared: &'a Shared,
    /// The write in progress, and the `seq`s it stores (to take back if the commit fails).
    started: RefCell<Option<(Promise, Vec<u64>)>>,
}

impl Copying<'_> {
    /// Starts writing `copy`, if there is a copy to keep.
    pub fn start(&self, copy: &CopyWrite) {
        let Some(backup) = &self.shared.backup else {
            return;
        };
        if copy.is_empty() {
            return;
        }
        match backup.start(self.shared.transport.client(), copy) {
            Ok(promise) => {
                let seqs = copy.put.iter().map(|c| c.op.seq).collect();
                *self.started.borrow_mut() = Some((promise, seqs));
            }
            Err(error) => self.shared.report_copy_failure(&error),
        }
    }

    /// Waits for the write. If the transaction did not commit, the ops it stored in the copy are
    /// taken out again: a rebuild must not bring back an op its caller was told failed.
    pub async fn finish(self, committed: bool) {
        let Some((promise, seqs)) = self.started.take() else {
            return;
        };
        let written = JsFuture::from(promise).await;
        let Some(backup) = &self.shared.backup else {
            return;
        };
        if let Err(error) = written {
            self.shared.report_copy_failure(&Error::storage(error));
        }
        if !committed {
            let undo = CopyWrite {
                remove: seqs,
                ..CopyWrite::default()
            };
            if let Err(error) = backup.write(self.shared.transport.client(), &undo).await {
                self.shared.report_copy_failure(&error);
            }
        }
    }
}
