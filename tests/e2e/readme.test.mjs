// Scenario 12: the README's "Add outbox to your extension" works as written. The extension is
// built from exactly the README's marked blocks (the install commands are run, the files are
// written verbatim), with only the example endpoint and token replaced, so README and code
// cannot drift apart unnoticed.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { launch } from './lib/chromium.mjs';
import { deliveredOnce } from './lib/delivery.mjs';
import { REPO, Server, TOKEN } from './lib/server.mjs';
import { until } from './lib/wait.mjs';

/** The README's blocks between `<!-- readme-extension:NAME -->` and `<!-- /readme-extension -->`. */
export async function readmeBlocks() {
  const readme = await readFile(join(REPO, 'README.md'), 'utf8');
  const blocks = new Map();
  for (const [, name, body] of readme.matchAll(/<!-- readme-extension:(\S+) -->\n```\w*\n([\s\S]*?)```\n<!-- \/readme-extension -->/g)) {
    blocks.set(name, body);
  }
  return blocks;
}

test('12 readme: an extension built from the README lines delivers its op', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'outbox-e2e-readme-'));
  await mkdir(join(dir, 'server'));
  const extension = join(dir, 'extension');
  await mkdir(extension);
  let server;
  let browser;
  t.after(async () => {
    await browser?.close();
    await server?.dispose();
    await rm(dir, { recursive: true, force: true });
  });
  server = await Server.start({ dir: join(dir, 'server') });

  const blocks = await readmeBlocks();
  assert.deepEqual([...blocks.keys()].sort(),
    ['background.js', 'build.sh', 'install.sh', 'manifest.json', 'popup.html', 'popup.js']);
  // The package as `make package` packs it, installed by its tarball instead of the name.
  const tarball = execFileSync(join(REPO, 'scripts/package'), { cwd: REPO, encoding: 'utf8' }).trim().split('\n').pop();
  await writeFile(join(extension, 'package.json'), JSON.stringify({ name: 'readme-extension', private: true, type: 'module' }));
  const shell = (script) => execFileSync('sh', ['-e', '-c', script], { cwd: extension, stdio: 'pipe',
    env: { ...process.env, PATH: `${join(REPO, 'node_modules/.bin')}:${process.env.PATH}`, npm_config_offline: 'true' } });
  const local = (text) => text.replaceAll('https://api.example.com', server.url).replaceAll('YOUR_TOKEN', TOKEN);
  shell(blocks.get('install.sh').replaceAll('@outbox-rs/extension', join(REPO, tarball)));
  for (const name of ['manifest.json', 'background.js', 'popup.html', 'popup.js']) {
    await writeFile(join(extension, name), local(blocks.get(name)));
  }
  // `npx esbuild` finds the repository's esbuild (the test has no registry to install it from).
  shell(`ln -s "${join(REPO, 'node_modules/esbuild')}" node_modules/esbuild && ln -s "${join(REPO, 'node_modules/@esbuild')}" node_modules/@esbuild`);
  shell(blocks.get('build.sh'));
  const js = ['background.js', 'popup.js'].reduce((sum, name) => sum + blocks.get(name).trimEnd().split('\n').length, 0);
  assert.ok(js <= 15, `${js} lines of JavaScript in the README, at most 15`);
  const lines = [...blocks.values()].reduce((sum, block) => sum + block.trimEnd().split('\n').length, 0);
  t.diagnostic(`${lines} README lines`);

  browser = await launch({ extension, profile: join(dir, 'profile') });
  const page = await browser.context.newPage();
  await page.goto(browser.url('popup.html'));
  const clicked = Date.now();
  await page.click('#save');
  const op = await until(async () => (await server.log()).find((e) => e.kind === 'rename'),
    { what: 'the README extension\'s op to reach the server' });
  await deliveredOnce(server, [{ ...op, actedAt: clicked }]);
  assert.deepEqual((await server.entity('doc/1')).state, { title: 'Hello' });
  t.diagnostic(`delivered ${op.at - clicked} ms after the click`);
});
