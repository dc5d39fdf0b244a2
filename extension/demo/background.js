// PR review tracker: the background. Everything outbox needs is startOutbox(); the rest is the
// demo's own: where the token lives and a way for pages to read an entity's version.
import { startOutbox } from './outbox/outbox-background.js';
import config from './config.js';

const ext = globalThis.browser ?? globalThis.chrome;

async function token() {
  const { token } = await ext.storage.local.get('token');
  return token ?? config.token;
}

const outbox = startOutbox({
  endpoint: config.endpoint,
  // Read at send time, so a token saved in the popup is used by the very next request.
  auth: async () => ({ Authorization: `Bearer ${await token()}` }),
  // Lively for a demo, still realistic: retries within seconds, never faster than 200 ms.
  backoff: { baseMs: 200, capMs: 5000 },
  requestTimeoutMs: 5000,
  // A dead backend is probed every few seconds instead of every 30 s.
  breaker: { openMs: 3000, maxOpenMs: 30000 },
  kinds: {
    // An approval made against an old version of the PR waits for the user to decide.
    approve: { conflict: 'manual' },
    // Comments and viewed marks merge with whatever the others did.
    comment: { conflict: 'client-wins' },
    'file-viewed': { conflict: 'client-wins' },
    // The popup's summary: only its newest text matters.
    summary: { conflict: 'client-wins', coalesce: true },
  },
});

// A new token (the popup's login) resumes a queue that a 401 paused.
ext.storage.onChanged.addListener((changes, area) => {
  if (area === 'local' && changes.token) outbox.then((o) => o.wake('auth'));
});

// The PR page asks for the version it is looking at (the base of its approvals). The page's own
// origin is the backend's, but the token lives here, so the background reads it.
ext.runtime.onMessage.addListener((message, _sender, sendResponse) => {
  if (message?.demo !== 'entity') return false;
  (async () => {
    const url = `${config.endpoint}/v1/entities/${message.id}`;
    const response = await fetch(url, { headers: { Authorization: `Bearer ${await token()}` } });
    if (response.status === 404) return { version: 0, state: {} };
    if (!response.ok) throw new Error(`GET ${url}: ${response.status}`);
    return response.json();
  })().then((entity) => sendResponse({ ok: true, entity }),
    (error) => sendResponse({ ok: false, error: String(error.message ?? error) }));
  return true;
});
