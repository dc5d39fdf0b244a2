// The chaos checker: a pure function over what the harness recorded (its call book, the
// extension's dead letters and storage incidents, the time it took to drain) and what the server
// holds (every entity's state and version from its SQLite file, and the admin log it kept while
// each server process lived). It never looks at the clock.
//
// How the workload makes this checkable: every call's payload is `{chaos: {<key>: <seq>}}`, so
// the server's JSON merge patch leaves in each entity's state the set of keys that took effect,
// and the entity's version counts how many ops took effect. A key applied twice shows as a version
// higher than the number of keys, even when the second op came from a caller's retry and the
// harness never saw its id.

/** The codes a storage incident may carry (see docs/DELIVERY.md, the second copy). */
const LOST_CODES = new Set(['STORAGE_LOST']);

/**
 * @param {object} history
 * @param {Array} history.calls       the call book: {key, entity, seq, receipts: [{id, seq, replayed?}],
 *                                    errors: [{code, message}]} (a receipt is an acknowledgement)
 * @param {Array} history.entities    the server's entities: {entity, version, state}
 * @param {Array} history.log         the admin log, each server process's in turn: {client, id, seq,
 *                                    entity, status, replayed, http}
 * @param {Array} [history.deadLetters] the extension's dead letters: {op: {id, entity, payload}, reason}
 * @param {Array} [history.incidents] the storage incidents the extension reported: {code, lost?}
 * @param {object} [history.drain]    {drained, ms}: from the end of the chaos to fully drained
 * @param {number} [history.drainBoundMs] the liveness bound
 * @param {boolean} [history.failuresInjected] whether 5xx faults that count toward max_attempts
 *                                    were injected (then an `exhausted` dead letter is the design)
 */
export function check(history) {
  const { calls, entities, log, deadLetters = [], incidents = [], drain, drainBoundMs, failuresInjected = false } = history;
  const violations = [];
  const byKey = new Map(calls.map((call) => [call.key, call]));
  const keyOfId = new Map();
  for (const call of calls) for (const receipt of call.receipts) keyOfId.set(receipt.id, call.key);
  const chaosEntities = new Set(calls.map((call) => call.entity));

  // What took effect, by the server's own database.
  const appliedKeys = new Map();
  for (const { entity, version, state } of entities) {
    if (!chaosEntities.has(entity)) continue;
    const keys = Object.keys(state?.chaos ?? {});
    for (const key of keys) {
      if (!byKey.has(key)) violations.push({ kind: 'phantom', entity, key, why: 'applied but never called' });
      else if (byKey.get(key).entity !== entity) {
        violations.push({ kind: 'phantom', entity, key, why: `called on ${byKey.get(key).entity}, applied here` });
      }
      appliedKeys.set(key, entity);
    }
    if (version > keys.length) {
      violations.push({ kind: 'duplicated', entity, extra: version - keys.length,
        why: `version ${version} but ${keys.length} distinct keys: ${version - keys.length} op(s) took effect twice` });
    }
  }

  // Dead letters, by the key in their payload (their ids may never have reached the harness).
  const deadKeys = new Map();
  for (const letter of deadLetters) {
    const key = Object.keys(letter.op?.payload?.chaos ?? {})[0] ?? keyOfId.get(letter.op?.id);
    if (!key) continue;
    deadKeys.set(key, letter.reason);
    const expected = failuresInjected && /exhausted/.test(String(letter.reason));
    if (!expected) violations.push({ kind: 'dead-lettered', key, reason: letter.reason });
  }

  // Lost: acknowledged and not applied (and not a dead letter, which the application was told of).
  let acknowledged = 0;
  let unacknowledgedApplied = 0;
  let secondOps = 0;
  for (const call of calls) {
    const ids = new Set(call.receipts.map((r) => r.id));
    if (ids.size > 1) {
      secondOps++;
      violations.push({ kind: 'duplicated', key: call.key, entity: call.entity, ids: [...ids],
        why: 'the same key was answered with different ops (a caller retry made a second op)' });
    }
    if (call.receipts.length) {
      acknowledged++;
      if (!appliedKeys.has(call.key) && !deadKeys.has(call.key)) {
        violations.push({ kind: 'lost', key: call.key, entity: call.entity, ids: [...ids], why: 'acknowledged, never applied' });
      }
    } else if (appliedKeys.has(call.key)) {
      unacknowledgedApplied++;
    }
  }

  // The admin log: each op id takes effect at most once, in each entity's call order, and what
  // the server said it applied is in its database.
  const effects = log.filter((e) => e.status === 'applied' && !e.replayed && chaosEntities.has(e.entity));
  const effectsOfId = new Map();
  const lastSeqOf = new Map();
  for (const entry of effects) {
    effectsOfId.set(entry.id, (effectsOfId.get(entry.id) ?? 0) + 1);
    const key = keyOfId.get(entry.id);
    if (!key) continue;
    const { seq, entity } = byKey.get(key);
    const last = lastSeqOf.get(entity);
    if (last && seq < last.seq) {
      violations.push({ kind: 'reordered', entity, key, seq, after: last.key, afterSeq: last.seq,
        why: `call ${seq} took effect after call ${last.seq}` });
    }
    if (!last || seq > last.seq) lastSeqOf.set(entity, { seq, key });
    if (!appliedKeys.has(key)) {
      violations.push({ kind: 'lost', key, entity, ids: [entry.id], why: 'the server logged it applied; its database lacks it' });
    }
  }
  for (const [id, count] of effectsOfId) {
    if (count > 1) violations.push({ kind: 'duplicated', id, key: keyOfId.get(id), why: `op took effect ${count} times` });
  }

  // Every rejection a page sees carries a code (docs/DELIVERY.md, the contract from the call).
  for (const call of calls) {
    for (const error of call.errors) {
      if (!error.code) violations.push({ kind: 'uncoded-error', key: call.key, message: error.message });
    }
  }

  const storageLost = incidents.filter((i) => LOST_CODES.has(i.code));
  const liveness = drain && {
    drained: drain.drained, ms: drain.ms, boundMs: drainBoundMs,
    ok: drain.drained && (drainBoundMs == null || drain.ms <= drainBoundMs),
  };
  if (liveness && !liveness.ok) {
    violations.push({ kind: 'liveness', why: drain.drained ? `drained in ${drain.ms} ms, over the ${drainBoundMs} ms bound`
      : `not drained after ${drain.ms} ms` });
  }

  const count = (kind) => violations.filter((v) => v.kind === kind).length;
  const summary = {
    calls: calls.length,
    acknowledged,
    unacknowledged: calls.length - acknowledged,
    unacknowledgedApplied,
    applied: appliedKeys.size,
    lost: count('lost'),
    duplicated: count('duplicated'),
    secondOps,
    reordered: count('reordered'),
    phantom: count('phantom'),
    uncodedErrors: count('uncoded-error'),
    deadLettered: { total: deadKeys.size, byCause: tally([...deadKeys.values()].map(String)) },
    storageLost: { reports: storageLost.length, opsLost: storageLost.reduce((n, i) => n + (i.lost ?? 0), 0) },
    incidents: tally(incidents.map((i) => i.code)),
    callErrors: tally(calls.flatMap((c) => c.errors.map((e) => e.code ?? 'uncoded'))),
    logEffects: effects.length,
    liveness,
  };
  return { ok: violations.length === 0, violations, summary };
}

function tally(values) {
  const out = {};
  for (const value of values) out[value] = (out[value] ?? 0) + 1;
  return out;
}
