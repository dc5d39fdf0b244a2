// The seeded schedule of a chaos run: one integer seed gives the same list of events every time,
// each pinned to the number of enqueue calls that had resolved when it fires (not to a wall-clock
// time, which would make a schedule depend on how fast this machine is today).

/** mulberry32: a small, fast PRNG whose whole state is one 32-bit integer (the seed). */
export function random(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The knobs of a run; the short run of `make chaos-short` and the long one of `make chaos`. */
export const PRESETS = {
  short: { ops: 300, entities: 20, lanes: 4, paceMs: 600, browserKills: 3, workerStops: 4, serverKills: 1, offlinePeriods: 1,
    fault5xx: 0.05, fault429: 0.05, faultDropAfterCommit: 0.03, drainBoundMs: 90_000 },
  long: { ops: 10_000, entities: 200, lanes: 6, paceMs: 100, browserKills: 24, workerStops: 20, serverKills: 3, offlinePeriods: 4,
    fault5xx: 0.05, fault429: 0.1, faultDropAfterCommit: 0.03, drainBoundMs: 90_000 },
};

/**
 * The events of a run, sorted by `afterOps` (fire once that many enqueue calls have resolved).
 * Kinds:
 *   browser-kill  {afterEnqueue}  SIGKILL the browser's process group and relaunch on the same
 *                 profile; `afterEnqueue` fires within milliseconds of one call resolving, with
 *                 the other lanes' calls still in flight
 *   worker-stop   stop every service worker over CDP
 *   server-kill   {downMs}  SIGKILL the server and start it again on the same database
 *   offline       {ms}  every op request answered 503 for `ms` (server-side, see README: the
 *                 extension sees a backend that will not take anything, without counting it
 *                 toward max_attempts)
 */
export function makeSchedule(seed, settings) {
  const next = random(seed);
  const { ops } = settings;
  // Events land in the middle 90 % of the run, so the run starts and ends with some calm traffic.
  const at = () => Math.floor(ops * (0.05 + 0.9 * next()));
  const events = [];
  for (let i = 0; i < settings.browserKills; i++) {
    events.push({ kind: 'browser-kill', afterOps: at(), afterEnqueue: next() < 0.5 });
  }
  for (let i = 0; i < settings.workerStops; i++) events.push({ kind: 'worker-stop', afterOps: at() });
  for (let i = 0; i < settings.serverKills; i++) {
    events.push({ kind: 'server-kill', afterOps: at(), downMs: 500 + Math.floor(next() * 4500) });
  }
  for (let i = 0; i < settings.offlinePeriods; i++) {
    events.push({ kind: 'offline', afterOps: at(), ms: 3000 + Math.floor(next() * 12_000) });
  }
  // Stable order for events at the same count: by kind, then by when they were drawn.
  return events.map((e, drawn) => ({ ...e, drawn }))
    .sort((a, b) => a.afterOps - b.afterOps || a.drawn - b.drawn)
    .map(({ drawn, ...e }, index) => ({ index, ...e }));
}

/**
 * The workload's calls: `ops` calls spread over `entities`, each call's entity drawn from the
 * seed, and `thinkMs`, the pause its lane takes before making it (uniform in 0..2 × paceMs), so
 * enqueues keep streaming in while the queue drains, as a user's clicks would.
 */
export function makeWorkload(seed, { ops, entities, paceMs = 0 }) {
  const next = random(seed ^ 0x5eed);
  const perEntity = new Map();
  const calls = [];
  for (let i = 0; i < ops; i++) {
    const entity = `pr/${1000 + Math.floor(next() * entities)}`;
    const seq = (perEntity.get(entity) ?? 0) + 1;
    perEntity.set(entity, seq);
    calls.push({ index: i, key: `chaos-${seed}-${i}`, entity, seq, thinkMs: Math.floor(next() * 2 * paceMs) });
  }
  return calls;
}
