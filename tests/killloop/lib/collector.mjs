// The collector: a tiny loopback HTTP server that the workload extension reports to. Acks live
// here, outside the browser, so they survive its SIGKILL and are the ground truth of "acknowledged".
//
// Protocol (every request is a POST with a JSON text/plain body; answers are JSON, CORS-open so an
// extension needs no host permission; see tests/killloop/README.md):
//   /hello      {trigger, id, scope, ua}          -> {boot, epoch, cycle, load, storages, retireBelow}
//   /inventory  {boot, epoch, inventory: {<storage>: {marker, ranges, bad, ...}}}
//   /writing    {boot}                            the workload has started writing
//   /ack        {boot, acks: [[storage, id, ms], ...]}  each id durable in storage, ms = write time
//   /event      {boot, type, ...}                 anything else worth keeping (onInstalled, errors)
// GET paths registered with `serve(path, {type, body})` are answered as given (the packed
// variant's update manifest and .crx).
import { EventEmitter } from 'node:events';
import { createServer } from 'node:http';

export const EPOCH_SPAN = 1e7;

export class Collector extends EventEmitter {
  /** Starts listening on 127.0.0.1 at a free port. `config` is what /hello answers (see configure). */
  static async start(config = {}) {
    const collector = new Collector();
    collector.configure(config);
    await new Promise((resolve, reject) => {
      collector.server.once('error', reject);
      collector.server.listen(0, '127.0.0.1', resolve);
    });
    collector.url = `http://127.0.0.1:${collector.server.address().port}`;
    return collector;
  }

  constructor() {
    super();
    this.cycle = 0;
    this.epoch = 0;
    this.boots = new Map();
    this.statics = new Map();
    this.server = createServer((req, res) => this.#handle(req, res));
    this.server.keepAliveTimeout = 60_000;
  }

  /**
   * What the next /hello answers: `load` ({pattern, intervalMs, bytes, inflight}, or null to stay
   * idle), `storages` (names the workload writes), `keepEpochs` (records of older epochs are
   * retired at start; 0 keeps everything).
   */
  configure({ load = null, storages = ['idb', 'storage', 'opfs'], keepEpochs = 3 } = {}) {
    this.load = load;
    this.storages = storages;
    this.keepEpochs = keepEpochs;
  }

  /** Answers GET `path` with `body` (for update manifests and .crx files). */
  serve(path, { type, body }) {
    this.statics.set(path, { type, body });
  }

  /** The boot record of the most recent /hello, or null. */
  get lastBoot() {
    return [...this.boots.values()].at(-1) ?? null;
  }

  #hello(body) {
    const epoch = ++this.epoch;
    const retireBelow = this.keepEpochs ? Math.max(1, epoch - this.keepEpochs) : 1;
    const boot = { boot: epoch, epoch, cycle: this.cycle, at: Date.now(), hello: body, inventory: null,
      writingAt: null, events: [], acks: 0, firstAckAt: null, lastAckAt: null, retireBelow };
    this.boots.set(epoch, boot);
    this.emit('hello', boot);
    return { boot: epoch, epoch, cycle: this.cycle, load: this.load, storages: this.storages, retireBelow };
  }

  #post(path, body) {
    if (path === '/hello') return this.#hello(body);
    const boot = this.boots.get(body.boot);
    if (!boot) return { ok: false, error: 'unknown boot' };
    const at = Date.now();
    if (path === '/inventory') {
      boot.inventory = body.inventory;
      boot.inventoryAt = at;
      boot.sinceScriptMs = body.sinceScriptMs;
      this.emit('inventory', boot);
    } else if (path === '/writing') {
      boot.writingAt = at;
      this.emit('writing', boot);
    } else if (path === '/ack') {
      boot.acks += body.acks.length;
      boot.firstAckAt ??= at;
      boot.lastAckAt = at;
      this.emit('ack', boot, body.acks, at);
    } else if (path === '/event') {
      boot.events.push(body);
      this.emit('event', boot, body);
    } else {
      return null;
    }
    return { ok: true };
  }

  #handle(req, res) {
    const headers = { 'access-control-allow-origin': '*', 'cache-control': 'no-store' };
    const url = new URL(req.url, 'http://x');
    if (req.method === 'OPTIONS') {
      res.writeHead(204, { ...headers, 'access-control-allow-methods': 'GET, POST',
        'access-control-allow-headers': 'content-type' });
      res.end();
      return;
    }
    if (req.method === 'GET') {
      const item = this.statics.get(url.pathname);
      this.emit('get', url.pathname, Boolean(item));
      if (!item) { res.writeHead(404, headers); res.end(); return; }
      res.writeHead(200, { ...headers, 'content-type': item.type });
      res.end(item.body);
      return;
    }
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      let answer;
      try {
        answer = this.#post(url.pathname, JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}'));
      } catch (error) {
        res.writeHead(400, headers);
        res.end(JSON.stringify({ error: String(error) }));
        return;
      }
      if (answer === null) { res.writeHead(404, headers); res.end(); return; }
      res.writeHead(200, { ...headers, 'content-type': 'application/json' });
      res.end(JSON.stringify(answer));
    });
  }

  /** Stops listening and drops open connections. */
  async close() {
    this.server.closeAllConnections?.();
    await new Promise((resolve) => this.server.close(resolve));
  }
}
