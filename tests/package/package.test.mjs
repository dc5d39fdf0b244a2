// `make package`'s tarball installs into an empty folder, and a small consumer type-checks
// against its three entry points (`.`, `./background`, `./page`) with tsc.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const root = resolve(import.meta.dirname, '../..');

test('the tarball installs into an empty folder and type-checks a consumer', () => {
  const tarball = execFileSync(join(root, 'scripts/package'), { cwd: root, encoding: 'utf8' }).trim().split('\n').pop();
  const dir = mkdtempSync(join(tmpdir(), 'outbox-package-'));
  try {
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }));
    execFileSync('npm', ['install', '--no-audit', '--no-fund', '--offline', join(root, tarball)], { cwd: dir, stdio: 'pipe' });
    const installed = join(dir, 'node_modules/@outbox-rs/extension');
    for (const f of ['pkg/outbox_bg.wasm', 'pkg/outbox.d.ts', 'outbox-background.d.ts', 'outbox-page.d.ts', 'README.md', 'LICENSE']) {
      assert.ok(existsSync(join(installed, f)), f);
    }
    writeFileSync(join(dir, 'consumer.ts'), `
import init, { Outbox } from '@outbox-rs/extension';
import { startOutbox } from '@outbox-rs/extension/background';
import { connectOutbox } from '@outbox-rs/extension/page';

export async function background(): Promise<void> {
  startOutbox({ endpoint: 'https://api.example.com', auth: async () => ({ Authorization: 'Bearer t' }) });
}
export async function page(): Promise<string> {
  const receipt = await connectOutbox().enqueue({ entity: 'doc/1', kind: 'rename', payload: { title: 'Hello' } });
  return receipt.id;
}
export async function direct(): Promise<void> {
  await init();
  const outbox = await Outbox.open({ endpoint: 'https://api.example.com' });
  await outbox.flush();
}
`);
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify({
      compilerOptions: { strict: true, noEmit: true, target: 'es2022', module: 'esnext', moduleResolution: 'bundler', lib: ['esnext', 'dom'], skipLibCheck: false, types: [] },
      files: ['consumer.ts'],
    }));
    execFileSync(join(root, 'node_modules/.bin/tsc'), ['-p', dir], { cwd: dir, encoding: 'utf8', stdio: 'pipe' });
  } catch (e) {
    assert.fail(`${e.message}\n${e.stdout ?? ''}${e.stderr ?? ''}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
