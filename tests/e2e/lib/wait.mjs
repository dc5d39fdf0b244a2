// Polling with a deadline, instead of fixed sleeps.

/**
 * Calls `probe` until it returns something truthy, and returns that. Fails after `timeout` ms
 * with `what` and the last value or error, so a failure says what was being waited for.
 */
export async function until(probe, { timeout = 30_000, interval = 100, what = 'a condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      const detail = last instanceof Error ? last.stack : JSON.stringify(last);
      throw new Error(`timed out after ${timeout} ms waiting for ${what}; last: ${detail}`);
    }
    await new Promise((resolve) => setTimeout(resolve, interval));
  }
}
