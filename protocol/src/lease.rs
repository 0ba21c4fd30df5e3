//! Lease records, the values in the `<prefix>-leases` KV bucket (key `<run_id>`).
//!
//! A lease is created with KV `create` (fails if held), renewed by CAS `update`
//! on its last revision, and released with a revision-checked delete. The
//! bucket's `max_age` is the lease TTL, so a lease that is not renewed ages out.

use serde::{Deserialize, Serialize};

use crate::ids::{RunId, WorkerId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub run_id: RunId,
    pub worker_id: WorkerId,
    pub attempt: u32,
    pub acquired_ms: i64,
    pub renewed_ms: i64,
}
