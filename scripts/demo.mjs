// The scripted session of `make demo` (scripts/demo starts the server and runs this). It builds
// the demo extension into .demo/pr-tracker/, runs the scenarios of the end-to-end tests
// (tests/e2e/lib/scenarios.mjs) one after another in one Chromium profile against the one
// server, prints a table per scenario and a summary, and saves popup screenshots.
//
// Expects OUTBOX_SERVER_URL (scripts/with-server sets it) and OUTBOX_ADMIN_TOKEN.
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { buildDemo } from '../extension/demo/build.mjs';
import { launch } from '../tests/e2e/lib/chromium.mjs';
import { setReviewer } from '../tests/e2e/lib/env.mjs';
import { PlaywrightPrPage } from '../tests/e2e/lib/pr-page.mjs';
import { CHROMIUM_SCENARIOS } from '../tests/e2e/lib/scenarios.mjs';
import { REPO, ServerClient } from '../tests/e2e/lib/server.mjs';

const url = process.env.OUTBOX_SERVER_URL;
if (!url) {
  console.error('demo: OUTBOX_SERVER_URL is not set; run scripts/demo (or make demo), which starts the server');
  process.exit(2);
}
const server = new ServerClient(url, process.env.OUTBOX_ADMIN_TOKEN);
const root = join(REPO, '.demo');
const shots = join(root, 'screenshots');
await rm(join(root, 'profiles'), { recursive: true, force: true });
await rm(shots, { recursive: true, force: true });
await mkdir(shots, { recursive: true });
const extension = await buildDemo({ out: join(root, 'pr-tracker'), endpoint: url });
console.log(`demo: extension built in ${extension}; server ${url}`);

const start = (profile) => launch({ extension, profile: join(root, 'profiles', profile) });
let browser = await start('you');
/** Second profiles of the current scenario (the conflict's other reviewer). */
const others = [];
let next = 17;
let shot = 0;
const saved = [];
const env = {
  server,
  get browser() { return browser; },
  pr: () => next++,
  openPr: (n) => PlaywrightPrPage.open(browser.context, server.url, n),
  async relaunch() {
    await browser.close();
    browser = await start('you');
  },
  async otherProfile(reviewer) {
    const other = await start(reviewer);
    others.push(other);
    await setReviewer(other, reviewer);
    return other;
  },
  async screenshot(page, name) {
    const path = join(shots, `${String(++shot).padStart(2, '0')}-${name}.png`);
    await page.setViewportSize({ width: 500, height: 760 });
    await page.screenshot({ path, fullPage: true });
    saved.push(path);
  },
};

const ms = (v) => (v == null ? '—' : `${(v / 1000).toFixed(2)} s`);
const COLUMNS = ['ops made', 'applied on server', 'duplicates absorbed', 'requests', 'time to deliver (median / max)'];
function row(f) {
  return [String(f.made), String(f.applied), String(f.duplicates), String(f.arrivals), `${ms(f.medianMs)} / ${ms(f.maxMs)}`];
}
function table(rows, header) {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells) => `  ${cells.map((c, i) => c.padEnd(widths[i])).join('  ')}`.trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}

// Scenario 3b stops and restarts its server; the demo's server belongs to scripts/with-server.
const SKIP = new Map([['3b server down', 'needs a server the session may stop; `make e2e` runs it']]);
const results = [];
const began = Date.now();
for (const [label, behaviour, scenario] of CHROMIUM_SCENARIOS) {
  console.log(`\n${label}: ${behaviour}`);
  if (SKIP.has(label)) {
    console.log(`  skipped: ${SKIP.get(label)}`);
    continue;
  }
  const started = Date.now();
  try {
    const figures = await scenario(env);
    results.push([label, figures]);
    console.log(table([row(figures)], COLUMNS));
    console.log(`  ${figures.note} (${ms(Date.now() - started)})`);
  } catch (error) {
    results.push([label, null]);
    console.log(`  FAILED: ${error.stack ?? error}`);
  } finally {
    await server.clearFaults().catch(() => {});
    // Each scenario starts from a quiet browser: its pages closed, no fault left behind.
    for (const other of others.splice(0)) await other.close().catch(() => {});
    for (const page of browser.context.pages().slice(1)) await page.close().catch(() => {});
  }
}

// A last look at the popup, after everything.
const popup = await browser.popup('popup.html');
await env.screenshot(popup, 'after-the-session');
await browser.close();

console.log(`\nSummary (${ms(Date.now() - began)} for ${results.length} scenarios)`);
console.log(table(results.map(([label, f]) => [label, ...(f ? row(f) : ['FAILED', '', '', '', ''])]), ['scenario', ...COLUMNS]));
console.log('\nPopup screenshots:');
for (const path of saved) console.log(`  ${path}`);
const failed = results.filter(([, f]) => !f).length;
if (failed) {
  console.log(`\ndemo: ${failed} scenario(s) failed`);
  process.exit(1);
}
