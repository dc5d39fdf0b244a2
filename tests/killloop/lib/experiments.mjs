// Two deterministic companions of the kill loop, for Chromium with the workload unpacked:
//
// torn-tail: the suspected mechanism without a kill. Launch and write, stop cleanly, append a
//   7-byte LevelDB record header with no payload (what a kill between the header's and the
//   payload's write() leaves) to one store's newest log, then launch (write more, stop cleanly)
//   several times and see what each storage reports.
// syncs: which storage flushes to disk per acknowledged write. Chromium runs under
//   `strace -f -e trace=fsync,fdatasync,...`, the workload writes to one storage at a time, and
//   the sync calls are counted by the file they target.
import { readFile, readdir, appendFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildXpi, launchChromium, launchFirefox, prepareFirefoxProfile } from './browsers.mjs';
import { Collector } from './collector.mjs';
import { Ledger, timingStats } from './ledger.mjs';
import { extensionLevelDbs, scanLevelDb } from './leveldb.mjs';
import { PROBE, prepareWorkload } from './workload.mjs';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function once(emitter, name, test, timeout) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => { emitter.off(name, on); resolve(null); }, timeout);
    function on(...args) {
      if (!test(...args)) return;
      clearTimeout(timer);
      emitter.off(name, on);
      resolve(args[0]);
    }
    emitter.on(name, on);
  });
}

/** A header with no payload: any checksum, length 64, type FULL (as after a kill mid-append). */
export const TORN_HEADER = Buffer.from([0x11, 0x22, 0x33, 0x44, 0x40, 0x00, 0x01]);

async function newestLog(dir) {
  const logs = (await readdir(dir)).filter((n) => n.endsWith('.log')).sort();
  if (!logs.length) throw new Error(`no .log in ${dir}`);
  return join(dir, logs.at(-1));
}

/** One launch of the workload: inventory checked, `writeMs` of writing, then a clean stop. */
async function cleanLaunch({ collector, ledger, profile, extension, logPath, writeMs, cycle }) {
  collector.cycle = cycle;
  const booted = once(collector, 'inventory', (b) => b.cycle === cycle, 30_000);
  const browser = await launchChromium({ profile, extension, logPath });
  try {
    const boot = await booted;
    if (!boot) throw new Error(`launch ${cycle}: no inventory`);
    const check = ledger.check(boot);
    if (collector.load) {
      await once(collector, 'writing', (b) => b.boot === boot.boot, 10_000);
      await sleep(writeMs);
    }
    return { boot, check };
  } finally {
    await browser.stop({ grace: 15_000 });
  }
}

function logLines(text) {
  return text.split('\n').filter((l) => /backing_store|corrupt|checksum|value_store|leveldb|obfuscated|sandbox_(directory|origin)/i.test(l))
    .map((l) => l.slice(0, 300)).slice(0, 12);
}

/**
 * For each target store (idb, storage, opfs-paths, opfs-origins): a fresh profile, launch 1
 * writes, the torn header is appended to the target's log, launches 2..`launches` write and
 * check. Returns {target: [{launch, check, log, tails}]}.
 */
export async function runTornTail({ targets = ['idb', 'storage', 'opfs-paths'], launches = 4, writeMs = 2000,
  dir, keep = false, extension = PROBE, say = (l) => process.stderr.write(`${l}\n`) } = {}) {
  const base = dir ?? await mkdtemp(join(tmpdir(), 'outbox-torntail-'));
  const storages = ['idb', 'storage', 'opfs'];
  const load = { pattern: 'parallel', intervalMs: 20, bytes: 512, inflight: 1 };
  const results = {};
  for (const target of targets) {
    const sub = join(base, target);
    await mkdir(join(sub, 'logs'), { recursive: true });
    const collector = await Collector.start({ load, storages, keepEpochs: 0 });
    const ledger = new Ledger(storages);
    collector.on('ack', (_boot, acks, at) => ledger.recordAcks(acks, at));
    const steps = [];
    try {
      const workload = await prepareWorkload({ source: extension, out: join(sub, 'extension'), collector: collector.url });
      const profile = join(sub, 'profile');
      let id = null;
      for (let launch = 1; launch <= launches; launch++) {
        const logPath = join(sub, 'logs', `launch-${launch}.log`);
        const { boot, check } = await cleanLaunch({ collector, ledger, profile, extension: workload.dir, logPath,
          writeMs, cycle: launch });
        id ??= boot.hello.id;
        const dirs = await extensionLevelDbs(profile, id);
        const key = target === 'opfs-paths' ? Object.keys(dirs).find((k) => k.startsWith('opfs-paths-')) : target;
        const step = { launch, check: Object.fromEntries(Object.entries(check).map(([s, c]) => [s,
          { expected: c.expected, kept: c.kept, lost: c.lost, wholesale: c.wholesale, markerReset: c.markerReset,
            upgrade: c.upgrade, error: c.error }])), acked: boot.acks,
          log: logLines(await readFile(logPath, 'utf8').catch(() => '')) };
        if (launch === 1) {
          const log = await newestLog(dirs[key]);
          await appendFile(log, TORN_HEADER);
          step.injected = `${TORN_HEADER.length} bytes appended to ${log}`;
        }
        const scan = await scanLevelDb(dirs[key]);
        step.targetLogs = Object.fromEntries(Object.entries(scan?.logs ?? {}).map(([n, l]) => [n,
          `${l.bytes}:${l.tail.kind}${l.corrupt ? `:corrupt@${l.corrupt.offset}` : ''}`]));
        step.targetLOG = scan?.notable ?? [];
        steps.push(step);
        say(`torn-tail ${target} launch ${launch}: ${storages.map((s) => `${s} ${step.check[s].kept}/${step.check[s].expected}`
          + `${step.check[s].lost ? ` LOST ${step.check[s].lost}` : ''}${step.check[s].markerReset ? ' MARKER-RESET' : ''}`).join(', ')}`
          + `${step.injected ? ' | injected' : ''}${step.log.length ? ` | log: ${step.log.length} lines` : ''}`);
      }
    } finally {
      await collector.close();
    }
    results[target] = steps;
  }
  if (!keep && !dir) await rm(base, { recursive: true, force: true });
  return { experiment: 'torn-tail', header: TORN_HEADER.toString('hex'), launches, writeMs, dir: base, results };
}

/** Counts sync calls per file kind in an `strace -f -ttt -y` output, between `from` and `to` (ms). */
function countSyncs(text, from, to) {
  const counts = {};
  for (const line of text.split('\n')) {
    const match = /^\d+\s+(\d+\.\d+)\s.*?\b(fsync|fdatasync|sync_file_range|msync)\((\d+)(?:<([^>]*)>)?/.exec(line);
    if (!match) continue;
    const at = Number(match[1]) * 1000;
    if (at < from || at > to) continue;
    match.splice(1, 1);
    const path = match[3] ?? '?';
    let kind = 'other';
    if (/moz-extension\+\+\+[^/]*\^userContextId=4294967295\/idb\//.test(path)) kind = `storage ${/-wal$/.test(path) ? 'sqlite-wal' : /\.sqlite$/.test(path) ? 'sqlite' : 'other'}`;
    else if (/moz-extension\+\+\+[^/]*\/idb\//.test(path)) kind = `idb ${/-wal$/.test(path) ? 'sqlite-wal' : /\.sqlite$/.test(path) ? 'sqlite' : 'other'}`;
    else if (/moz-extension\+\+\+[^/]*\/fs\//.test(path)) kind = /\.sqlite/.test(path) ? 'opfs metadata db' : 'opfs file';
    else if (/IndexedDB/.test(path)) kind = /\.log$/.test(path) ? 'idb .log' : /MANIFEST/.test(path) ? 'idb MANIFEST' : 'idb other';
    else if (/Local Extension Settings/.test(path)) kind = /\.log$/.test(path) ? 'storage .log' : 'storage other';
    else if (/File System/.test(path)) kind = /Paths/.test(path) ? 'opfs Paths db' : /Origins/.test(path) ? 'opfs Origins db' : 'opfs file';
    else if (/\/$|^\/tmp\/[^.]*$/.test(path)) kind = 'directory';
    const key = `${match[1]} ${kind}`;
    counts[key] = (counts[key] ?? 0) + 1;
  }
  return counts;
}

/**
 * For each storage: a fresh profile, Chromium under strace, the workload writing only that
 * storage one write at a time for `writeMs`, a clean stop; returns {storage: {acked, syncs,
 * syncsPerWrite, writeMs}}.
 */
export async function runSyncCount({ storages = ['idb', 'storage', 'opfs'], writeMs = 5000, bytes = 1024, dir,
  keep = false, extension = PROBE, browser: browserName = 'chromium', say = (l) => process.stderr.write(`${l}\n`) } = {}) {
  const base = dir ?? await mkdtemp(join(tmpdir(), 'outbox-syncs-'));
  const results = {};
  for (const storage of storages) {
    const sub = join(base, storage);
    await mkdir(sub, { recursive: true });
    const load = { pattern: 'round-robin', intervalMs: 0, bytes, inflight: 1 };
    const collector = await Collector.start({ load, storages: [storage], keepEpochs: 0 });
    const ledger = new Ledger([storage]);
    let window = null; // acks counted only while strace output is being counted
    let acks = 0;
    collector.on('ack', (_b, list, at) => { ledger.recordAcks(list, at); if (window) acks += list.length; });
    try {
      const workload = await prepareWorkload({ source: extension, out: join(sub, 'extension'), collector: collector.url });
      const trace = join(sub, 'strace.txt');
      collector.cycle = 1;
      const booted = once(collector, 'writing', () => true, 60_000);
      const wrap = ['strace', '-f', '-qq', '-ttt', '-y', '-e', 'trace=fsync,fdatasync,sync_file_range,msync', '-o', trace];
      let browser;
      if (browserName === 'firefox') {
        const addonId = workload.manifest.browser_specific_settings.gecko.id;
        const xpi = await buildXpi({ dir: workload.dir, out: join(sub, 'workload.xpi') });
        await prepareFirefoxProfile({ profile: join(sub, 'profile'), xpi, addonId, uuid: '6c1f6c2e-1b51-4d33-9a51-0c0ffee0c0de' });
        browser = await launchFirefox({ profile: join(sub, 'profile'), logPath: join(sub, 'firefox.log'), wrap });
      } else {
        browser = await launchChromium({ profile: join(sub, 'profile'), extension: workload.dir,
          logPath: join(sub, 'chromium.log'), wrap });
      }
      try {
        if (!await booted) throw new Error(`${storage}: the workload did not start writing`);
        await sleep(500);
        const from = Date.now();
        window = true;
        await sleep(writeMs);
        window = false;
        const to = Date.now();
        await browser.stop({ grace: 15_000 });
        const syncs = countSyncs(await readFile(trace, 'utf8'), from, to);
        const perWrite = Object.fromEntries(Object.entries(syncs).map(([k, v]) => [k, Math.round((v / acks) * 100) / 100]));
        results[storage] = { acked: acks, syncs, syncsPerWrite: perWrite, writeMs: timingStats(ledger.timings[storage]) };
        say(`syncs ${storage}: ${acks} writes, ${JSON.stringify(perWrite)} per write`);
      } finally {
        await browser.stop({ grace: 15_000 });
      }
    } finally {
      await collector.close();
    }
  }
  if (!keep && !dir) await rm(base, { recursive: true, force: true });
  return { experiment: 'syncs', browser: browserName, writeMs, bytes, dir: base, results };
}
