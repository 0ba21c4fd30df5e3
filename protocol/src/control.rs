//! Control records: the `<prefix>-control` KV bucket, key `<run_id>`.
//!
//! A cancel request is written here by the coordinator before it acts, and
//! every worker watches the bucket, so a worker running the run stops within
//! moments; a worker that claims the run later finds the request at claim.

use serde::{Deserialize, Serialize};

/// A request to cancel a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the request was made, ms since the Unix epoch.
    pub requested_ms: i64,
}
