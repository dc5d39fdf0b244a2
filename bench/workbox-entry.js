// The Workbox peer, bundled by esbuild with its dependencies (workbox-core, idb), minified, as an
// ES module: scripts/size-check measures it, and the benchmark worker imports it.
export * from 'workbox-background-sync';
