// Types of outbox-page.js, the helper for extension pages and content scripts.
import type {
  CallOptions, Conflict, DeadLetter, EnqueueRequest, OutboxErrorCode, OutboxEvent, QueuedOp, Receipt, Stats,
} from './pkg/outbox.js';

/** An `error` event as it crosses to a page (an `OutboxError` loses its fields in messaging). */
export interface ErrorEvent { type: 'error'; code: OutboxErrorCode; message: string }

/** What `subscribe` listeners get. */
export type StatusMessage =
  | { stats: Stats }
  | { event: OutboxEvent | ErrorEvent }
  | { own: { pending: number } }
  | { disconnected: true };

/** The background outbox's API, over runtime messages. Calls that change something carry an idempotency key and retry a lost answer until the deadline. */
export interface PageOutbox {
  enqueue(request: EnqueueRequest): Promise<Receipt>;
  flush(): Promise<Stats>;
  stats(): Promise<Stats>;
  pending(limit?: number): Promise<QueuedOp[]>;
  deadLetters(): Promise<DeadLetter[]>;
  retryDeadLetter(id: string, options?: CallOptions): Promise<Receipt>;
  discardDeadLetter(id: string, options?: CallOptions): Promise<void>;
  conflicts(): Promise<Conflict[]>;
  resolveConflict(id: string, resolution: 'keep-mine' | 'take-theirs', options?: CallOptions): Promise<Receipt | null>;
  /** Live status; returns a function that stops it. */
  subscribe(listener: (message: StatusMessage) => void): () => void;
  /** Queues `request` now and sends the same op as the page closes; resolves with the receipt. */
  sendFinalStateOnClose(request: EnqueueRequest): Promise<Receipt>;
}

/** Connects to the background's outbox. `deadlineMs` (default 30 s) bounds how long a call tries to reach it. */
export function connectOutbox(options?: { deadlineMs?: number }): PageOutbox;

/** The codes a call may reject with that come from the helper itself. */
export const PAGE_ERRORS: OutboxErrorCode[];
