// The kill loop: launch a browser on one profile with the workload extension, read back what
// survived, let it write, SIGKILL the whole browser at a seeded moment, relaunch; repeat. After
// the last kill one more launch only checks. Every cycle is a line in cycles.jsonl; the summary
// is JSON. Variants: Chromium with the extension unpacked (--load-extension) or packed and
// force-installed into the profile by policy, and Firefox ESR with the add-on in the profile.
import { appendFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  buildXpi, launchChromium, launchFirefox, packChromiumExtension, policyWrap, prepareFirefoxProfile, updateManifest,
} from './browsers.mjs';
import { Collector } from './collector.mjs';
import { Ledger, timingStats } from './ledger.mjs';
import { scanExtensionStores } from './leveldb.mjs';
import { LOADS, PROBE, prepareWorkload } from './workload.mjs';
// The chaos suite's seeded PRNG (mulberry32), so both harnesses draw the same way from a seed.
import { random as rng } from '../../chaos/lib/schedule.mjs';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));


/** Resolves with the first `name` event of `emitter` whose arguments satisfy `test`, or null after `timeout`. */
function nextEvent(emitter, name, test, timeout) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => { emitter.off(name, on); resolve(null); }, timeout);
    function on(...args) {
      if (!test(...args)) return;
      clearTimeout(timer);
      emitter.off(name, on);
      resolve(args);
    }
    emitter.on(name, on);
  });
}

/** Log lines worth counting, per browser. */
const LOG_PATTERNS = {
  chromium: {
    backingStore: /backing_store\.cc/,
    idbRecovering: /IndexedDB recovering from a corrupted/,
    corruption: /Corruption|checksum mismatch|corrupt/i,
    valueStore: /value_store|Local Extension Settings|lazy_leveldb/,
    fileSystem: /obfuscated_file_util|sandbox_(directory|origin)_database|sandbox_file_system|file_system_context/,
    leveldb: /leveldb/i,
    indexedDb: /indexed_db|IndexedDB/,
  },
  firefox: {
    indexedDb: /IndexedDB|indexedDB|ActorsParent/,
    quota: /QuotaManager|quota/i,
    corruption: /corrupt|malformed|SQLITE_/i,
    storage: /ExtensionStorage|storage\.local/,
    probe: /probe/i,
  },
};
const NOISE = /dbus|DBus|Floss|vaapi|drmGetDevices|InitializeSandbox|ScreenSaver|UPower|PropertiesChanged|gpu_init|viz_main/;

async function scanLog(path, browser) {
  const text = await readFile(path, 'utf8').catch(() => '');
  const counts = {};
  const lines = [];
  const patterns = LOG_PATTERNS[browser];
  const any = new RegExp(Object.values(patterns).map((p) => p.source).join('|'), 'i');
  for (const line of text.split('\n')) {
    if (!line || NOISE.test(line)) continue;
    let hit = false;
    for (const [name, pattern] of Object.entries(patterns)) {
      if (pattern.test(line)) { counts[name] = (counts[name] ?? 0) + 1; hit = true; }
    }
    if (hit && any.test(line) && lines.length < 20) lines.push(line.slice(0, 400));
  }
  return { counts, lines };
}

/**
 * The tails of each LevelDB log, compact: {store: ['000004.log:<bytes>:clean', ...]}. `torn`: stores
 * whose log now ends in a torn record (this kill tore it); `corrupt`: stores whose log holds a
 * record with a bad checksum (the aftermath: a torn record that later appends ran into; the next
 * open trips on it). A torn-looking tail after a bad record is garbage and is not a new tear.
 */
function compactForensics(scan) {
  const out = {};
  const torn = [];
  const corrupt = [];
  for (const [store, info] of Object.entries(scan ?? {})) {
    if (!info) continue;
    out[store] = Object.entries(info.logs).map(([name, log]) => {
      const kind = log.tail.kind;
      if (log.corrupt) corrupt.push(store);
      else if (['partial-header', 'header-only', 'partial-payload'].includes(kind)) torn.push(store);
      return `${name}:${log.bytes}:${kind}${log.tail.declared !== undefined ? `(${log.tail.have}/${log.tail.declared})` : ''}`
        + `${log.corrupt ? `:corrupt@${log.corrupt.offset}` : ''}`;
    });
    if (info.notable.length) out[`${store}.LOG`] = info.notable.slice(0, 5);
    if (info.lost) out[`${store}.lost`] = info.lost;
  }
  return { logs: out, torn: [...new Set(torn)], corrupt: [...new Set(corrupt)] };
}

// --- variants: how to get the workload into a browser on the profile, and how to launch it ---

async function chromiumUnpacked({ dir, workload }) {
  const profile = join(dir, 'profile');
  return {
    browser: 'chromium', install: 'unpacked', profile,
    launch: ({ logPath }) => launchChromium({ profile, extension: workload.dir, logPath }),
    forensics: (extensionId) => scanExtensionStores(profile, extensionId),
  };
}

async function chromiumPacked({ dir, workload, collector, say }) {
  const profile = join(dir, 'profile');
  const packed = await packChromiumExtension({ dir: workload.dir });
  collector.serve('/workload.crx', { type: 'application/x-chrome-extension', body: await readFile(packed.crx) });
  collector.serve('/update.xml', { type: 'text/xml',
    body: updateManifest({ id: packed.id, version: packed.version, crxUrl: `${collector.url}/workload.crx` }) });
  // A force-installed extension is downloaded from its update URL (here: the collector), which
  // --disable-background-networking forbids; so the install launch runs with it allowed.
  const wrap = await policyWrap({ dir, policies: { ExtensionInstallForcelist: [`${packed.id};${collector.url}/update.xml`] } });
  say(`packed ${packed.crx} as ${packed.id}; force-installing it by policy (private mount namespace)`);
  return {
    browser: 'chromium', install: 'packed', profile, extensionId: packed.id,
    async setup({ logPath }) {
      const gets = [];
      const onGet = (path) => gets.push(path);
      collector.on('get', onGet);
      const browser = await launchChromium({ profile, wrap, logPath, backgroundNetworking: true });
      try {
        const boot = await nextEvent(collector, 'inventory', () => true, 60_000);
        if (!boot) throw new Error(`the packed extension did not start within 60 s (GETs: ${gets.join(', ') || 'none'})`);
        await sleep(2000);
      } finally {
        collector.off('get', onGet);
        await browser.stop({ grace: 15_000 }); // a clean exit, so the install is in Preferences
      }
      const prefs = await readFile(join(profile, 'Default', 'Secure Preferences'), 'utf8').catch(() => '')
        + await readFile(join(profile, 'Default', 'Preferences'), 'utf8').catch(() => '');
      return { gets, installedInPrefs: prefs.includes(packed.id) };
    },
    launch: ({ logPath }) => launchChromium({ profile, wrap, logPath }),
    forensics: (extensionId) => scanExtensionStores(profile, extensionId),
  };
}

async function firefoxProfile({ dir, workload }) {
  const profile = join(dir, 'profile');
  const addonId = workload.manifest.browser_specific_settings?.gecko?.id;
  if (!addonId) throw new Error('the workload manifest has no browser_specific_settings.gecko.id');
  const uuid = '6c1f6c2e-1b51-4d33-9a51-0c0ffee0c0de';
  const xpi = await buildXpi({ dir: workload.dir, out: join(dir, 'workload.xpi') });
  await prepareFirefoxProfile({ profile, xpi, addonId, uuid });
  return {
    browser: 'firefox', install: 'profile', profile, addonId, uuid,
    launch: ({ logPath }) => launchFirefox({ profile, logPath }),
    forensics: async () => null,
  };
}

const VARIANTS = { 'chromium-unpacked': chromiumUnpacked, 'chromium-packed': chromiumPacked, firefox: firefoxProfile };

/** The loop's options with their defaults (scripts/kill-loop --help documents them). */
export const DEFAULTS = {
  browser: 'chromium', install: 'unpacked', load: 'heavy', cycles: 20, seed: null, minDelay: 300, maxDelay: 3000,
  afterAckShare: 0.5, afterAckMaxGap: 5, keepEpochs: 3, storages: 'idb,storage,opfs', extension: PROBE,
  dir: null, keep: false, bootTimeout: null, bytes: null, intervalMs: null, inflight: null, pattern: null, out: null,
};

/**
 * Runs the loop. `say` gets one human line per cycle. Returns the summary (also written to
 * <dir>/summary.json). The browser and the collector are stopped whatever happens.
 */
export async function runKillLoop(options, { say = (line) => process.stderr.write(`${line}\n`), signal } = {}) {
  const o = { ...DEFAULTS, ...options };
  const seed = o.seed ?? (Math.floor(Math.random() * 2 ** 31) >>> 0);
  const random = rng(seed);
  const variantName = o.browser === 'firefox' ? 'firefox' : `chromium-${o.install}`;
  if (!VARIANTS[variantName]) throw new Error(`unknown variant ${variantName}`);
  const load = { ...LOADS[o.load] };
  if (!LOADS[o.load]) throw new Error(`unknown load ${o.load} (${Object.keys(LOADS).join(', ')})`);
  for (const key of ['bytes', 'intervalMs', 'inflight', 'pattern']) if (o[key] !== null) load[key] = o[key];
  const storages = o.storages.split(',');
  const bootTimeout = o.bootTimeout ?? (o.browser === 'firefox' ? 60_000 : 30_000);
  const dir = o.dir ?? await mkdtemp(join(tmpdir(), 'outbox-killloop-'));
  await mkdir(join(dir, 'logs'), { recursive: true });
  say(`kill-loop: seed ${seed}, ${variantName}, load ${o.load} ${JSON.stringify(load)}, ${o.cycles} cycles, dir ${dir}`);

  const collector = await Collector.start({ load, storages, keepEpochs: o.keepEpochs });
  const ledger = new Ledger(storages);
  const perBoot = new Map();
  collector.on('ack', (boot, acks, at) => {
    ledger.recordAcks(acks, at);
    const counts = perBoot.get(boot.boot) ?? {};
    for (const [storage] of acks) counts[storage] = (counts[storage] ?? 0) + 1;
    perBoot.set(boot.boot, counts);
  });
  collector.on('writing', (boot) => ledger.retired(boot)); // it posts /writing after retiring
  let browser = null;
  const started = Date.now();
  const cycles = [];
  const summary = { seed, variant: variantName, browser: o.browser, install: o.browser === 'firefox' ? 'profile' : o.install,
    load: o.load, loadParams: load, storages, cyclesPlanned: o.cycles, minDelay: o.minDelay, maxDelay: o.maxDelay,
    afterAckShare: o.afterAckShare, keepEpochs: o.keepEpochs, dir };
  try {
    const workload = await prepareWorkload({ source: o.extension, out: join(dir, 'extension'), collector: collector.url });
    const variant = await VARIANTS[variantName]({ dir, workload, collector, say });
    if (variant.setup) {
      collector.configure({ load: null, storages, keepEpochs: o.keepEpochs });
      summary.setup = await variant.setup({ logPath: join(dir, 'logs', 'setup.log') });
      say(`setup: ${JSON.stringify(summary.setup)}`);
    }
    let killAt = null;
    let extensionId = variant.extensionId ?? null;
    for (let cycle = 1; cycle <= o.cycles + 1; cycle++) {
      if (signal?.aborted) break;
      const final = cycle === o.cycles + 1;
      collector.cycle = cycle;
      collector.configure({ load: final ? null : load, storages, keepEpochs: o.keepEpochs });
      // Draw the schedule first, so a cycle's draws do not depend on what happened.
      const plan = { delayMs: Math.round(o.minDelay + random() * (o.maxDelay - o.minDelay)),
        afterAck: random() < o.afterAckShare, gapMs: Math.floor(random() * (o.afterAckMaxGap + 1)) };
      const logPath = join(dir, 'logs', `cycle-${String(cycle).padStart(4, '0')}.log`);
      const record = { cycle, final };
      const launchAt = Date.now();
      const booted = nextEvent(collector, 'inventory', (boot) => boot.cycle === cycle, bootTimeout);
      browser = await variant.launch({ logPath });
      record.pid = browser.pid;
      const bootArgs = await booted;
      if (!bootArgs) {
        record.noBoot = true;
        say(`cycle ${cycle}: no inventory within ${bootTimeout} ms; killing and going on`);
      } else {
        const [boot] = bootArgs;
        extensionId ??= boot.hello.id;
        record.boot = boot.boot;
        record.trigger = boot.hello.trigger;
        record.helloMs = boot.at - launchAt;
        record.inventoryMs = boot.inventoryAt - launchAt;
        record.check = ledger.check(boot, { killAt });
        if (!final) {
          const writing = boot.writingAt ? [boot] : await nextEvent(collector, 'writing', (b) => b.boot === boot.boot, 30_000);
          if (!writing) record.noWrites = true;
          const writingAt = boot.writingAt ?? Date.now();
          await sleep(Math.max(0, writingAt + plan.delayMs - Date.now()));
          if (plan.afterAck) {
            const ack = await nextEvent(collector, 'ack', (b) => b.boot === boot.boot, 5000);
            if (ack && plan.gapMs) await sleep(plan.gapMs);
          }
          const lastAckAt = boot.lastAckAt;
          const kill = await browser.kill();
          killAt = kill.at;
          record.kill = { ...plan, sinceWritingMs: kill.at - writingAt,
            sinceLastAckMs: lastAckAt === null ? null : kill.at - lastAckAt, members: kill.members };
        }
        record.events = boot.events.map((e) => (e.reason ? `${e.type}:${e.reason}` : e.type));
      }
      if (browser.running || !record.kill) {
        const stop = final && !record.noBoot ? await browser.stop() : await browser.kill();
        if (!record.kill && !final) { killAt = stop.at; record.kill = { ...plan, late: true }; }
      }
      await sleep(50); // let requests that were already received finish
      record.boots = [...collector.boots.values()].filter((b) => b.cycle === cycle).length;
      record.acked = perBoot.get(record.boot) ?? {};
      record.log = await scanLog(logPath, variant.browser);
      if (extensionId) {
        const scan = await variant.forensics(extensionId).catch((error) => ({ error: String(error) }));
        if (scan) record.forensics = compactForensics(scan);
      }
      cycles.push(record);
      await appendFile(join(dir, 'cycles.jsonl'), `${JSON.stringify(record)}\n`);
      say(cycleLine(record, storages));
      browser = null;
    }
  } finally {
    if (browser?.running) await browser.kill().catch(() => {});
    await collector.close();
  }
  Object.assign(summary, summarize(cycles, ledger, storages), { wallMs: Date.now() - started });
  await writeFile(join(dir, 'summary.json'), `${JSON.stringify(summary, null, 2)}\n`);
  if (o.out) await writeFile(o.out, `${JSON.stringify(summary, null, 2)}\n`);
  if (!o.keep && !o.dir) await rm(dir, { recursive: true, force: true });
  return summary;
}

function cycleLine(r, storages) {
  const parts = [`cycle ${r.cycle}${r.final ? ' (final check)' : ''}`];
  if (r.noBoot) parts.push('NO BOOT');
  if (r.check) {
    parts.push(storages.map((s) => {
      const c = r.check[s];
      if (c.error) return `${s}:ERROR(${c.error})`;
      return `${s}:${c.kept}/${c.expected}${c.lost ? ` LOST ${c.lost}${c.wholesale ? ' WHOLESALE' : ''}` : ''}`
        + `${c.markerReset ? ' MARKER-RESET' : ''}${c.undeleted ? ` UNDELETED ${c.undeleted}` : ''}`;
    }).join(' '));
  }
  if (r.kill && !r.final) {
    parts.push(`kill +${r.kill.sinceWritingMs}ms${r.kill.afterAck ? ` (${r.kill.sinceLastAckMs}ms after an ack)` : ''}`);
  }
  parts.push(`acked ${storages.map((s) => `${s}=${r.acked?.[s] ?? 0}`).join(' ')}`);
  const logs = Object.entries(r.log?.counts ?? {}).filter(([k]) => ['backingStore', 'idbRecovering', 'corruption', 'valueStore', 'fileSystem'].includes(k));
  if (logs.length) parts.push(`log ${logs.map(([k, v]) => `${k}=${v}`).join(' ')}`);
  if (r.forensics?.torn.length) parts.push(`torn tail: ${r.forensics.torn.join(',')}`);
  if (r.forensics?.corrupt?.length) parts.push(`bad record in log: ${r.forensics.corrupt.join(',')}`);
  if (r.events?.length) parts.push(`events ${[...new Set(r.events)].join(',')}`);
  return parts.join(' | ');
}

function summarize(cycles, ledger, storages) {
  const checked = cycles.filter((c) => c.check);
  const kills = cycles.filter((c) => c.kill && !c.final).length;
  const perStorage = ledger.summary();
  const idbP50 = perStorage.idb?.writeMs.p50;
  for (const s of storages) {
    const st = perStorage[s];
    st.cyclesWithWholesaleLoss = checked.filter((c) => c.check[s]?.wholesale).length;
    st.cyclesWithMarkerReset = checked.filter((c) => c.check[s]?.markerReset).length;
    if (idbP50) st.p50RatioToIdb = Math.round((st.writeMs.p50 / idbP50) * 100) / 100;
    if (perStorage.idb?.writeMs.p99) st.p99RatioToIdb = Math.round((st.writeMs.p99 / perStorage.idb.writeMs.p99) * 100) / 100;
  }
  const lossCycles = checked.filter((c) => storages.some((s) => c.check[s]?.lost || c.check[s]?.markerReset || c.check[s]?.error))
    .map((c) => ({ cycle: c.cycle, ...Object.fromEntries(storages.map((s) => [s, {
      lost: c.check[s]?.lost ?? null, kept: c.check[s]?.kept ?? null, wholesale: c.check[s]?.wholesale ?? false,
      markerReset: c.check[s]?.markerReset ?? null, error: c.check[s]?.error, upgrade: c.check[s]?.upgrade,
      lostAckedBeforeKillMs: c.check[s]?.lostAckedBeforeKillMs }])),
    log: c.log?.lines.filter((l) => /backing_store|corrupt|value_store|leveldb/i.test(l)),
    tornBefore: cycles.filter((p) => p.cycle < c.cycle && p.cycle >= c.cycle - 3 && p.forensics?.torn.length)
      .map((p) => ({ cycle: p.cycle, torn: p.forensics.torn })) }));
  const undeletedCycles = checked.filter((c) => storages.some((s) => c.check[s]?.undeleted))
    .map((c) => ({ cycle: c.cycle, ...Object.fromEntries(storages.filter((s) => c.check[s]?.undeleted)
      .map((s) => [s, c.check[s].undeleted])) }));
  const logTotals = {};
  const cyclesWithLog = {};
  for (const c of cycles) {
    for (const [k, v] of Object.entries(c.log?.counts ?? {})) {
      logTotals[k] = (logTotals[k] ?? 0) + v;
      cyclesWithLog[k] = (cyclesWithLog[k] ?? 0) + 1;
    }
  }
  const torn = {};
  const corrupt = {};
  for (const c of cycles) {
    for (const store of c.forensics?.torn ?? []) torn[store] = (torn[store] ?? 0) + 1;
    for (const store of c.forensics?.corrupt ?? []) corrupt[store] = (corrupt[store] ?? 0) + 1;
  }
  const events = {};
  for (const c of cycles) for (const e of new Set(c.events ?? [])) events[e] = (events[e] ?? 0) + 1;
  const afterAck = cycles.filter((c) => c.kill?.afterAck && c.kill.sinceLastAckMs !== null && !c.final)
    .map((c) => c.kill.sinceLastAckMs);
  return {
    cycles: cycles.filter((c) => !c.final).length, kills, checks: checked.length,
    noBoot: cycles.filter((c) => c.noBoot).length, noWrites: cycles.filter((c) => c.noWrites).length,
    multiBootCycles: cycles.filter((c) => c.boots > 1).length,
    perStorage, lossCycles, undeletedCycles, logTotals, cyclesWithLog, killsThatToreALog: torn, cyclesEndingWithABadLogRecord: corrupt, events,
    killsAfterAck: { n: afterAck.length, msAfterLastAck: timingStats(afterAck) },
    bootMs: timingStats(checked.map((c) => c.inventoryMs)),
  };
}
