//! Run events: the per-run log on `<prefix>.runs.<tenant>.<run_id>.events`.
//!
//! Each run's events have `seq` 1..n with no gap. Every append is published
//! with `Nats-Msg-Id: <run_id>:<seq>` and `Nats-Expected-Last-Subject-Sequence`
//! set to the stream sequence of the run's previous event, so only the holder
//! of the run's lease can extend its log.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorCode;
use crate::ids::{AgentName, QueueName, RunId, TenantId, WorkerId};
use crate::state::RunState;

/// One event of a run's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub run_id: RunId,
    pub tenant: TenantId,
    /// Position in the run's log, from 1, no gaps.
    pub seq: u64,
    /// When the event was written, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The execution attempt that wrote the event (0 for `run.created`).
    pub attempt: u32,
    /// The worker that wrote the event, if a worker did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<WorkerId>,
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    /// The run's state after this event.
    pub fn state_after(&self) -> RunState {
        self.body.state_after()
    }
}

/// What happened. On the wire: `"type": "<name>"` and `"data": {…}` beside
/// the common fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum EventBody {
    /// The coordinator accepted the run. Always seq 1.
    #[serde(rename = "run.created")]
    Created(RunCreated),
    /// A worker claimed the run and started the agent.
    #[serde(rename = "run.started")]
    Started(RunStarted),
    /// An event the agent emitted through its run context.
    #[serde(rename = "agent.event")]
    Agent(AgentEvent),
    /// The agent returned an output. Terminal.
    #[serde(rename = "run.completed")]
    Completed(RunCompleted),
    /// The run failed for good. Terminal.
    #[serde(rename = "run.failed")]
    Failed(RunFailed),
}

impl EventBody {
    /// The wire name of the event type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Created(_) => "run.created",
            Self::Started(_) => "run.started",
            Self::Agent(_) => "agent.event",
            Self::Completed(_) => "run.completed",
            Self::Failed(_) => "run.failed",
        }
    }

    /// The run's state after an event of this kind.
    pub fn state_after(&self) -> RunState {
        match self {
            Self::Created(_) => RunState::Queued,
            Self::Started(_) | Self::Agent(_) => RunState::Running,
            Self::Completed(_) => RunState::Completed,
            Self::Failed(_) => RunState::Failed,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.state_after().is_terminal()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCreated {
    pub agent: AgentName,
    pub queue: QueueName,
    /// Priority band, 0 = highest.
    pub priority: u8,
    pub input: Value,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStarted {
    /// How many times the job had been delivered when this attempt claimed it.
    pub delivery: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// Agent-chosen event name, e.g. `progress`.
    pub name: String,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCompleted {
    pub output: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFailed {
    pub error: RunError,
}

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunError {
    pub code: ErrorCode,
    pub message: String,
}
