// PR review tracker: the background. Everything outbox needs is startOutbox(); the rest is the
// demo's own: where the token lives and a way for PR pages to read their entity's version.
import { roleOf, startOutbox } from './outbox/outbox-background.js';
import config from './config.js';
import secrets from './secrets.js';

const ext = globalThis.browser ?? globalThis.chrome;
/** The entities the demo knows: one per PR. */
const ENTITY = /^pr\/([0-9]{1,9})$/;

// The token lives in storage.session: in memory, gone when the browser closes, and not readable
// by content scripts. Where there is no storage.session (Firefox before 115), only this
// background's memory holds it (and a login would set it again).
const tokens = {
  memory: null,
  async get() {
    const area = ext.storage.session;
    const stored = area ? (await area.get('token')).token : this.memory;
    return stored ?? secrets.token;
  },
  async set(token) {
    if (ext.storage.session) await ext.storage.session.set({ token });
    else this.memory = token;
  },
};

// The PR number a content script's page is about, from the URL the browser says it is on.
function prOfPage(sender) {
  const n = new URL(sender.url).searchParams.get('n') ?? '17';
  return /^[0-9]{1,9}$/.test(n) ? n : null;
}

const outbox = startOutbox({
  endpoint: config.endpoint,
  // Read at send time, so a token saved in the popup is used by the very next request.
  auth: async () => ({ Authorization: `Bearer ${await tokens.get()}` }),
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
  // The PR page's content script records review actions on the PR it is on, and hears about
  // its own ops; it cannot read the queue, touch dead letters or conflicts, or send a summary.
  contentScripts: {
    kinds: ['file-viewed', 'comment', 'approve'],
    subscribe: 'own-tab',
    accept: (request, sender) => request.entity === `pr/${prOfPage(sender)}`,
  },
});

ext.runtime.onMessage.addListener((message, sender, sendResponse) => {
  if (typeof message?.demo !== 'string') return false;
  demo(message, sender).then((result) => sendResponse({ ok: true, ...result }),
    (error) => sendResponse({ ok: false, error: String(error.message ?? error) }));
  return true;
});

async function demo(message, sender) {
  const role = roleOf(sender);
  if (message.demo === 'set-token' && role === 'extension-page') {
    if (typeof message.token !== 'string' || !message.token) throw new Error('a token is a non-empty string');
    await tokens.set(message.token);
    // A new token resumes a queue that a 401 paused.
    (await outbox).wake('auth');
    return {};
  }
  if (message.demo === 'reviewer' && role) {
    const { reviewer } = await ext.storage.local.get('reviewer');
    return { reviewer: reviewer ?? config.reviewer };
  }
  if (message.demo === 'entity' && role) {
    // The PR page asks for the version it is looking at (the base of its approvals). The token
    // lives here, so the background reads it; a page may read only its own PR.
    const match = ENTITY.exec(String(message.id));
    if (!match || (role === 'content-script' && match[1] !== prOfPage(sender))) {
      throw new Error(`not an entity this page may read: ${JSON.stringify(message.id)}`);
    }
    const path = message.id.split('/').map(encodeURIComponent).join('/');
    const response = await fetch(`${config.endpoint}/v1/entities/${path}`,
      { headers: { Authorization: `Bearer ${await tokens.get()}` } });
    if (response.status === 404) return { entity: { version: 0, state: {} } };
    if (!response.ok) throw new Error(`GET entity ${message.id}: ${response.status}`);
    const { version, state } = await response.json();
    return { entity: { version, state } };
  }
  throw new Error(`the demo does not answer ${JSON.stringify(message.demo)} to this sender`);
}
