// outbox page helper, for the popup, the options page and content scripts. It talks to the
// background's outbox through runtime messages; it never opens the database itself (a content
// script's IndexedDB is the web page's, not the extension's) and never sees a credential.
//
//   import { connectOutbox } from './outbox/outbox-page.js';
//   const outbox = connectOutbox();
//   await outbox.enqueue({ entity: 'pr/17', kind: 'approve', payload: { approved: true } });
//   const stop = outbox.subscribe((message) => render(message));
//
// Every call that changes something carries an idempotency key made here, before it leaves the
// page. When the answer is lost (the service worker died mid-call, or was not running yet), the
// call is sent again with the same key, with backoff, until `deadlineMs`; the background answers
// a repeat with the first answer. So a call resolves once, or rejects with a coded error after
// which calling again with the same `key` is still safe: no call leaves the caller unsure
// whether its op exists.
const ext = globalThis.browser ?? globalThis.chrome;

/** Codes a call may reject with that come from here rather than from the background. */
export const PAGE_ERRORS = ['UNAVAILABLE'];

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function coded(code, message) {
  return Object.assign(new Error(message), { name: 'OutboxError', code });
}

/**
 * Whether a messaging failure means "the answer never came" (so the same message may be sent
 * again) rather than "this page can no longer talk to its extension". Chrome and Firefox word
 * these differently; every one of them leaves the call's outcome unknown, which the key settles.
 */
function lostAnswer(error) {
  const text = String(error?.message ?? error);
  return /message channel closed|message port closed|Receiving end does not exist|Could not establish connection|disconnected port|before a response|did not answer/i.test(text);
}

/**
 * The background outbox's API, over runtime messages.
 *
 * `options.deadlineMs` (default 30 s) bounds how long a call keeps trying to reach the
 * background before it rejects with `UNAVAILABLE`.
 */
export function connectOutbox({ deadlineMs = 30_000 } = {}) {
  let armed = null;

  async function call(method, ...args) {
    const message = { outbox: method, args };
    const deadline = Date.now() + deadlineMs;
    let delay = 50;
    let last = 'no answer';
    for (;;) {
      let reply;
      try {
        reply = await ext.runtime.sendMessage(message);
      } catch (error) {
        if (!lostAnswer(error)) {
          // "Extension context invalidated" and the like: this page outlived its extension.
          throw coded('UNAVAILABLE', `the extension cannot be reached: ${error?.message ?? error}`);
        }
        last = String(error?.message ?? error);
      }
      if (reply?.ok) return reply.result;
      if (reply && !reply.ok && reply.error?.code !== 'UNAVAILABLE') {
        throw coded(reply.error?.code ?? 'ERROR', reply.error?.message ?? 'the background refused');
      }
      if (reply) last = reply.error.message;
      if (Date.now() + delay > deadline) {
        throw coded('UNAVAILABLE', `the background did not answer within ${deadlineMs} ms (${last}); `
          + 'calling again with the same key is safe');
      }
      await sleep(delay * (0.75 + Math.random() / 2));
      delay = Math.min(delay * 2, 2000);
    }
  }

  // A key for a call that changes something: the caller's, or a fresh one.
  const keyed = (options) => ({ key: options?.key ?? crypto.randomUUID() });

  return {
    /** Queues an op; resolves with its receipt once it is on disk. `request.key` is optional. */
    enqueue: (request) => call('enqueue', { ...request, ...keyed(request) }),
    flush: () => call('flush'),
    stats: () => call('stats'),
    pending: (limit) => call('pending', limit),
    deadLetters: () => call('deadLetters'),
    retryDeadLetter: (id, options) => call('retryDeadLetter', id, keyed(options)),
    discardDeadLetter: (id, options) => call('discardDeadLetter', id, keyed(options)),
    conflicts: () => call('conflicts'),
    resolveConflict: (id, resolution, options) => call('resolveConflict', id, resolution, keyed(options)),

    /**
     * Live status. An extension page gets `listener({stats})` once, then `listener({event})` for
     * every outbox event; a content script (when the extension allows it) gets `{own: {pending}}`
     * and the events of its own tab's ops only. `listener({disconnected: true})` says the
     * background went away. Returns a function that stops the subscription.
     */
    subscribe(listener) {
      const port = ext.runtime.connect({ name: 'outbox-status' });
      port.onMessage.addListener(listener);
      // The port dies with the background (a stopped service worker): say so rather than go
      // quiet. Subscribing again restarts the background and sends fresh status.
      port.onDisconnect.addListener(() => listener({ disconnected: true }));
      return () => port.disconnect();
    },

    /**
     * Makes `request` the state this page leaves behind. It is queued in the background at once,
     * and the same op (same id and seq) is also sent by the page itself when it closes:
     * `fetchLater` where it exists, else `sendBeacon` on `pagehide`, to a URL that carries a
     * grant for exactly that op (never a credential). The server applies whichever copy comes
     * first and answers the other as a duplicate. Calling again replaces what an earlier call
     * armed. Resolves with the queued op's receipt.
     */
    async sendFinalStateOnClose(request) {
      const final = await call('finalState', { ...request, ...keyed(request) });
      armed?.cancel();
      armed = final.body ? arm(final, final.receipt, call) : null;
      return final.receipt;
    },
  };
}

/** How long before a grant expires the page asks for a new one. */
const RENEW_BEFORE_MS = 30_000;

function arm(beacon, receipt, call) {
  let current = send(beacon);
  let timer = null;
  const renewLater = (expiresAt) => {
    timer = setTimeout(async () => {
      const fresh = await call('renewBeacon', { id: receipt.id, seq: receipt.seq }).catch(() => null);
      current.cancel();
      // No body: the op has left the queue (delivered), so there is nothing left to send.
      current = fresh?.body ? send(fresh) : { cancel() {} };
      if (fresh?.body) renewLater(fresh.expiresAt);
    }, Math.max(10_000, expiresAt - Date.now() - RENEW_BEFORE_MS));
  };
  if (beacon.expiresAt) renewLater(beacon.expiresAt);
  return {
    cancel() {
      clearTimeout(timer);
      current.cancel();
    },
  };
}

// The envelope goes as text/plain, which needs no CORS preflight (sendBeacon cannot send one).
function send({ url, body }) {
  if (typeof globalThis.fetchLater === 'function') {
    const controller = new AbortController();
    try {
      // Sent when the document goes away (or never, if cancelled first).
      globalThis.fetchLater(url, { method: 'POST', body, signal: controller.signal,
        headers: { 'content-type': 'text/plain' } });
      return { cancel: () => controller.abort() };
    } catch {
      // Over the deferred-fetch quota, or an endpoint it refuses: fall back to the beacon.
    }
  }
  const onHide = () => navigator.sendBeacon(url, new Blob([body], { type: 'text/plain' }));
  globalThis.addEventListener('pagehide', onHide);
  return { cancel: () => globalThis.removeEventListener('pagehide', onHide) };
}
