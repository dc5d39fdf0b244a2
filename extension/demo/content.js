// PR review tracker: the content script on a PR page. Each review action becomes an op on
// entity `pr/<n>`, applied to the page at once (optimistic) and delivered by the background.
// The build bundles this file with outbox-page.js (content scripts cannot be ES modules).
import { connectOutbox } from './outbox/outbox-page.js';
import config from './config.js';

const ext = globalThis.browser ?? globalThis.chrome;
const outbox = connectOutbox();
const pr = document.body.dataset.pr;
const entity = `pr/${pr}`;

// The version this page read from the server. An approval is checked against it; the outbox
// accounts for the reviewer's own actions queued ahead of it.
let loadedVersion = 0;

const badge = document.createElement('div');
badge.id = 'outbox-badge';
badge.style.cssText = 'position:fixed;right:12px;bottom:12px;padding:6px 10px;border-radius:6px;'
  + 'background:#24292f;color:#fff;font:12px system-ui;z-index:9999';
document.body.append(badge);

async function reviewer() {
  return (await ext.storage.local.get('reviewer')).reviewer ?? config.reviewer;
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
    badge.textContent = `not saved: ${error.message}`;
    throw error;
  }
}

for (const file of document.querySelectorAll('[data-file]')) {
  file.querySelector('.viewed').addEventListener('change', async (event) => {
    const path = file.dataset.file;
    await record('file-viewed', { viewed: { [path]: { [await reviewer()]: event.target.checked } } });
  });
}

document.getElementById('comment').addEventListener('click', async () => {
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

document.getElementById('approve').addEventListener('click', async () => {
  const by = await reviewer();
  document.getElementById('approve').textContent = 'Approved';
  await record('approve', { approval: { by, at: Date.now() } },
    { baseVersion: loadedVersion });
});

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

let retrying = null;
function show(stats) {
  badge.textContent = `outbox: ${stats.pending} pending`
    + (stats.pending && retrying ? ` · retrying (${retrying})` : '')
    + (stats.deadLetters ? ` · ${stats.deadLetters} failed` : '')
    + (stats.conflicts ? ` · ${stats.conflicts} conflicts` : '');
}

outbox.subscribe(async (message) => {
  if (message.event?.type === 'retry-scheduled') retrying = message.event.error;
  if (message.event?.type === 'delivered') retrying = null;
  show(message.stats ?? await outbox.stats());
});
load().then(() => { document.body.dataset.outboxReady = 'true'; },
  (error) => { badge.textContent = `could not load ${entity}: ${error.message}`; });
