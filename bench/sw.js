// The benchmark's service worker. scripts/bench copies it, with the shipped package
// (extension/pkg) and the esbuild bundle of workbox-background-sync, into bench/out/ext, and
// bench/run.mjs drives it: through `worker.evaluate(() => bench.…)` for the warm measurements,
// and through runtime messages from an extension page for cold starts (a stopped worker cannot be
// evaluated in; a message starts it).
//
// Every line runs in this one worker, against one loopback server, with the same op shape:
// ENTITIES entities, one small JSON payload each.
import init, { Outbox } from './pkg/outbox.js';
import { Queue } from './workbox-background-sync.js';

// When the module finished evaluating, in ms since the worker started (its time origin).
const evaluatedAt = performance.now();

const WASM_URL = new URL('./pkg/outbox_bg.wasm', import.meta.url);
/** Ops are spread over this many entities (the outbox delivers one op per entity at a time). */
const ENTITIES = 1000;

let wasm = null;
const outboxes = new Map(); // database name -> Outbox
const drainLocks = new Map(); // database name -> release()
const queues = new Map(); // Workbox queue name -> Queue
const patched = []; // [object, method name, original] while instrumented
let counts = {};
let durations = {}; // ms summed over transactions and fetches while instrumented
let shapes = {}; // transactions grouped by mode, durability and the kinds of request they made
const transactionRequests = new WeakMap();
const commits = new WeakMap(); // transaction -> when commit() was called

async function loadWasm() {
  wasm ??= await init({ module_or_path: WASM_URL });
  return wasm;
}

/** What the user did, op number `i`. */
function draft(i) {
  return {
    entity: `pr/${i % ENTITIES}`,
    kind: 'review',
    payload: { approved: i % 2 === 0, comment: 'Looks good to me', n: i },
  };
}

/**
 * The same op on the wire, for the lines that send without the outbox (Workbox, plain fetch):
 * the op's `seq`, and `prev` chained per entity as the outbox would.
 */
function wireOp(i) {
  const seq = i + 1;
  const d = draft(i);
  return {
    id: crypto.randomUUID(), seq, prev: i >= ENTITIES ? seq - ENTITIES : 0, entity: d.entity,
    kind: d.kind, payload: d.payload, created_at: Date.now(),
  };
}

/** A `POST /v1/ops` body of a client of its own carrying ops `from` to `from + count - 1`. */
function envelope(client, from, count = 1) {
  const ops = new Array(count);
  for (let k = 0; k < count; k++) ops[k] = wireOp(from + k);
  return JSON.stringify({ client, ops });
}

function outboxOptions(server, database) {
  return {
    endpoint: server.url,
    database,
    auth: () => ({ authorization: `Bearer ${server.token}` }),
    // The scale line keeps 101,000 ops pending.
    limits: { maxPending: 1_000_000, maxBytes: 1024 * 1024 * 1024 },
  };
}

/** Runs `run()` and resolves with how long it took, in ms. */
async function time(run) {
  const start = performance.now();
  await run();
  return performance.now() - start;
}

function requestDone(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function transactionDone(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onabort = tx.onerror = () => reject(tx.error ?? new Error('transaction aborted'));
  });
}

const bench = {
  evaluatedAt,

  /** The wasm module's linear memory (the JS heap is read over CDP: workers lack performance.memory). */
  async wasmMemory() {
    return (await loadWasm()).memory.buffer.byteLength;
  },

  /** Opens an outbox on `database` with delivery held off (its drain lock taken). */
  async open(server, database) {
    bench.server = server;
    await loadWasm();
    await bench.hold(database);
    outboxes.set(database, await Outbox.open(outboxOptions(server, database)));
  },

  /**
   * Takes the outbox's drain lock, so that no context starts delivering: enqueue() is then
   * measured alone, and ops stay pending. (The outbox tries the lock without waiting.)
   */
  async hold(database) {
    if (drainLocks.has(database)) return;
    await new Promise((acquired) => {
      navigator.locks.request(`outbox-drain:${database}`, () => {
        acquired();
        return new Promise((release) => drainLocks.set(database, release));
      });
    });
  },

  release(database) {
    drainLocks.get(database)?.();
    drainLocks.delete(database);
  },

  /** `n` enqueue() calls one after another; the ms each took. */
  async enqueueSequential(database, from, n) {
    const outbox = outboxes.get(database);
    const times = new Array(n);
    for (let i = 0; i < n; i++) {
      const op = draft(from + i);
      const start = performance.now();
      await outbox.enqueue(op);
      times[i] = performance.now() - start;
    }
    return times;
  },

  /** `n` enqueue() calls with `concurrency` in flight at once (to fill a queue); total ms. */
  async enqueueParallel(database, from, n, concurrency) {
    const outbox = outboxes.get(database);
    let next = from;
    const end = from + n;
    const lane = async () => {
      while (next < end) await outbox.enqueue(draft(next++));
    };
    return time(() => Promise.all(Array.from({ length: concurrency }, lane)));
  },

  /**
   * Fills the open, empty outbox `database` with `n` pending ops, fast. Strict transactions
   * are serialised and each waits for a flush (about 1.5 ms here), so `n` enqueue() calls take
   * minutes at 100,000, in parallel or not (measured: 8 or 64 in flight were no faster than one).
   * So: the first op of each entity goes through enqueue() (so heads, client and counters are
   * the outbox's own), and every later op is a copy of its entity's head record with a new
   * `seq`, `prev`, id and payload and no due time, written in chunks; then the counters. This
   * knows the record layout (either the plain-object records or the `json` text records), and
   * the runner checks the result: stats() must count `n`, and the drain must deliver exactly
   * `n` ops, all applied by the server.
   */
  async seed(database, n) {
    const outbox = outboxes.get(database);
    const heads = Math.min(n, ENTITIES);
    const start = performance.now();
    await bench.enqueueParallel(database, 0, heads, 8);
    if (n === heads) return performance.now() - start;
    await outbox.close();
    const db = await requestDone(indexedDB.open(database));
    try {
      const read = db.transaction(['ops', 'meta'], 'readonly');
      const templates = await requestDone(read.objectStore('ops').getAll());
      const counters = await requestDone(read.objectStore('meta').get('counters'));
      if (templates.length !== heads) throw new Error(`seed: expected ${heads} heads, found ${templates.length}`);
      const textual = typeof counters === 'string';
      const count = textual ? JSON.parse(counters) : { ...counters };
      if (count.pending !== heads || count.next_seq !== heads + 1) throw new Error(`seed: unexpected counters ${JSON.stringify(counters)}`);
      const fields = (record) => (typeof record.json === 'string' ? JSON.parse(record.json) : record);
      // Bytes per op beyond its payload and entity, as the outbox counted the heads.
      let known = 0;
      for (const record of templates) { const op = fields(record); known += op.payload.length + op.entity.length; }
      const overhead = (count.bytes - known) / heads;
      if (!Number.isInteger(overhead)) throw new Error(`seed: uneven op overhead ${overhead}`);
      const byEntity = new Map(templates.map((record) => [fields(record).entity, record]));
      const now = Date.now();
      const copy = (i) => {
        const template = byEntity.get(draft(i).entity);
        const seq = i + 1;
        const prev = i < 2 * ENTITIES ? fields(template).seq : seq - ENTITIES;
        const changes = {
          id: crypto.randomUUID(), seq, prev, payload: JSON.stringify(draft(i).payload),
          created_at: now, next_attempt_at: undefined,
        };
        count.bytes += changes.payload.length + fields(template).entity.length + overhead;
        if (typeof template.json === 'string') {
          const { next_attempt_at: _due, ...outer } = template;
          const op = { ...JSON.parse(template.json), ...changes, next_attempt_at: null };
          return { ...outer, seq, json: JSON.stringify(op) };
        }
        const { next_attempt_at: _due, ...op } = { ...template, ...changes };
        return op;
      };
      const CHUNK = 5000;
      for (let from = heads; from < n; from += CHUNK) {
        const tx = db.transaction(['ops'], 'readwrite', { durability: 'relaxed' });
        const ops = tx.objectStore('ops');
        for (let i = from; i < Math.min(n, from + CHUNK); i++) ops.put(copy(i));
        await transactionDone(tx);
      }
      count.pending = n;
      count.next_seq = n + 1;
      const tx = db.transaction(['meta'], 'readwrite', { durability: 'strict' });
      tx.objectStore('meta').put(textual ? JSON.stringify(count) : count, 'counters');
      await transactionDone(tx);
    } finally {
      db.close();
    }
    outboxes.set(database, await Outbox.open(outboxOptions(bench.server, database)));
    return performance.now() - start;
  },

  /**
   * Releases the drain lock and delivers: everything (until flush() resolves), or, with
   * `until`, the first `until` ops, after which the outbox is closed. Counts the `delivered`
   * events; `trouble` counts the events that mean an op did not simply go through.
   */
  async drain(database, until = null) {
    const outbox = outboxes.get(database);
    const counts = { delivered: 0, trouble: 0 };
    let reached;
    let reachedAt = null;
    const enough = new Promise((resolve) => { reached = resolve; });
    outbox.on('delivered', () => {
      if (++counts.delivered === until) {
        reachedAt = performance.now();
        reached();
      }
    });
    for (const name of ['retry-scheduled', 'dead-lettered', 'conflict', 'breaker-opened', 'error']) {
      outbox.on(name, () => counts.trouble++);
    }
    const start = performance.now();
    bench.release(database);
    const flushed = outbox.flush().then((stats) => ({ stats, end: performance.now() }));
    if (until == null) {
      const { stats, end } = await flushed;
      return { ms: end - start, ...counts, pending: stats.pending };
    }
    flushed.catch(() => {}); // closing below makes it reject
    await Promise.race([enough, flushed]);
    if (reachedAt == null) throw new Error(`drain: the queue emptied after ${counts.delivered} of ${until} deliveries`);
    const result = { ms: reachedAt - start, ...counts };
    await bench.close(database);
    return result;
  },

  async stats(database) {
    return outboxes.get(database).stats();
  },

  async close(database) {
    await outboxes.get(database)?.close();
    outboxes.delete(database);
    bench.release(database);
  },

  /**
   * The floor: `n` puts of an op-shaped record, one put per transaction with `durability`, into
   * a store with the outbox's key path and indexes. The ms each transaction took to complete.
   */
  async rawPut(database, from, n, durability) {
    const open = indexedDB.open(database, 1);
    open.onupgradeneeded = () => {
      const ops = open.result.createObjectStore('ops', { keyPath: 'seq' });
      ops.createIndex('by_due', 'next_attempt_at');
      ops.createIndex('by_entity', ['entity', 'seq']);
    };
    const db = await requestDone(open);
    const times = new Array(n);
    for (let k = 0; k < n; k++) {
      const i = from + k;
      const d = draft(i);
      const start = performance.now();
      const tx = db.transaction(['ops'], 'readwrite', { durability });
      tx.objectStore('ops').put({
        id: crypto.randomUUID(), seq: i + 1, prev: i >= ENTITIES ? i + 1 - ENTITIES : 0,
        entity: d.entity, kind: d.kind, payload: JSON.stringify(d.payload), priority: 'user',
        created_at: Date.now(), attempts: 0, failures: 0, solo: false,
        ...(i < ENTITIES ? { next_attempt_at: Date.now() } : {}),
      });
      tx.commit(); // as the outbox does: no wait for the auto-commit
      await transactionDone(tx);
      times[k] = performance.now() - start;
    }
    db.close();
    return times;
  },

  /**
   * A Workbox queue as the benchmark uses it: `forceSyncFallback` so that pushRequest does not
   * call `registration.sync.register()` (which rejects in an extension worker with no page
   * open), and a no-op `onSync` so that nothing replays until replayRequests() is called.
   */
  workboxQueue(name) {
    if (!queues.has(name)) queues.set(name, new Queue(name, { forceSyncFallback: true, onSync: async () => {} }));
    return queues.get(name);
  },

  /** `n` Queue.pushRequest() calls one after another, each a POST of one op; the ms each took. */
  async workboxPush(server, name, client, from, n, measure = true) {
    const queue = bench.workboxQueue(name);
    const times = measure ? new Array(n) : null;
    const headers = { 'content-type': 'application/json', authorization: `Bearer ${server.token}` };
    for (let i = 0; i < n; i++) {
      const request = new Request(`${server.url}/v1/ops`, { method: 'POST', headers, body: envelope(client, from + i) });
      const start = performance.now();
      await queue.pushRequest({ request });
      if (measure) times[i] = performance.now() - start;
    }
    return measure ? times : null;
  },

  /**
   * Queue.replayRequests() over everything queued: total ms, and the ms from one request's start
   * to the next (the cost of one op: Workbox takes the entry out of IndexedDB, then fetches).
   * The global fetch is wrapped only to take the times.
   */
  async workboxReplay(name) {
    const queue = bench.workboxQueue(name);
    const real = globalThis.fetch;
    const starts = [];
    let failed = 0;
    globalThis.fetch = (...args) => {
      starts.push(performance.now());
      return real(...args).then((response) => { if (!response.ok) failed++; return response; });
    };
    let ms;
    try {
      ms = await time(() => queue.replayRequests());
    } finally {
      globalThis.fetch = real;
    }
    const perOp = starts.slice(1).map((t, i) => t - starts[i]);
    return { ms, requests: starts.length, failed, perOp, left: await queue.size() };
  },

  /** The plain loop: `n` POSTs of one op each, one after another, no storage; ms, and each's ms. */
  async fetchLoop(server, client, n) {
    const headers = { 'content-type': 'application/json', authorization: `Bearer ${server.token}` };
    let failed = 0;
    const perOp = new Array(n);
    const ms = await time(async () => {
      for (let i = 0; i < n; i++) {
        const start = performance.now();
        const response = await fetch(`${server.url}/v1/ops`, { method: 'POST', headers, body: envelope(client, i) });
        await response.arrayBuffer();
        if (!response.ok) failed++;
        perOp[i] = performance.now() - start;
      }
    });
    return { ms, requests: n, failed, perOp };
  },

  /**
   * The drain's floor: the same `n` ops as the drain line, sent as the outbox sends them (batches
   * of `batch` per `POST /v1/ops`, `inFlight` requests at a time) with nothing read or stored.
   * Batch k+1 may go out before batch k is answered, as in the outbox; an op's `prev` is ten
   * batches back (1,000 entities), long answered when two requests are in flight.
   */
  async fetchBatched(server, client, n, batch, inFlight) {
    const headers = { 'content-type': 'application/json', authorization: `Bearer ${server.token}` };
    let failed = 0;
    let next = 0;
    const perRequest = [];
    const sender = async () => {
      while (next < n) {
        const from = next;
        const count = Math.min(batch, n - from);
        next += count;
        const start = performance.now();
        const response = await fetch(`${server.url}/v1/ops`, { method: 'POST', headers, body: envelope(client, from, count) });
        await response.arrayBuffer();
        if (!response.ok) failed++;
        perRequest.push(performance.now() - start);
      }
    };
    const ms = await time(() => Promise.all(Array.from({ length: inFlight }, sender)));
    return { ms, requests: perRequest.length, failed, perOp: perRequest };
  },

  /**
   * What IndexedDB request patterns cost in this worker, against the floor's database (its first
   * `n` records): ms per record, transaction commit included, for `n` records per transaction,
   * 5 runs each. `await`ing each request costs a round trip to the browser's IndexedDB backend;
   * requests issued together are pipelined within the transaction.
   */
  async requestPatterns(database, n) {
    const db = await requestDone(indexedDB.open(database));
    const keys = Array.from({ length: n }, (_, i) => i + 1);
    const patterns = {
      'get, awaited one by one (read-only)': async (ops) => { for (const k of keys) await requestDone(ops.get(k)); },
      'get, issued together (read-only)': (ops) => Promise.all(keys.map((k) => requestDone(ops.get(k)))),
      'get then put, awaited one by one (relaxed)': async (ops) => {
        for (const k of keys) ops.put({ ...(await requestDone(ops.get(k))), attempts: 1 });
      },
      'get, issued together, then put (relaxed)': async (ops) => {
        const records = await Promise.all(keys.map((k) => requestDone(ops.get(k))));
        for (const record of records) ops.put({ ...record, attempts: 1 });
      },
    };
    const result = {};
    for (const [name, run] of Object.entries(patterns)) {
      const times = [];
      for (let r = 0; r < 5; r++) {
        const tx = db.transaction(['ops'], name.includes('read-only') ? 'readonly' : 'readwrite', { durability: 'relaxed' });
        const start = performance.now();
        await run(tx.objectStore('ops'));
        await transactionDone(tx);
        times.push((performance.now() - start) / n);
      }
      result[name] = times;
    }
    db.close();
    return result;
  },

  async deleteDatabase(database) {
    await requestDone(indexedDB.deleteDatabase(database));
  },

  /**
   * Counts calls to IndexedDB and fetch while on: how many requests of each kind, and how many
   * transactions of each mode and durability, the outbox makes per op. Wraps the prototypes'
   * methods, which the wasm glue looks up at each call.
   */
  instrument(on) {
    if (!on) {
      for (const [target, name, original] of patched) target[name] = original;
      patched.length = 0;
      return { counts, durations, shapes };
    }
    counts = {};
    durations = {};
    shapes = {};
    const wrap = (target, prefix, names) => {
      for (const name of names) {
        const original = target[name];
        patched.push([target, name, original]);
        target[name] = function (...args) {
          const key = name === 'transaction'
            ? `transaction ${args[1] ?? 'readonly'} ${args[2]?.durability ?? 'default'}`
            : `${prefix}.${name}`;
          counts[key] = (counts[key] ?? 0) + 1;
          const result = original.apply(this, args);
          // How long transactions (begin to complete) and fetches (call to response) last, and
          // which requests each transaction made.
          const start = performance.now();
          const took = () => { durations[key] = (durations[key] ?? 0) + performance.now() - start; };
          if (name === 'transaction') {
            const made = {};
            transactionRequests.set(result, made);
            const done = () => {
              took();
              const end = performance.now();
              const commitAt = commits.get(result) ?? end;
              const shape = `${key}: ${Object.keys(made).sort().join(' ')}`;
              const entry = (shapes[shape] ??= { transactions: 0, ms: 0, msToCommit: 0, requests: {} });
              entry.transactions++;
              entry.ms += end - start;
              // Until commit() was called (the requests and the work between them), or until
              // complete when the transaction committed on its own.
              entry.msToCommit += commitAt - start;
              for (const [request, n] of Object.entries(made)) entry.requests[request] = (entry.requests[request] ?? 0) + n;
            };
            result.addEventListener('complete', done);
            result.addEventListener('abort', done);
          } else if (name === 'fetch') {
            result.then(took, took);
          } else if (prefix === 'store' || prefix === 'index') {
            const tx = prefix === 'store' ? this.transaction : this.objectStore.transaction;
            const made = transactionRequests.get(tx);
            if (made) made[key] = (made[key] ?? 0) + 1;
          }
          return result;
        };
      }
    };
    wrap(IDBDatabase.prototype, 'db', ['transaction']);
    wrap(IDBObjectStore.prototype, 'store', ['put', 'add', 'get', 'getAll', 'getAllKeys', 'delete', 'count', 'openCursor', 'openKeyCursor']);
    wrap(IDBIndex.prototype, 'index', ['get', 'getAll', 'getAllKeys', 'count', 'openCursor', 'openKeyCursor']);
    wrap(IDBCursor.prototype, 'cursor', ['continue', 'advance']);
    wrap(globalThis, 'global', ['fetch']);
    wrap(IDBFactory.prototype, 'indexedDB', ['open']);
    const commit = IDBTransaction.prototype.commit;
    patched.push([IDBTransaction.prototype, 'commit', commit]);
    IDBTransaction.prototype.commit = function () {
      commits.set(this, performance.now());
      return commit.call(this);
    };
    return null;
  },
};
globalThis.bench = bench;

// Cold start: a page sends {bench: 'cold-start', which, server} to a stopped worker. Timed from
// the handler's start (the module has been evaluated: both libraries' code is loaded in every
// run), plus, for reference, the worker's own clock (ms since the worker started).
chrome.runtime.onMessage.addListener((message, _sender, sendResponse) => {
  if (message?.bench !== 'cold-start') return false;
  coldStart(message).then(sendResponse, (error) => sendResponse({ error: String(error?.stack ?? error) }));
  return true;
});

async function coldStart({ which, server, database, instrument }) {
  if (instrument) bench.instrument(true);
  try {
    const result = await coldStartTimed({ which, server, database });
    return instrument ? { ...result, calls: bench.instrument(false) } : result;
  } finally {
    if (instrument) bench.instrument(false);
  }
}

async function coldStartTimed({ which, server, database }) {
  const start = performance.now();
  if (which === 'outbox') {
    await loadWasm();
    const instantiated = performance.now();
    const outbox = await Outbox.open({ ...outboxOptions(server, database) });
    const opened = performance.now();
    const stats = await outbox.stats();
    const ready = performance.now();
    return {
      evaluatedAt, start, ready, ms: ready - start, acceptsMs: opened - start, wasmMs: instantiated - start, openMs: opened - instantiated,
      statsMs: ready - opened, pending: stats.pending,
    };
  }
  if (which === 'floor') {
    // The least a worker must do before it can take an op: compile the module, open the queue's
    // database and count what it holds.
    await WebAssembly.compileStreaming(fetch(WASM_URL));
    const compiled = performance.now();
    const db = await requestDone(indexedDB.open(database));
    const pending = await requestDone(db.transaction('ops', 'readonly').objectStore('ops').count());
    db.close();
    const ready = performance.now();
    return { evaluatedAt, start, ready, ms: ready - start, compileMs: compiled - start, pending };
  }
  if (which === 'wasm-compile') {
    // Only fetching and compiling the module, as init() does first, in a fresh worker.
    await WebAssembly.compileStreaming(fetch(WASM_URL));
    const ready = performance.now();
    return { evaluatedAt, start, ready, ms: ready - start };
  }
  const queue = new Queue(database, { forceSyncFallback: true, onSync: async () => {} });
  const constructed = performance.now();
  const size = await queue.size();
  const ready = performance.now();
  return { evaluatedAt, start, ready, constructMs: constructed - start, ms: ready - start, pending: size };
}
