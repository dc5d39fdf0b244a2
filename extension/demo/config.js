// What every part of the demo may know: where the backend is and who "you" are on the PR page.
// `node extension/demo/build.mjs --endpoint URL` writes this file into the assembled extension;
// these defaults match `outbox-server --listen 127.0.0.1:8080 --token demo=demo-token`. The
// content script is bundled with this file, so it holds nothing secret: the token is in
// secrets.js, which only the background imports.
export default {
  endpoint: 'http://127.0.0.1:8080',
  // Who "you" are on the PR page, until the popup sets chrome.storage.local `reviewer`.
  reviewer: 'you',
};
