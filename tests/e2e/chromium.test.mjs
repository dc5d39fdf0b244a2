// The delivery scenarios of issue #5 in headless Chromium with the demo extension, each against
// its own server and browser profile. Every assertion reads the server's admin log and entity
// state (see lib/scenarios.mjs).
import { test } from 'node:test';
import { describe } from './lib/delivery.mjs';
import { chromiumEnv } from './lib/env.mjs';
import { CHROMIUM_SCENARIOS } from './lib/scenarios.mjs';

for (const [label, behaviour, scenario] of CHROMIUM_SCENARIOS) {
  test(`${label}: ${behaviour}`, async (t) => {
    const env = await chromiumEnv(t);
    t.diagnostic(describe(await scenario(env)));
  });
}
