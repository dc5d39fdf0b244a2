// PR review tracker: the popup. Live status of the queue, with the actions the user may take on
// what delivery cannot settle alone (dead letters, conflicts, a refused token).
import { connectOutbox } from './outbox/outbox-page.js';
import config from './config.js';

const ext = globalThis.browser ?? globalThis.chrome;
const outbox = connectOutbox();
const $ = (id) => document.getElementById(id);
// The PR whose summary this popup edits: ?pr=N, else the demo's PR #17.
const ENTITY = `pr/${new URLSearchParams(location.search).get('pr') ?? 17}`;
let nextAttemptAt = null;
let hold = null;

function text(tag, content, className) {
  const node = document.createElement(tag);
  node.textContent = content;
  if (className) node.className = className;
  return node;
}

function button(label, className, action) {
  const node = text('button', label, className);
  node.addEventListener('click', () => act(action));
  return node;
}

// Every action reports its failure in the popup instead of failing silently.
async function act(action) {
  try {
    $('error').hidden = true;
    await action();
  } catch (error) {
    $('error').textContent = `${error.code ?? 'ERROR'}: ${error.message}`;
    $('error').hidden = false;
  }
  refresh();
}

function describe(op) {
  return `${op.kind} on ${op.entity ?? '(none)'} · seq ${op.seq}`;
}

function showStats(stats) {
  $('pending').textContent = stats.pending;
  $('in-flight').textContent = stats.inFlight;
  // While paused or cut off by the breaker, the next attempt is not a time but a condition.
  hold = stats.paused ? 'after a new token' : stats.breaker.state !== 'closed' ? 'after the probe' : null;
  nextAttemptAt = stats.nextAttemptAt;
  tick();
  const breaker = stats.breaker;
  $('breaker').textContent = breaker.state
    + (breaker.until ? ` (${Math.max(0, Math.ceil((breaker.until - Date.now()) / 1000))} s)` : '');
  $('breaker').className = breaker.state;
  $('auth').hidden = !stats.paused;
  document.body.dataset.pending = String(stats.pending);
  document.body.dataset.breaker = breaker.state;
  document.body.dataset.paused = String(stats.paused);
}

function tick() {
  if (hold) return void ($('next-retry').textContent = hold);
  const wait = nextAttemptAt == null ? null : Math.max(0, nextAttemptAt - Date.now());
  $('next-retry').textContent = wait == null ? '—' : wait < 1000 ? 'now' : `in ${Math.ceil(wait / 1000)} s`;
}

function showQueue(ops) {
  $('queue').replaceChildren(...ops.map((op) => {
    const item = text('li', describe(op));
    if (op.attempts) item.append(text('span', ` · ${op.attempts} attempt${op.attempts === 1 ? '' : 's'}`, 'dim'));
    if (op.lastError) item.append(text('div', op.lastError, 'dim'));
    return item;
  }));
  if (!ops.length) $('queue').append(text('li', 'empty', 'dim'));
}

function showDeadLetters(letters) {
  $('dead-letters').replaceChildren(...letters.map((letter) => {
    const item = text('li', `${describe(letter.op)}: ${letter.reason} `);
    item.dataset.id = letter.op.id;
    item.append(button('Retry', 'retry', () => outbox.retryDeadLetter(letter.op.id)), ' ',
      button('Discard', 'discard', () => outbox.discardDeadLetter(letter.op.id)));
    return item;
  }));
  if (!letters.length) $('dead-letters').append(text('li', 'none', 'dim'));
}

function showConflicts(conflicts) {
  $('conflicts').replaceChildren(...conflicts.map((conflict) => {
    const card = $('conflict').content.firstElementChild.cloneNode(true);
    card.dataset.id = conflict.op.id;
    card.querySelector('h3').textContent = describe(conflict.op);
    card.querySelector('.mine').textContent = JSON.stringify(conflict.op.payload, null, 1);
    const theirs = card.querySelector('.theirs');
    theirs.textContent = JSON.stringify(conflict.serverState, null, 1);
    // The server sends an entity's state once per answer and never on a replay: read it then.
    if (conflict.serverStateOmitted) {
      theirs.textContent = '…';
      ext.runtime.sendMessage({ demo: 'entity', id: conflict.op.entity })
        .then((reply) => {
          if (!reply?.ok) throw new Error(reply?.error ?? 'the background did not answer');
          theirs.textContent = JSON.stringify(reply.entity.state, null, 1);
        })
        .catch((error) => { theirs.textContent = `(not available: ${error.message})`; });
    }
    card.querySelector('.version').textContent = `(v${conflict.serverVersion})`;
    card.querySelector('.keep-mine').addEventListener('click',
      () => act(() => outbox.resolveConflict(conflict.op.id, 'keep-mine')));
    card.querySelector('.take-theirs').addEventListener('click',
      () => act(() => outbox.resolveConflict(conflict.op.id, 'take-theirs')));
    return card;
  }));
  if (!conflicts.length) $('conflicts').append(text('p', 'none', 'dim'));
}

// Lists are rebuilt only when their content changed: a rebuild under the pointer would swallow
// the click on a Retry or Keep mine button.
const shown = new Map();
function unchanged(name, data) {
  const json = JSON.stringify(data);
  if (shown.get(name) === json) return true;
  shown.set(name, json);
  return false;
}

let refreshing = null;
async function refresh() {
  // Coalesce bursts of events into one round of reads.
  refreshing ??= (async () => {
    try {
      const [stats, ops, letters, conflicts] = await Promise.all([
        outbox.stats(), outbox.pending(20), outbox.deadLetters(), outbox.conflicts()]);
      showStats(stats);
      unchanged('queue', ops) || showQueue(ops);
      unchanged('dead-letters', letters) || showDeadLetters(letters);
      unchanged('conflicts', conflicts) || showConflicts(conflicts);
      document.body.dataset.ready = 'true';
    } catch (error) {
      $('error').textContent = `status unavailable: ${error.message}`;
      $('error').hidden = false;
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

// What just happened, newest first: the events this popup saw while open.
function summarize(event) {
  switch (event.type) {
    case 'delivered': return `${event.kind} on ${event.entity} delivered (v${event.version})${event.duplicate ? ', a duplicate' : ''}`;
    case 'retry-scheduled': return `retry in ${event.delayMs < 1000 ? `${event.delayMs} ms` : `${(event.delayMs / 1000).toFixed(1)} s`}: ${event.error}`;
    case 'dead-lettered': return `${event.kind} failed for good: ${event.reason}`;
    case 'conflict': return `${event.kind} on ${event.entity} conflicts with v${event.serverVersion} (${event.resolution})`;
    case 'auth-required': return 'the server refused the token; paused';
    case 'breaker-opened': return 'too many failures; pausing until a health probe succeeds';
    case 'breaker-closed': return 'the server is back';
    case 'queue-full': return `queue full (${event.limit} ${event.max})`;
    case 'error': return `error ${event.code}: ${event.message}`;
    default: return null; // `drained` shows in the counters
  }
}

outbox.subscribe((message) => {
  const line = message.event && summarize(message.event);
  if (line) {
    const list = $('activity');
    list.querySelector('.dim')?.remove();
    list.prepend(text('li', `${new Date().toLocaleTimeString()} ${line}`));
    while (list.children.length > 6) list.lastChild.remove();
  }
  refresh();
});
// In flight and the countdowns change without events.
setInterval(refresh, 1000);
setInterval(tick, 250);
$('summary-entity').textContent = ENTITY;
refresh();

// The token goes to the background, which keeps it in storage.session and resumes the queue.
$('save-token').addEventListener('click', () => act(async () => {
  const token = $('token').value.trim();
  if (token) {
    const reply = await ext.runtime.sendMessage({ demo: 'set-token', token });
    if (!reply?.ok) throw new Error(reply?.error ?? 'the background did not answer');
  }
  $('token').value = '';
}));

// The summary is this page's final state: queued at once and also sent as the popup closes.
let typing = null;
$('summary').addEventListener('input', () => {
  clearTimeout(typing);
  typing = setTimeout(() => act(async () => {
    const { reviewer = config.reviewer } = await ext.storage.local.get('reviewer');
    const receipt = await outbox.sendFinalStateOnClose({ entity: ENTITY, kind: 'summary',
      payload: { summary: { [reviewer]: $('summary').value } } });
    document.body.dataset.finalState = receipt.id;
  }), 300);
});
