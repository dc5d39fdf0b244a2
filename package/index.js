// The Outbox API itself (wasm-bindgen's module). `init()` finds the wasm beside it with
// `new URL('outbox_bg.wasm', import.meta.url)`, which esbuild, Vite/Rollup and webpack copy.
export * from './pkg/outbox.js';
export { default } from './pkg/outbox.js';
