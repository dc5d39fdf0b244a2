// The reference server for end-to-end runs: started on a free loopback port with a SQLite file
// in a temporary directory, stopped by the caller (tests register `stop` with `t.after`).
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

export const REPO = resolve(fileURLToPath(import.meta.url), '../../../..');
export const TENANT = 'demo';
export const TOKEN = 'demo-token';
/** A second token of the same tenant: the "renewed" credentials of the 401 scenario. */
export const RENEWED_TOKEN = 'renewed-token';
export const ADMIN = 'admin';
const BIN = process.env.OUTBOX_SERVER_BIN ?? join(REPO, 'target/release/outbox-server');

/** Flags every e2e server gets: the demo tenant, admin endpoints, the fixture pages. */
export const SERVER_FLAGS = ['--token', `${TENANT}=${TOKEN}`, '--token', `${TENANT}=${RENEWED_TOKEN}`,
  '--admin-token', ADMIN, '--demo-pages', join(REPO, 'extension/demo/site')];

/** The HTTP side of a running server: admin log, scripted faults, entities, metrics. */
export class ServerClient {
  constructor(url, admin = ADMIN) {
    this.url = url;
    this.admin = admin;
  }

  async log() {
    return (await this.#admin('GET', `/v1/admin/log?tenant=${TENANT}`)).json();
  }

  async faults(...rules) {
    await this.#admin('POST', '/v1/admin/faults', { rules });
  }

  async clearFaults() {
    await this.#admin('DELETE', '/v1/admin/faults');
  }

  /** GET /v1/entities/{id} as the demo tenant; `null` when it does not exist. */
  async entity(id) {
    const response = await fetch(`${this.url}/v1/entities/${id}`, { headers: { authorization: `Bearer ${TOKEN}` } });
    if (response.status === 404) return null;
    if (!response.ok) throw new Error(`GET entity ${id}: ${response.status}`);
    return response.json();
  }

  /** How many faults of `kind` the server has injected so far (from /metrics). */
  async faultsInjected(kind) {
    const text = await (await fetch(`${this.url}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith(`outbox_faults_injected_total{kind="${kind}"}`));
    return line ? Number(line.split(' ').at(-1)) : 0;
  }

  async #admin(method, path, body) {
    const response = await fetch(`${this.url}${path}`, {
      method,
      headers: { authorization: `Bearer ${this.admin}`, ...(body && { 'content-type': 'application/json' }) },
      body: body && JSON.stringify(body),
    });
    if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${await response.text()}`);
    return response;
  }
}

/** A server process of this test's own (start, stop, restart on the same port and database). */
export class Server extends ServerClient {
  /** Starts a server. `port` 0 picks a free one; `restart()` keeps the port and the database. */
  static async start({ flags = [], port = 0, dir } = {}) {
    const server = new Server();
    server.dir = dir ?? await mkdtemp(join(tmpdir(), 'outbox-e2e-server-'));
    server.ownsDir = !dir;
    server.db = join(server.dir, 'outbox.db');
    server.flags = [...SERVER_FLAGS, ...flags];
    server.starts = 0;
    await server.#launch(port);
    return server;
  }

  async #launch(port) {
    this.logPath = join(this.dir, `server-${this.starts++}.log`);
    const child = spawn(BIN, [...this.flags, '--listen', `127.0.0.1:${port}`, '--db', this.db],
      { stdio: ['ignore', 'pipe', 'pipe'] });
    child.stderr.pipe(createWriteStream(this.logPath));
    const exited = new Promise((resolve) => child.once('exit', resolve));
    const line = await new Promise((resolve, reject) => {
      const lines = createInterface({ input: child.stdout });
      lines.once('line', resolve);
      child.once('error', reject);
      exited.then((code) => reject(new Error(`outbox-server exited with ${code} before listening; see ${this.logPath}`)));
    });
    const match = /^listening on (http:\/\/127\.0\.0\.1:(\d+))$/.exec(line);
    if (!match) throw new Error(`outbox-server printed ${JSON.stringify(line)}`);
    this.child = child;
    this.exited = exited;
    this.url = match[1];
    this.port = Number(match[2]);
  }

  /** SIGTERM, then SIGKILL after 5 s. Safe to call twice. */
  async stop() {
    const child = this.child;
    if (!child) return;
    this.child = null;
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await this.exited;
      clearTimeout(timer);
    }
  }

  /** SIGKILL, as a crash would: no shutdown, whatever SQLite had not committed is gone. */
  async kill() {
    const child = this.child;
    if (!child) return;
    this.child = null;
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await this.exited;
    }
  }

  /** Starts the process again after kill() (or stop()), on the same port and database. */
  async relaunch() {
    await this.#launch(this.port);
  }

  /** A new process on the same port and database (the "server comes back" half of an outage). */
  async restart() {
    await this.stop();
    await this.#launch(this.port);
  }

  /** Stops the server and removes its directory. */
  async dispose() {
    await this.stop();
    if (this.ownsDir) await rm(this.dir, { recursive: true, force: true });
  }

  async stderr() {
    return readFile(this.logPath, 'utf8').catch(() => '');
  }
}
