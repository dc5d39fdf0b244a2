// outbox background glue: the only file an extension's background script needs.
//
//   import { startOutbox } from './outbox/outbox-background.js';
//   const outbox = startOutbox({ endpoint: 'https://api.example.com', auth: async () => ({...}) });
//
// It runs in the Chrome MV3 service worker and in the Firefox MV3 event page. Every listener is
// registered synchronously, while the caller's module is evaluated: Chrome drops events whose
// listener is added after an `await`. Each listener waits for the wasm module and the database
// inside the handler instead.
import init, { Outbox } from './pkg/outbox.js';

const ext = globalThis.browser ?? globalThis.chrome;
const ALARM = 'outbox-wake';
const SYNC_TAG = 'outbox-sync';
/** The runtime-message methods pages may call (see outbox-page.js). */
const PAGE_METHODS = new Set(['enqueue', 'flush', 'stats', 'pending', 'deadLetters', 'retryDeadLetter',
  'discardDeadLetter', 'conflicts', 'resolveConflict']);
/** The page methods that queue an op, so a send follows (see `guard`). */
const QUEUEING_METHODS = new Set(['enqueue', 'retryDeadLetter', 'resolveConflict']);
const EVENTS = ['delivered', 'retry-scheduled', 'dead-lettered', 'conflict', 'auth-required',
  'breaker-opened', 'breaker-closed', 'queue-full', 'drained', 'error'];

/**
 * Starts the outbox in the background context. `options` are those of `Outbox.open`, minus
 * `schedule` (mapped here to `chrome.alarms`). Returns a promise of the `Outbox`.
 */
export function startOutbox(options) {
  const ports = new Set();
  const leaseMs = 2 * (options.requestTimeoutMs ?? 5000) + 1000;
  // The wasm arms the alarm when a drain goes idle. A worker stopped mid-send never gets there,
  // and a drain that ends just as an op is queued can miss that op (its wake is lost; seen in
  // Firefox). Either strands the queue until the next event. So while ops wait to be sent, an
  // alarm is due by the time a send's lease (two request timeouts) runs out; the drain's own
  // schedule may move it sooner, not later (see `schedule`). Guarding only while ops are pending
  // keeps an idle extension asleep; the cost is one spare wake after a burst of work.
  async function guard() {
    const at = Date.now() + leaseMs;
    guardUntil = at;
    const alarm = await ext.alarms.get(ALARM);
    if (!alarm || alarm.scheduledTime > at) await ext.alarms.create(ALARM, { when: at });
  }
  const guardIfPending = async (outbox) => { if ((await outbox.stats()).pending > 0) await guard(); };
  const ready = (async () => {
    await init({ module_or_path: new URL('./pkg/outbox_bg.wasm', import.meta.url) });
    const outbox = await Outbox.open({ ...options, schedule });
    for (const name of EVENTS) {
      outbox.on(name, (event) => {
        // `error` events are Error objects, whose fields do not survive postMessage.
        const plain = name === 'error' ? { type: name, code: event.code, message: event.message } : event;
        ports.forEach((port) => port.postMessage({ event: plain }));
      });
    }
    await guardIfPending(outbox); // open resumes the queue
    return outbox;
  })();
  const wake = (reason) => ready.then(async (outbox) => {
    await guardIfPending(outbox);
    return outbox.wake(reason);
  });

  ext.alarms.onAlarm.addListener((alarm) => { if (alarm.name === ALARM) wake('alarm'); });
  ext.runtime.onStartup.addListener(() => wake('start'));
  ext.runtime.onInstalled.addListener(() => wake('start'));
  // Fires in the Firefox event page and in windows; never in a Chrome service worker.
  globalThis.addEventListener('online', () => wake('online'));
  // Background Sync (Chrome only, and only registered while a page is open): best effort.
  globalThis.addEventListener('sync', (event) => {
    if (event.tag === SYNC_TAG) event.waitUntil(ready.then((outbox) => outbox.flush()));
  });
  ext.runtime.onMessage.addListener((message, _sender, sendResponse) => {
    if (!message || typeof message.outbox !== 'string') return false;
    answer(ready, message).then(
      (result) => sendResponse({ ok: true, result }),
      (error) => sendResponse({ ok: false, error: { code: error.code ?? 'ERROR', message: String(error.message ?? error) } }));
    return true; // the answer is asynchronous
  });
  ext.runtime.onConnect.addListener((port) => {
    if (port.name !== 'outbox-status') return;
    ports.add(port);
    port.onDisconnect.addListener(() => ports.delete(port));
    registerSync();
    ready.then((outbox) => outbox.stats()).then((stats) => port.postMessage({ stats }), () => {});
  });
  ready.catch((error) => console.error('outbox: failed to start', error));
  return ready;

  async function answer(ready, message) {
    const outbox = await ready;
    if (message.outbox === 'finalState') return guard().then(() => finalState(outbox, message.args?.[0]));
    if (!PAGE_METHODS.has(message.outbox)) throw Object.assign(new Error(`unknown outbox method ${message.outbox}`), { code: 'INVALID_ARGUMENT' });
    registerSync();
    if (QUEUEING_METHODS.has(message.outbox)) await guard();
    else if (message.outbox === 'flush') await guardIfPending(outbox);
    return outbox[message.outbox](...(message.args ?? []));
  }

  // The queued copy, plus what the page needs to send the same op itself as it closes.
  async function finalState(outbox, request) {
    const receipt = await outbox.enqueue(request);
    const body = await outbox.beaconBody(receipt.seq);
    const headers = (await options.auth?.()) ?? {};
    const bearer = Object.entries(headers).find(([name]) => name.toLowerCase() === 'authorization')?.[1];
    const token = bearer?.replace(/^Bearer\s+/i, '');
    return { receipt, url: `${options.endpoint.replace(/\/+$/, '')}/v1/beacon`, body, headers, token };
  }
}

/** The deadline of the last guard (see startOutbox); it stands until it passes. */
let guardUntil = 0;

// chrome.alarms survive the service worker; the outbox asks for one at its next wake-up.
function schedule(at) {
  const guarded = guardUntil > Date.now() ? guardUntil : null;
  const when = at == null ? guarded : Math.min(at, guarded ?? at);
  if (when == null) return void ext.alarms.clear(ALARM);
  ext.alarms.create(ALARM, { when: Math.max(when, Date.now() + 100) });
}

// Registering needs an open extension page in Chrome (it rejects otherwise); Firefox has no
// SyncManager. Either way delivery does not depend on it.
function registerSync() {
  globalThis.registration?.sync?.register(SYNC_TAG).catch(() => {});
}
