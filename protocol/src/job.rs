//! Job messages: one per dispatch of a run, on
//! `<prefix>.jobs.<queue>.p<band>.<run_id>` in the work-queue stream.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{AgentName, QueueName, RunId, TenantId};

/// Everything a worker needs to start (or resume) a run without another read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub run_id: RunId,
    pub tenant: TenantId,
    pub agent: AgentName,
    pub queue: QueueName,
    pub priority: u8,
    pub input: Value,
    pub max_attempts: u32,
    /// When the run was created, µs since the Unix epoch (for latency metrics).
    pub created_us: i64,
    /// W3C `traceparent` of the submission, so every attempt of the run, on
    /// any worker, joins the submission's trace. Absent when tracing is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The stream sequence of the run's `run.created` event, set only on the
    /// job a submission publishes (its first dispatch) right after that
    /// event was stored. A worker taking such a job on its first delivery
    /// starts the run without reading the run's log first: its first append
    /// expects exactly this last sequence, so if anything else was written
    /// meanwhile (a cancel, another attempt) the append is refused and the
    /// claim reads the log as usual. Absent on every later dispatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_seq: Option<u64>,
}

impl Job {
    /// The job as any dispatch after the submission's own publishes it
    /// (a wake, a timer, a retry): without [`Job::created_seq`], so its
    /// claimant reads the run's log rather than assume the run is fresh.
    pub fn redispatch(&self) -> Job {
        Job { created_seq: None, ..self.clone() }
    }
}
