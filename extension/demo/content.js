// PR review tracker: the content script on a PR page. Each review action becomes an op on
// entity `pr/<n>`, applied to the page at once (optimistic) and delivered by the background.
// The build bundles this file with outbox-page.js (content scripts cannot be ES modules).
//
// The page around this script is not ours: its own scripts can dispatch events, rewrite
// attributes and call what we expose. So only events the user made count (`isTrusted`), the PR
// number comes from the URL and is checked against a pattern, and the background decides again
// what this script may do (see background.js `contentScripts`).
import { connectOutbox } from './outbox/outbox-page.js';
import config from './config.js';

const ext = globalThis.browser ?? globalThis.chrome;
const outbox = connectOutbox();
const pr = new URLSearchParams(location.search).get('n') ?? '17';
const valid = /^[0-9]{1,9}$/.test(pr);
const entity = `pr/${pr}`;

// The version this page read from the server. An approval is checked against it; the outbox
// accounts for the reviewer's own actions queued ahead of it.
let loadedVersion = 0;

const badge = document.createElement('div');
badge.id = 'outbox-badge';
badge.style.cssText = 'position:fixed;right:12px;bottom:12px;padding:6px 10px;border-radius:6px;'
  + 'background:#24292f;color:#fff;font:12px system-ui;z-index:9999';
document.body.append(badge);

// Who the reviewer is, as the background says (content scripts cannot read storage.local,
// which holds the outbox's copy of the queue).
let reviewerName = null;
async function reviewer() {
  reviewerName ??= ext.runtime.sendMessage({ demo: 'reviewer' })
    .then((reply) => (reply?.ok ? reply.reviewer : config.reviewer), () => config.reviewer);
  return reviewerName;
}

async function record(kind, payload, extra = {}) {
  try {
    const receipt = await outbox.enqueue({ entity, kind, payload, ...extra });
    // The ids of the ops this page made, for anyone (the demo's driver, a test) who wants to
    // follow them to the server.
    const root = document.documentElement;
    root.dataset.outboxOps = `${root.dataset.outboxOps ?? ''} ${kind}:${receipt.id}:${receipt.seq}`.trim();
    return receipt;
  } catch (error) {
    // Nothing was queued: say so where the user looks, rather than pretend it was saved.
    badge.textContent = `not saved (${error.code ?? 'ERROR'}): ${error.message}`;
    throw error;
  }
}

/** Runs `handler` for events the user made, never for ones the page's scripts dispatched. */
function onUser(target, type, handler) {
  target.addEventListener(type, (event) => {
    if (event.isTrusted) handler(event);
  });
}

function start() {
  for (const file of document.querySelectorAll('[data-file]')) {
    // `click`, not `change`: a script's box.click() fires a change event the browser marks
    // trusted, while the click itself is not. A real click or a Space on the box is trusted,
    // and the box is already toggled when it arrives.
    onUser(file.querySelector('.viewed'), 'click', async (event) => {
      const path = file.dataset.file;
      await record('file-viewed', { viewed: { [path]: { [await reviewer()]: event.target.checked } } });
    });
  }

  onUser(document.getElementById('comment'), 'click', async () => {
    const box = document.getElementById('comment-text');
    const text = box.value.trim();
    if (!text) return;
    box.value = '';
    const by = await reviewer();
    const item = document.createElement('li');
    item.textContent = `${by}: ${text}`;
    document.getElementById('comments').append(item);
    await record('comment', { comments: { [`c-${crypto.randomUUID()}`]: { by, text } } });
  });

  onUser(document.getElementById('approve'), 'click', async () => {
    const by = await reviewer();
    document.getElementById('approve').textContent = 'Approved';
    await record('approve', { approval: { by, at: Date.now() } }, { baseVersion: loadedVersion });
  });
}

async function load() {
  const reply = await ext.runtime.sendMessage({ demo: 'entity', id: entity });
  if (!reply?.ok) throw new Error(reply?.error ?? 'no answer from the background');
  loadedVersion = reply.entity.version;
  const comments = Object.values(reply.entity.state?.comments ?? {});
  document.getElementById('comments').replaceChildren(...comments.map(({ by, text }) => {
    const item = document.createElement('li');
    item.textContent = `${by}: ${text}`;
    return item;
  }));
  document.body.dataset.version = String(loadedVersion);
}

// What this page's own ops are doing: the background tells a content script nothing else.
let retrying = null;
let failed = 0;
let conflicts = 0;
let pending = 0;
function show() {
  badge.textContent = `outbox: ${pending} pending`
    + (pending && retrying ? ` · retrying (${retrying})` : '')
    + (failed ? ` · ${failed} failed` : '')
    + (conflicts ? ` · ${conflicts} conflicts` : '');
}

function follow() {
  outbox.subscribe((message) => {
    if (message.disconnected) {
      // The service worker stopped; ask again when it is back (the next message restarts it).
      setTimeout(follow, 1000);
      return;
    }
    const event = message.event;
    if (event?.type === 'retry-scheduled') retrying = event.error;
    if (event?.type === 'delivered') retrying = null;
    if (event?.type === 'dead-lettered') failed += 1;
    if (event?.type === 'conflict' && event.resolution === 'parked') conflicts += 1;
    if (message.own) pending = message.own.pending;
    show();
  });
}

if (!valid) {
  badge.textContent = 'outbox: not a PR page';
} else {
  start();
  follow();
  load().then(() => { document.body.dataset.outboxReady = 'true'; },
    (error) => { badge.textContent = `could not load ${entity}: ${error.message}`; });
}
