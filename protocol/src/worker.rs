//! Worker registry records, the values in the `<prefix>-workers` KV bucket
//! (key `<worker_id>`), refreshed by each worker's heartbeat. The bucket's
//! `max_age` removes workers that stopped heartbeating.

use serde::{Deserialize, Serialize};

use crate::ids::{QueueName, WorkerId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: WorkerId,
    pub queues: Vec<QueueName>,
    pub agents: Vec<String>,
    pub slots: u32,
    pub running: u32,
    pub version: String,
    pub hostname: String,
    pub pid: u32,
    pub started_ms: i64,
    pub heartbeat_ms: i64,
}
