// Forensics of Chromium's LevelDB stores in a profile, read between two launches (the browser is
// dead, so nothing changes under us): the shape of each write-ahead log's tail (a torn record is
// the suspected precursor of "Corruption: checksum mismatch") and what LevelDB's own LOG said.
//
// Log format (leveldb doc/log_format.md): 32 KiB blocks; a record is checksum (4, masked CRC-32C
// of type + payload), length (2, little-endian), type (1: FULL, 2: FIRST, 3: MIDDLE, 4: LAST),
// payload. Fewer than 7 bytes left in a block are zero padding.
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';

const BLOCK = 32768;
const HEADER = 7;

const CRC32C = new Uint32Array(256).map((_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32c(bytes, start, end) {
  let c = 0xffffffff;
  for (let i = start; i < end; i++) c = CRC32C[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function unmask(masked) {
  const rot = (masked - 0xa282ead8) >>> 0;
  return ((rot >>> 17) | (rot << 15)) >>> 0;
}

/**
 * Walks a LevelDB log. Returns {bytes, records, tail, corrupt}: `tail` describes how the file ends
 * ('clean', 'padding', 'partial-header', 'header-only' or 'partial-payload' with the offset and the
 * declared and present lengths); `corrupt` is the first record whose checksum does not match.
 */
export function scanLog(bytes) {
  let offset = 0;
  let records = 0;
  let corrupt = null;
  let tail = { kind: 'clean', offset: bytes.length };
  while (offset < bytes.length) {
    const leftInBlock = BLOCK - (offset % BLOCK);
    if (leftInBlock < HEADER) {
      const end = Math.min(bytes.length, offset + leftInBlock);
      if (end === bytes.length) { tail = { kind: 'padding', offset }; break; }
      offset = end;
      continue;
    }
    if (bytes.length - offset < HEADER) {
      tail = { kind: 'partial-header', offset, have: bytes.length - offset };
      break;
    }
    const length = bytes[offset + 4] | (bytes[offset + 5] << 8);
    const type = bytes[offset + 6];
    if (type === 0 && length === 0) {
      // Zeroed space (a preallocated or reused tail): nothing more is written in this block.
      offset += leftInBlock;
      continue;
    }
    const end = offset + HEADER + length;
    if (end > bytes.length) {
      const have = bytes.length - offset - HEADER;
      tail = { kind: have === 0 ? 'header-only' : 'partial-payload', offset, declared: length, have, type };
      break;
    }
    const stored = unmask(bytes.readUInt32LE(offset));
    if (!corrupt && stored !== crc32c(bytes, offset + 6, end)) corrupt = { offset, length, type };
    records++;
    offset = end;
  }
  return { bytes: bytes.length, records, tail, corrupt };
}

/** scanLog for every *.log file of the LevelDB directory `dir` (missing directory: null). */
export async function scanLevelDb(dir) {
  let names;
  try { names = await readdir(dir); } catch { return null; }
  const logs = {};
  for (const name of names.filter((n) => n.endsWith('.log')).sort()) {
    logs[name] = scanLog(await readFile(join(dir, name)));
  }
  const info = await readFile(join(dir, 'LOG'), 'utf8').catch(() => '');
  const notable = info.split('\n').filter((line) => /corrupt|error|repair|checksum|delet(e|ing) (db|database)|lost/i.test(line)
    && !/Delete type=/.test(line));
  // RepairDB (which Chromium's extension value store runs when an open fails) moves what it
  // could not keep into lost/.
  const lost = names.includes('lost') ? (await readdir(join(dir, 'lost')).catch(() => [])).length : 0;
  return { logs, ldb: names.filter((n) => n.endsWith('.ldb')).length, notable, lost };
}

/**
 * The LevelDB directories that hold an extension's storage in a Chromium profile: its IndexedDB
 * origin, its chrome.storage.local ("Local Extension Settings"), and the sandboxed file system's
 * directory databases that OPFS uses (File System/Origins and every File System/<n>/t/Paths).
 */
export async function extensionLevelDbs(profile, extensionId) {
  const base = join(profile, 'Default');
  const dirs = {
    idb: join(base, 'IndexedDB', `chrome-extension_${extensionId}_0.indexeddb.leveldb`),
    storage: join(base, 'Local Extension Settings', extensionId),
    'opfs-origins': join(base, 'File System', 'Origins'),
  };
  for (const name of await readdir(join(base, 'File System')).catch(() => [])) {
    if (/^\d+$/.test(name)) dirs[`opfs-paths-${name}`] = join(base, 'File System', name, 't', 'Paths');
  }
  return dirs;
}

/** {name: scanLevelDb(dir)} for every directory of extensionLevelDbs. */
export async function scanExtensionStores(profile, extensionId) {
  const out = {};
  for (const [name, dir] of Object.entries(await extensionLevelDbs(profile, extensionId))) {
    out[name] = await scanLevelDb(dir);
  }
  return out;
}
