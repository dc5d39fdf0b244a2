// Reading delivery from the server's admin log (never from the extension, whose own reports
// would be offline or dead exactly when it matters).
import assert from 'node:assert/strict';
import { until } from './wait.mjs';

/**
 * The log entries of `ops`: by id, or by the same client and seq, because a conflict resolved
 * with keep-mine is resent as a copy with a new id and the same seq.
 */
export function entriesOf(log, ops) {
  const clients = new Map(log.filter((e) => ops.some((op) => op.id === e.id)).map((e) => [e.id, e.client]));
  return log.filter((e) => ops.some((op) => e.id === op.id
    || (clients.get(op.id) === e.client && e.seq === op.seq)));
}

/** The entries of one op (see entriesOf). */
export function entriesOfOp(log, op) {
  return entriesOf(log, [op]);
}

/** The entry that took effect: applied, and not a replay of an earlier answer. */
export const tookEffect = (e) => e.status === 'applied' && !e.replayed;
/** An arrival the server absorbed: a replayed answer or a duplicate by seq. */
export const absorbed = (e) => e.replayed === true || e.status === 'duplicate';

/**
 * Waits until each of `ops` has taken effect on the server, then checks that each took effect
 * exactly once. Returns the entries of `ops`.
 */
export async function deliveredOnce(server, ops, { timeout = 45_000, what = 'delivery' } = {}) {
  let seen = [];
  const entries = await until(async () => {
    seen = entriesOf(await server.log(), ops);
    return ops.every((op) => entriesOfOp(seen, op).some(tookEffect)) && seen;
  }, { timeout, what: `${what}: ${ops.length} ops to take effect on the server` }).catch((error) => {
    // Say what did arrive, which tells a stuck client from a refusing server.
    error.message += `\nops: ${JSON.stringify(ops)}\ntheir log entries: ${JSON.stringify(seen)}`;
    throw error;
  });
  for (const op of ops) {
    assert.equal(entriesOfOp(entries, op).filter(tookEffect).length, 1,
      `${op.kind} ${op.id} took effect more than once: ${JSON.stringify(entriesOfOp(entries, op))}`);
  }
  return entries;
}

/** Checks that the ops of one client took effect in the order they were made. */
export function assertInOrder(entries, ops) {
  const applied = entries.filter(tookEffect).map((e) => e.seq);
  const made = ops.map((op) => op.seq);
  assert.deepEqual(applied.filter((seq) => made.includes(seq)), [...made].sort((a, b) => a - b),
    'ops took effect out of order');
}

/**
 * The figures of a scenario: ops made, ops that took effect, arrivals absorbed as duplicates,
 * requests, and for each op the time from the user's action to the arrival that took effect.
 */
export function measure(entries, ops) {
  const delays = ops.flatMap((op) => {
    const effect = entriesOfOp(entries, op).find(tookEffect);
    return effect && op.actedAt ? [effect.at - op.actedAt] : [];
  }).sort((a, b) => a - b);
  return {
    made: ops.length,
    applied: ops.filter((op) => entriesOfOp(entries, op).some(tookEffect)).length,
    duplicates: entries.filter(absorbed).length,
    arrivals: entries.length,
    medianMs: delays.length ? delays[Math.floor((delays.length - 1) / 2)] : null,
    maxMs: delays.length ? delays.at(-1) : null,
  };
}

/** One line for a test's diagnostics. */
export function describe(figures) {
  const ms = (v) => (v == null ? '—' : `${v} ms`);
  return `made ${figures.made}, applied ${figures.applied}, duplicates absorbed ${figures.duplicates}, `
    + `arrivals ${figures.arrivals}, time to deliver median ${ms(figures.medianMs)} / max ${ms(figures.maxMs)}`
    + (figures.note ? ` (${figures.note})` : '');
}
