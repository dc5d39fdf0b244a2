// The delivery scenarios of issue #5, each a user's session followed to the server. Each one
// asserts what it proves and returns its figures ({made, applied, duplicates, ...}, see
// delivery.mjs), so the end-to-end tests and `make demo` run the very same code.
//
// `env` is what a scenario may use:
//   server             url, log(), faults(...), clearFaults(), entity(id), faultsInjected(kind)
//                      stop() and restart() where the caller owns the process
//   pr()               a PR number no other scenario uses
//   openPr(n)          the PR page in the main browser (a PrPage, see pr-page.mjs)
//   browser            the main Chromium (see chromium.mjs); absent in Firefox
//   relaunch()         closes the main browser and starts it again on the same profile
//   otherProfile(name) a second Chromium profile whose reviewer is `name`
//   screenshot(page, name)  keeps a picture of a popup (the demo does; tests need not)
import assert from 'node:assert/strict';
import { access, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { RENEWED_TOKEN } from './server.mjs';
import { PlaywrightPrPage } from './pr-page.mjs';
import { absorbed, assertInOrder, deliveredOnce, entriesOf, entriesOfOp, measure, tookEffect } from './delivery.mjs';
import { until } from './wait.mjs';

/** Waits until the page's badge says an attempt failed and the ops are waiting to be retried. */
async function retrying(page, count) {
  await until(async () => {
    const badge = await page.badge();
    return badge.startsWith(`outbox: ${count} pending`) && badge.includes('retrying') && badge;
  }, { what: `the badge to show ${count} ops pending after a failed attempt` });
}

export async function normalSync(env) {
  const page = await env.openPr(env.pr());
  await page.view('src/upload.rs');
  await page.view('src/backoff.rs');
  await page.comment('Nice, the backoff is capped.');
  await page.approve();
  const ops = await page.queued();
  const entries = await deliveredOnce(env.server, ops);
  assertInOrder(entries, ops);
  assert.equal(entries.length, ops.length, 'every op arrived exactly once, with no retry');
  const entity = await env.server.entity(page.entity);
  assert.equal(entity.version, ops.length);
  assert.deepEqual(Object.keys(entity.state.viewed).sort(), ['src/backoff.rs', 'src/upload.rs']);
  assert.ok(entity.state.approval, 'the approval is in the PR state');
  return { ...measure(entries, ops), note: 'one request per op, applied in order' };
}

export async function retryAfterFailures(env) {
  const page = await env.openPr(env.pr());
  // The demo watches this one in the popup, whose activity list shows the retries.
  const popup = env.screenshot && await env.browser.popup();
  await env.server.faults({ route: 'ops', tenant: 'demo', times: 2, action: { status: 503 } });
  await page.comment('Retried until the server takes it.');
  const ops = await page.queued();
  const entries = await deliveredOnce(env.server, ops);
  assert.deepEqual(entries.map((e) => e.http), [503, 503, 200], 'two 503s, then the op applied');
  if (popup) {
    await popup.locator('#activity li', { hasText: 'delivered' }).waitFor();
    await env.screenshot(popup, 'retried');
    await popup.close();
  }
  return { ...measure(entries, ops), note: '503, 503, then applied' };
}

export async function offlineThenOnline(env) {
  const page = await env.openPr(env.pr());
  await env.browser.setOffline(true);
  let ops;
  try {
    await page.view('src/upload.rs');
    await page.comment('Written on a train.');
    await page.approve();
    ops = await page.queued();
    await retrying(page, ops.length);
    if (env.screenshot) {
      const popup = await env.browser.popup();
      await popup.locator(`body[data-pending="${ops.length}"]`).waitFor();
      await env.screenshot(popup, 'offline');
      await popup.close();
    }
    assert.equal(entriesOf(await env.server.log(), ops).length, 0, 'nothing reached the server while offline');
  } finally {
    await env.browser.setOffline(false);
  }
  const online = Date.now();
  const entries = await deliveredOnce(env.server, ops, { what: 'delivery after reconnecting' });
  assertInOrder(entries, ops);
  const last = Math.max(...entries.filter(tookEffect).map((e) => e.at));
  return { ...measure(entries, ops), note: `offline (setOffline); all in ${last - online} ms after reconnect, no user action` };
}

export async function serverDownThenUp(env) {
  const page = await env.openPr(env.pr());
  await env.server.stop();
  let ops;
  try {
    await page.view('README.md');
    await page.comment('Queued while the server was down.');
    ops = await page.queued();
    await retrying(page, ops.length);
  } finally {
    await env.server.restart();
  }
  const up = Date.now();
  const entries = await deliveredOnce(env.server, ops, { what: 'delivery after the server came back' });
  assertInOrder(entries, ops);
  const last = Math.max(...entries.filter(tookEffect).map((e) => e.at));
  return { ...measure(entries, ops), note: `server stopped; all in ${last - up} ms after it restarted, no user action` };
}

export async function finalStateByBeacon(env) {
  const n = env.pr();
  const popup = await env.browser.popup(`popup.html?pr=${n}`);
  // Hold the queued copy on the server, so the closing page's copy comes first.
  await env.server.faults({ route: 'ops', tenant: 'demo', times: 1, action: { delay_ms: 4000 } });
  const actedAt = Date.now();
  await popup.fill('#summary', 'Approve once CI is green.');
  const id = await until(() => popup.evaluate(() => document.body.dataset.finalState),
    { what: 'the popup to queue its final state' });
  await env.screenshot?.(popup, 'final-state');
  await popup.close();
  const op = { kind: 'summary', id, actedAt };
  await deliveredOnce(env.server, [op]);
  const entries = await until(async () => {
    const entries = entriesOfOp(await env.server.log(), op);
    return entries.length === 2 && entries;
  }, { what: 'both copies (beacon and queued) to arrive' });
  const effect = entries.find(tookEffect);
  assert.equal(effect.route, 'beacon', 'the beacon copy arrived first and took effect');
  const queued = entries.find((e) => e.route === 'ops');
  assert.ok(queued && absorbed(queued), 'the queued copy was answered as a replay');
  const entity = await env.server.entity(`pr/${n}`);
  assert.equal(entity.version, 1, 'applied once');
  assert.equal(Object.values(entity.state.summary)[0], 'Approve once CI is green.');
  op.seq = effect.seq;
  return { ...measure(entries, [op]), note: 'the beacon took effect; the queued copy was a replay' };
}

export async function browserRestart(env) {
  const n = env.pr();
  const page = await env.openPr(n);
  await env.browser.setOffline(true);
  await page.view('src/backoff.rs');
  await page.comment('Survives a restart.');
  const ops = await page.queued();
  await retrying(page, ops.length);
  const closed = Date.now();
  await env.relaunch();
  const entries = await deliveredOnce(env.server, ops, { what: 'delivery after the browser restarted' });
  assertInOrder(entries, ops);
  const last = Math.max(...entries.filter(tookEffect).map((e) => e.at));
  return { ...measure(entries, ops), note: `queued offline, browser closed; all in ${last - closed} ms after the restart began` };
}

export async function lostAcknowledgement(env) {
  const page = await env.openPr(env.pr());
  await env.server.faults({ route: 'ops', tenant: 'demo', times: 1, action: 'drop_after_commit' });
  await page.comment('Committed, but the answer is lost.');
  const ops = await page.queued();
  await deliveredOnce(env.server, ops);
  const entries = await until(async () => {
    const entries = entriesOf(await env.server.log(), ops);
    return entries.some(absorbed) && entries;
  }, { what: 'the resend after the lost answer' });
  assert.equal(entries[0].fault, 'drop_after_commit');
  assert.equal(entries[0].http, null, 'the first answer was never sent');
  assert.ok(tookEffect(entries[0]), 'the first copy took effect');
  assert.ok(entries.slice(1).every(absorbed), 'the resend was answered from the stored result');
  assert.equal((await env.server.entity(page.entity)).version, 1, 'applied once');
  return { ...measure(entries, ops), note: 'answer dropped after commit; the resend was a replay' };
}

export async function workerKilledMidSend(env) {
  const page = await env.openPr(env.pr());
  const before = await env.server.faultsInjected('delay');
  await env.server.faults({ route: 'ops', tenant: 'demo', times: 1, action: { delay_ms: 2000 } });
  await page.view('src/upload.rs');
  await page.view('README.md');
  const ops = await page.queued();
  // The first request is on the server, held by the delay: the worker is mid-send.
  await until(async () => (await env.server.faultsInjected('delay')) > before,
    { what: 'the first request to reach the server' });
  const killed = Date.now();
  await env.browser.stopServiceWorkers();
  // Nothing touches the extension from here: only its alarm can start the worker again.
  const entries = await deliveredOnce(env.server, ops, { what: 'delivery after the worker was killed' });
  assertInOrder(entries, ops);
  const resumed = Math.min(...entries.filter((e) => e.http !== null && e.at > killed).map((e) => e.at));
  assert.ok(Number.isFinite(resumed), 'requests arrived after the kill');
  return { ...measure(entries, ops), note: `worker stopped over CDP mid-send; the alarm resumed delivery ${resumed - killed} ms later` };
}

export async function retryAfterHonoured(env) {
  const page = await env.openPr(env.pr());
  await env.server.faults({ route: 'ops', tenant: 'demo', times: 1, action: { status: 429, retry_after: 2 } });
  await page.comment('Not so fast.');
  const ops = await page.queued();
  const entries = await deliveredOnce(env.server, ops);
  assert.deepEqual(entries.map((e) => e.http), [429, 200]);
  const gap = entries[1].at - entries[0].at;
  assert.ok(gap >= 2000, `the second attempt came ${gap} ms after the 429, before its Retry-After of 2 s`);
  return { ...measure(entries, ops), note: `429 with Retry-After: 2; the next attempt came ${gap} ms later` };
}

export async function unauthorizedPausesUntilRenewed(env) {
  const n = env.pr();
  const page = await env.openPr(n);
  await env.server.faults({ route: 'ops', tenant: 'demo', times: 1, action: { status: 401 } });
  await page.view('src/backoff.rs');
  await page.comment('Made while the token was refused.');
  await page.queued();
  const popup = await env.browser.popup(`popup.html?pr=${n}`);
  await popup.locator('body[data-paused="true"]').waitFor({ timeout: 30_000 });
  // More work while paused is kept, not sent.
  await page.approve();
  const ops = await page.queued();
  await popup.locator('body[data-pending="3"]').waitFor();
  await env.screenshot?.(popup, 'auth-paused');
  const paused = entriesOf(await env.server.log(), ops);
  assert.deepEqual(paused.map((e) => e.http), [401], 'one refused request, then nothing while paused');
  await popup.fill('#token', RENEWED_TOKEN);
  const renewed = Date.now();
  await popup.click('#save-token');
  const entries = await deliveredOnce(env.server, ops, { what: 'delivery after the token was renewed' });
  assertInOrder(entries, ops);
  assert.ok(entries.filter(tookEffect).every((e) => e.at >= renewed), 'nothing was applied before the renewal');
  await popup.close();
  return { ...measure(entries, ops), note: '401 paused the queue; resumed by the popup\'s new token' };
}

export async function conflictResolvedInPopup(env) {
  const n = env.pr();
  const bob = await env.otherProfile('bob');
  const mine = await env.openPr(n);
  const theirs = await PlaywrightPrPage.open(bob.context, env.server.url, n);
  // Both reviewers look at version 0. Mine approves first.
  await mine.approve();
  const [first] = await mine.queued();
  await deliveredOnce(env.server, [first]);
  await theirs.approve();
  const [second] = await theirs.queued();

  // Bob's approval conflicts; his popup shows both sides, and he keeps his.
  const popup = await bob.popup(`popup.html?pr=${n}`);
  const card = popup.locator(`.conflict[data-id="${second.id}"]`);
  await card.waitFor({ timeout: 30_000 });
  assert.match(await card.locator('.mine').innerText(), /bob/);
  assert.match(await card.locator('.theirs').innerText(), /"by": "you"/);
  await env.screenshot?.(popup, 'conflict');
  const kept = Date.now();
  await card.locator('.keep-mine').click();
  // Keep-mine queues the approval again as a new op against the server's version: a new id
  // and seq, since the old id keeps its stored conflict answer.
  const [conflict] = entriesOfOp(await env.server.log(), second);
  assert.equal(conflict.status, 'conflict');
  const resent = await until(async () => (await env.server.log()).find((e) => e.client === conflict.client
    && e.kind === 'approve' && tookEffect(e) && e.at >= kept), { what: 'the kept approval to be applied' });
  assert.ok(resent.seq > conflict.seq);
  let entity = await env.server.entity(`pr/${n}`);
  assert.equal(entity.state.approval.by, 'bob');
  assert.equal(entity.version, 2);
  await popup.close();

  // Mine approves again on the page that still shows version 0: a conflict, and this time the
  // popup takes theirs, so nothing is sent.
  await mine.approve();
  const third = (await mine.queued())[1];
  const myPopup = await env.browser.popup(`popup.html?pr=${n}`);
  const myCard = myPopup.locator(`.conflict[data-id="${third.id}"]`);
  await myCard.waitFor({ timeout: 30_000 });
  await myCard.locator('.take-theirs').click();
  await myCard.waitFor({ state: 'detached' });
  await myPopup.close();
  const thirdEntries = entriesOfOp(await env.server.log(), third);
  assert.deepEqual(thirdEntries.map((e) => e.status), ['conflict'], 'take-theirs sends nothing');
  entity = await env.server.entity(`pr/${n}`);
  assert.equal(entity.state.approval.by, 'bob');
  assert.equal(entity.version, 2);
  const resentOp = { kind: 'approve', id: resent.id, seq: resent.seq, actedAt: kept };
  const all = [first, resentOp];
  const figures = measure(entriesOf(await env.server.log(), [...all, second, third]), all);
  return { ...figures, made: 3,
    note: 'two profiles approve v0; the second conflicts: keep-mine (time from the click) resent and applied; a third take-theirs sent nothing' };
}

export async function deadLetterDoesNotBlock(env) {
  const n = env.pr();
  const page = await env.openPr(n);
  await env.server.faults({ route: 'ops', tenant: 'demo', times: 1, action: { status: 422 } });
  await page.comment('The server refuses this one.');
  await page.view('src/upload.rs');
  const [refused, later] = await page.queued();
  // The op queued behind the refused one goes through.
  await deliveredOnce(env.server, [later], { what: 'the op behind the dead letter' });
  const popup = await env.browser.popup(`popup.html?pr=${n}`);
  const letter = popup.locator(`#dead-letters li[data-id="${refused.id}"]`);
  await letter.waitFor({ timeout: 30_000 });
  assert.match(await letter.innerText(), /422/);
  await env.screenshot?.(popup, 'dead-letter');
  assert.deepEqual(entriesOfOp(await env.server.log(), refused).map((e) => e.http), [422]);

  // Retry sends it again (as a new op: the user asked anew), and it is applied.
  const retried = Date.now();
  await letter.locator('.retry').click();
  await letter.waitFor({ state: 'detached' });
  const client = entriesOfOp(await env.server.log(), later)[0].client;
  const again = await until(async () => (await env.server.log()).find((e) => e.client === client
    && e.kind === 'comment' && tookEffect(e) && e.at >= retried), { what: 'the retried comment' });

  // Discard removes the next refused op for good.
  await env.server.faults({ route: 'ops', tenant: 'demo', times: 1, action: { status: 422 } });
  await page.comment('Refused and discarded.');
  const discarded = (await page.queued())[2];
  const second = popup.locator(`#dead-letters li[data-id="${discarded.id}"]`);
  await second.waitFor({ timeout: 30_000 });
  await second.locator('.discard').click();
  await second.waitFor({ state: 'detached' });
  assert.ok(!entriesOfOp(await env.server.log(), discarded).some(tookEffect));
  await popup.close();
  const entries = entriesOf(await env.server.log(), [refused, later, discarded]);
  const figures = measure(entries, [refused, later, discarded]);
  return { ...figures, applied: figures.applied + 1,
    note: `422 → dead letter; the op behind it applied; Retry applied it as seq ${again.seq}; Discard dropped the other` };
}

export async function databaseDropped(env) {
  const n = env.pr();
  const page = await env.openPr(n);
  await env.browser.setOffline(true);
  await page.view('src/upload.rs');
  await page.comment('Queued while the disk was about to fail.');
  await page.approve();
  const ops = await page.queued();
  await retrying(page, ops.length);
  // What Chromium does when it finds the database's LevelDB corrupt after a hard kill: the
  // extension's IndexedDB is gone at the next launch.
  const closed = Date.now();
  await env.relaunch({
    between: async (profile, browser) => {
      const database = join(profile, 'Default', 'IndexedDB', `chrome-extension_${browser.id}_0.indexeddb.leveldb`);
      await access(database);
      await rm(database, { recursive: true });
    },
  });
  const entries = await deliveredOnce(env.server, ops, { what: 'delivery after the database was dropped' });
  assertInOrder(entries, ops);
  const popup = await env.browser.popup();
  const stats = await popup.evaluate(() => chrome.runtime.sendMessage({ outbox: 'stats', args: [] }));
  await popup.close();
  assert.equal(stats.result.incident?.code, 'STORAGE_RECOVERED', JSON.stringify(stats));
  assert.equal(stats.result.incident.recovered, ops.length);
  const last = Math.max(...entries.filter(tookEffect).map((e) => e.at));
  return { ...measure(entries, ops), note: `IndexedDB deleted between launches; rebuilt from storage.local, all in ${last - closed} ms after the restart began` };
}

/**
 * The Chromium scenarios in the order of the issue (12, the README extension, has its own
 * test): [label for the demo's tables, the behaviour a test proves, the scenario].
 */
export const CHROMIUM_SCENARIOS = [
  ['1 normal sync', 'ops made online are delivered once each, in order', normalSync],
  ['2 retry', 'an op the server fails twice is retried until it is applied once', retryAfterFailures],
  ['3a offline', 'ops made offline are delivered after reconnecting without user action', offlineThenOnline],
  ['3b server down', 'ops made while the server is down are delivered when it is back', serverDownThenUp],
  ['4 page close', 'the popup final state arrives by beacon and its queued copy is a replay', finalStateByBeacon],
  ['5 browser restart', 'ops queued offline survive a browser restart and are delivered', browserRestart],
  ['6 duplicate', 'an op whose answer was lost after commit is resent and applied once', lostAcknowledgement],
  ['7 worker killed', 'delivery resumes on the alarm after the worker is stopped mid-send', workerKilledMidSend],
  ['8 429', 'a 429 Retry-After delays the next attempt by at least that long', retryAfterHonoured],
  ['9 401', 'a 401 pauses the queue until the token is renewed, losing nothing', unauthorizedPausesUntilRenewed],
  ['10 conflict', 'a conflict between two profiles is settled in the popup and the choice delivered', conflictResolvedInPopup],
  ['11 dead letter', 'a 422 dead letter shows in the popup and does not block later ops', deadLetterDoesNotBlock],
  ['13 database dropped', 'a queue whose IndexedDB the browser deleted is rebuilt from the copy and delivered once', databaseDropped],
];
