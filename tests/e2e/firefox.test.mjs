// A smoke run in Firefox ESR (headless): the demo installed as a temporary add-on, so its
// background is the MV3 event page rather than a service worker. The same scenario code as in
// Chromium (lib/scenarios.mjs); "offline" here is the server going away, since geckodriver has
// no network emulation.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { deliveredOnce, describe } from './lib/delivery.mjs';
import { firefoxEnv } from './lib/env.mjs';
import { normalSync, serverDownThenUp } from './lib/scenarios.mjs';

/** Runs a scenario; a failure carries the add-on's badge and the end of Firefox's log. */
async function run(t, scenario) {
  const env = await firefoxEnv(t);
  try {
    t.diagnostic(describe(await scenario(env)));
  } catch (error) {
    const badge = await env.firefox.evaluate('return document.getElementById("outbox-badge")?.textContent').catch(() => null);
    error.message += `\nbadge: ${badge}\nfirefox.log:\n${await env.firefox.logTail()}`;
    throw error;
  }
}

test('firefox 1 normal sync: ops made online are delivered once each, in order', (t) => run(t, normalSync));

test('firefox 3 server down: ops made while the server is down are delivered when it is back',
  (t) => run(t, serverDownThenUp));

test('security firefox: synthetic events from the page enqueue nothing; the user\'s own click does',
  (t) => run(t, async (env) => {
    const page = await env.openPr(env.pr());
    // WebDriver's script runs in the page's own world, as a hostile page's would.
    await env.firefox.evaluate(`
      document.getElementById('comment-text').value = 'forged';
      document.getElementById('comment').click();
      document.getElementById('approve').dispatchEvent(new MouseEvent('click', { bubbles: true }));
      const box = document.querySelector('[data-file="README.md"] .viewed');
      box.click();
      box.dispatchEvent(new Event('change', { bubbles: true }));`);
    await page.comment('A real click.');
    const ops = await page.queued();
    assert.equal(ops.length, 1, 'only the trusted click was queued');
    const entries = await deliveredOnce(env.server, ops);
    assert.deepEqual((await env.server.log()).map((e) => e.kind), ['comment']);
    return { made: 1, applied: 1, duplicates: 0, arrivals: entries.length, medianMs: null, maxMs: null,
      note: 'forged click(), dispatchEvent and a scripted checkbox were ignored' };
  }));
