// The benchmark runner behind `make bench` (scripts/bench starts the server and builds
// bench/out/ext first). One headless Chromium, one service worker (bench/sw.js), one loopback
// outbox-server; every baseline is measured in the same run as the figure it is compared with.
//
//   node bench/run.mjs [--quick] [--profile] [--js-flags=FLAGS]
//     --quick    fewer ops everywhere, to try the harness (its figures are not the benchmark's)
//     --profile  also record CPU profiles of the outbox's enqueue and drain (bench/out/*.cpuprofile)
//                and print where the time went; profiling slows what it measures
//     --js-flags=FLAGS  V8 flags for Chromium (an experiment, e.g. --no-wasm-lazy-compilation)
//
// Prints the tables (Markdown) on stdout, progress on stderr; writes bench/results.json (or
// bench/out/results-quick.json with --quick). Needs OUTBOX_SERVER_URL (scripts/with-server).
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const root = path.resolve(import.meta.dirname, '..');
const argv = new Set(process.argv.slice(2));
const QUICK = argv.has('--quick');
const PROFILE = argv.has('--profile');
// --js-flags=… passes V8 flags to Chromium, for experiments such as --no-wasm-lazy-compilation.
const JS_FLAGS = [...argv].find((arg) => arg.startsWith('--js-flags='));
for (const arg of argv) if (!['--quick', '--profile', JS_FLAGS].includes(arg)) fail(`unknown argument ${arg}`);

const N = QUICK
  ? { enqueue: 200, rounds: 2, warmup: 10, drain: 1000, levels: [0, 2000, 5000], window: 1000, cold: 3, count: 200 }
  : { enqueue: 1000, rounds: 4, warmup: 20, drain: 10000, levels: [0, 10000, 100000], window: 10000, cold: 10, count: 1000 };
const TOKEN = 'bench-token'; // scripts/bench starts the server with --token bench=bench-token
const server = { url: process.env.OUTBOX_SERVER_URL, token: TOKEN };
if (!server.url) fail('OUTBOX_SERVER_URL is not set; run through scripts/bench');
const out = path.join(root, 'bench/out');
const extension = path.join(out, 'ext');
const began = Date.now();

function fail(message) {
  console.error(`bench: ${message}`);
  process.exit(1);
}
function progress(message) {
  console.error(`bench: [${((Date.now() - began) / 1000).toFixed(0).padStart(4)} s] ${message}`);
}

// ---- statistics -------------------------------------------------------------------------------

/** Nearest-rank percentile of unsorted samples. */
function percentile(samples, p) {
  const sorted = [...samples].sort((a, b) => a - b);
  return sorted[Math.max(0, Math.ceil((p / 100) * sorted.length) - 1)];
}
function summary(samples) {
  const mean = samples.reduce((a, b) => a + b, 0) / samples.length;
  return { n: samples.length, p50: percentile(samples, 50), p99: percentile(samples, 99), mean, max: Math.max(...samples) };
}
const round = (x, digits = 2) => (x == null ? null : Number(x.toFixed(digits)));
const ms = (x) => (x == null ? '—' : x < 1 ? x.toFixed(3) : x < 10 ? x.toFixed(2) : x < 100 ? x.toFixed(1) : x.toFixed(0));
const ratio = (x) => (x == null || !Number.isFinite(x) ? '—' : `${x.toFixed(2)}×`);
const int = (x) => Math.round(x).toLocaleString('en-US');
const kb = (bytes) => `${(bytes / 1000).toFixed(1)} KB`;
const mib = (bytes) => `${(bytes / 1024 / 1024).toFixed(1)} MiB`;

// ---- the server ---------------------------------------------------------------------------------

/** Per-op results the server has given so far, by status (from /metrics). */
async function serverResults() {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const results = {};
  for (const [, status, value] of text.matchAll(/^outbox_op_results_total\{status="([^"]+)"\} (\d+)/gm)) {
    results[status] = Number(value);
  }
  return results;
}
/** Runs `work` and checks that the server applied exactly `expected` ops (at least, with `atLeast`) and nothing else. */
async function expectApplied(what, expected, work, { atLeast = false } = {}) {
  const before = await serverResults();
  const result = await work();
  if (atLeast) await new Promise((resolve) => setTimeout(resolve, 500)); // let abandoned requests land
  const after = await serverResults();
  const delta = {};
  for (const status of new Set([...Object.keys(before), ...Object.keys(after)])) {
    const d = (after[status] ?? 0) - (before[status] ?? 0);
    if (d) delta[status] = d;
  }
  const applied = delta.applied ?? 0;
  const others = Object.entries(delta).filter(([status]) => status !== 'applied');
  if ((atLeast ? applied < expected : applied !== expected) || others.length) {
    fail(`${what}: the server applied ${applied} ops (expected ${atLeast ? 'at least ' : ''}${expected}); other results: ${JSON.stringify(Object.fromEntries(others))}`);
  }
  return result;
}

// ---- the browser --------------------------------------------------------------------------------

const profileDir = path.join(out, 'profile');
fs.rmSync(profileDir, { recursive: true, force: true });
const context = await chromium.launchPersistentContext(profileDir, {
  headless: true,
  executablePath: '/usr/bin/chromium',
  args: [`--disable-extensions-except=${extension}`, `--load-extension=${extension}`, '--no-sandbox',
    '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--no-first-run',
    '--disable-sync', '--disable-quic', ...(JS_FLAGS ? [JS_FLAGS] : [])],
});
let worker = context.serviceWorkers()[0] ?? await context.waitForEvent('serviceworker');
await worker.evaluate(() => new Promise((resolve) => {
  const ready = () => (globalThis.bench ? resolve() : setTimeout(ready, 10));
  ready();
}));
const extensionId = new URL(worker.url()).host;
const page = await context.newPage();
await page.goto(`chrome-extension://${extensionId}/page.html`);
const pageCdp = await context.newCDPSession(page);
/** Calls `fn(...args)` in the worker (`fn` is sent as source text; `args` must be JSON). */
const call = (fn, ...args) => worker.evaluate(`(${fn})(...${JSON.stringify(args)})`);

/**
 * A CDP session on the service worker. Playwright opens sessions on pages only, so this attaches
 * from the page's session (non-flattened: commands travel inside Target.sendMessageToTarget).
 */
async function workerCdp() {
  const { targetInfos } = await pageCdp.send('Target.getTargets');
  const target = targetInfos.find((t) => t.type === 'service_worker' && t.url.startsWith(`chrome-extension://${extensionId}/`));
  const { sessionId } = await pageCdp.send('Target.attachToTarget', { targetId: target.targetId, flatten: false });
  let next = 0;
  const waiting = new Map();
  pageCdp.on('Target.receivedMessageFromTarget', (event) => {
    if (event.sessionId !== sessionId) return;
    const message = JSON.parse(event.message);
    const waiter = waiting.get(message.id);
    if (!waiter) return;
    waiting.delete(message.id);
    if (message.error) waiter.reject(new Error(`${message.error.message}`));
    else waiter.resolve(message.result);
  });
  return {
    send: (method, params = {}) => new Promise((resolve, reject) => {
      const id = ++next;
      waiting.set(id, { resolve, reject });
      pageCdp.send('Target.sendMessageToTarget', { sessionId, message: JSON.stringify({ id, method, params }) }).catch(reject);
    }),
  };
}
const cdp = await workerCdp();

/** JS heap in use after a full GC, and wasm linear memory, in the worker. */
async function memory() {
  await cdp.send('HeapProfiler.collectGarbage');
  const { usedSize } = await cdp.send('Runtime.getHeapUsage');
  return { jsHeapBytes: usedSize, wasmMemoryBytes: await call(() => bench.wasmMemory()) };
}

/** Runs `work` under the CPU profiler when --profile is on; saves the profile and prints a summary. */
async function profiled(name, work) {
  if (!PROFILE) return work();
  await cdp.send('Profiler.enable');
  await cdp.send('Profiler.setSamplingInterval', { interval: 100 });
  await cdp.send('Profiler.start');
  const result = await work();
  const { profile } = await cdp.send('Profiler.stop');
  const file = path.join(out, `${name}.cpuprofile`);
  fs.writeFileSync(file, JSON.stringify(profile));
  console.error(`bench: profile of ${name} in ${path.relative(root, file)}\n${profileSummary(profile)}`);
  return result;
}
function profileSummary(profile, top = 25) {
  const nodes = new Map(profile.nodes.map((node) => [node.id, node]));
  const self = new Map();
  const groups = new Map();
  let total = 0;
  profile.samples.forEach((id, i) => {
    const frame = nodes.get(id).callFrame;
    const name = frame.functionName || '(anonymous)';
    const where = frame.url ? ` ${frame.url.split('/').pop()}:${frame.lineNumber + 1}` : '';
    const dt = profile.timeDeltas[i] ?? 0;
    total += dt;
    self.set(name + where, (self.get(name + where) ?? 0) + dt);
    const group = name === '(idle)' ? 'idle (waiting for IndexedDB, the network, timers)'
      : name === '(garbage collector)' ? 'garbage collector'
      : frame.url.endsWith('.wasm') || name.startsWith('wasm-') || name.startsWith('js-to-wasm') ? 'wasm (and its transitions)'
      : frame.url.endsWith('outbox.js') ? 'wasm-bindgen glue (pkg/outbox.js)'
      : !frame.url && /^(put|get|delete|add|getAll|openCursor|openKeyCursor|count|transaction|commit|objectStore|index|continue)$/.test(name) ? 'IndexedDB calls (native, incl. structured clone)'
      : !frame.url ? `other native: ${name}` : 'other JS';
    groups.set(group, (groups.get(group) ?? 0) + dt);
  });
  const line = ([key, t]) => `${(t / 1000).toFixed(0).padStart(7)} ms ${((100 * t) / total).toFixed(1).padStart(5)} %  ${key}`;
  const sorted = (map) => [...map].sort((a, b) => b[1] - a[1]);
  return ['  by kind:', ...sorted(groups).slice(0, 12).map(line), '  by function (self time):', ...sorted(self).slice(0, top).map(line)]
    .map((l) => `    ${l}`).join('\n');
}

// ---- the run ------------------------------------------------------------------------------------

const results = {
  meta: {
    date: new Date().toISOString(),
    command: (QUICK ? 'scripts/bench --quick' : 'make bench') + (JS_FLAGS ? ` ${JS_FLAGS}` : ''),
    quick: QUICK,
    machine: {
      cpu: os.cpus()[0]?.model, cores: os.cpus().length, memoryGiB: round(os.totalmem() / 2 ** 30, 1),
      os: `${os.type()} ${os.release()}`, loadAverageAtStart: os.loadavg().map((x) => round(x)),
    },
    chromium: execFileSync('/usr/bin/chromium', ['--version'], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().match(/[\d.]+/)?.[0],
    node: process.version,
    git: execFileSync('git', ['describe', '--always', '--dirty', '--abbrev=12'], { cwd: root }).toString().trim(),
    wasmSha256: crypto.createHash('sha256').update(fs.readFileSync(path.join(extension, 'pkg/outbox_bg.wasm'))).digest('hex'),
    workbox: JSON.parse(fs.readFileSync(path.join(root, 'node_modules/workbox-background-sync/package.json'))).version,
    server: 'outbox-server --token bench=… --rate 0 (rate limit off), SQLite synchronous=FULL, loopback',
    ops: `entity pr/(i mod 1000), kind "review", payload {approved, comment: "Looks good to me", n: i} (about 55 bytes of JSON)`,
    sizes: N,
  },
};
results.size = JSON.parse(execFileSync(path.join(root, 'scripts/size-check'), ['--json'], { cwd: root }).toString());

// Enqueue latency. The outbox's drain lock is held, so enqueue() is measured alone (no delivery
// runs beside it) and its ops stay queued; the Workbox queue never replays on its own. The four
// lines take turns in rounds, so a burst of load on the machine hits them alike.
progress(`enqueue latency: ${N.enqueue} sequential writes per line, in ${N.rounds} rounds`);
const wbClient = crypto.randomUUID();
await call((s) => bench.open(s, 'warm-outbox'), server);
await call((s) => bench.open(s, 'enqueue'), server);
await call((w) => bench.rawPut('warm-raw', 0, w, 'strict'), N.warmup);
await call((w) => bench.enqueueSequential('warm-outbox', 0, w), N.warmup);
await call((s, w) => bench.workboxPush(s, 'warm', crypto.randomUUID(), 0, w, false), server, N.warmup);
const enqueueTimes = { rawStrict: [], rawRelaxed: [], outbox: [], workbox: [] };
const perRound = N.enqueue / N.rounds;
{
  for (let r = 0; r < N.rounds; r++) {
    const from = r * perRound;
    enqueueTimes.rawStrict.push(...await call((f, n) => bench.rawPut('raw-strict', f, n, 'strict'), from, perRound));
    enqueueTimes.rawRelaxed.push(...await call((f, n) => bench.rawPut('raw-relaxed', f, n, 'relaxed'), from, perRound));
    enqueueTimes.outbox.push(...await call((f, n) => bench.enqueueSequential('enqueue', f, n), from, perRound));
    enqueueTimes.workbox.push(...await call((s, c, f, n) => bench.workboxPush(s, 'wb-drain', c, f, n), server, wbClient, from, perRound));
  }
}
if (PROFILE) {
  // The outbox's enqueue() alone, under the profiler (not part of the figures).
  await call((s) => bench.open(s, 'profile-enqueue'), server);
  await profiled('enqueue', () => call((n) => bench.enqueueSequential('profile-enqueue', 0, n), N.enqueue));
  await call(() => bench.close('profile-enqueue'));
  await call(() => bench.deleteDatabase('profile-enqueue'));
}
results.enqueue = Object.fromEntries(Object.entries(enqueueTimes).map(([line, times]) => [line, summary(times)]));

const held = await call(() => bench.stats('enqueue'));
if (held.pending !== N.enqueue) fail(`the drain lock did not hold delivery off: ${held.pending} of ${N.enqueue} ops pending`);
const patterns = await call((n) => bench.requestPatterns('raw-strict', n), Math.min(100, N.enqueue));
results.requestPatterns = Object.fromEntries(Object.entries(patterns).map(([name, times]) => [name, summary(times)]));
for (const database of ['enqueue', 'warm-outbox']) {
  await call((d) => bench.close(d), database);
  await call((d) => bench.deleteDatabase(d), database);
}

// Drain throughput: the same number of ops, each line against the same server.
progress(`drain: the outbox delivers ${N.drain} queued ops`);
await call((s) => bench.open(s, 'drain'), server);
const seedMs = await call((n) => bench.seed('drain', n), N.drain);
const queued = await call(() => bench.stats('drain'));
if (queued.pending !== N.drain) fail(`seeding queued ${queued.pending} ops, not ${N.drain}`);
const outboxDrain = await expectApplied('outbox drain', N.drain, () => profiled('drain', () => call(() => bench.drain('drain'))));
if (outboxDrain.delivered !== N.drain || outboxDrain.pending !== 0 || outboxDrain.trouble) fail(`outbox drain: ${JSON.stringify(outboxDrain)}`);
await call(() => bench.close('drain'));
await call(() => bench.deleteDatabase('drain'));

progress(`drain: Workbox replays ${N.drain} requests (${N.enqueue} queued by the enqueue line, the rest pushed now)`);
await call((s, c, f, n) => bench.workboxPush(s, 'wb-drain', c, f, n, false), server, wbClient, N.enqueue, N.drain - N.enqueue);
const workboxDrain = await expectApplied('Workbox replay', N.drain, () => call(() => bench.workboxReplay('wb-drain')));
if (workboxDrain.requests !== N.drain || workboxDrain.failed || workboxDrain.left) fail(`Workbox replay: ${JSON.stringify({ ...workboxDrain, perOp: undefined })}`);

progress(`drain: the floor, ${N.drain} ops in batches of 100 with 2 requests in flight, nothing stored`);
const batchedDrain = await expectApplied('batched fetch', N.drain, () => call((s, c, n) => bench.fetchBatched(s, c, n, 100, 2), server, crypto.randomUUID(), N.drain));
if (batchedDrain.failed) fail(`batched fetch: ${batchedDrain.failed} requests failed`);

progress(`drain: a plain sequential fetch loop sends ${N.drain} requests`);
const loopDrain = await expectApplied('fetch loop', N.drain, () => call((s, c, n) => bench.fetchLoop(s, c, n), server, crypto.randomUUID(), N.drain));
if (loopDrain.failed) fail(`fetch loop: ${loopDrain.failed} requests failed`);

const drainLine = (d, requests) => ({ ops: N.drain, requests, ms: d.ms, opsPerSec: (1000 * N.drain) / d.ms, perRequest: d.perOp ? summary(d.perOp) : null });
results.drain = {
  outbox: { ...drainLine(outboxDrain, null), seedMs },
  workbox: drainLine(workboxDrain, workboxDrain.requests),
  fetchLoop: drainLine(loopDrain, loopDrain.requests),
  batchedFetch: drainLine(batchedDrain, batchedDrain.requests),
};

// Scale: the same measurements on top of 0, 10,000 and 100,000 pending ops. Each level: a fresh
// queue filled to the level, N.enqueue sequential enqueue() on top, memory, then the time to
// deliver the first N.enqueue ops (the same window at every level), and the queue is dropped.
const scale = [];
for (const pending of N.levels) {
  const database = `scale-${pending}`;
  await call((s, d) => bench.open(s, d), server, database);
  let filled = 0;
  if (pending) {
    progress(`scale ${pending}: filling the queue`);
    filled = await call((d, n) => bench.seed(d, n), database, pending);
    const stats = await call((d) => bench.stats(d), database);
    if (stats.pending !== pending) fail(`seeding queued ${stats.pending} ops, not ${pending}`);
  }
  progress(`scale ${pending}: ${filled ? `filled in ${(filled / 1000).toFixed(1)} s; ` : ''}${N.enqueue} sequential enqueues on top`);
  const times = await call((d, f, n) => bench.enqueueSequential(d, f, n), database, pending, N.enqueue);
  const after = await call((d) => bench.stats(d), database);
  if (after.pending !== pending + N.enqueue) fail(`scale ${pending}: ${after.pending} ops pending, not ${pending + N.enqueue}`);
  const mem = await memory();
  progress(`scale ${pending}: delivering the first ${N.enqueue} ops`);
  const drained = await expectApplied(`drain at ${pending} pending`, N.enqueue, () => call((d, n) => bench.drain(d, n), database, N.enqueue), { atLeast: true });
  if (drained.trouble) fail(`drain at ${pending} pending: ${JSON.stringify(drained)}`);
  scale.push({ pending, enqueue: summary(times), drain: { ops: N.enqueue, of: pending + N.enqueue, ms: drained.ms, opsPerSec: (1000 * N.enqueue) / drained.ms }, memory: mem, fillMs: filled });
  await call((d) => bench.deleteDatabase(d), database);
}
results.scale = scale;
results.memoryAfterDrains = await memory();

// Where the calls go: IndexedDB requests and transactions per enqueue (on an empty queue) and per
// delivered op (the drain line's workload again: N.drain ops over 1,000 entities).
progress(`hot path: counting IndexedDB calls for ${N.count} enqueues, then for delivering ${N.drain} ops`);
await call((s) => bench.open(s, 'count-enqueue'), server);
await call(() => bench.instrument(true));
const enqueueMs = await call(async (n) => {
  const start = performance.now();
  await bench.enqueueSequential('count-enqueue', 0, n);
  return performance.now() - start;
}, N.count);
const enqueueCalls = await call(() => bench.instrument(false));
await call(() => bench.instrument(true));
await call((n) => bench.rawPut('count-floor', 0, n, 'strict'), N.count);
const floorCalls = await call(() => bench.instrument(false));
await call(() => bench.deleteDatabase('count-floor'));
await call(() => bench.close('count-enqueue'));
await call(() => bench.deleteDatabase('count-enqueue'));
await call((s) => bench.open(s, 'count-drain'), server);
await call((n) => bench.seed('count-drain', n), N.drain);
await call(() => bench.instrument(true));
const countDrain = await expectApplied('counted drain', N.drain, () => call(() => bench.drain('count-drain')));
const drainCalls = await call(() => bench.instrument(false));
await call(() => bench.close('count-drain'));
await call(() => bench.deleteDatabase('count-drain'));
const per = (calls, n) => Object.fromEntries(Object.entries(calls).sort().map(([k, v]) => [k, v / n]));
results.calls = {
  enqueues: N.count,
  delivered: countDrain.delivered,
  perEnqueue: per(enqueueCalls.counts, N.count),
  perDeliveredOp: per(drainCalls.counts, countDrain.delivered),
  // Summed durations of transactions (begin to complete) and fetches; they overlap in a drain.
  msPerEnqueue: { wall: enqueueMs / N.count, ...per(enqueueCalls.durations, N.count) },
  msPerDeliveredOp: { wall: countDrain.ms / countDrain.delivered, ...per(drainCalls.durations, countDrain.delivered) },
  // Transactions grouped by the kinds of request they made: how many, ms each, requests each.
  enqueueTransactions: shapes(enqueueCalls.shapes),
  floorTransactions: shapes(floorCalls.shapes),
  drainTransactions: shapes(drainCalls.shapes),
};
function shapes(found) {
  return Object.fromEntries(Object.entries(found).map(([shape, t]) => [shape, {
    transactions: t.transactions, msEach: t.ms / t.transactions, msToCommitEach: t.msToCommit / t.transactions,
    requestsEach: Object.fromEntries(Object.entries(t.requests).map(([k, v]) => [k, round(v / t.transactions, 1)])),
  }]));
}

// Cold start: stop the worker, wake it with a message, time from the handler's start to ready.
// Each run starts a fresh worker and measures one library; the first run of each is discarded
// (it creates the database).
progress(`cold start: ${N.cold} worker starts per line (+1 discarded each)`);
const cold = { outbox: [], floor: [], workbox: [], 'wasm-compile': [] };
// The first compile of the module in this profile: if V8 kept compiled code for the extension's
// wasm between workers (its code cache), the later compiles would be much faster than this one.
let firstCompileMs;
await pageCdp.send('ServiceWorker.enable');
for (let run = 0; run <= N.cold; run++) {
  for (const which of run % 2 ? ['workbox', 'wasm-compile', 'outbox', 'floor'] : ['outbox', 'floor', 'wasm-compile', 'workbox']) {
    await pageCdp.send('ServiceWorker.stopAllWorkers');
    const answer = await page.evaluate((message) => chrome.runtime.sendMessage(message), { bench: 'cold-start', which, server, database: 'cold' });
    if (!answer || answer.error) fail(`cold start (${which}): ${answer?.error ?? 'no answer'}`);
    if (run > 0) cold[which].push(answer);
    else if (which === 'wasm-compile') firstCompileMs = answer.ms;
  }
}
// One more start of each, not timed, counting the calls made until ready.
const coldCalls = {};
for (const which of ['outbox', 'workbox']) {
  await pageCdp.send('ServiceWorker.stopAllWorkers');
  const answer = await page.evaluate((message) => chrome.runtime.sendMessage(message), { bench: 'cold-start', which, server, database: 'cold', instrument: true });
  if (!answer || answer.error) fail(`cold start (${which}, counted): ${answer?.error ?? 'no answer'}`);
  coldCalls[which] = Object.fromEntries(Object.entries(answer.calls.counts).sort());
}
const coldSummary = (runs, key) => summary(runs.map((r) => r[key]));
results.coldCalls = coldCalls;
results.cold = {
  floor: { ready: coldSummary(cold.floor, 'ms'), compile: coldSummary(cold.floor, 'compileMs') },
  outbox: { accepts: coldSummary(cold.outbox, 'acceptsMs'), ready: coldSummary(cold.outbox, 'ms'), wasm: coldSummary(cold.outbox, 'wasmMs'), open: coldSummary(cold.outbox, 'openMs'), stats: coldSummary(cold.outbox, 'statsMs'), sinceWorkerStart: coldSummary(cold.outbox, 'ready'), evaluated: coldSummary(cold.outbox, 'evaluatedAt') },
  wasmCompile: coldSummary(cold['wasm-compile'], 'ms'),
  firstCompileMs,
  workbox: { construct: coldSummary(cold.workbox, 'constructMs'), constructAndSize: coldSummary(cold.workbox, 'ms'), sinceWorkerStart: coldSummary(cold.workbox, 'ready'), evaluated: coldSummary(cold.workbox, 'evaluatedAt') },
};
results.meta.loadAverageAtEnd = os.loadavg().map((x) => round(x));
results.meta.seconds = Math.round((Date.now() - began) / 1000);
await context.close();

// ---- targets, tables, results.json --------------------------------------------------------------

const e = results.enqueue;
const d = results.drain;
const c = results.cold;
const level = (p) => scale.find((s) => s.pending === p);
const top = level(Math.max(...N.levels));
results.targets = [
  { target: 'enqueue p50 ≤ 1.3 × raw strict put p50', limit: 1.3, measured: e.outbox.p50 / e.rawStrict.p50, atMost: true },
  { target: 'drain ≥ 0.6 × batched fetch, nothing stored (ops/s)', limit: 0.6, measured: d.outbox.opsPerSec / d.batchedFetch.opsPerSec, atMost: false },
  { target: 'cold start (open() resolved) ≤ 1.5 × its floor (compile + open + count)', limit: 1.5, measured: c.outbox.accepts.p50 / c.floor.ready.p50, atMost: true },
  { target: 'drain ≥ 10 × Workbox replay (ops/s)', limit: 10, measured: d.outbox.opsPerSec / d.workbox.opsPerSec, atMost: false },
  { target: 'cold start ≤ 1.5 × Workbox (construct + first size())', limit: 1.5, measured: c.outbox.accepts.p50 / c.workbox.constructAndSize.p50, atMost: true },
  { target: `enqueue p50 at ${int(top.pending)} pending ≤ 1.2 × at 0`, limit: 1.2, measured: top.enqueue.p50 / level(0).enqueue.p50, atMost: true },
  { target: 'shipped wasm + JS ≤ 100 KB gzipped', limit: results.size.targetGzipBytes, measured: results.size.outbox.gzip, atMost: true, bytes: true },
].map((t) => ({ ...t, met: t.atMost ? t.measured <= t.limit : t.measured >= t.limit }));

/** A Markdown table; `left` is how many leading columns are text (left-aligned). */
const table = (head, rows, left = 1) => [`| ${head.join(' | ')} |`, `|${head.map((h, i) => (i < left ? '---' : '---:')).join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
const md = [];
md.push(`Measured ${results.meta.date.slice(0, 10)} with \`${results.meta.command}\` in ${results.meta.seconds} s: Chromium ${results.meta.chromium} headless, ` +
  `${results.meta.machine.cpu}, ${results.meta.machine.cores} cores, ${results.meta.machine.memoryGiB} GiB, ${results.meta.machine.os}; ` +
  `outbox ${results.meta.git} (wasm sha256 ${results.meta.wasmSha256.slice(0, 12)}), workbox-background-sync ${results.meta.workbox}. ` +
  `Load average ${results.meta.machine.loadAverageAtStart.join(', ')} at the start, ${results.meta.loadAverageAtEnd.join(', ')} at the end.`);
md.push('', `**Enqueue latency**, ms per call, ${int(N.enqueue)} sequential calls per line in one service worker (ratio: outbox ÷ this line)`, '');
md.push(table(['line', 'durability', 'p50', 'p99', 'mean', 'p50 ratio', 'p99 ratio'], [
  ['outbox `enqueue()`', 'strict', ms(e.outbox.p50), ms(e.outbox.p99), ms(e.outbox.mean), '', ''],
  ['raw IndexedDB put, one per transaction (the floor)', 'strict', ms(e.rawStrict.p50), ms(e.rawStrict.p99), ms(e.rawStrict.mean), ratio(e.outbox.p50 / e.rawStrict.p50), ratio(e.outbox.p99 / e.rawStrict.p99)],
  ['raw IndexedDB put, one per transaction', 'relaxed', ms(e.rawRelaxed.p50), ms(e.rawRelaxed.p99), ms(e.rawRelaxed.mean), ratio(e.outbox.p50 / e.rawRelaxed.p50), ratio(e.outbox.p99 / e.rawRelaxed.p99)],
  ['Workbox `Queue.pushRequest()`', 'relaxed (Workbox sets it)', ms(e.workbox.p50), ms(e.workbox.p99), ms(e.workbox.mean), ratio(e.outbox.p50 / e.workbox.p50), ratio(e.outbox.p99 / e.workbox.p99)],
], 2));
md.push('', `**Drain throughput**, ${int(N.drain)} queued ops to the reference server on loopback (ratio: outbox ops/s ÷ this line's)`, '');
const perReq = (x) => (x.perRequest ? `${ms(x.perRequest.p50)} / ${ms(x.perRequest.p99)}` : '—');
md.push(table(['line', 'requests', 'seconds', 'ops/s', 'ms per request p50 / p99', 'ratio'], [
  ['outbox (`flush()`, batches of up to 100, 2 in flight)', '—', (d.outbox.ms / 1000).toFixed(1), int(d.outbox.opsPerSec), '—', ''],
  ['batched `fetch`, batches of 100, 2 in flight, nothing stored (the floor)', int(d.batchedFetch.requests), (d.batchedFetch.ms / 1000).toFixed(1), int(d.batchedFetch.opsPerSec), perReq(d.batchedFetch), ratio(d.outbox.opsPerSec / d.batchedFetch.opsPerSec)],
  ['Workbox `replayRequests()`, one op per request', int(d.workbox.requests), (d.workbox.ms / 1000).toFixed(1), int(d.workbox.opsPerSec), perReq(d.workbox), ratio(d.outbox.opsPerSec / d.workbox.opsPerSec)],
  ['plain sequential `fetch` loop, one op per request, no storage', int(d.fetchLoop.requests), (d.fetchLoop.ms / 1000).toFixed(1), int(d.fetchLoop.opsPerSec), perReq(d.fetchLoop), ratio(d.outbox.opsPerSec / d.fetchLoop.opsPerSec)],
]));
md.push('', `**Cold start**, ms from the wake-up message's handler to ready, ${N.cold} worker starts per line (p99 of ${N.cold} runs is their maximum; ratio: outbox ready ÷ this)`, '');
md.push(table(['line', 'ready means', 'p50', 'p99', 'ratio', 'since worker start p50'], [
  ['outbox', '`init()` (wasm fetched, compiled, instantiated) + `Outbox.open()`: `enqueue()` accepted from here', ms(c.outbox.accepts.p50), ms(c.outbox.accepts.p99), '', ''],
  ['  of which `init()`', '', ms(c.outbox.wasm.p50), ms(c.outbox.wasm.p99), '', ''],
  ['  of which `Outbox.open()`', '', ms(c.outbox.open.p50), ms(c.outbox.open.p99), '', ''],
  ['  then a first `stats()`', 'not on the wake path; a popup asks for it', ms(c.outbox.stats.p50), ms(c.outbox.stats.p99), '', ms(c.outbox.sinceWorkerStart.p50)],
  ['the floor', '`compileStreaming(fetch(wasm))` + `indexedDB.open()` of the same database + a count of its ops, in a fresh worker', ms(c.floor.ready.p50), ms(c.floor.ready.p99), ratio(c.outbox.accepts.p50 / c.floor.ready.p50), ''],
  ['  of which the compile', '', ms(c.floor.compile.p50), ms(c.floor.compile.p99), '', ''],
  ['(wasm alone)', '`WebAssembly.compileStreaming(fetch(wasm))` in a fresh worker: what `init()` does first', ms(c.wasmCompile.p50), ms(c.wasmCompile.p99), '', ''],
  ['Workbox', '`new Queue()` (opens nothing yet)', ms(c.workbox.construct.p50), ms(c.workbox.construct.p99), ratio(c.outbox.accepts.p50 / c.workbox.construct.p50), ''],
  ['Workbox', '`new Queue()` + first `size()` (database open, count known)', ms(c.workbox.constructAndSize.p50), ms(c.workbox.constructAndSize.p99), ratio(c.outbox.accepts.p50 / c.workbox.constructAndSize.p50), ms(c.workbox.sinceWorkerStart.p50)],
], 2));
const codeCached = c.wasmCompile.p50 < 0.5 * c.firstCompileMs;
md.push('', `The first compile in this profile (a discarded start) took ${ms(c.firstCompileMs)} ms, the later ones ${ms(c.wasmCompile.p50)} ms (p50): ` +
  (codeCached ? 'later workers compile much faster, so V8 appears to keep compiled code for the extension\'s wasm.' : 'no faster, so no compiled code is kept for the extension\'s wasm between workers and every cold start compiles it again.'));
md.push('', `The worker's module (both libraries) had finished evaluating ${ms(c.outbox.evaluated.p50)} ms (outbox runs) and ${ms(c.workbox.evaluated.p50)} ms (Workbox runs) after the worker started (p50); "since worker start" adds that and the message's dispatch.`);
md.push('', `**Scale**: ${int(N.enqueue)} sequential \`enqueue()\` on top of a queue of *pending* ops, then a drain (ratio: this level ÷ level 0)`, '');
const second = scale[1];
md.push(table(['pending', 'enqueue p50', 'p99', 'p50 ÷ at 0', 'drain ops/s', 'drain ÷ at 0', `drain ÷ at ${int(second.pending)}`, 'drained', 'JS heap', 'wasm memory'], scale.map((s) => [
  int(s.pending), ms(s.enqueue.p50), ms(s.enqueue.p99), s.pending ? ratio(s.enqueue.p50 / level(0).enqueue.p50) : '',
  int(s.drain.opsPerSec), s.pending ? ratio(s.drain.opsPerSec / level(0).drain.opsPerSec) : '', s.pending > second.pending ? ratio(s.drain.opsPerSec / second.drain.opsPerSec) : '',
  `first ${int(s.drain.ops)} of ${int(s.drain.of)}`,
  mib(s.memory.jsHeapBytes), mib(s.memory.wasmMemoryBytes),
])));
md.push('', `At 0 pending each of the ${int(N.enqueue)} ops is alone on its entity, so delivering it promotes no successor; above 0 every delivered op promotes the next op of its entity (an index read and a put). Compare the levels above 0 with each other for the effect of queue length alone.`);
md.push('', `Memory is measured after the enqueues, with ${int(N.enqueue)} more ops pending than the level says, after a forced GC. ` +
  `After every drain: JS heap ${mib(results.memoryAfterDrains.jsHeapBytes)}, wasm memory ${mib(results.memoryAfterDrains.wasmMemoryBytes)} (linear memory never shrinks: this is its high-water mark).`);
const s = results.size;
md.push('', '**Size**, bytes; each file gzipped on its own at level 9', '');
md.push(table(['what', 'raw', 'gzip', 'ratio'], [
  ...s.outbox.files.map((f) => [`\`${f.file}\``, int(f.raw), int(f.gzip), '']),
  ['outbox, shipped wasm + JS', int(s.outbox.raw), int(s.outbox.gzip), ''],
  [`Workbox background-sync ${results.meta.workbox}, esbuild bundle with deps, minified`, int(s.workbox.raw), int(s.workbox.gzip), ratio(s.outbox.gzip / s.workbox.gzip)],
  ['target (issue 6)', '', int(s.targetGzipBytes), ratio(s.outbox.gzip / s.targetGzipBytes)],
  ['budget (`make test` fails past it)', '', int(s.budgetGzipBytes), ratio(s.outbox.gzip / s.budgetGzipBytes)],
]));
md.push('', '**Targets**', '');
md.push(table(['target', 'measured', 'met'], results.targets.map((t) => [t.target, t.bytes ? `${int(t.measured)} B` : ratio(t.measured), t.met ? 'yes' : '**no**']), 1));
const callRow = (calls) => Object.entries(calls).map(([k, v]) => `${k} ${v > 0 && v < 0.001 ? '<0.001' : round(v, 3)}`).join(', ');
md.push('', `**Calls per op**: ${int(N.count)} enqueues on an empty queue, then the delivery of ${int(N.drain)} queued ops as in the drain line, counted by wrapping the IndexedDB prototypes and fetch`, '');
md.push(table(['path', 'calls'], [
  ['`enqueue()`, per call', callRow(results.calls.perEnqueue)],
  ['`enqueue()`, ms per call: wall, and summed over transactions and fetches', callRow(results.calls.msPerEnqueue)],
  ['delivery, per delivered op', callRow(results.calls.perDeliveredOp)],
  ['delivery, ms per delivered op: wall, and summed over transactions and fetches (they overlap)', callRow(results.calls.msPerDeliveredOp)],
  ['outbox cold start, until ready', callRow(results.coldCalls.outbox)],
  ['Workbox cold start, until ready', callRow(results.coldCalls.workbox)],
], 2));
md.push('', 'Transactions grouped by the requests they made: how many, ms each from begin to complete, the part of it until `commit()` was called (the requests and the work between them; the rest is the commit), and requests each:', '');
const txRow = (path) => ([shape, t]) => [path, shape.split(':')[0].replace('transaction ', ''), int(t.transactions), ms(t.msEach), ms(t.msToCommitEach), callRow(t.requestsEach)];
md.push(table(['path', 'transaction', 'count', 'ms each', 'of which until commit()', 'requests each'], [
  ...Object.entries(results.calls.enqueueTransactions).map(txRow('`enqueue()`')),
  ...Object.entries(results.calls.floorTransactions).map(txRow('raw put (the floor)')),
  ...Object.entries(results.calls.drainTransactions).map(txRow('delivery')),
], 2));
md.push('', `**IndexedDB request patterns** in this worker, ms per record, commit included (${Math.min(100, N.enqueue)} records of the floor's store per transaction, p50 of 5 runs)`, '');
md.push(table(['pattern', 'ms per record'], Object.entries(results.requestPatterns).map(([name, t]) => [name, ms(t.p50)])));
results.markdown = md.join('\n');

const resultsFile = QUICK ? path.join(out, 'results-quick.json') : path.join(root, 'bench/results.json');
fs.writeFileSync(resultsFile, `${JSON.stringify(results, (key, value) => (typeof value === 'number' && !Number.isInteger(value) ? round(value, 3) : value), 2)}\n`);
console.log(results.markdown);
progress(`done; wrote ${path.relative(root, resultsFile)}`);
