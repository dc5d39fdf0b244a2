// The kill-loop probe: the background of a Chrome MV3 service worker or a Firefox MV3 event page.
//
// At every start it asks the harness's collector what to do (POST /hello), reports what survived
// in each storage (POST /inventory), retires old records, then writes records continuously into
// IndexedDB (strict transactions), storage.local and OPFS. A write is acknowledged (POST /ack)
// only after its storage said it is durable, so the collector's acks are the ground truth that
// survives a SIGKILL of the browser. `config.js` (written by the harness) holds the collector URL.
//
// Record ids: `epoch * EPOCH_SPAN + n`, where the collector hands out a new epoch per start.
import { COLLECTOR } from './config.js';

const ext = globalThis.browser ?? globalThis.chrome;
const EPOCH_SPAN = 1e7;
const DB_NAME = 'probe';

let booted = null;
let bootId = null;

// Listeners first, synchronously (Chrome drops events whose listener is added after an await).
ext.runtime.onInstalled.addListener((details) => note('installed', { reason: details.reason }));
ext.runtime.onStartup.addListener(() => note('startup'));
ext.runtime.onMessage.addListener((message, _sender, sendResponse) => {
  if (message?.probe !== 'start') return false;
  boot('message').then(() => sendResponse({ ok: true }), (error) => sendResponse({ ok: false, error: String(error) }));
  return true;
});
boot('script');

function post(path, body) {
  // A text/plain body keeps it a CORS "simple" request: no preflight, no host permission needed.
  return fetch(`${COLLECTOR}${path}`, { method: 'POST', body: JSON.stringify(body) }).then((response) => {
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  });
}

// Events before the collector gave us a boot id wait for it.
const early = [];

function note(type, detail = {}) {
  const event = { type, at: Date.now(), ...detail };
  if (bootId === null) early.push(event);
  else post('/event', { boot: bootId, ...event }).catch(() => {});
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function retry(call) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await call();
    } catch (error) {
      if (attempt > 600) throw error;
      await sleep(100);
    }
  }
}

/** A record's content: `len` pseudo-random characters drawn from its id (so a reader can check it). */
export function payload(id, len) {
  let x = (id % 4294967291) + 1;
  const chars = new Array(len);
  for (let i = 0; i < len; i++) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    chars[i] = String.fromCharCode(48 + (x % 74));
  }
  return chars.join('');
}

/** Sorted ids as [[first, last], ...] runs, to keep inventories small. */
function toRanges(ids) {
  ids.sort((a, b) => a - b);
  const ranges = [];
  for (const id of ids) {
    const last = ranges[ranges.length - 1];
    if (last && id === last[1] + 1) last[1] = id;
    else ranges.push([id, id]);
  }
  return ranges;
}

function errorText(error) {
  return `${error?.name ?? 'Error'}: ${error?.message ?? error}`;
}

// --- IndexedDB: one record per write, keyed by its id, in a strict readwrite transaction. ---

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onabort = () => reject(tx.error ?? new Error('transaction aborted'));
    tx.onerror = () => reject(tx.error);
  });
}

const idb = {
  db: null,
  upgrade: null,
  async open() {
    if (this.db) return this.db;
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = (event) => {
      // dataLoss / dataLossMessage: Chromium tells the first open after it deleted a corrupt store.
      this.upgrade = { oldVersion: event.oldVersion, dataLoss: event.dataLoss ?? null,
        dataLossMessage: event.dataLossMessage ?? null };
      req.result.createObjectStore('records', { keyPath: 'id' });
      req.result.createObjectStore('meta');
    };
    this.db = await request(req);
    return this.db;
  },
  async inventory() {
    const db = await this.open();
    const tx = db.transaction(['records', 'meta'], 'readonly');
    const marker = await request(tx.objectStore('meta').get('marker'));
    const records = await request(tx.objectStore('records').getAll());
    const ok = [];
    const bad = [];
    for (const record of records) (record.data === payload(record.id, record.len) ? ok : bad).push(record.id);
    return { marker: marker ?? null, ranges: toRanges(ok), bad, upgrade: this.upgrade };
  },
  async retire(below) {
    const db = await this.open();
    const tx = db.transaction('records', 'readwrite', { durability: 'strict' });
    tx.objectStore('records').delete(IDBKeyRange.upperBound(below * EPOCH_SPAN, true));
    await done(tx);
  },
  async mark(epoch) {
    const db = await this.open();
    const tx = db.transaction('meta', 'readwrite', { durability: 'strict' });
    tx.objectStore('meta').put({ epoch, at: Date.now() }, 'marker');
    await done(tx);
  },
  async write(id, data) {
    const db = await this.open();
    const tx = db.transaction('records', 'readwrite', { durability: 'strict' });
    tx.objectStore('records').put({ id, len: data.length, data });
    await done(tx);
  },
};

// --- storage.local: one key per record, acknowledged when set() resolves. ---

const storage = {
  area: ext.storage.local,
  async keys() {
    if (typeof this.area.getKeys === 'function') return this.area.getKeys();
    return Object.keys(await this.area.get(null));
  },
  async inventory() {
    const keys = (await this.keys()).filter((key) => key.startsWith('r'));
    const { marker } = await this.area.get('marker');
    const ok = [];
    const bad = [];
    for (let i = 0; i < keys.length; i += 500) {
      const values = await this.area.get(keys.slice(i, i + 500));
      for (const [key, value] of Object.entries(values)) {
        const id = Number(key.slice(1));
        (value?.data === payload(id, value?.len) ? ok : bad).push(id);
      }
    }
    return { marker: marker ?? null, ranges: toRanges(ok), bad };
  },
  async retire(below) {
    const old = (await this.keys()).filter((key) => key.startsWith('r') && Number(key.slice(1)) < below * EPOCH_SPAN);
    for (let i = 0; i < old.length; i += 500) await this.area.remove(old.slice(i, i + 500));
  },
  async mark(epoch) {
    await this.area.set({ marker: { epoch, at: Date.now() } });
  },
  async write(id, data) {
    await this.area.set({ [`r${id}`]: { len: data.length, data } });
  },
};

// --- OPFS through the async API (what a service worker has): probe/e<epoch>/<n>, one file per
// record, written with createWritable() and acknowledged when close() resolves. ---

const opfs = {
  dir: null,
  epochDirs: new Map(),
  async probe() {
    if (!this.dir) this.dir = await (await navigator.storage.getDirectory()).getDirectoryHandle('probe', { create: true });
    return this.dir;
  },
  async inventory() {
    const dir = await this.probe();
    let marker = null;
    const ok = [];
    const bad = [];
    const stray = [];
    const files = [];
    for await (const [name, handle] of dir.entries()) {
      if (name === 'marker' && handle.kind === 'file') {
        try { marker = JSON.parse(await (await handle.getFile()).text()); } catch { marker = { unreadable: true }; }
        continue;
      }
      const epoch = /^e(\d+)$/.exec(name);
      if (!epoch || handle.kind !== 'directory') { stray.push(name); continue; }
      for await (const [file, fileHandle] of handle.entries()) {
        const n = /^\d+$/.test(file) ? Number(file) : NaN;
        if (Number.isNaN(n) || fileHandle.kind !== 'file') { stray.push(`${name}/${file}`); continue; }
        files.push([Number(epoch[1]) * EPOCH_SPAN + n, fileHandle]);
      }
    }
    // Reading is the slow part: 32 files at a time.
    for (let i = 0; i < files.length; i += 32) {
      await Promise.all(files.slice(i, i + 32).map(async ([id, fileHandle]) => {
        const text = await (await fileHandle.getFile()).text();
        (text.length > 0 && text === payload(id, text.length) ? ok : bad).push(id);
      }));
    }
    return { marker, ranges: toRanges(ok), bad, stray: stray.slice(0, 20), strayCount: stray.length };
  },
  async retire(below) {
    const dir = await this.probe();
    const old = [];
    for await (const [name] of dir.entries()) {
      const epoch = /^e(\d+)$/.exec(name);
      if (epoch && Number(epoch[1]) < below) old.push(name);
    }
    for (const name of old) await dir.removeEntry(name, { recursive: true });
  },
  async mark(epoch) {
    const file = await (await this.probe()).getFileHandle('marker', { create: true });
    const writable = await file.createWritable();
    await writable.write(JSON.stringify({ epoch, at: Date.now() }));
    await writable.close();
  },
  async write(id, data) {
    const epoch = Math.floor(id / EPOCH_SPAN);
    let dir = this.epochDirs.get(epoch);
    if (!dir) {
      dir = await (await this.probe()).getDirectoryHandle(`e${epoch}`, { create: true });
      this.epochDirs.set(epoch, dir);
    }
    const file = await dir.getFileHandle(String(id % EPOCH_SPAN), { create: true });
    const writable = await file.createWritable();
    await writable.write(data);
    await writable.close();
  },
};

const STORES = { idb, storage, opfs };

// --- Acks: batched while one report is in flight, so a kill loses at most the unsent tail. ---

const pending = [];
let sending = false;

function ack(storage, id, ms) {
  pending.push([storage, id, Math.round(ms * 1000) / 1000]);
  if (!sending) flush();
}

async function flush() {
  sending = true;
  while (pending.length) {
    const batch = pending.splice(0, pending.length);
    try {
      await post('/ack', { boot: bootId, acks: batch });
    } catch {
      pending.unshift(...batch);
      await sleep(200);
    }
  }
  sending = false;
}

function boot(trigger) {
  booted ??= run(trigger).catch((error) => note('boot-failed', { error: errorText(error) }));
  return booted;
}

async function run(trigger) {
  const t0 = performance.now();
  const scope = typeof ServiceWorkerGlobalScope !== 'undefined' ? 'service-worker' : 'window';
  const hello = await retry(() => post('/hello', { trigger, id: ext.runtime.id, scope, ua: navigator.userAgent }));
  bootId = hello.boot;
  for (const event of early.splice(0)) note(event.type, event);
  const { epoch, load } = hello;
  const inventory = {};
  for (const name of hello.storages) {
    const start = performance.now();
    try {
      inventory[name] = await STORES[name].inventory();
    } catch (error) {
      inventory[name] = { error: errorText(error) };
    }
    inventory[name].ms = performance.now() - start;
  }
  await retry(() => post('/inventory', { boot: bootId, epoch, sinceScriptMs: performance.now() - t0, inventory }));
  for (const name of hello.storages) {
    try {
      await STORES[name].retire(hello.retireBelow);
      if (!inventory[name].marker) await STORES[name].mark(epoch);
    } catch (error) {
      note('error', { storage: name, phase: 'retire', error: errorText(error) });
    }
  }
  if (!load) return; // told to stay idle
  await post('/writing', { boot: bootId });
  const next = { idb: 0, storage: 0, opfs: 0 };
  const one = async (name) => {
    const n = next[name]++;
    const id = epoch * EPOCH_SPAN + n;
    const data = payload(id, load.bytes);
    const start = performance.now();
    try {
      await STORES[name].write(id, data);
    } catch (error) {
      note('error', { storage: name, phase: 'write', id, error: errorText(error) });
      await sleep(100);
      return;
    }
    ack(name, id, performance.now() - start);
  };
  if (load.pattern === 'round-robin') {
    // One write at a time, storages in turn: each write's timing is free of the others' load.
    for (;;) {
      for (const name of hello.storages) await one(name);
      if (load.intervalMs) await sleep(load.intervalMs);
    }
  }
  // Parallel: every storage has `inflight` writers of its own, as fast as `intervalMs` allows.
  for (const name of hello.storages) {
    for (let w = 0; w < load.inflight; w++) {
      (async () => {
        for (;;) {
          await one(name);
          if (load.intervalMs) await sleep(load.intervalMs);
        }
      })();
    }
  }
}
