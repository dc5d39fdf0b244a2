//! Time as the core sees it: plain milliseconds passed in by the caller.

/// A point in time, in milliseconds since the Unix epoch.
///
/// The core never reads a clock. The shell passes `Date.now()`; tests pass a fake clock. Wall-clock
/// time (not a monotonic clock) is used because ops are persisted and compared across restarts.
pub type Millis = u64;

/// One second in [`Millis`].
pub const SECOND: Millis = 1_000;
/// One minute in [`Millis`].
pub const MINUTE: Millis = 60 * SECOND;
/// One hour in [`Millis`].
pub const HOUR: Millis = 60 * MINUTE;
/// One day in [`Millis`].
pub const DAY: Millis = 24 * HOUR;
