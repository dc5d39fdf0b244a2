export * from './pkg/outbox.js';
export { default } from './pkg/outbox.js';
