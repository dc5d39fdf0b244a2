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
/** The methods that queue an op, after which a Background Sync is worth registering. */
const QUEUEING_METHODS = new Set(['enqueue', 'retryDeadLetter', 'resolveConflict', 'finalState']);
const EVENTS = ['delivered', 'retry-scheduled', 'dead-lettered', 'conflict', 'auth-required',
  'breaker-opened', 'breaker-closed', 'queue-full', 'drained', 'error'];

/**
 * Starts the outbox in the background context. `options` are those of `Outbox.open`, minus
 * `schedule` (mapped here to `chrome.alarms`). Returns a promise of the `Outbox`.
 */
export function startOutbox(options) {
  const ports = new Set();
  const ready = (async () => {
    await init({ module_or_path: new URL('./pkg/outbox_bg.wasm', import.meta.url) });
    const outbox = await Outbox.open({ ...options, schedule });
    for (const name of EVENTS) {
      outbox.on(name, (event) => {
        // `error` events are Error objects, whose fields do not survive postMessage.
        const plain = name === 'error' ? { type: name, code: event.code, message: event.message } : event;
        for (const port of ports) {
          try { port.postMessage({ event: plain }); } catch { ports.delete(port); } // it went away
        }
      });
    }
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
    ready.then((outbox) => outbox.stats())
      .then((stats) => port.postMessage({ stats }))
      .catch(() => {}); // the port closed first, or the outbox failed to start (logged below)
  });
  ready.catch((error) => console.error('outbox: failed to start', error));
  return ready;

  async function answer(ready, message) {
    const outbox = await ready;
    const method = message.outbox;
    if (method !== 'finalState' && !PAGE_METHODS.has(method)) {
      throw Object.assign(new Error(`unknown outbox method ${method}`), { code: 'INVALID_ARGUMENT' });
    }
    if (QUEUEING_METHODS.has(method)) registerSync();
    if (method === 'finalState') return finalState(outbox, message.args?.[0]);
    return outbox[method](...(message.args ?? []));
  }

  // The queued copy, plus what the page needs to send the same op itself as it closes. Once the
  // op is queued this never fails: the receipt is what the page must not lose, and without a
  // beacon the queued copy is delivered all the same.
  async function finalState(outbox, request) {
    const receipt = await outbox.enqueue(request);
    try {
      const body = await outbox.beaconBody(receipt.seq);
      const headers = (await options.auth?.()) ?? {};
      const bearer = Object.entries(headers).find(([name]) => name.toLowerCase() === 'authorization')?.[1];
      const token = bearer?.replace(/^Bearer\s+/i, '');
      return { receipt, url: `${options.endpoint.replace(/\/+$/, '')}/v1/beacon`, body, headers, token };
    } catch (error) {
      console.warn('outbox: no beacon for the final state; the queued copy will carry it', error);
      return { receipt, body: null };
    }
  }
}

// chrome.alarms survive the service worker. The outbox keeps one alarm at its next wake-up
// (while a drain runs, at the latest time a send could still be in flight), so a worker that was
// stopped, even mid-send, is started again.
function schedule(at) {
  const done = at == null ? ext.alarms.clear(ALARM)
    : ext.alarms.create(ALARM, { when: Math.max(at, Date.now() + 100) });
  Promise.resolve(done).catch((error) => console.error('outbox: could not set the alarm', error));
}

// Registering needs an open extension page in Chrome (it rejects otherwise); Firefox has no
// SyncManager. Either way delivery does not depend on it.
function registerSync() {
  globalThis.registration?.sync?.register(SYNC_TAG).catch(() => {});
}
