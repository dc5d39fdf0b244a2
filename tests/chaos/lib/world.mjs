// The things a chaos run controls: the reference server (a process of ours on a SQLite file), and
// headless Chromium on one persistent profile with the built demo extension, whose pid is ours so
// a SIGKILL reaches every process of it. The workload runs in an extension page through
// connectOutbox(), as the extension's own UI would.
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { connectCdp, launchChromium } from '../../killloop/lib/browsers.mjs';
import { until } from '../../e2e/lib/wait.mjs';

const run = promisify(execFile);

/** The id Chromium gives an unpacked extension: SHA-256 of its absolute path, first 16 bytes as a-p. */
export function unpackedExtensionId(path) {
  const hex = createHash('sha256').update(path).digest('hex').slice(0, 32);
  return [...hex].map((c) => String.fromCharCode(97 + parseInt(c, 16))).join('');
}

/** Every entity's version and state, read from the server's SQLite file (it survives server kills; the admin log does not). */
export async function readEntities(db, tenant = 'demo') {
  const { stdout } = await run('sqlite3', ['-readonly', '-json', db,
    `SELECT entity, version, state FROM entities WHERE tenant = '${tenant}'`], { maxBuffer: 256 << 20 });
  return (stdout.trim() ? JSON.parse(stdout) : []).map((row) => ({ ...row, state: JSON.parse(row.state) }));
}

/**
 * The browser side: launch, SIGKILL, relaunch on the same profile, and the extension page the
 * workload runs in. `generation` counts launches, so a call that failed with the browser can wait
 * for the next one.
 */
export class ChromiumWorld {
  constructor({ dir, extension, log }) {
    this.dir = dir;
    this.extension = extension;
    this.id = unpackedExtensionId(extension);
    this.profile = join(dir, 'profile');
    this.log = log;
    this.generation = 0;
    this.launches = 0;
    this.incidents = new Map();
    this.eventsByGeneration = new Map();
    this.ready = null;
  }

  /** Launches the browser and opens the workload page; `ready` resolves once calls can be made. */
  launch() {
    this.generation++;
    const generation = this.generation;
    this.ready = (async () => {
      const logPath = join(this.dir, `chromium-${String(this.launches++).padStart(3, '0')}.log`);
      this.process = await launchChromium({ profile: this.profile, extension: this.extension, logPath });
      this.cdp = await connectCdp(this.process);
      const context = this.cdp.contexts()[0];
      this.context = context;
      const page = await context.newPage();
      await page.goto(`chrome-extension://${this.id}/popup.html`);
      await page.evaluate(async () => {
        const { connectOutbox } = await import('./outbox/outbox-page.js');
        const outbox = connectOutbox();
        const incidents = [];
        // STORAGE_* error events come shortly after open; stats().incident keeps the last one
        // for a page that subscribed too late.
        const listen = () => outbox.subscribe((message) => {
          if (message.event?.type === 'error' && /^STORAGE_/.test(message.event.code ?? '')) incidents.push(message.event);
          if (message.disconnected) setTimeout(listen, 200);
        });
        listen();
        globalThis.chaos = { outbox, incidents };
      });
      this.page = page;
      if (generation !== this.generation) throw new Error('relaunched while launching');
      return page;
    })();
    return this.ready;
  }

  /** One enqueue with its key; never throws: {ok, receipt} | {ok: false, code, message} | {interrupted}. */
  async enqueue(call) {
    let page;
    try {
      page = await this.ready;
    } catch (error) {
      return { interrupted: true, message: `launch failed: ${error.message}` };
    }
    try {
      return await page.evaluate(async ({ entity, key, seq }) => {
        try {
          const receipt = await globalThis.chaos.outbox.enqueue({ entity, kind: 'comment', payload: { chaos: { [key]: seq } }, key });
          return { ok: true, receipt: { id: receipt.id, seq: receipt.seq, replayed: Boolean(receipt.replayed) } };
        } catch (error) {
          return { ok: false, code: error?.code ?? null, message: String(error?.message ?? error) };
        }
      }, call);
    } catch (error) {
      // The page went away under the call (the browser was killed): its outcome is unknown.
      return { interrupted: true, message: String(error.message).split('\n')[0] };
    }
  }

  /** SIGKILLs the browser's process group; resolves when every process is gone. */
  async kill() {
    const process = this.process;
    this.ready = Promise.reject(new Error('browser killed'));
    this.ready.catch(() => {});
    const cdp = this.cdp;
    const killed = await process.kill();
    await cdp?.close().catch(() => {});
    return killed;
  }

  /** Stops every service worker over CDP (on a page session; the browser session lacks it). */
  async stopWorkers() {
    const page = await this.ready;
    const session = await this.context.newCDPSession(page);
    await session.send('ServiceWorker.enable');
    await session.send('ServiceWorker.stopAllWorkers');
    await session.detach();
  }

  /** What the extension says of itself: stats, dead letters, and the storage incidents heard. */
  async report() {
    const generation = this.generation;
    const page = await this.ready;
    const report = await page.evaluate(async () => {
      const { outbox, incidents } = globalThis.chaos;
      const [stats, deadLetters] = await Promise.all([outbox.stats(), outbox.deadLetters()]);
      return { stats, deadLetters, events: incidents.map((e) => e.code) };
    });
    // stats().incident keeps the last incident with its details: one entry per distinct one.
    if (report.stats.incident) this.incidents.set(JSON.stringify(report.stats.incident), report.stats.incident);
    // The error events this launch's page heard (a later read of the same page sees them again).
    this.eventsByGeneration.set(generation, report.events);
    return report;
  }

  /** The STORAGE_* error events heard by every launch's page, by code. */
  eventCounts() {
    const counts = {};
    for (const codes of this.eventsByGeneration.values()) for (const code of codes) counts[code] = (counts[code] ?? 0) + 1;
    return counts;
  }

  async stop() {
    await this.cdp?.close().catch(() => {});
    if (this.process?.running) await this.process.stop({ grace: 3000 }).catch(() => {});
  }
}

export { until };
