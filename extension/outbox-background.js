// outbox background glue: the only file an extension's background script needs.
//
//   import { startOutbox } from './outbox/outbox-background.js';
//   const outbox = startOutbox({
//     endpoint: 'https://api.example.com',
//     auth: async () => ({ Authorization: `Bearer ${await token()}` }),
//     contentScripts: { kinds: ['comment'], finalState: false, subscribe: 'own-tab' },
//   });
//
// It runs in the Chrome MV3 service worker and in the Firefox MV3 event page. Every listener is
// registered synchronously, while the caller's module is evaluated: Chrome drops events whose
// listener is added after an `await`. Each listener waits for the wasm module and the database
// inside the handler instead.
//
// The background is the only holder of credentials (docs/SECURITY.md). Every runtime message
// and port is checked against its sender: extension pages (the popup, the options page) get the
// whole API; content scripts, which run in the web page's renderer and must be treated as
// hostile, get only what `contentScripts` allows, and never a credential.
import init, { Outbox } from './pkg/outbox.js';

const ext = globalThis.browser ?? globalThis.chrome;
const ALARM = 'outbox-wake';
const SYNC_TAG = 'outbox-sync';
const STATUS_PORT = 'outbox-status';
/** The runtime-message methods extension pages may call (see outbox-page.js). */
const PAGE_METHODS = new Set(['enqueue', 'finalState', 'renewBeacon', 'flush', 'stats', 'pending',
  'deadLetters', 'retryDeadLetter', 'discardDeadLetter', 'conflicts', 'resolveConflict']);
/** The methods that queue an op, after which a Background Sync is worth registering. */
const QUEUEING_METHODS = new Set(['enqueue', 'retryDeadLetter', 'resolveConflict', 'finalState']);
/** Events that end an op's life in the queue (a rebased conflict hands it on to a new id). */
const ENDING = new Set(['delivered', 'dead-lettered', 'conflict']);

/** The error every refused call rejects with. */
function forbidden(why) {
  return Object.assign(new Error(`forbidden: ${why}`), { code: 'FORBIDDEN' });
}

function invalid(why) {
  return Object.assign(new Error(why), { code: 'INVALID_ARGUMENT' });
}

/**
 * Starts the outbox in the background context. `options` are those of `Outbox.open` (minus
 * `schedule`, which is mapped here to `chrome.alarms`), plus `contentScripts`, what content
 * scripts may do:
 *
 *   kinds       the op kinds they may enqueue (default none: content scripts may do nothing)
 *   finalState  whether they may use sendFinalStateOnClose (default false)
 *   subscribe   'own-tab': they hear the events of the ops their tab enqueued; false (default)
 *   accept      optional (request, sender) => boolean, a last check of each request (for
 *               example that its entity belongs to the page the sender is on)
 *
 * and `backup`: where the second copy of the pending ops lives, so that a database the
 * browser drops after a crash is rebuilt (docs/DELIVERY.md). By default `chrome.storage.local`
 * (the manifest needs the "storage" permission; "unlimitedStorage" lifts its 10 MB quota);
 * `false` keeps no copy. The copy holds what the queue holds, so `storage.local` is closed to
 * content scripts where the browser can do it (Chrome's `setAccessLevel`); `storageAccess:
 * 'all'` leaves it open, for an extension whose content scripts read `storage.local` itself.
 *
 * Returns a promise of the `Outbox`.
 */
export function startOutbox(options) {
  const { contentScripts, storageAccess = 'trusted', backup = storageLocalBackup(options?.database ?? 'outbox', storageAccess),
    ...config } = options ?? {};
  const policy = contentScriptPolicy(contentScripts);
  const ports = new Set();
  const tabs = new TabLedger();
  const refusalsLogged = new Set();
  let syncRegistered = false;
  // Content scripts' ops may have been recorded by an earlier life of this worker.
  if (policy.kinds.size) tabs.ready().catch(() => {});

  const ready = (async () => {
    await init({ module_or_path: new URL('./pkg/outbox_bg.wasm', import.meta.url) });
    const outbox = await Outbox.open({ ...config, schedule, ...(backup && { backup }) });
    for (const name of Outbox.eventNames()) outbox.on(name, (event) => fanOut(name, event));
    return outbox;
  })();
  const wake = (reason) => ready.then((outbox) => outbox.wake(reason))
    .catch((error) => console.error(`outbox: wake(${reason}) failed`, error));

  ext.alarms.onAlarm.addListener((alarm) => { if (alarm.name === ALARM) wake('alarm'); });
  ext.runtime.onStartup.addListener(() => wake('start'));
  ext.runtime.onInstalled.addListener(() => wake('start'));
  // Fires in the Firefox event page and in windows; never in a Chrome service worker.
  globalThis.addEventListener('online', () => wake('online'));
  // Background Sync (Chrome only, and only registered while a page is open): best effort. A
  // wake, not a flush: a flush would also cut short an open circuit breaker.
  globalThis.addEventListener('sync', (event) => {
    if (event.tag === SYNC_TAG) event.waitUntil(wake('sync'));
  });
  ext.tabs?.onRemoved?.addListener((tabId) => tabs.forgetTab(tabId));
  ext.runtime.onMessage.addListener((message, sender, sendResponse) => {
    if (!message || typeof message.outbox !== 'string') return false;
    answer(message, sender).then(
      (result) => sendResponse({ ok: true, result }),
      (error) => sendResponse({ ok: false, error: { code: error.code ?? 'ERROR', message: String(error.message ?? error) } }));
    return true; // the answer is asynchronous
  });
  ext.runtime.onConnect.addListener((port) => {
    if (port.name !== STATUS_PORT) return;
    const role = roleOf(port.sender);
    if (role === 'extension-page') {
      watch({ port, role });
      registerSync();
      ready.then((outbox) => outbox.stats())
        .then((stats) => port.postMessage({ stats }))
        .catch(() => {}); // the port closed first, or the outbox failed to start (logged below)
    } else if (role === 'content-script' && policy.subscribe === 'own-tab') {
      const tab = port.sender.tab.id;
      watch({ port, role, tab });
      tabs.pendingOf(tab).then((pending) => port.postMessage({ own: { pending } })).catch(() => {});
    } else {
      refuse(role, 'subscribe');
      port.disconnect();
    }
  });
  ready.catch((error) => console.error('outbox: failed to start', error));
  return ready;

  function watch(entry) {
    ports.add(entry);
    entry.port.onDisconnect.addListener(() => ports.delete(entry));
  }

  // Every event reaches extension pages; a content script hears only its own tab's ops.
  function fanOut(name, event) {
    // `error` events are Error objects, whose fields do not survive messaging.
    const plain = name === 'error' ? { type: name, code: event.code, message: event.message } : event;
    const owner = plain.id ? tabs.owner(plain.id) : undefined;
    if (owner !== undefined) {
      if (plain.type === 'conflict' && plain.rebasedAs) tabs.handOn(plain.id, plain.rebasedAs);
      else if (ENDING.has(plain.type)) tabs.end(plain.id);
    }
    if (name === 'drained') syncRegistered = false;
    for (const entry of ports) {
      if (entry.role === 'content-script') continue;
      try {
        entry.port.postMessage({ event: plain });
      } catch {
        ports.delete(entry); // it went away
      }
    }
    if (owner === undefined) return;
    for (const entry of ports) {
      if (entry.role !== 'content-script' || entry.tab !== owner) continue;
      try {
        entry.port.postMessage({ event: plain });
      } catch {
        ports.delete(entry);
      }
    }
    tellTab(owner);
  }

  function refuse(role, method) {
    const what = `${role ?? 'unknown sender'}:${method}`;
    if (!refusalsLogged.has(what)) {
      refusalsLogged.add(what);
      console.warn(`outbox: refused ${method} from a ${role ?? 'sender outside this extension'} (logged once)`);
    }
    return forbidden(`${role ?? 'this sender'} may not call ${method}`);
  }

  async function answer(message, sender) {
    const method = message.outbox;
    const args = Array.isArray(message.args) ? message.args : [];
    const role = roleOf(sender);
    if (!PAGE_METHODS.has(method)) throw invalid(`unknown outbox method ${method}`);
    if (role === 'content-script') return answerContentScript(method, args, sender);
    if (role !== 'extension-page') throw refuse(role, method);
    const outbox = await started();
    if (QUEUEING_METHODS.has(method)) registerSync();
    if (method === 'finalState') return finalState(outbox, args[0]);
    if (method === 'renewBeacon') return renewBeacon(outbox, args[0]);
    return outbox[method](...args);
  }

  // What a content script may do: enqueue an allowed kind for its tab, perhaps arm a final
  // state, and nothing else. Its keys are kept apart per tab, so one page cannot replay
  // another's calls.
  async function answerContentScript(method, args, sender) {
    const tab = sender.tab.id;
    if (method === 'renewBeacon') {
      if (!policy.finalState) throw refuse('content-script', method);
      const id = args[0]?.id;
      if (tabs.owner(id) !== tab) throw refuse('content-script', `${method} of an op it did not make`);
      return renewBeacon(await started(), args[0]);
    }
    if (method !== 'enqueue' && !(method === 'finalState' && policy.finalState)) {
      throw refuse('content-script', method);
    }
    const request = args[0];
    if (!request || typeof request !== 'object' || Array.isArray(request)) throw invalid(`${method} takes a request object`);
    if (!policy.kinds.has(request.kind)) throw refuse('content-script', `${method} of kind ${JSON.stringify(request.kind)}`);
    if (policy.accept && !policy.accept(request, sender)) throw refuse('content-script', `${method} of this request`);
    const scoped = { ...request, ...(request.key != null && { key: `tab:${tab}:${request.key}` }) };
    const outbox = await started();
    registerSync();
    await tabs.ready();
    const result = method === 'finalState' ? await finalState(outbox, scoped) : await outbox.enqueue(scoped);
    const receipt = method === 'finalState' ? result.receipt : result;
    tabs.own(receipt.id, tab);
    tellTab(tab);
    return result;
  }

  // A content script's own count, after it changed.
  function tellTab(tab) {
    for (const entry of ports) {
      if (entry.role !== 'content-script' || entry.tab !== tab) continue;
      try {
        entry.port.postMessage({ own: { pending: tabs.countOf(tab) } });
      } catch {
        ports.delete(entry);
      }
    }
  }

  // A failed start is reported as UNAVAILABLE: a later call may reach a background that started.
  async function started() {
    try {
      return await ready;
    } catch (error) {
      throw Object.assign(new Error(`the outbox did not start: ${error.message ?? error}`), { code: 'UNAVAILABLE' });
    }
  }

  // The queued copy, plus what the page needs to send the same op itself as it closes: the body
  // and a URL carrying a beacon grant for exactly that op, never the credentials. Once the op is
  // queued this never fails: the receipt is what the page must not lose, and without a beacon
  // the queued copy is delivered all the same.
  async function finalState(outbox, request) {
    const receipt = await outbox.enqueue(request);
    return { receipt, ...(await beaconFor(outbox, receipt.seq)) };
  }

  // A fresh grant for an op still queued (a page that stays open longer than a grant lives).
  async function renewBeacon(outbox, { id, seq } = {}) {
    const beacon = await beaconFor(outbox, seq);
    // The seq must still name that op: a page may only renew its own.
    if (beacon.body && JSON.parse(beacon.body).ops[0].id !== id) return { body: null };
    return beacon;
  }

  async function beaconFor(outbox, seq) {
    try {
      const beacon = await outbox.beacon(seq);
      return beacon ?? { body: null };
    } catch (error) {
      console.warn('outbox: no beacon for the final state; the queued copy will carry it', error);
      return { body: null };
    }
  }

  // Registering needs an open extension page in Chrome (it rejects otherwise); Firefox has no
  // SyncManager. Either way delivery does not depend on it, so once per pending period is enough.
  function registerSync() {
    if (syncRegistered || !globalThis.registration?.sync) return;
    syncRegistered = true;
    globalThis.registration.sync.register(SYNC_TAG).catch(() => { syncRegistered = false; });
  }
}

/**
 * The second copy in `chrome.storage.local`: a LevelDB of its own, which Chromium did not lose
 * in any of the kills that made it drop the extension's IndexedDB (tests/killloop/FINDINGS.md).
 * One entry per op, under `outbox:<database>:`, so a write costs one small record.
 */
function storageLocalBackup(database, access) {
  const area = ext.storage?.local;
  if (!area) {
    console.warn('outbox: no chrome.storage.local (add the "storage" permission): no second copy is kept');
    return undefined;
  }
  if (access !== 'all') {
    // Chrome only (Firefox offers it for storage.session alone): there, content scripts can
    // read the copy, which docs/SECURITY.md says.
    Promise.resolve(area.setAccessLevel?.({ accessLevel: 'TRUSTED_CONTEXTS' }))
      .catch((error) => console.warn('outbox: could not close storage.local to content scripts', error));
  }
  const prefix = `outbox:${database}:`;
  return {
    async get(names) {
      const found = await area.get(names === null ? null : names.map((name) => prefix + name));
      const entries = {};
      for (const [name, value] of Object.entries(found)) {
        if (name.startsWith(prefix) && typeof value === 'string') entries[name.slice(prefix.length)] = value;
      }
      return entries;
    },
    async write(put, remove) {
      const names = Object.keys(put);
      if (names.length) await area.set(Object.fromEntries(names.map((name) => [prefix + name, put[name]])));
      if (remove.length) await area.remove(remove.map((name) => prefix + name));
    },
  };
}

/** Checks `contentScripts` and fills in the least-privilege defaults. */
function contentScriptPolicy(given = {}) {
  if (typeof given !== 'object' || given === null) throw invalid('contentScripts must be an object');
  const known = new Set(['kinds', 'finalState', 'subscribe', 'accept']);
  for (const key of Object.keys(given)) {
    if (!known.has(key)) throw invalid(`contentScripts.${key} is not an option`);
  }
  const { kinds = [], finalState = false, subscribe = false, accept } = given;
  if (!Array.isArray(kinds) || !kinds.every((k) => typeof k === 'string')) throw invalid('contentScripts.kinds must be an array of kinds');
  if (typeof finalState !== 'boolean') throw invalid('contentScripts.finalState must be a boolean');
  if (subscribe !== false && subscribe !== 'own-tab') throw invalid("contentScripts.subscribe must be 'own-tab' or false");
  if (accept !== undefined && typeof accept !== 'function') throw invalid('contentScripts.accept must be a function');
  return { kinds: new Set(kinds), finalState, subscribe, accept };
}

/**
 * Who sent a message or opened a port: `'extension-page'` (a page of this extension's own
 * origin: popup, options, a tab showing one of them), `'content-script'` (this extension's
 * script in a web page, so the page's renderer), or `null` (anything else).
 */
export function roleOf(sender) {
  if (!sender || sender.id !== ext.runtime.id) return null;
  const origin = new URL(ext.runtime.getURL('')).origin;
  let url;
  try {
    url = new URL(sender.url ?? '');
  } catch {
    return null;
  }
  if (url.origin === origin) return 'extension-page';
  return sender.tab?.id != null ? 'content-script' : null;
}

// chrome.alarms survive the service worker. The outbox keeps one alarm at its next wake-up
// (while a drain runs, at the latest time a send could still be in flight), so a worker that was
// stopped, even mid-send, is started again.
function schedule(at) {
  const done = at == null ? ext.alarms.clear(ALARM)
    : ext.alarms.create(ALARM, { when: Math.max(at, Date.now() + 100) });
  Promise.resolve(done).catch((error) => console.error('outbox: could not set the alarm', error));
}

/** Most op ids the ledger remembers; the oldest go first. */
const LEDGER_CAP = 10_000;
const LEDGER_KEY = 'outbox-tab-ops';

/**
 * Which tab enqueued which op, so that a content script hears only about its own. Kept in
 * `storage.session` where it exists (it survives the service worker, not the browser, and
 * content scripts cannot read it), else in memory. Best effort: an op whose entry is lost
 * (the worker died before the write) is simply not reported to its page.
 */
class TabLedger {
  #owners = new Map(); // op id -> tab id
  #loaded = null;

  ready() {
    this.#loaded ??= (async () => {
      const area = ext.storage?.session;
      if (!area) return;
      const stored = (await area.get(LEDGER_KEY).catch(() => ({})))[LEDGER_KEY] ?? {};
      for (const [id, tab] of Object.entries(stored)) if (!this.#owners.has(id)) this.#owners.set(id, tab);
    })();
    return this.#loaded;
  }

  owner(id) {
    return this.#owners.get(id);
  }

  own(id, tab) {
    this.#owners.set(id, tab);
    while (this.#owners.size > LEDGER_CAP) this.#owners.delete(this.#owners.keys().next().value);
    this.#save();
  }

  handOn(id, next) {
    const tab = this.#owners.get(id);
    this.#owners.delete(id);
    if (tab !== undefined) this.own(next, tab);
  }

  end(id) {
    if (this.#owners.delete(id)) this.#save();
  }

  forgetTab(tab) {
    for (const [id, owner] of this.#owners) if (owner === tab) this.#owners.delete(id);
    this.#save();
  }

  countOf(tab) {
    let n = 0;
    for (const owner of this.#owners.values()) if (owner === tab) n += 1;
    return n;
  }

  async pendingOf(tab) {
    await this.ready();
    return this.countOf(tab);
  }

  // After the stored entries are read, or this write would drop them.
  #save() {
    const area = ext.storage?.session;
    if (!area) return;
    this.ready().then(() => area.set({ [LEDGER_KEY]: Object.fromEntries(this.#owners) })).catch(() => {});
  }
}
