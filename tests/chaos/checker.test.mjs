// The checker against synthetic histories: a clean one passes, and each kind of violation it
// exists for is caught.
import assert from 'node:assert/strict';
import test from 'node:test';
import { check } from './lib/checker.mjs';
import { makeSchedule, makeWorkload, PRESETS } from './lib/schedule.mjs';

/** A clean history of `n` calls on two entities: each acknowledged, applied once, in order. */
function cleanHistory(n = 6) {
  const calls = [];
  const perEntity = { 'pr/1': 0, 'pr/2': 0 };
  for (let i = 0; i < n; i++) {
    const entity = i % 2 ? 'pr/2' : 'pr/1';
    const seq = ++perEntity[entity];
    calls.push({ key: `k${i}`, entity, seq, receipts: [{ id: `op${i}`, seq: i + 1 }], errors: [] });
  }
  const log = calls.map((c) => ({ client: 'c1', id: c.receipts[0].id, seq: c.receipts[0].seq, entity: c.entity,
    status: 'applied', replayed: false, http: 200 }));
  return { calls, log, entities: entitiesOf(calls), drain: { drained: true, ms: 1000 }, drainBoundMs: 60_000 };
}

/** The server's entities as the merge patches of `calls` leave them. */
function entitiesOf(calls, extraVersions = {}) {
  const out = new Map();
  for (const c of calls) {
    const e = out.get(c.entity) ?? { entity: c.entity, version: 0, state: { chaos: {} } };
    e.version++;
    e.state.chaos[c.key] = c.seq;
    out.set(c.entity, e);
  }
  for (const [entity, extra] of Object.entries(extraVersions)) out.get(entity).version += extra;
  return [...out.values()];
}

const kinds = (result) => result.violations.map((v) => v.kind);

test('a clean history passes', () => {
  const result = check(cleanHistory());
  assert.deepEqual(result.violations, []);
  assert.equal(result.summary.acknowledged, 6);
  assert.equal(result.summary.applied, 6);
});

test('an acknowledged op that never took effect is lost', () => {
  const h = cleanHistory();
  h.entities = entitiesOf(h.calls.filter((c) => c.key !== 'k3'));
  h.log = h.log.filter((e) => e.id !== 'op3');
  const result = check(h);
  assert.deepEqual(kinds(result), ['lost']);
  assert.equal(result.violations[0].key, 'k3');
});

test('an op the server logged applied but its database lacks is lost', () => {
  const h = cleanHistory();
  h.entities = entitiesOf(h.calls.filter((c) => c.key !== 'k2'));
  assert.deepEqual(kinds(check(h)), ['lost', 'lost']);
});

test('an unacknowledged call that was not applied is not a loss', () => {
  const h = cleanHistory();
  h.calls[5].receipts = [];
  h.calls[5].errors = [{ code: 'UNAVAILABLE', message: 'no answer' }];
  h.entities = entitiesOf(h.calls.slice(0, 5));
  h.log = h.log.slice(0, 5);
  const result = check(h);
  assert.deepEqual(result.violations, []);
  assert.equal(result.summary.unacknowledged, 1);
});

test('an op applied twice is a duplicate, by the version even without its id', () => {
  const h = cleanHistory();
  // A caller retry made a second op whose id the harness never saw: same key, one more version.
  h.entities = entitiesOf(h.calls, { 'pr/2': 1 });
  h.log.push({ client: 'c1', id: 'unseen', seq: 7, entity: 'pr/2', status: 'applied', replayed: false, http: 200 });
  const result = check(h);
  assert.deepEqual(kinds(result), ['duplicated']);
  assert.equal(result.violations[0].entity, 'pr/2');
});

test('one op id taking effect twice in the log is a duplicate', () => {
  const h = cleanHistory();
  h.log.push({ ...h.log[4] });
  h.entities = entitiesOf(h.calls, { 'pr/1': 1 });
  assert.deepEqual(kinds(check(h)).sort(), ['duplicated', 'duplicated']);
});

test('the same key answered with two different ops is a duplicate made by a caller retry', () => {
  const h = cleanHistory();
  h.calls[1].receipts.push({ id: 'op1-again', seq: 9 });
  const result = check(h);
  assert.deepEqual(kinds(result), ['duplicated']);
  assert.equal(result.summary.secondOps, 1);
});

test('a replayed answer for the same key is not a duplicate', () => {
  const h = cleanHistory();
  h.calls[1].receipts.push({ id: 'op1', seq: 2, replayed: true });
  h.log.push({ ...h.log[1], replayed: true });
  assert.deepEqual(check(h).violations, []);
});

test('ops of one entity taking effect out of call order are reordered', () => {
  const h = cleanHistory();
  // pr/1's calls are k0, k2, k4; swap the effects of k2 and k4.
  [h.log[2], h.log[4]] = [h.log[4], h.log[2]];
  const result = check(h);
  assert.deepEqual(kinds(result), ['reordered']);
  assert.equal(result.violations[0].key, 'k2');
});

test('interleaving between entities is not a reorder', () => {
  const h = cleanHistory();
  [h.log[0], h.log[1]] = [h.log[1], h.log[0]];
  assert.deepEqual(check(h).violations, []);
});

test('a key applied that no call made is a phantom', () => {
  const h = cleanHistory();
  h.entities[0].state.chaos.ghost = 9;
  h.entities[0].version++;
  assert.deepEqual(kinds(check(h)), ['phantom']);
});

test('a dead letter is reported with its cause; exhausted under injected 5xx is the design', () => {
  const h = cleanHistory();
  h.entities = entitiesOf(h.calls.filter((c) => c.key !== 'k3'));
  h.log = h.log.filter((e) => e.id !== 'op3');
  h.deadLetters = [{ op: { id: 'op3', payload: { chaos: { k3: 2 } } }, reason: 'exhausted' }];
  const expected = check({ ...h, failuresInjected: true });
  assert.deepEqual(expected.violations, []);
  assert.deepEqual(expected.summary.deadLettered, { total: 1, byCause: { exhausted: 1 } });
  assert.deepEqual(kinds(check(h)), ['dead-lettered']);
  h.deadLetters[0].reason = 'rejected: no';
  assert.deepEqual(kinds(check({ ...h, failuresInjected: true })), ['dead-lettered']);
});

test('STORAGE_LOST reports are counted', () => {
  const h = cleanHistory();
  h.incidents = [{ code: 'STORAGE_RECOVERED', recovered: 3 }, { code: 'STORAGE_LOST', lost: 2 }];
  const result = check(h);
  assert.deepEqual(result.summary.storageLost, { reports: 1, opsLost: 2 });
  assert.deepEqual(result.summary.incidents, { STORAGE_RECOVERED: 1, STORAGE_LOST: 1 });
});

test('an uncoded rejection is a violation', () => {
  const h = cleanHistory();
  h.calls[0].errors.push({ message: 'A listener indicated an asynchronous response' });
  assert.deepEqual(kinds(check(h)), ['uncoded-error']);
});

test('liveness: not drained, or drained past the bound, is a violation', () => {
  const h = cleanHistory();
  assert.deepEqual(kinds(check({ ...h, drain: { drained: false, ms: 90_000 } })), ['liveness']);
  assert.deepEqual(kinds(check({ ...h, drain: { drained: true, ms: 61_000 } })), ['liveness']);
});

test('the schedule and the workload are a function of the seed', () => {
  assert.deepEqual(makeSchedule(7, PRESETS.short), makeSchedule(7, PRESETS.short));
  assert.notDeepEqual(makeSchedule(7, PRESETS.short), makeSchedule(8, PRESETS.short));
  assert.deepEqual(makeWorkload(7, PRESETS.short), makeWorkload(7, PRESETS.short));
  const schedule = makeSchedule(7, PRESETS.long);
  assert.equal(schedule.filter((e) => e.kind === 'browser-kill').length, PRESETS.long.browserKills);
  assert.ok(schedule.every((e, i) => i === 0 || schedule[i - 1].afterOps <= e.afterOps));
  const calls = makeWorkload(7, PRESETS.short);
  const seqs = new Map();
  for (const c of calls) {
    assert.equal(c.seq, (seqs.get(c.entity) ?? 0) + 1, 'each entity numbers its calls 1, 2, 3, ...');
    seqs.set(c.entity, c.seq);
  }
});
