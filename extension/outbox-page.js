// outbox page helper, for the popup, the options page and content scripts. It talks to the
// background's outbox through runtime messages; it never opens the database itself (a content
// script's IndexedDB is the web page's, not the extension's).
//
//   import { connectOutbox } from './outbox/outbox-page.js';
//   const outbox = connectOutbox();
//   await outbox.enqueue({ entity: 'pr/17', kind: 'approve', payload: { approved: true } });
//   const stop = outbox.subscribe((message) => render(message));
const ext = globalThis.browser ?? globalThis.chrome;

async function call(method, ...args) {
  const reply = await ext.runtime.sendMessage({ outbox: method, args });
  if (!reply) throw Object.assign(new Error('the background did not answer'), { code: 'UNAVAILABLE' });
  if (!reply.ok) throw Object.assign(new Error(reply.error.message), { code: reply.error.code });
  return reply.result;
}

/** The background outbox's API, over runtime messages. */
export function connectOutbox() {
  let armed = null;
  return {
    enqueue: (request) => call('enqueue', request),
    flush: () => call('flush'),
    stats: () => call('stats'),
    pending: (limit) => call('pending', limit),
    deadLetters: () => call('deadLetters'),
    retryDeadLetter: (id) => call('retryDeadLetter', id),
    discardDeadLetter: (id) => call('discardDeadLetter', id),
    conflicts: () => call('conflicts'),
    resolveConflict: (id, resolution) => call('resolveConflict', id, resolution),

    /**
     * Live status: `listener({stats})` once, then `listener({event})` for every outbox event,
     * and `listener({disconnected: true})` if the background goes away. Returns a function that
     * stops the subscription.
     */
    subscribe(listener) {
      const port = ext.runtime.connect({ name: 'outbox-status' });
      port.onMessage.addListener(listener);
      // The port dies with the background (a stopped service worker): say so rather than go
      // quiet. Subscribing again restarts the background and sends fresh {stats}.
      port.onDisconnect.addListener(() => listener({ disconnected: true }));
      return () => port.disconnect();
    },

    /**
     * Makes `request` the state this page leaves behind. It is queued in the background at once,
     * and the same op (same id and seq) is also sent by the page itself when it closes:
     * `fetchLater` where it exists, else `sendBeacon` on `pagehide`. The server applies
     * whichever copy comes first and answers the other as a duplicate. Calling again replaces
     * what an earlier call armed. Resolves with the queued op's receipt.
     */
    async sendFinalStateOnClose(request) {
      const final = await call('finalState', request);
      armed?.cancel();
      armed = final.body ? arm(final) : null;
      return final.receipt; // never an error once queued: a retry would queue it twice
    },
  };
}

function arm({ url, body, headers, token }) {
  if (typeof globalThis.fetchLater === 'function') {
    const controller = new AbortController();
    try {
      // Sent when the document goes away (or never, if cancelled first).
      globalThis.fetchLater(url, { method: 'POST', body, signal: controller.signal,
        headers: { ...headers, 'content-type': 'text/plain' } });
      return { cancel: () => controller.abort() };
    } catch {
      // Over the deferred-fetch quota, or an endpoint it refuses: fall back to the beacon.
    }
  }
  // sendBeacon cannot carry headers, so the token rides in the envelope.
  const envelope = token ? JSON.stringify({ ...JSON.parse(body), access_token: token }) : body;
  const onHide = () => navigator.sendBeacon(url, new Blob([envelope], { type: 'text/plain' }));
  globalThis.addEventListener('pagehide', onHide);
  return { cancel: () => globalThis.removeEventListener('pagehide', onHide) };
}
