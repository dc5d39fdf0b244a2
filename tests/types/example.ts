// Every API of the package, typed: `make test` runs `tsc --noEmit -p tests/types` over this file
// against the declarations the build generates (extension/pkg/outbox.d.ts, from the Rust types)
// and the glue's own (extension/*.d.ts), so a type that drifts from the code fails the build.
// The `@ts-expect-error` lines prove the types catch mistakes: each must be an error.
import init, { Outbox } from '../../extension/pkg/outbox.js';
import type { OutboxEvent, OutboxEventMap, OutboxErrorCode, Stats } from '../../extension/pkg/outbox.js';
import { roleOf, startOutbox } from '../../extension/outbox-background.js';
import { connectOutbox } from '../../extension/outbox-page.js';

export async function wasmApi(): Promise<void> {
  await init({ module_or_path: new URL('./outbox_bg.wasm', import.meta.url) });
  const outbox = await Outbox.open({
    endpoint: 'https://api.example.com',
    database: 'outbox',
    auth: async () => ({ Authorization: 'Bearer t' }),
    schedule: (at) => void at,
    backoff: { strategy: 'proportional', jitter: 0.25, baseMs: 100, capMs: 30_000 },
    user: { maxAttempts: 5, maxAgeMs: 86_400_000 },
    batch: { maxOps: 100, mode: 'batch' },
    kinds: { approve: { conflict: 'manual' }, title: { conflict: 'client-wins', coalesce: true } },
    keyRetentionMs: 86_400_000,
  });
  // @ts-expect-error: not a strategy
  await Outbox.open({ endpoint: 'https://x', backoff: { strategy: 'random' } });
  // @ts-expect-error: the endpoint is required
  await Outbox.open({ database: 'x' });

  const receipt = await outbox.enqueue({ entity: 'pr/17', kind: 'approve', payload: { approved: true }, baseVersion: 6, key: 'k-1' });
  const seq: number = receipt.seq;
  const replayed: boolean = receipt.replayed;
  // @ts-expect-error: kind is required
  await outbox.enqueue({ payload: 1 });

  const stats: Stats = await outbox.flush();
  const state: 'closed' | 'open' | 'half-open' = stats.breaker.state;
  const client: string | null = stats.client;
  await outbox.wake('alarm');
  // @ts-expect-error: not a wake reason
  await outbox.wake('whenever');
  const ops = await outbox.pending(10);
  const next: number | null = ops[0].nextAttemptAt;
  const beacon = await outbox.beacon(seq);
  if (beacon) fetch(beacon.url, { method: 'POST', body: beacon.body });
  for (const letter of await outbox.deadLetters()) {
    const cause: 'rejected' | 'exhausted' | 'expired' | 'ambiguous' = letter.cause;
    void cause;
    await outbox.retryDeadLetter(letter.op.id, { key: 'r-1' });
    await outbox.discardDeadLetter(letter.op.id);
  }
  for (const conflict of await outbox.conflicts()) {
    const theirs: unknown = conflict.serverState;
    void theirs;
    const again = await outbox.resolveConflict(conflict.op.id, 'keep-mine');
    void again?.id;
  }
  const delivered = (event: OutboxEventMap['delivered']) => {
    const version: number | null = event.version;
    void version;
    // @ts-expect-error: a delivered event has no delay
    void event.delayMs;
  };
  outbox.on('delivered', delivered);
  outbox.on('retry-scheduled', (event) => void (event.delayMs + event.attempt));
  outbox.on('conflict', (event) => void event.serverState);
  outbox.on('error', (error) => {
    const code: OutboxErrorCode = error.code;
    void code;
  });
  outbox.off('delivered', delivered);
  // @ts-expect-error: not an event
  outbox.on('delivred', () => {});
  const names: string[] = Outbox.eventNames();
  const any: OutboxEvent['type'] = 'drained';
  void [next, replayed, state, client, names, any];
  await outbox.close();
}

export async function glue(): Promise<void> {
  const outbox = await startOutbox({
    endpoint: 'https://api.example.com',
    auth: async () => ({ Authorization: 'Bearer t' }),
    contentScripts: {
      kinds: ['comment'],
      subscribe: 'own-tab',
      accept: (request, sender) => request.entity === `pr/${new URL(sender.url ?? '').searchParams.get('n')}`,
    },
  });
  await outbox.stats();
  // @ts-expect-error: the glue owns schedule
  await startOutbox({ endpoint: 'https://x', schedule: () => {} });
  const role: 'extension-page' | 'content-script' | null = roleOf({ id: 'x', url: 'https://a' });
  void role;

  const page = connectOutbox({ deadlineMs: 10_000 });
  const receipt = await page.enqueue({ entity: 'pr/1', kind: 'comment', payload: { text: 'hi' } });
  await page.sendFinalStateOnClose({ entity: 'pr/1', kind: 'summary', payload: { s: 1 } });
  await Promise.all([page.flush(), page.stats(), page.pending(5), page.deadLetters(), page.conflicts()]);
  await page.retryDeadLetter(receipt.id);
  await page.discardDeadLetter(receipt.id, { key: 'd-1' });
  await page.resolveConflict(receipt.id, 'take-theirs');
  const stop = page.subscribe((message) => {
    if ('stats' in message) void message.stats.pending;
    if ('own' in message) void message.own.pending;
    if ('event' in message && message.event.type === 'error') void message.event.code;
    if ('disconnected' in message) void message.disconnected;
  });
  stop();
}
