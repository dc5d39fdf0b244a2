#!/usr/bin/env node
// Assembles the demo extension into a loadable folder, from extension/demo/ and the shared glue
// and wasm package in extension/ (which are not copied into git here, only into the output).
//
//   node extension/demo/build.mjs [--out .demo/pr-tracker] [--endpoint http://127.0.0.1:8080]
//                                 [--token demo-token] [--browser chrome|firefox]
//
// The output folder is replaced. Its layout:
//   manifest.json          host_permissions and content-script matches point at the endpoint
//   config.js              the endpoint and the default reviewer (the content script has it)
//   secrets.js             the starting token (only the background imports it)
//   background.js, popup.* the demo's own files
//   content.js             content.js bundled with outbox-page.js (content scripts are not modules)
//   outbox/                outbox-background.js, outbox-page.js, pkg/outbox.js, pkg/outbox_bg.wasm
import { cp, mkdir, readFile, rm, writeFile, access } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const demo = dirname(fileURLToPath(import.meta.url));
const shared = resolve(demo, '..');
const repo = resolve(shared, '..');

/** The glue and the built package, as an extension loads them (no typings, no gitignore). */
export const OUTBOX_FILES = ['outbox-background.js', 'outbox-page.js', 'pkg/outbox.js', 'pkg/outbox_bg.wasm'];

/** Copies the shared glue and wasm package into `dir/outbox/`. Fails clearly when unbuilt. */
export async function copyOutbox(dir) {
  for (const file of OUTBOX_FILES) {
    const from = join(shared, file);
    try {
      await access(from);
    } catch {
      throw new Error(`${from} is missing; build the wasm package first (scripts/build-wasm or make build)`);
    }
    await mkdir(dirname(join(dir, 'outbox', file)), { recursive: true });
    await cp(from, join(dir, 'outbox', file));
  }
}

/**
 * Builds the demo into `out` for the backend at `endpoint`. `browser: 'firefox'` writes match
 * patterns without the port, because Firefox refuses a port in a match pattern (and then
 * matches every port of the host); Chrome honours the port, so it gets the exact origin.
 * `extraContentScripts` (paths) are bundled like content.js and run beside it on the PR page:
 * the security tests use one to play a compromised renderer.
 */
export async function buildDemo({ out, endpoint = 'http://127.0.0.1:8080', token = 'demo-token',
  reviewer = 'you', browser = 'chrome', extraContentScripts = [] }) {
  const url = new URL(endpoint);
  const origin = browser === 'firefox' ? `${url.protocol}//${url.hostname}` : url.origin;
  out = resolve(out);
  await rm(out, { recursive: true, force: true });
  await mkdir(out, { recursive: true });
  for (const file of ['background.js', 'popup.html', 'popup.js', 'popup.css']) {
    await cp(join(demo, file), join(out, file));
  }
  await copyOutbox(out);

  const manifest = JSON.parse(await readFile(join(demo, 'manifest.json'), 'utf8'));
  manifest.host_permissions = [`${origin}/*`];
  manifest.content_scripts[0].matches = [`${origin}/demo/pr.html*`];
  const extras = extraContentScripts.map((file, i) => ({ file, name: `extra-${i}.js` }));
  if (extras.length) manifest.content_scripts[0].js.push(...extras.map((e) => e.name));
  await writeFile(join(out, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
  const config = { endpoint: url.origin, reviewer };
  await writeFile(join(out, 'config.js'),
    `// Written by extension/demo/build.mjs.\nexport default ${JSON.stringify(config, null, 2)};\n`);
  await writeFile(join(out, 'secrets.js'),
    `// Written by extension/demo/build.mjs; imported by background.js only.\nexport default ${JSON.stringify({ token }, null, 2)};\n`);

  // Bundled from the output folder, so the content script imports the same outbox-page.js copy.
  const esbuild = await import(join(repo, 'node_modules/esbuild/lib/main.js')).catch(() => {
    throw new Error('esbuild is missing from node_modules; run scripts/setup');
  });
  for (const { file, name } of [{ file: join(demo, 'content.js'), name: 'content.js' }, ...extras]) {
    const source = join(out, `src-${name}`);
    await cp(file, source);
    await esbuild.build({ entryPoints: [source], outfile: join(out, name),
      bundle: true, format: 'iife', target: 'es2022', logLevel: 'warning' });
    await rm(source);
  }
  return out;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: {
    out: { type: 'string', default: join(repo, '.demo/pr-tracker') },
    endpoint: { type: 'string', default: 'http://127.0.0.1:8080' },
    token: { type: 'string', default: 'demo-token' },
    browser: { type: 'string', default: 'chrome' },
  } });
  const out = await buildDemo(values);
  console.log(`demo extension built in ${out} for ${values.endpoint}`);
}
