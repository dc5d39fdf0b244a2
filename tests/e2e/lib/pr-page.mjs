// The fixture PR page with the demo's content script, driven by a user's clicks. One class per
// driver (Playwright for Chromium, WebDriver for Firefox) with the same methods, so that a
// scenario runs in either browser.
import { until } from './wait.mjs';

const FILE = (path) => `[data-file="${path}"] .viewed`;

class PrPage {
  /** When each action was taken (ms since epoch), in order: the k-th recorded op is the k-th action's. */
  actedAt = [];

  constructor(n) {
    this.n = n;
    this.entity = `pr/${n}`;
  }

  /** The ops the content script queued, oldest first: [{kind, id, seq, actedAt}]. */
  async ops() {
    const list = await this.evaluate('return document.documentElement.dataset.outboxOps ?? ""');
    return list.split(' ').filter(Boolean).map((entry, k) => {
      const [kind, id, seq] = entry.split(':');
      return { kind, id, seq: Number(seq), actedAt: this.actedAt[k] };
    });
  }

  /** Waits until every action so far has been queued (enqueue resolved, so it is on disk). */
  async queued() {
    return until(async () => {
      const ops = await this.ops();
      return ops.length >= this.actedAt.length && ops;
    }, { what: `${this.actedAt.length} ops queued by the content script on ${this.entity}`, timeout: 15_000 });
  }

  /** The content script's badge ("outbox: 3 pending"). */
  badge() {
    return this.evaluate('return document.getElementById("outbox-badge")?.textContent ?? ""');
  }

  async view(path) {
    this.actedAt.push(Date.now());
    await this.click(FILE(path));
  }

  async comment(text) {
    await this.type('#comment-text', text);
    this.actedAt.push(Date.now());
    await this.click('#comment');
  }

  async approve() {
    this.actedAt.push(Date.now());
    await this.click('#approve');
  }

  async waitReady() {
    await until(() => this.evaluate('return document.body.dataset.outboxReady === "true"'),
      { what: `the content script on ${this.entity}`, timeout: 15_000 });
  }
}

/** A PR page in a Playwright (Chromium) page. */
export class PlaywrightPrPage extends PrPage {
  static async open(context, serverUrl, n) {
    const page = new PlaywrightPrPage(n);
    page.page = await context.newPage();
    await page.page.goto(`${serverUrl}/demo/pr.html?n=${n}`);
    await page.waitReady();
    return page;
  }

  evaluate(body) {
    return this.page.evaluate(new Function(body));
  }

  click(selector) {
    return this.page.click(selector);
  }

  type(selector, text) {
    return this.page.fill(selector, text);
  }
}

/** A PR page in Firefox through geckodriver (see firefox.mjs). */
export class WebDriverPrPage extends PrPage {
  static async open(firefox, serverUrl, n) {
    const page = new WebDriverPrPage(n);
    page.firefox = firefox;
    await firefox.goto(`${serverUrl}/demo/pr.html?n=${n}`);
    await page.waitReady();
    return page;
  }

  evaluate(body) {
    return this.firefox.evaluate(body);
  }

  click(selector) {
    return this.firefox.click(selector);
  }

  type(selector, text) {
    return this.firefox.type(selector, text);
  }
}
