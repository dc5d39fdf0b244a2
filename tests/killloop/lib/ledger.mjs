// The ledger: what the collector acknowledged, checked against what the workload finds at its next
// start. Lost = acknowledged and missing (or present with wrong content); a wholesale loss = none
// of the acknowledged records of a storage is left.
import { EPOCH_SPAN } from './collector.mjs';

/** Nearest-rank percentile of a sorted array. */
export function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

/** {n, p50, p90, p99, max, mean} of a list of milliseconds, rounded to 0.01 ms. */
export function timingStats(values) {
  const sorted = Float64Array.from(values).sort();
  const round = (x) => (x === null ? null : Math.round(x * 100) / 100);
  const mean = sorted.length ? sorted.reduce((a, b) => a + b, 0) / sorted.length : null;
  return { n: sorted.length, p50: round(percentile(sorted, 50)), p90: round(percentile(sorted, 90)),
    p99: round(percentile(sorted, 99)), max: round(sorted.at(-1) ?? null), mean: round(mean) };
}

function expand(ranges) {
  const ids = new Set();
  for (const [first, last] of ranges ?? []) for (let id = first; id <= last; id++) ids.add(id);
  return ids;
}

export class Ledger {
  constructor(storages) {
    this.storages = storages;
    this.acked = Object.fromEntries(storages.map((s) => [s, new Map()])); // id -> ack arrival time
    this.timings = Object.fromEntries(storages.map((s) => [s, []]));
    this.markers = Object.fromEntries(storages.map((s) => [s, null]));
    this.totals = Object.fromEntries(storages.map((s) => [s, { acked: 0, lost: 0, checks: 0, checkErrors: 0,
      cyclesWithLoss: 0, wholesale: 0, markerResets: 0, unackedSurvivors: 0, undeleted: 0, cyclesWithUndeleted: 0 }]));
    this.retiredBelow = 0; // the retireBelow of the last boot that reported retiring
  }

  /** Acks as the collector received them: [[storage, id, ms], ...] arriving at `at`. */
  recordAcks(acks, at) {
    for (const [storage, id, ms] of acks) {
      const acked = this.acked[storage];
      if (!acked || acked.has(id)) continue;
      acked.set(id, at);
      this.totals[storage].acked++;
      this.timings[storage].push(ms);
    }
  }

  /**
   * Compares a boot's inventory with everything acknowledged before it. `killAt` (the previous
   * kill's time) lets a loss say how long before the kill its record was acknowledged. Afterwards
   * lost records are no longer expected (a loss counts once) and records older than the boot's
   * `retireBelow` epoch are dropped (the workload deletes them). Returns {storage: result}.
   */
  check(boot, { killAt = null } = {}) {
    const results = {};
    for (const storage of this.storages) {
      const found = boot.inventory?.[storage];
      const acked = this.acked[storage];
      const totals = this.totals[storage];
      const result = { expected: acked.size };
      results[storage] = result;
      if (!found || found.error) {
        result.error = found?.error ?? 'no inventory';
        totals.checkErrors++;
        continue;
      }
      totals.checks++;
      const present = expand(found.ranges);
      const bad = new Set(found.bad ?? []);
      const lost = [];
      let kept = 0;
      for (const [id, at] of acked) {
        if (present.has(id) && !bad.has(id)) kept++;
        else lost.push({ id, beforeKillMs: killAt === null ? null : killAt - at, bad: bad.has(id) });
      }
      // Present but not expected: written but never acked, or deleted by an earlier boot's
      // retirement and back again (a lost delete), counted apart.
      let unacked = 0;
      let undeleted = 0;
      const retiredFloor = this.retiredBelow * EPOCH_SPAN;
      for (const id of present) {
        if (acked.has(id)) continue;
        if (id < retiredFloor) undeleted++;
        else unacked++;
      }
      if (undeleted) {
        result.undeleted = undeleted;
        totals.undeleted += undeleted;
        totals.cyclesWithUndeleted++;
      }
      result.found = present.size;
      result.kept = kept;
      result.lost = lost.length;
      result.unackedSurvivors = unacked;
      totals.unackedSurvivors += unacked;
      if (lost.length) {
        totals.lost += lost.length;
        totals.cyclesWithLoss++;
        result.lostSample = lost.slice(0, 5).concat(lost.length > 10 ? lost.slice(-5) : lost.slice(5, 10));
        result.lostBad = lost.filter((l) => l.bad).length;
        const gaps = lost.map((l) => l.beforeKillMs).filter((g) => g !== null).sort((a, b) => a - b);
        if (gaps.length) result.lostAckedBeforeKillMs = { min: gaps[0], max: gaps.at(-1) };
        for (const { id } of lost) acked.delete(id);
      }
      result.wholesale = acked.size + lost.length > 0 && kept === 0 && lost.length > 0;
      if (result.wholesale) totals.wholesale++;
      const marker = found.marker?.epoch ?? null;
      if (this.markers[storage] !== null && marker !== this.markers[storage]) {
        result.markerReset = { was: this.markers[storage], now: marker };
        totals.markerResets++;
      }
      // The workload writes a marker when it finds none, in the boot it found none.
      this.markers[storage] = marker ?? boot.epoch;
      if (found.upgrade) result.upgrade = found.upgrade;
      if (found.strayCount) result.stray = found.strayCount;
      result.inventoryMs = Math.round(found.ms ?? 0);
    }
    const floor = boot.retireBelow * EPOCH_SPAN;
    for (const storage of this.storages) {
      for (const id of this.acked[storage].keys()) if (id < floor) this.acked[storage].delete(id);
    }
    return results;
  }

  /** The workload of `boot` says it retired (deleted) the records below its retireBelow. */
  retired(boot) {
    this.retiredBelow = Math.max(this.retiredBelow, boot.retireBelow);
  }

  /** Totals per storage, with the write-time statistics of every acknowledged write. */
  summary() {
    const out = {};
    for (const storage of this.storages) {
      out[storage] = { ...this.totals[storage], writeMs: timingStats(this.timings[storage]) };
    }
    return out;
  }
}
