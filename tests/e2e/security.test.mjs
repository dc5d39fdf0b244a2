// The extension boundary under attack (docs/SECURITY.md): a hostile page, a compromised
// renderer playing the demo's content script, and stolen beacon grants. Each test runs the
// built demo in headless Chromium against its own server and reads the outcome from the server
// and from what the attacker's script received.
import assert from 'node:assert/strict';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { deliveredOnce, entriesOf, tookEffect } from './lib/delivery.mjs';
import { chromiumEnv } from './lib/env.mjs';
import { RENEWED_TOKEN, TENANT, TOKEN } from './lib/server.mjs';
import { until } from './lib/wait.mjs';

const HOSTILE = fileURLToPath(new URL('./fixtures/hostile-content.js', import.meta.url));
const OTHER_TOKEN = 'other-tenant-token';
const SECRETS = [TOKEN, RENEWED_TOKEN, OTHER_TOKEN];

/** Every call a content script may not make. */
const FORBIDDEN_CALLS = ['stats', 'pending', 'deadLetters', 'conflicts', 'flush', 'retryDeadLetter',
  'discardDeadLetter', 'resolveConflict', 'finalState', 'renewBeacon', 'enqueue forbidden kind',
  'enqueue another page\'s entity'];

function assertNoSecret(what, value) {
  const text = typeof value === 'string' ? value : JSON.stringify(value);
  for (const secret of SECRETS) assert.ok(!text.includes(secret), `${what} contains a bearer token`);
}

/** Opens the PR page with the attacker active, and waits for its report. */
async function attack(env, n, target) {
  const page = await env.browser.context.newPage();
  const query = new URLSearchParams({ n: String(n), hostile: '1', ...(target && { target }) });
  await page.goto(`${env.server.url}/demo/pr.html?${query}`);
  const report = await until(async () => {
    const json = await page.evaluate(() => document.documentElement.dataset.hostile);
    const parsed = json && JSON.parse(json);
    return parsed?.done && parsed;
  }, { what: 'the hostile content script to try every call' });
  return { page, report };
}

/** Raw runtime messages from an extension page (the popup), which may call everything. */
async function fromPopup(env, message) {
  const popup = await env.browser.popup();
  try {
    return await popup.evaluate((message) => chrome.runtime.sendMessage(message), message);
  } finally {
    await popup.close();
  }
}

test('security: synthetic events from the page enqueue nothing; the user\'s own click does', async (t) => {
  const env = await chromiumEnv(t);
  const page = await env.openPr(env.pr());
  // The page's own scripts (page.evaluate runs in the page's world) fake every action.
  await page.page.evaluate(() => {
    document.getElementById('comment-text').value = 'forged';
    document.getElementById('comment').click();
    document.getElementById('approve').dispatchEvent(new MouseEvent('click', { bubbles: true }));
    const box = document.querySelector('[data-file="README.md"] .viewed');
    box.click();
    box.dispatchEvent(new Event('change', { bubbles: true }));
  });
  await page.comment('A real click.');
  const [op, ...more] = await page.queued();
  assert.equal(more.length, 0, 'only the trusted click was queued');
  await deliveredOnce(env.server, [op]);
  const log = await env.server.log();
  assert.deepEqual(log.map((e) => e.kind), ['comment'], 'the server saw one op, the real one');
  const entity = await env.server.entity(page.entity);
  assert.equal(entity.version, 1);
  assert.ok(!JSON.stringify(entity.state).includes('forged'));
  assert.equal(entity.state.approval, undefined);
});

test('security: a content script is refused everything but the kinds it may enqueue for its own page', async (t) => {
  const env = await chromiumEnv(t, { extraContentScripts: [HOSTILE] });
  const n = env.pr();
  // A real dead letter for the attacker to try to retry and discard.
  await env.server.faults({ route: 'ops', tenant: TENANT, times: 1, action: { status: 422 } });
  const victim = await env.openPr(n);
  await victim.comment('Refused by the server.');
  const [dead] = await victim.queued();
  const popup = await env.browser.popup(`popup.html?pr=${n}`);
  await popup.locator(`#dead-letters li[data-id="${dead.id}"]`).waitFor({ timeout: 30_000 });

  const { report } = await attack(env, n, dead.id);
  for (const name of FORBIDDEN_CALLS) {
    assert.equal(report.calls[name]?.code, 'FORBIDDEN', `${name}: ${JSON.stringify(report.calls[name])}`);
  }
  assert.equal(report.calls['unknown method'].code, 'INVALID_ARGUMENT');
  assert.equal(report.calls['read another entity'].ok, false, 'a page reads only its own PR');
  assert.equal(report.calls['set the token'].ok, false, 'a page cannot set the token');
  assert.equal(report.calls['read storage.local'].ok, false,
    `the queue's copy is out of a content script's reach: ${JSON.stringify(report.calls['read storage.local'])}`);
  assert.equal(report.calls['enqueue allowed'].ok, true, JSON.stringify(report.calls['enqueue allowed']));
  assertNoSecret('what the content script received', report.received);

  // The dead letter is untouched, and the allowed op is delivered.
  await popup.reload();
  await popup.locator(`#dead-letters li[data-id="${dead.id}"]`).waitFor();
  await popup.close();
  const allowed = { kind: 'comment', id: report.calls['enqueue allowed'].result.id };
  await deliveredOnce(env.server, [allowed]);
  const log = await env.server.log();
  assert.deepEqual(log.filter(tookEffect).map((e) => e.id), [allowed.id], 'nothing else took effect');

  // Nothing a content script loads holds a token: the glue and every bundled script.
  for (const file of await readdir(env.extension)) {
    if (file.endsWith('.js') && !['background.js', 'secrets.js'].includes(file)) {
      assertNoSecret(file, await readFile(join(env.extension, file), 'utf8'));
    }
  }
  assertNoSecret('outbox-page.js', await readFile(join(env.extension, 'outbox/outbox-page.js'), 'utf8'));
});

test('security: a content script hears the events of its own tab\'s ops only', async (t) => {
  const env = await chromiumEnv(t, { extraContentScripts: [HOSTILE] });
  const n = env.pr();
  const other = await env.openPr(n);
  await other.comment('From another tab.');
  const [theirs] = await other.queued();
  await deliveredOnce(env.server, [theirs]);
  const { page, report: first } = await attack(env, n);
  const mine = first.calls['enqueue allowed'].result.id;
  // Another tab acts while the attacker listens.
  await other.comment('Also from another tab.');
  const [, later] = await other.queued();
  await deliveredOnce(env.server, [later, { kind: 'comment', id: mine }]);
  const report = await until(async () => {
    const parsed = JSON.parse(await page.evaluate(() => document.documentElement.dataset.hostile));
    return parsed.received.some((m) => m?.event?.type === 'delivered' && m.event.id === mine) && parsed;
  }, { what: 'the attacker to hear its own op delivered' });
  const events = report.received.filter((m) => m?.event).map((m) => m.event);
  assert.ok(events.every((e) => e.id === mine), `only its own op: ${JSON.stringify(events)}`);
  assert.ok(!events.some((e) => e.type === 'drained' || e.type?.startsWith('breaker')), 'no queue-wide events');
  assert.ok(!report.received.some((m) => m?.stats), 'no queue stats');
  assertNoSecret('the attacker\'s port', report.received);
});

test('security: an extension page gets the whole API', async (t) => {
  const env = await chromiumEnv(t);
  for (const method of ['stats', 'pending', 'deadLetters', 'conflicts']) {
    const reply = await fromPopup(env, { outbox: method, args: [] });
    assert.equal(reply.ok, true, `${method}: ${JSON.stringify(reply)}`);
  }
  const reply = await fromPopup(env, { outbox: 'enqueue', args: [{ entity: 'doc/1', kind: 'summary', payload: { s: 1 }, key: 'k-1' }] });
  assert.equal(reply.ok, true, JSON.stringify(reply));
  const again = await fromPopup(env, { outbox: 'enqueue', args: [{ entity: 'doc/1', kind: 'summary', payload: { s: 1 }, key: 'k-1' }] });
  assert.deepEqual([again.result.id, again.result.replayed], [reply.result.id, true], 'a repeated call is one op');
});

test('security: a beacon grant works once for its op and is refused expired, for another op, or from another tenant', async (t) => {
  const env = await chromiumEnv(t, { serverFlags: ['--grant-ttl', '3s', '--token', `other=${OTHER_TOKEN}`] });
  // Held on the server, so the grant is what delivers the op first.
  await env.server.faults({ route: 'ops', tenant: TENANT, times: 100, action: { delay_ms: 2500 } });
  const final = await fromPopup(env, { outbox: 'finalState', args: [{ entity: 'pr/1', kind: 'summary', payload: { summary: { you: 'bye' } }, key: 'f-1' }] });
  assert.equal(final.ok, true, JSON.stringify(final));
  const { receipt, url, body } = final.result;
  assertNoSecret('the final state a page gets', final.result);
  assert.ok(url.includes('/v1/beacon?grant='), url);
  const post = (to, text) => fetch(to, { method: 'POST', headers: { 'content-type': 'text/plain' }, body: text });

  const envelope = JSON.parse(body);
  const forged = structuredClone(envelope);
  forged.ops[0].payload = { summary: { you: 'forged' } };
  assert.equal((await post(url, JSON.stringify(forged))).status, 403, 'another body under the granted op id');
  const otherOp = structuredClone(envelope);
  otherOp.ops[0].id = crypto.randomUUID();
  assert.equal((await post(url, JSON.stringify(otherOp))).status, 403, 'another op id');

  // A grant the other tenant got for its own client cannot carry this tenant's op.
  const otherClient = crypto.randomUUID();
  const otherGrant = await fetch(`${env.server.url}/v1/grants`, {
    method: 'POST', headers: { authorization: `Bearer ${OTHER_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify({ client: otherClient, ops: [{ ...envelope.ops[0], id: crypto.randomUUID() }] }),
  });
  assert.equal(otherGrant.status, 200, await otherGrant.clone().text());
  const stolen = `${env.server.url}/v1/beacon?grant=${encodeURIComponent((await otherGrant.json()).grant)}`;
  assert.equal((await post(stolen, body)).status, 403, 'another tenant\'s grant');

  assert.equal((await post(url, body)).status, 200, 'the granted op');
  const op = { kind: 'summary', id: receipt.id };
  const entries = await deliveredOnce(env.server, [op]);
  assert.equal(entries.find(tookEffect).route, 'beacon');

  // A second final state's grant, left to expire.
  const late = await fromPopup(env, { outbox: 'finalState', args: [{ entity: 'pr/2', kind: 'summary', payload: { summary: { you: 'later' } }, key: 'f-2' }] });
  const expiresAt = late.result.expiresAt;
  await until(() => Date.now() > expiresAt + 500, { what: 'the grant to expire', timeout: 10_000 });
  const expired = await post(late.result.url, late.result.body);
  assert.equal(expired.status, 401, 'an expired grant');
  assert.match((await expired.json()).type, /grant-expired/);
  await env.server.clearFaults();
  // Refused beacons lose nothing: the queued copies arrive.
  await deliveredOnce(env.server, [op, { kind: 'summary', id: late.result.receipt.id }]);
  const log = entriesOf(await env.server.log(), [op]);
  assert.equal(log.filter(tookEffect).length, 1, 'the final state took effect once');
});
