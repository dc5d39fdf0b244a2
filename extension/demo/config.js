// Where the demo's backend is. `node extension/demo/build.mjs --endpoint URL` writes this file
// into the assembled extension; these defaults match `outbox-server --listen 127.0.0.1:8080
// --token demo=demo-token`.
export default {
  endpoint: 'http://127.0.0.1:8080',
  // The token a fresh install starts with. A real extension gets it at login; the popup can
  // replace it (chrome.storage.local `token`).
  token: 'demo-token',
  // Who "you" are on the PR page, until the popup sets chrome.storage.local `reviewer`.
  reviewer: 'you',
};
