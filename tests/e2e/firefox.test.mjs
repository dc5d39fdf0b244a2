// A smoke run in Firefox ESR (headless): the demo installed as a temporary add-on, so its
// background is the MV3 event page rather than a service worker. The same scenario code as in
// Chromium (lib/scenarios.mjs); "offline" here is the server going away, since geckodriver has
// no network emulation.
import { test } from 'node:test';
import { describe } from './lib/delivery.mjs';
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
