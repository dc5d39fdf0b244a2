// Browser-process control for kill loops: launch a browser on a persistent profile with an
// extension, own its pid and process group, SIGKILL the whole group, relaunch on the same profile.
// Chromium runs /usr/bin/chromium directly (not launchPersistentContext, so the pid is ours);
// Firefox runs firefox-esr on a profile with the add-on installed into it (so it survives restarts).
// Browsers bind loopback only; nothing here downloads anything.
import { execFile, spawn } from 'node:child_process';
import { createHash, createPublicKey } from 'node:crypto';
import { closeSync, openSync, readdirSync, readFileSync } from 'node:fs';
import { copyFile, cp, mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { zipStore } from './zip.mjs';

const run = promisify(execFile);

export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
export const FIREFOX = process.env.FIREFOX ?? '/usr/bin/firefox-esr';

/** The flags of every kill-loop Chromium (the extension flags are added per variant). */
export const CHROMIUM_FLAGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--no-first-run', '--disable-sync', '--disable-quic', '--remote-debugging-port=0',
  '--remote-debugging-address=127.0.0.1', '--enable-logging=stderr', '--v=0', '--no-default-browser-check'];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Live (non-zombie) processes whose process group is `pgid`, as [{pid, comm, state}]. */
export function groupMembers(pgid) {
  const members = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    let text;
    try { text = readFileSync(`/proc/${name}/stat`, 'utf8'); } catch { continue; }
    // pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
    const close = text.lastIndexOf(')');
    const comm = text.slice(text.indexOf('(') + 1, close);
    const [state, , pgrp] = text.slice(close + 2).split(' ');
    if (Number(pgrp) === pgid && state !== 'Z') members.push({ pid: Number(name), comm, state });
  }
  return members;
}

/**
 * A browser we started: its own process group (`pgid` = `pid`), its log file, `exited` (a promise
 * of {code, signal}). `kill()` SIGKILLs the whole group and resolves when no member is left
 * running; `stop()` asks politely (SIGTERM) first.
 */
export class BrowserProcess {
  constructor({ child, kind, profile, logPath, startedAt }) {
    this.child = child;
    this.kind = kind;
    this.pid = child.pid;
    this.pgid = child.pid;
    this.profile = profile;
    this.logPath = logPath;
    this.startedAt = startedAt;
    this.exit = null;
    this.exited = new Promise((resolve) => child.once('exit', (code, signal) => {
      this.exit = { code, signal, at: Date.now() };
      resolve(this.exit);
    }));
  }

  get running() {
    return this.exit === null;
  }

  /** SIGKILLs every process of the group; resolves {at, members (still listed right after the
   * signal), waitedMs} once all are gone. */
  async kill({ timeout = 10_000 } = {}) {
    const at = Date.now();
    try { process.kill(-this.pgid, 'SIGKILL'); } catch (error) { if (error.code !== 'ESRCH') throw error; }
    // Counted after the signal (scanning /proc first would delay the kill).
    const members = groupMembers(this.pgid).length;
    await this.#gone(timeout);
    return { at, members, waitedMs: Date.now() - at };
  }

  /** SIGTERM to the group, SIGKILL after `grace` ms; resolves when all are gone. */
  async stop({ grace = 5000 } = {}) {
    try { process.kill(-this.pgid, 'SIGTERM'); } catch (error) { if (error.code !== 'ESRCH') throw error; }
    const deadline = Date.now() + grace;
    while (Date.now() < deadline && (this.running || groupMembers(this.pgid).length)) await sleep(50);
    if (this.running || groupMembers(this.pgid).length) return this.kill();
    return { at: Date.now(), members: 0, waitedMs: 0 };
  }

  async #gone(timeout) {
    const deadline = Date.now() + timeout;
    for (;;) {
      const left = groupMembers(this.pgid);
      if (!left.length && !this.running) return;
      if (Date.now() > deadline) {
        throw new Error(`${this.kind} group ${this.pgid} still has ${JSON.stringify(left)} after SIGKILL`);
      }
      await sleep(20);
    }
  }
}

function spawnLogged(binary, args, { logPath, env, kind, profile }) {
  const fd = openSync(logPath, 'a');
  try {
    // detached: a new session and process group, so one kill(-pgid) reaches every child.
    const child = spawn(binary, args, { detached: true, stdio: ['ignore', fd, fd], env: env ?? process.env });
    return new BrowserProcess({ child, kind, profile, logPath, startedAt: Date.now() });
  } finally {
    closeSync(fd);
  }
}

// --- Chromium ---

/**
 * Launches Chromium headless on `profile` (a user-data-dir). `extension`: an unpacked folder to
 * pass with --load-extension (omit it for an extension installed into the profile). `args` adds
 * flags, `wrap` is an argv prefix that execs the browser (e.g. a private mount namespace, see
 * policyWrap). Returns a BrowserProcess with `devtools()` (a promise of the ws endpoint).
 */
export async function launchChromium({ profile, extension, logPath, args = [], wrap = [], binary = CHROMIUM,
  backgroundNetworking = false }) {
  await mkdir(profile, { recursive: true });
  await rm(join(profile, 'DevToolsActivePort'), { force: true });
  const flags = CHROMIUM_FLAGS.filter((flag) => backgroundNetworking ? flag !== '--disable-background-networking' : true);
  const extensionFlags = extension ? [`--disable-extensions-except=${extension}`, `--load-extension=${extension}`] : [];
  const argv = [...wrap, binary, `--user-data-dir=${profile}`, ...extensionFlags, ...flags, ...args, 'about:blank'];
  const browser = spawnLogged(argv[0], argv.slice(1), { logPath: logPath ?? join(profile, '..', 'chromium.log'),
    kind: 'chromium', profile });
  browser.argv = argv;
  browser.devtools = () => devtoolsEndpoint(browser);
  return browser;
}

/** The browser's DevTools websocket URL, from <profile>/DevToolsActivePort (port, then path). */
export async function devtoolsEndpoint(browser, { timeout = 30_000 } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const text = await readFile(join(browser.profile, 'DevToolsActivePort'), 'utf8').catch(() => '');
    const [port, path] = text.split('\n');
    if (port && path) return `ws://127.0.0.1:${port.trim()}${path.trim()}`;
    if (!browser.running) throw new Error(`chromium exited (${JSON.stringify(browser.exit)}) before DevTools was up`);
    if (Date.now() > deadline) throw new Error('no DevToolsActivePort within the deadline');
    await sleep(50);
  }
}

/** playwright-core connected over CDP to a running Chromium (for talking to extension pages). */
export async function connectCdp(browser) {
  const { chromium } = await import('playwright-core');
  return chromium.connectOverCDP(await browser.devtools());
}

/** The extension id Chromium derives from a public key (SHA-256 of the SPKI, first 16 bytes as a-p). */
export function chromiumExtensionId(pem) {
  const der = createPublicKey(pem).export({ type: 'spki', format: 'der' });
  const hex = createHash('sha256').update(der).digest('hex').slice(0, 32);
  return [...hex].map((c) => String.fromCharCode(97 + parseInt(c, 16))).join('');
}

/**
 * Packs `dir` into a .crx with `chromium --pack-extension` (a key is made next to it unless `key`
 * is given). Returns {crx, pem, id, version}.
 */
export async function packChromiumExtension({ dir, key, binary = CHROMIUM }) {
  dir = resolve(dir);
  const args = [`--pack-extension=${dir}`, '--no-message-box'];
  if (key) args.push(`--pack-extension-key=${key}`);
  await rm(`${dir}.crx`, { force: true });
  if (!key) await rm(`${dir}.pem`, { force: true });
  await run(binary, [...args, '--headless=new', '--no-sandbox', '--disable-gpu'], { timeout: 60_000 })
    .catch((error) => { throw new Error(`--pack-extension failed: ${error.stderr || error.message}`); });
  const pem = key ?? `${dir}.pem`;
  await stat(`${dir}.crx`);
  const manifest = JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8'));
  return { crx: `${dir}.crx`, pem, id: chromiumExtensionId(await readFile(pem, 'utf8')), version: manifest.version };
}

/** A gupdate manifest that offers `crxUrl` as version `version` of extension `id`. */
export function updateManifest({ id, version, crxUrl }) {
  return `<?xml version='1.0' encoding='UTF-8'?>\n<gupdate xmlns='http://www.google.com/update2/response' protocol='2.0'>\n`
    + `  <app appid='${id}'>\n    <updatecheck codebase='${crxUrl}' version='${version}' />\n  </app>\n</gupdate>\n`;
}

/**
 * Chromium on Linux reads policies only from /etc/chromium/policies. Rather than change the
 * machine's (every other Chromium here would see them), this builds a copy of /etc/chromium with
 * `policies` added under `dir` and returns an argv prefix that runs the browser in a private
 * mount namespace where that copy is bind-mounted over /etc/chromium. Needs root (or CAP_SYS_ADMIN).
 */
export async function policyWrap({ dir, policies }) {
  const etc = join(dir, 'etc-chromium');
  await rm(etc, { recursive: true, force: true });
  await cp('/etc/chromium', etc, { recursive: true }).catch(() => mkdir(etc, { recursive: true }));
  await mkdir(join(etc, 'policies/managed'), { recursive: true });
  await writeFile(join(etc, 'policies/managed/killloop.json'), `${JSON.stringify(policies, null, 2)}\n`);
  return ['unshare', '--mount', '--propagation', 'private', '--', 'sh', '-c',
    `mount --bind "$0" /etc/chromium && exec "$@"`, etc];
}

// --- Firefox ---

/** Zips an unpacked add-on folder into an .xpi (stored, no compression). */
export async function buildXpi({ dir, out }) {
  await writeFile(out, await zipStore(dir));
  return out;
}

/** Prefs for a kill-loop Firefox profile: no first-run, no network, unsigned profile add-ons on. */
export const FIREFOX_PREFS = {
  'xpinstall.signatures.required': false,
  'extensions.autoDisableScopes': 0,
  'extensions.enabledScopes': 15,
  'extensions.startupScanScopes': 15,
  'browser.shell.checkDefaultBrowser': false,
  'browser.startup.homepage_override.mstone': 'ignore',
  'browser.startup.page': 0,
  'browser.aboutwelcome.enabled': false,
  'datareporting.policy.dataSubmissionEnabled': false,
  'datareporting.healthreport.uploadEnabled': false,
  'toolkit.telemetry.enabled': false,
  'app.update.enabled': false,
  'app.update.auto': false,
  'extensions.update.enabled': false,
  'extensions.getAddons.cache.enabled': false,
  'browser.safebrowsing.malware.enabled': false,
  'browser.safebrowsing.phishing.enabled': false,
  'network.captive-portal-service.enabled': false,
  'network.connectivity-service.enabled': false,
  'browser.sessionstore.resume_from_crash': false,
  'toolkit.startup.max_resumed_crashes': -1,
  'browser.tabs.crashReporting.sendReport': false,
  'privacy.reduceTimerPrecision': false,
  'devtools.console.stdout.chrome': true,
  'devtools.console.stdout.content': true,
};

/**
 * Makes `profile` a Firefox profile with the add-on `xpi` (id `addonId`) installed into it
 * (`<profile>/extensions/<id>.xpi`, picked up at start because of the prefs) and its moz-extension
 * UUID pinned to `uuid`. Returns the profile path.
 */
export async function prepareFirefoxProfile({ profile, xpi, addonId, uuid, prefs = {} }) {
  await mkdir(join(profile, 'extensions'), { recursive: true });
  await copyFile(xpi, join(profile, 'extensions', `${addonId}.xpi`));
  const all = { ...FIREFOX_PREFS, ...prefs };
  if (uuid) all['extensions.webextensions.uuids'] = JSON.stringify({ [addonId]: uuid });
  const lines = Object.entries(all).map(([key, value]) => `user_pref(${JSON.stringify(key)}, ${JSON.stringify(value)});`);
  await writeFile(join(profile, 'user.js'), `${lines.join('\n')}\n`);
  return profile;
}

/** Launches firefox-esr headless on `profile` (prepared by prepareFirefoxProfile); `wrap` as for Chromium. */
export async function launchFirefox({ profile, logPath, args = [], wrap = [], binary = FIREFOX }) {
  const argv = [...wrap, binary, '-profile', profile, '-headless', '-no-remote', ...args];
  const env = { ...process.env, MOZ_CRASHREPORTER_DISABLE: '1', MOZ_DISABLE_AUTO_SAFE_MODE: '1' };
  const browser = spawnLogged(argv[0], argv.slice(1), { logPath: logPath ?? join(dirname(profile), 'firefox.log'),
    env, kind: 'firefox', profile });
  browser.argv = argv;
  return browser;
}
