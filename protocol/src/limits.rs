//! Protocol-wide limits and defaults.

/// Number of priority bands; band 0 is the highest, `PRIORITY_BANDS - 1` the lowest.
pub const PRIORITY_BANDS: u8 = 5;
/// The band a run gets when the submitter names none.
pub const DEFAULT_PRIORITY: u8 = 2;
/// Default for `max_attempts` when the submitter names none.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Upper bound for `max_attempts`.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
/// Default limit on a run's encoded input (MessagePack bytes). Coordinators
/// may lower or raise it (below the NATS `max_payload`).
pub const DEFAULT_MAX_INPUT_BYTES: usize = 256 * 1024;
/// Default and maximum page sizes of `list` and `events`.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_LIST_PAGE_SIZE: u32 = 500;
pub const MAX_EVENTS_PAGE_SIZE: u32 = 1000;
