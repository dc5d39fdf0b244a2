// Firefox ESR headless through geckodriver (plain WebDriver over HTTP, so no extra npm
// packages). The extension is installed as a temporary add-on, as PLATFORM.md measured; its
// background runs as an event page. The driver cannot open moz-extension:// pages, so Firefox
// runs are driven from the fixture PR page.
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

export const FIREFOX = process.env.FIREFOX ?? '/usr/bin/firefox-esr';
export const GECKODRIVER = process.env.GECKODRIVER ?? join(homedir(), '.cargo/bin/geckodriver');

export class Firefox {
  /** Starts geckodriver on a free port and a headless Firefox session with a profile under `dir`. */
  static async start({ dir }) {
    const firefox = new Firefox();
    const driver = spawn(GECKODRIVER, ['--port', '0', '--binary', FIREFOX, '--profile-root', dir],
      { stdio: ['ignore', 'pipe', 'pipe'] });
    firefox.driver = driver;
    firefox.exited = new Promise((resolve) => driver.once('exit', resolve));
    // Everything geckodriver and Firefox print, the extension's console included (see prefs).
    firefox.logPath = join(dir, 'firefox.log');
    const log = createWriteStream(firefox.logPath);
    driver.stdout.pipe(log);
    driver.stderr.pipe(log);
    const port = await new Promise((resolve, reject) => {
      const lines = createInterface({ input: driver.stdout });
      lines.on('line', (line) => {
        const match = /Listening on 127\.0\.0\.1:(\d+)/.exec(line);
        if (match) resolve(Number(match[1]));
      });
      driver.once('error', reject);
      firefox.exited.then((code) => reject(new Error(`geckodriver exited with ${code}`)));
    });
    firefox.base = `http://127.0.0.1:${port}`;
    const session = await firefox.#call('POST', '/session', { capabilities: { alwaysMatch: {
      browserName: 'firefox',
      'moz:firefoxOptions': { binary: FIREFOX, args: ['-headless'],
        prefs: { 'browser.shell.checkDefaultBrowser': false, 'datareporting.policy.dataSubmissionEnabled': false,
          // Console messages, the add-on's included, go to stdout, hence to firefox.log.
          'devtools.console.stdout.chrome': true, 'devtools.console.stdout.content': true } },
    } } });
    firefox.session = `/session/${session.sessionId}`;
    return firefox;
  }

  async #call(method, path, body) {
    const response = await fetch(`${this.base}${path}`, {
      method,
      headers: body ? { 'content-type': 'application/json' } : {},
      body: body && JSON.stringify(body),
    });
    const reply = await response.json();
    if (!response.ok) throw new Error(`geckodriver ${method} ${path}: ${JSON.stringify(reply.value)}`);
    return reply.value;
  }

  /** Installs an unpacked extension folder as a temporary add-on; returns its add-on id. */
  installTemporary(path) {
    return this.#call('POST', `${this.session}/moz/addon/install`, { path, temporary: true });
  }

  goto(url) {
    return this.#call('POST', `${this.session}/url`, { url });
  }

  /** Runs `script` (a function body; `arguments` holds `args`) in the page and returns its value. */
  evaluate(script, ...args) {
    return this.#call('POST', `${this.session}/execute/sync`, { script, args });
  }

  async click(selector) {
    const element = await this.#call('POST', `${this.session}/element`, { using: 'css selector', value: selector });
    const id = Object.values(element)[0];
    await this.#call('POST', `${this.session}/element/${id}/click`, {});
  }

  async type(selector, text) {
    const element = await this.#call('POST', `${this.session}/element`, { using: 'css selector', value: selector });
    const id = Object.values(element)[0];
    await this.#call('POST', `${this.session}/element/${id}/value`, { text });
  }

  /** The last `lines` lines of firefox.log, for a failure report. */
  async logTail(lines = 60) {
    const text = await readFile(this.logPath, 'utf8').catch(() => '');
    return text.split('\n').slice(-lines).join('\n');
  }

  /** Ends the session (Firefox exits) and stops geckodriver. Safe to call twice. */
  async close() {
    if (!this.driver) return;
    const driver = this.driver;
    this.driver = null;
    if (this.session) await this.#call('DELETE', this.session).catch(() => {});
    driver.kill('SIGTERM');
    const timer = setTimeout(() => driver.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(timer);
  }
}
