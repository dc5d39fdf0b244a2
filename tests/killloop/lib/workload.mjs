// The workload extension: any folder with a manifest.json whose background speaks the collector
// protocol (lib/collector.mjs). The harness copies it and writes `config.js` next to the manifest:
//   export const COLLECTOR = 'http://127.0.0.1:<port>';
// The probe in tests/killloop/probe/ is the default workload.
import { cp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const PROBE = resolve(dirname(fileURLToPath(import.meta.url)), '../probe');

/** Copies the workload `source` to `out` with a config.js for `collector`; returns {dir, manifest}. */
export async function prepareWorkload({ source = PROBE, out, collector }) {
  await rm(out, { recursive: true, force: true });
  await mkdir(dirname(out), { recursive: true });
  await cp(source, out, { recursive: true, filter: (path) => !/\.(crx|pem|xpi)$/.test(path) });
  await writeFile(join(out, 'config.js'), `export const COLLECTOR = ${JSON.stringify(collector)};\n`);
  const manifest = JSON.parse(await readFile(join(out, 'manifest.json'), 'utf8'));
  return { dir: out, manifest };
}

/** The named write loads. `heavy` is as fast as the storages go, with larger records. */
export const LOADS = {
  light: { pattern: 'parallel', intervalMs: 250, bytes: 256, inflight: 1 },
  heavy: { pattern: 'parallel', intervalMs: 0, bytes: 4096, inflight: 2 },
  // One write at a time, storages in turn: for the cost of one durable write in each storage.
  bench: { pattern: 'round-robin', intervalMs: 0, bytes: 1024, inflight: 1 },
};
