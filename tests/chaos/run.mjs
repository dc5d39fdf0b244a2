#!/usr/bin/env node
// The chaos run (issue 17, item 2): the built demo extension in headless Chromium against the
// reference server, a seeded schedule of worker stops, browser SIGKILLs, offline periods, server
// SIGKILLs and injected faults, then the checker over the server's database and log and the call
// book. See tests/chaos/README.md. Exit status: 0 no violation, 1 violations, 2 harness error.
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildDemo } from '../../extension/demo/build.mjs';
import { Server } from '../e2e/lib/server.mjs';
import { check } from './lib/checker.mjs';
import { makeSchedule, makeWorkload, PRESETS } from './lib/schedule.mjs';
import { ChromiumWorld, readEntities } from './lib/world.mjs';

const HELP = `usage: scripts/chaos [--preset short|long] [--seed N] [--ops N] [--entities N] [--lanes N]
                    [--browser-kills N] [--worker-stops N] [--server-kills N] [--offline-periods N]
                    [--fault-5xx P] [--fault-429 P] [--fault-drop-after-commit P]
                    [--drain-bound-ms MS] [--out FILE] [--keep]

  --preset          short (~2 min: 300 ops, 3 browser kills) or long (10,000 ops, 24 browser kills)
  --seed            the schedule, the workload and the server's fault generator (default: random, printed)
  --out FILE        also write the JSON summary there
  --keep            keep the work directory (profile, logs, database, call book)
Every number of the preset can be overridden by its flag (or CHAOS_<NAME> in the environment,
e.g. CHAOS_OPS=2000). Prints the seed, the settings and the schedule on stderr, the JSON summary
on stdout. Exit status: 0 no violation, 1 violations, 2 harness error.`;

const NUMBERS = { ops: 'ops', entities: 'entities', lanes: 'lanes', 'browser-kills': 'browserKills',
  'worker-stops': 'workerStops', 'server-kills': 'serverKills', 'offline-periods': 'offlinePeriods',
  'fault-5xx': 'fault5xx', 'fault-429': 'fault429', 'fault-drop-after-commit': 'faultDropAfterCommit',
  'drain-bound-ms': 'drainBoundMs' };

function settingsFrom(argv) {
  const { values } = parseArgs({ args: argv, options: {
    preset: { type: 'string', default: process.env.CHAOS_PRESET ?? 'short' },
    seed: { type: 'string', default: process.env.CHAOS_SEED },
    out: { type: 'string', default: process.env.CHAOS_OUT },
    keep: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
    ...Object.fromEntries(Object.keys(NUMBERS).map((flag) => [flag, { type: 'string' }])),
  } });
  if (values.help) {
    console.log(HELP);
    process.exit(0);
  }
  const preset = PRESETS[values.preset];
  if (!preset) throw new Error(`no preset ${values.preset}; one of ${Object.keys(PRESETS).join(', ')}`);
  const settings = { ...preset };
  for (const [flag, name] of Object.entries(NUMBERS)) {
    const raw = values[flag] ?? process.env[`CHAOS_${name.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase()}`];
    if (raw != null) {
      settings[name] = Number(raw);
      if (!Number.isFinite(settings[name])) throw new Error(`--${flag} wants a number, not ${raw}`);
    }
  }
  const seed = values.seed != null ? Number(values.seed) : Math.floor(Math.random() * 2 ** 31);
  if (!Number.isInteger(seed)) throw new Error(`--seed wants an integer, not ${values.seed}`);
  return { seed, preset: values.preset, settings, out: values.out, keep: values.keep };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const t0 = Date.now();
const say = (line) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(7)} s] ${line}\n`);

/** A rule that answers every op request of the demo tenant 503 (the health probe still answers). */
const OFFLINE_RULE = { route: 'any', tenant: 'demo', times: 1_000_000, action: { status: 503, retry_after: 1 } };

async function main() {
  const { seed, preset, settings, out, keep } = settingsFrom(process.argv.slice(2));
  const schedule = makeSchedule(seed, settings);
  const calls = makeWorkload(seed, settings).map((c) => ({ ...c, receipts: [], errors: [], interrupted: 0 }));
  say(`seed ${seed} (reproduce: scripts/chaos --preset ${preset} --seed ${seed})`);
  say(`settings ${JSON.stringify(settings)}`);
  for (const e of schedule) say(`schedule #${e.index} after ${e.afterOps} calls: ${e.kind} ${JSON.stringify(e)}`);

  const dir = await mkdtemp(join(tmpdir(), 'outbox-chaos-'));
  say(`dir ${dir}`);
  const faultFlags = ['--fault-seed', String(seed), '--fault-5xx', String(settings.fault5xx),
    '--fault-429', String(settings.fault429), '--fault-drop-after-commit', String(settings.faultDropAfterCommit)];
  let server;
  let world;
  let stopping = false;
  const cleanup = async () => {
    stopping = true;
    await world?.stop().catch(() => {});
    await server?.stop().catch(() => {});
    if (!keep) await rm(dir, { recursive: true, force: true }).catch(() => {});
  };
  for (const signal of ['SIGINT', 'SIGTERM']) {
    process.once(signal, () => cleanup().finally(() => process.exit(2)));
  }
  try {
    await mkdir(join(dir, 'server'));
    server = await Server.start({ dir: join(dir, 'server'), flags: faultFlags });
    const extension = await buildDemo({ out: join(dir, 'extension'), endpoint: server.url });
    world = new ChromiumWorld({ dir, extension });
    await world.launch();
    say(`server ${server.url}, extension ${world.id}`);

    // The admin log lives in the server's memory: poll it, keep each process's last copy.
    const logs = [];
    let logNow = [];
    // A poll that was under way when a process's log was frozen must not land in the next one's;
    // within one process the log only grows, so a late, shorter answer is an older one.
    let incarnation = 0;
    const pollLog = async () => {
      const mine = incarnation;
      const entries = await server.log().catch(() => null);
      if (entries && mine === incarnation && entries.length >= logNow.length) logNow = entries;
    };
    const freezeLog = async () => {
      await pollLog();
      logs.push(logNow);
      logNow = [];
      incarnation++;
    };
    // While an offline period is on, until when (periods may overlap; the last one ends it).
    let offlineUntil = 0;
    const offline = () => Date.now() < offlineUntil;
    const background = (async () => {
      while (!stopping) {
        await pollLog();
        await Promise.race([world.report().catch(() => {}), sleep(3000)]);
        await sleep(1000);
      }
    })();

    const counts = { resolved: 0, browserKills: 0, killsAfterEnqueue: 0, workerStops: 0, serverKills: 0, offlinePeriods: 0 };
    const pending = [...schedule];
    const offlineTimers = [];
    let running = Promise.resolve();

    async function fire(event, fromLane) {
      const started = Date.now();
      if (event.kind === 'browser-kill') {
        const killed = await world.kill();
        counts.browserKills++;
        if (fromLane) counts.killsAfterEnqueue++;
        say(`#${event.index} browser SIGKILL${fromLane ? ` ${started - fromLane} ms after an enqueue resolved` : ''} (${killed.members} processes, gone in ${killed.waitedMs} ms); relaunch`);
        await world.launch();
      } else if (event.kind === 'worker-stop') {
        await world.stopWorkers().catch((error) => say(`worker stop failed: ${error.message}`));
        counts.workerStops++;
        say(`#${event.index} service workers stopped`);
      } else if (event.kind === 'server-kill') {
        await freezeLog();
        await server.kill();
        counts.serverKills++;
        say(`#${event.index} server SIGKILL, down ${event.downMs} ms`);
        await sleep(event.downMs);
        await server.relaunch();
        if (offline()) await server.faults(OFFLINE_RULE);
        say(`server back on ${server.url}`);
      } else if (event.kind === 'offline') {
        counts.offlinePeriods++;
        if (!offline()) await server.faults(OFFLINE_RULE);
        offlineUntil = Math.max(offlineUntil, Date.now() + event.ms);
        say(`#${event.index} offline (every op request 503) for ${event.ms} ms`);
        // Not awaited: the workload and the schedule go on while the server refuses.
        offlineTimers.push(setTimeout(async () => {
          if (offline() || stopping) return;
          await server.clearFaults().catch(() => {});
          say('online again');
        }, event.ms + 10));
      }
    }

    // Fires every event that is due; `fromLane` is when the call that made it due resolved.
    function due(fromLane) {
      const ready = [];
      while (pending.length && pending[0].afterOps <= counts.resolved) ready.push(pending.shift());
      if (!ready.length) return;
      // A kill right after an enqueue resolved goes out now, not behind an event still running.
      const urgent = ready.find((e) => e.kind === 'browser-kill' && e.afterEnqueue);
      running = running.then(async () => {
        for (const event of ready) {
          await fire(event, event === urgent ? fromLane : null).catch((error) => say(`event #${event.index} failed: ${error.stack}`));
        }
      });
    }

    // Lanes: each owns a set of entities and makes their calls one at a time, so each entity's
    // calls have one intended order. A rejected call is made again with its key, as a UI would.
    const lane = async (mine) => {
      for (const call of mine) {
        if (call.thinkMs) await sleep(call.thinkMs);
        for (;;) {
          const generation = world.generation;
          const answer = await world.enqueue(call);
          if (answer.ok) {
            call.receipts.push(answer.receipt);
            break;
          }
          if (answer.interrupted) {
            call.interrupted++;
            // Wait for the next launch, then ask again with the same key.
            while (world.generation === generation) await sleep(50);
            await world.ready.catch(() => {});
            continue;
          }
          call.errors.push({ code: answer.code, message: answer.message });
          if (call.errors.length >= 10) break;
          await sleep(200);
        }
        counts.resolved++;
        due(Date.now());
      }
    };
    const lanes = Array.from({ length: settings.lanes }, (_, l) =>
      calls.filter((c) => Number(c.entity.slice(3)) % settings.lanes === l));
    await Promise.all(lanes.map(lane));
    // Whatever is left of the schedule (and any offline period still on) ends the chaos.
    counts.resolved = Infinity;
    due(Date.now());
    await running;
    say(`workload done: ${counts.resolved === Infinity ? calls.length : counts.resolved} calls; end of chaos`);

    // End of chaos: a healthy server (no fault rules, no injected faults) and a live browser.
    for (const timer of offlineTimers) clearTimeout(timer);
    offlineUntil = 0;
    await freezeLog();
    server.flags = server.flags.filter((f) => !faultFlags.includes(f));
    await server.restart();
    await world.ready;
    const chaosEnded = Date.now();
    const acked = calls.filter((c) => c.receipts.length);
    let drained = false;
    let last = null;
    while (Date.now() - chaosEnded < settings.drainBoundMs + 30_000) {
      const report = await Promise.race([world.report().catch(() => null), sleep(5000).then(() => null)]);
      const applied = new Set((await readEntities(server.db)).flatMap((e) => Object.keys(e.state?.chaos ?? {})));
      const dead = new Set((report?.deadLetters ?? []).map((l) => Object.keys(l.op?.payload?.chaos ?? {})[0]));
      const missing = acked.filter((c) => !applied.has(c.key) && !dead.has(c.key)).length;
      last = { missing, pending: report?.stats?.pending, inFlight: report?.stats?.inFlight };
      if (report && missing === 0 && report.stats.pending === 0) {
        drained = true;
        break;
      }
      await sleep(500);
    }
    const drainMs = Date.now() - chaosEnded;
    say(`drain: ${drained ? 'drained' : 'NOT drained'} in ${drainMs} ms (${JSON.stringify(last)})`);
    stopping = true;
    await background;
    const final = await world.report();
    await freezeLog();

    const entities = await readEntities(server.db);
    const result = check({
      calls, entities, log: logs.flat(), deadLetters: final.deadLetters, incidents: [...world.incidents.values()],
      drain: { drained, ms: drainMs }, drainBoundMs: settings.drainBoundMs, failuresInjected: settings.fault5xx > 0,
    });
    const clients = new Set(logs.flat().map((e) => e.client));
    const summary = {
      seed, preset, settings, ok: result.ok, ...result.summary,
      storageEvents: world.eventCounts(),
      events: { ...counts, resolved: undefined, scheduled: schedule.length },
      interruptedCalls: calls.reduce((n, c) => n + c.interrupted, 0),
      callsRetriedWithKey: calls.filter((c) => c.interrupted || c.errors.length).length,
      replayedReceipts: calls.reduce((n, c) => n + c.receipts.filter((r) => r.replayed).length, 0),
      clientIds: clients.size,
      serverProcesses: logs.length,
      // From the log: the seeded faults and the offline periods' 503s, by kind and status.
      faultsInjected: tallyFaults(logs.flat()),
      violations: result.violations.slice(0, 50),
      violationCount: result.violations.length,
      minutes: Number(((Date.now() - t0) / 60000).toFixed(1)),
      dir: keep ? dir : undefined,
    };
    if (keep) await writeFile(join(dir, 'calls.json'), JSON.stringify(calls));
    const text = JSON.stringify(summary, null, 2);
    console.log(text);
    if (out) await writeFile(out, `${text}\n`);
    say(result.ok ? 'no violation' : `${result.violations.length} violation(s); reproduce with --seed ${seed}`);
    return result.ok ? 0 : 1;
  } finally {
    await cleanup();
  }
}

function tallyFaults(log) {
  const out = {};
  for (const e of log) {
    if (!e.fault) continue;
    const name = `${e.fault}${e.http ? ` ${e.http}` : ''}`;
    out[name] = (out[name] ?? 0) + 1;
  }
  return out;
}

main().then((code) => process.exit(code), (error) => {
  say(`harness error: ${error.stack}`);
  process.exit(2);
});
