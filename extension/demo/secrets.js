// The background's own: the token a fresh install starts with (a real extension gets one at
// login). Only background.js imports this file, so no page and no content script ever loads it.
// `node extension/demo/build.mjs --token T` writes it into the assembled extension.
export default {
  token: 'demo-token',
};
