// A test's world: its own server, extension build, browser profile(s) and temporary directory,
// all removed by `t.after` whether the test passes or fails.
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildDemo } from '../../../extension/demo/build.mjs';
import { launch } from './chromium.mjs';
import { Firefox } from './firefox.mjs';
import { PlaywrightPrPage, WebDriverPrPage } from './pr-page.mjs';
import { Server } from './server.mjs';

/** Sets who the reviewer is in a profile (the demo reads chrome.storage.local `reviewer`). */
export async function setReviewer(browser, reviewer) {
  const page = await browser.context.newPage();
  await page.goto(browser.url('popup.html'));
  await page.evaluate((reviewer) => chrome.storage.local.set({ reviewer }), reviewer);
  await page.close();
}

/**
 * The env of scenarios.mjs for one Chromium test. `serverFlags` go to the server;
 * `extraContentScripts` into the demo build (see extension/demo/build.mjs).
 */
export async function chromiumEnv(t, { serverFlags = [], extraContentScripts = [] } = {}) {
  const dir = await mkdtemp(join(tmpdir(), 'outbox-e2e-'));
  await mkdir(join(dir, 'server'));
  const browsers = new Set();
  let server;
  t.after(async () => {
    for (const browser of browsers) await browser.close().catch(() => {});
    await server?.dispose();
    await rm(dir, { recursive: true, force: true });
  });
  server = await Server.start({ dir: join(dir, 'server'), flags: serverFlags });
  const extension = await buildDemo({ out: join(dir, 'extension'), endpoint: server.url, extraContentScripts });
  const start = async (profile) => {
    const browser = await launch({ extension, profile: join(dir, profile) });
    browsers.add(browser);
    return browser;
  };
  let browser = await start('profile');
  let next = 100;
  return {
    server,
    extension,
    get browser() { return browser; },
    pr: () => next++,
    openPr: (n) => PlaywrightPrPage.open(browser.context, server.url, n),
    /** Closes the main browser and starts it on the same profile; `between(profileDir, browser)` runs in between. */
    async relaunch({ between } = {}) {
      browsers.delete(browser);
      await browser.close();
      await between?.(join(dir, 'profile'), browser);
      browser = await start('profile');
    },
    async otherProfile(reviewer) {
      const other = await start(`profile-${reviewer}`);
      await setReviewer(other, reviewer);
      return other;
    },
  };
}

/** The env of scenarios.mjs for one Firefox test: the demo as a temporary add-on, event page background. */
export async function firefoxEnv(t) {
  const dir = await mkdtemp(join(tmpdir(), 'outbox-e2e-firefox-'));
  await mkdir(join(dir, 'server'));
  let server;
  let firefox;
  t.after(async () => {
    await firefox?.close();
    await server?.dispose();
    await rm(dir, { recursive: true, force: true });
  });
  server = await Server.start({ dir: join(dir, 'server') });
  const extension = await buildDemo({ out: join(dir, 'extension'), endpoint: server.url, browser: 'firefox' });
  firefox = await Firefox.start({ dir });
  await firefox.installTemporary(extension);
  let next = 100;
  return {
    server,
    extension,
    firefox,
    pr: () => next++,
    openPr: (n) => WebDriverPrPage.open(firefox, server.url, n),
  };
}
