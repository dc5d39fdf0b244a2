// Headless Chromium with an unpacked extension, as PLATFORM.md measured it: playwright-core
// driving /usr/bin/chromium (never a downloaded browser), a persistent profile per launch.
import { chromium } from 'playwright-core';
import { until } from './wait.mjs';

export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

/**
 * Launches Chromium on `profile` (a user-data-dir) with the extension in `extension` loaded.
 * HEADLESS=0 shows the window where a display exists.
 */
export async function launch({ extension, profile }) {
  const context = await chromium.launchPersistentContext(profile, {
    headless: process.env.HEADLESS !== '0',
    executablePath: CHROMIUM,
    args: [`--disable-extensions-except=${extension}`, `--load-extension=${extension}`,
      '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--no-first-run', '--disable-sync', '--disable-quic'],
    viewport: { width: 1000, height: 800 },
  });
  const worker = context.serviceWorkers()[0] ?? await context.waitForEvent('serviceworker');
  return new Browser(context, new URL(worker.url()).host);
}

export class Browser {
  constructor(context, id) {
    this.context = context;
    this.id = id;
  }

  url(path) {
    return `chrome-extension://${this.id}/${path}`;
  }

  /** The demo popup in a tab (a real popup cannot be opened by automation), once it has read its status. */
  async popup(path = 'popup.html') {
    const page = await this.context.newPage();
    await page.goto(this.url(path));
    await page.locator('body[data-ready="true"]').waitFor();
    return page;
  }

  /** The fixture PR page with the content script ready (it has read the entity's version). */
  async prPage(server, n = 17) {
    const page = await this.context.newPage();
    await page.goto(`${server.url}/demo/pr/${n}.html`);
    await page.locator('body[data-outbox-ready="true"]').waitFor();
    return page;
  }

  /** Stops every service worker over CDP (on a page session; the browser session lacks it). */
  async stopServiceWorkers() {
    const page = this.context.pages()[0] ?? await this.context.newPage();
    const cdp = await this.context.newCDPSession(page);
    await cdp.send('ServiceWorker.enable');
    await cdp.send('ServiceWorker.stopAllWorkers');
    await cdp.detach();
  }

  setOffline(offline) {
    return this.context.setOffline(offline);
  }

  close() {
    return this.context.close();
  }
}

/** The op ids a PR page's content script recorded, as [{kind, id}], oldest first. */
export async function recordedOps(page) {
  const list = await page.evaluate(() => document.documentElement.dataset.outboxOps ?? '');
  return list.split(' ').filter(Boolean).map((entry) => {
    const [kind, id] = entry.split(':');
    return { kind, id };
  });
}

/** Waits until the page has recorded `count` ops and returns them. */
export async function waitForRecorded(page, count) {
  return until(async () => {
    const ops = await recordedOps(page);
    return ops.length >= count && ops;
  }, { what: `${count} ops recorded by the content script`, timeout: 10_000 });
}
