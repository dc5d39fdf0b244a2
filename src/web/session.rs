//! Drives the core in the browser: one drain session at a time per origin, fed by every trigger.
//!
//! A *session* holds the Web Lock `outbox-drain:<database>`, rebuilds a [`Drainer`] from the
//! store, performs its actions until it is idle, then releases the lock and arms a timer (and,
//! through the `schedule` hook, a `chrome.alarms` alarm) for the next wake. Any context may
//! enqueue; whichever holds the lock drains. A context that finds the lock taken tells the holder
//! over a `BroadcastChannel`, so an op enqueued in the popup is picked up by the worker's session.
//!
//! Every wake lands somewhere: in the running session's mailbox, or in `wake_pending` while a
//! session is starting or ending (it is replayed once the lock is released), or it starts a
//! session. A renewal of credentials (`wake("auth")`) reaches a running session as
//! `AuthRenewed`, or waits in `renewed` for the next. Nothing depends on a wake arriving, though:
//! each session begins by loading from the store, and while ops are pending the `schedule` hook
//! always has an alarm armed.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};

use js_sys::Function;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{BroadcastChannel, MessageEvent};

use super::error::{Error, Result, js_error};
use super::idb::Durability;
use super::platform::{now, random, with_lock};
use super::store::Store;
use super::transport::{Transport, timer_ms};
use crate::core::store::{apply, lease};
use crate::core::{Action, Config, Drainer, Event, Input, Millis, Reply, WakeReason};

/// With ops pending but nothing scheduled (paused for credentials, say), the `schedule` hook is
/// asked to wake the context this often, so that a token renewed without `wake("auth")`, or a
/// lost wake, never leaves the queue stranded. (Only the hook: an in-memory timer would keep a
/// window busy for nothing, and a service worker is stopped anyway.)
const HEARTBEAT_MS: Millis = 60_000;

/// Most callers' keys purged at the end of one session.
const KEY_PURGE_CHUNK: usize = 200;

/// Inputs for the running session, from replies, probes and wakes.
#[derive(Default)]
struct Mailbox {
    inputs: RefCell<VecDeque<Input>>,
    waker: RefCell<Option<Waker>>,
}

impl Mailbox {
    fn take(&self) -> Option<Input> {
        self.inputs.borrow_mut().pop_front()
    }

    fn push(&self, input: Input) {
        self.inputs.borrow_mut().push_back(input);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// The next input, or a timer wake at `deadline` if nothing comes first.
    async fn recv(&self, deadline: Option<Millis>) -> Input {
        let mut timer = deadline.map(|at| {
            let delay = timer_ms(at.saturating_sub(now()));
            Box::pin(gloo_timers::future::TimeoutFuture::new(delay))
        });
        poll_fn(|cx| {
            if let Some(input) = self.inputs.borrow_mut().pop_front() {
                return Poll::Ready(input);
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            match timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Input::Wake(WakeReason::Timer)),
                _ => Poll::Pending,
            }
        })
        .await
    }
}

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

    fn dispatch(&self, name: &str, value: &JsValue) {
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

/// Everything one open `Outbox` shares between its API calls and its sessions.
pub struct Shared {
    /// The database name, which also names the lock and the broadcast channel.
    pub name: String,
    /// The store.
    pub store: Store,
    /// The delivery policy.
    pub config: Config,
    /// The HTTP side.
    pub transport: Transport,
    /// The `schedule(atMs | null)` hook, which the extension glue maps to `chrome.alarms`.
    pub schedule: Option<Function>,
    /// Event listeners.
    pub listeners: Listeners,
    channel: RefCell<Option<BroadcastChannel>>,
    running: RefCell<Option<Rc<Mailbox>>>,
    starting: Cell<u32>,
    ending: Cell<bool>,
    wake_pending: Cell<bool>,
    timer: RefCell<Option<gloo_timers::callback::Timeout>>,
    closed: Cell<Option<&'static str>>,
    in_flight: Cell<usize>,
    /// The application said (`wake("auth")`) that credentials were renewed: the next session
    /// resumes a paused queue without comparing credentials.
    renewed: Cell<bool>,
}

/// What contexts of the same outbox broadcast to each other: this word, for "someone enqueued
/// or was woken but could not take the lock, so the holder should load"; or an event's JSON, for
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
    ) -> Rc<Self> {
        let shared = Rc::new(Shared {
            name,
            store,
            config,
            transport,
            schedule,
            listeners: Listeners::default(),
            channel: RefCell::new(None),
            running: RefCell::new(None),
            starting: Cell::new(0),
            ending: Cell::new(false),
            wake_pending: Cell::new(false),
            timer: RefCell::new(None),
            closed: Cell::new(None),
            in_flight: Cell::new(0),
            renewed: Cell::new(false),
        });
        shared.listen();
        shared
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
                this.spawn_wake(WakeReason::Message);
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
        // The closure lives as long as the page or worker; the channel is closed on `close`.
        on_message.forget();
        *self.channel.borrow_mut() = Some(channel);
    }

    fn broadcast(&self, message: &str) {
        if let Some(channel) = self.channel.borrow().as_ref() {
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

    /// Whether a session runs in this context now.
    pub fn is_draining(&self) -> bool {
        self.running.borrow().is_some()
    }

    /// Requests in flight from this context.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Emits an event to local listeners and to the other contexts.
    pub fn emit(&self, event: &Event) {
        let Ok(json) = serde_json::to_string(event) else {
            return;
        };
        if let Ok(value) = js_sys::JSON::parse(&json) {
            self.listeners.dispatch(event.name(), &value);
        }
        self.broadcast(&json);
    }

    fn report(&self, error: &Error) {
        let js = js_error(error.code(), &error.to_string());
        web_sys::console::error_2(&"outbox:".into(), &js);
        self.listeners.dispatch("error", &js);
    }

    /// The application renewed the credentials (`wake("auth")`): resume a paused queue, in the
    /// running session or the next one.
    pub fn renew_auth(self: &Rc<Self>) -> Option<impl Future<Output = ()> + use<>> {
        if let Some(mailbox) = self.running.borrow().as_ref() {
            mailbox.push(Input::AuthRenewed);
            return None;
        }
        self.renewed.set(true);
        self.wake(WakeReason::Message)
    }

    /// The browser closed the database under us (site data cleared, storage evicted, a backend
    /// failure): nothing works any more, and the application must hear it.
    pub fn lost_database(&self) {
        if self.closed.get().is_none() {
            self.close("the browser closed the database (site data cleared or storage evicted)");
            self.report(&Error::Closed("the browser closed the database"));
        }
    }

    /// Something happened that may make ops deliverable. Returns a future that ends when the
    /// session this wake started (if any) ends.
    pub fn wake(self: &Rc<Self>, reason: WakeReason) -> Option<impl Future<Output = ()> + use<>> {
        if self.closed.get().is_some() {
            return None;
        }
        if let Some(mailbox) = self.running.borrow().as_ref() {
            mailbox.push(Input::Wake(reason));
            return None;
        }
        if self.starting.get() > 0 || self.ending.get() {
            self.wake_pending.set(true);
            return None;
        }
        Some(self.clone().drain(reason, false))
    }

    /// Waits for the lock, then drains everything due. Resolves when the session is idle.
    pub async fn flush(self: Rc<Self>) -> Result<()> {
        self.check_open()?;
        if let Some(mailbox) = self.running.borrow().as_ref() {
            mailbox.push(Input::Wake(WakeReason::Flush));
        }
        self.clone().drain(WakeReason::Flush, true).await;
        self.check_open()
    }

    async fn drain(self: Rc<Self>, reason: WakeReason, wait: bool) {
        self.starting.set(self.starting.get() + 1);
        let lock = format!("outbox-drain:{}", self.name);
        let this = self.clone();
        let ran = with_lock(&lock, wait, async move {
            this.starting.set(this.starting.get() - 1);
            // This session loads from the store first, which covers every wake so far.
            this.wake_pending.set(false);
            let mailbox = Rc::new(Mailbox::default());
            *this.running.borrow_mut() = Some(mailbox.clone());
            let outcome = this.session(reason, &mailbox).await;
            this.stop_taking_inputs();
            match outcome {
                // Closing mid-session is not a failure; the store keeps everything.
                Err(Error::Closed(_)) | Ok(()) => {}
                Err(error) => this.report(&error),
            }
        })
        .await;
        if !ran {
            self.starting.set(self.starting.get() - 1);
            // Another context drains; make sure it looks at the store again.
            self.broadcast(WAKE_MESSAGE);
            self.wake_pending.set(false);
        }
        self.ending.set(false);
        if self.wake_pending.take() {
            self.spawn_wake(WakeReason::Message);
        }
    }

    /// Wakes without waiting for the resulting session (which would also make `drain`
    /// recursive).
    pub fn spawn_wake(self: &Rc<Self>, reason: WakeReason) {
        if let Some(drain) = self.wake(reason) {
            wasm_bindgen_futures::spawn_local(
                Box::pin(drain) as std::pin::Pin<Box<dyn Future<Output = ()>>>
            );
        }
    }

    async fn session(self: &Rc<Self>, reason: WakeReason, mailbox: &Rc<Mailbox>) -> Result<()> {
        self.check_open()?;
        let (breaker, paused, refused) = self.store.read(async |t| t.drainer_state().await).await?;
        let mut drainer = Drainer::new(self.config.clone(), breaker, paused, random()?);
        if paused && (self.renewed.take() || self.auth_changed(refused).await) {
            drainer.handle(now(), Input::AuthRenewed);
        }
        drainer.handle(now(), Input::Wake(reason));
        // If this context dies mid-send, nothing it planned to arm gets armed: until the session
        // arms the real next wake, one is due once a send started now would have timed out.
        self.schedule(Some(now() + 2 * self.config.request_timeout_ms + 1_000));
        loop {
            while let Some(action) = drainer.poll_action() {
                self.perform(&mut drainer, action, mailbox).await?;
            }
            // Inputs that arrived while actions were performed come first: a wake pushed during
            // the last await must not be dropped by an idle drainer.
            if let Some(input) = mailbox.take() {
                drainer.handle(now(), input);
                continue;
            }
            if drainer.is_idle() || self.closed.get().is_some() {
                break;
            }
            let input = mailbox.recv(drainer.next_wake()).await;
            drainer.handle(now(), input);
        }
        // Before the last await: from here a wake waits in `wake_pending` and starts a new
        // session once the lock is released, instead of landing in a mailbox nobody reads.
        self.stop_taking_inputs();
        // Callers' keys older than the retention go in small chunks, a few per session, so no
        // session pays for a backlog at once.
        let stale = now().saturating_sub(self.config.key_retention_ms);
        let pending = self.store.write(Durability::Relaxed, async |t| {
            use crate::core::store::QueueTxn;
            t.purge_keys(stale, KEY_PURGE_CHUNK).await?;
            Ok(t.counters().await?.pending)
        });
        let pending = pending.await?;
        self.arm(drainer.next_wake(), pending > 0);
        Ok(())
    }

    /// Whether the auth hook now gives credentials other than those refused (whose checksum,
    /// `refused`, the send that got the 401 stored). A hook that fails gives none: still paused.
    async fn auth_changed(&self, refused: Option<u32>) -> bool {
        match self.transport.credentials().await {
            Ok(current) => refused != Some(credentials_checksum(&current)),
            Err(_) => false,
        }
    }

    async fn perform(
        self: &Rc<Self>,
        drainer: &mut Drainer,
        action: Action,
        mailbox: &Rc<Mailbox>,
    ) -> Result<()> {
        match action {
            Action::Load { due_by, limit } => {
                let (ops, next_due) = self
                    .store
                    .read(async |t| {
                        use crate::core::store::QueueTxn;
                        t.due_heads(due_by, limit).await
                    })
                    .await?;
                drainer.handle(now(), Input::Loaded { ops, next_due });
            }
            Action::Send(request) => {
                let vanished = self
                    .store
                    .write(Durability::Relaxed, async |t| lease(t, &request.ops).await)
                    .await?;
                let (id, mode) = (request.id, request.mode);
                let ops = request.without(&vanished);
                if !vanished.is_empty() {
                    let seqs = vanished;
                    drainer.handle(now(), Input::Vanished { request: id, seqs });
                }
                if ops.is_empty() {
                    return Ok(());
                }
                let this = self.clone();
                let mailbox = mailbox.clone();
                self.in_flight.set(self.in_flight.get() + 1);
                wasm_bindgen_futures::spawn_local(async move {
                    let sent = this.transport.send(mode, &ops).await;
                    this.in_flight.set(this.in_flight.get() - 1);
                    if matches!(sent.reply, Reply::Http { status: 401, .. }) {
                        // Before the reply is handed over, so a pause is never stored without
                        // what tells a renewal from the refused credentials.
                        let checksum = credentials_checksum(&sent.credentials);
                        let stored = this
                            .store
                            .write(Durability::Relaxed, async |t| t.put_refused(checksum))
                            .await;
                        if let Err(error) = stored {
                            this.report(&error);
                        }
                    }
                    mailbox.push(Input::Reply {
                        request: id,
                        reply: sent.reply,
                    });
                });
            }
            Action::Persist(writes) => {
                let at = now();
                self.store
                    .write(Durability::Relaxed, async |t| apply(t, &writes, at).await)
                    .await?;
            }
            Action::Probe => {
                let this = self.clone();
                let mailbox = mailbox.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    let healthy = this.transport.probe().await;
                    mailbox.push(Input::ProbeResult { healthy });
                });
            }
            Action::Emit(event) => self.emit(&event),
        }
        Ok(())
    }

    /// Arms the in-memory timer and the durable `schedule` hook for the next wake. While ops are
    /// pending, something is always armed.
    fn arm(self: &Rc<Self>, next_wake: Option<Millis>, pending: bool) {
        let weak = Rc::downgrade(self);
        *self.timer.borrow_mut() = next_wake.map(|at| {
            let delay = timer_ms(at.saturating_sub(now()));
            gloo_timers::callback::Timeout::new(delay, move || {
                if let Some(this) = weak.upgrade() {
                    this.spawn_wake(WakeReason::Timer);
                }
            })
        });
        self.schedule(next_wake.or_else(|| pending.then(|| now() + HEARTBEAT_MS)));
    }

    /// Calls the `schedule` hook, which keeps one alarm: `at` replaces whatever was armed.
    fn schedule(&self, at: Option<Millis>) {
        if let Some(schedule) = &self.schedule {
            let arg = at.map_or(JsValue::NULL, |at| JsValue::from_f64(at as f64));
            if let Err(error) = schedule.call1(&JsValue::NULL, &arg) {
                web_sys::console::error_2(&"outbox: the schedule hook threw".into(), &error);
            }
        }
    }

    fn stop_taking_inputs(&self) {
        *self.running.borrow_mut() = None;
        self.ending.set(true);
    }

    /// Stops everything: no more sessions, timers or broadcasts; the connection closes once
    /// running transactions end. Requests in flight are abandoned; their leases bring them back.
    pub fn close(&self, why: &'static str) {
        if self.closed.get().is_some() {
            return;
        }
        self.closed.set(Some(why));
        self.timer.borrow_mut().take();
        if let Some(mailbox) = self.running.borrow().as_ref() {
            mailbox.push(Input::Wake(WakeReason::Message));
        }
        if let Some(channel) = self.channel.borrow_mut().take() {
            channel.close();
        }
        self.store.close();
    }
}

/// A 32-bit FNV-1a checksum of the credentials a request carried, stored when they are refused.
/// It tells whether later credentials differ and cannot give a token back: secrets never reach
/// the store, but a paused queue must know after a restart whether to try again.
pub fn credentials_checksum(credentials: &Option<String>) -> u32 {
    let text = credentials.as_deref().unwrap_or("");
    text.bytes().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}
