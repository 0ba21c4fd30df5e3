//! Step checkpoints, the values in the `<prefix>-checkpoints` KV bucket.
//!
//! One record per completed step under `<run_id>.<step_index>`, plus one
//! fence record per resumed attempt under `<run_id>.fence`. Every write is
//! published with `Nats-Expected-Last-Subject-Sequence` evaluated against
//! the wildcard `<run_id>.>` of the bucket (see
//! [`crate::names::HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT`]): the run's
//! checkpoints form one chain, only the writer that knows the chain's head
//! can extend it, and a resuming attempt moves the head (the fence) before
//! it runs anything, so a worker that lost its lease is refused by the
//! server. A second write of a step therefore fails like a KV `create`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{RunId, WorkerId};

/// A completed step's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub run_id: RunId,
    /// The step's position in the run, from 0.
    pub index: u32,
    /// The name the agent gave the step; a replay under another name is a
    /// divergence.
    pub name: String,
    /// The run attempt that executed the step.
    pub attempt: u32,
    pub worker_id: WorkerId,
    /// The lease revision the attempt held (its fencing token).
    pub fencing_token: u64,
    /// When the checkpoint was written, ms since the Unix epoch.
    pub ts_ms: i64,
    /// How long the successful try took.
    pub duration_ms: u64,
    pub output: StepOutput,
}

/// Where a step's output is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepOutput {
    /// The output itself (small outputs).
    Inline { value: Value },
    /// The output is an object in the `<prefix>-blobs` object store: a
    /// MessagePack envelope of the JSON value, `size` bytes with SHA-256
    /// `sha256` (hex), checked on read.
    Blob { object: String, size: u64, sha256: String },
}

/// The record a resuming attempt writes under `<run_id>.fence` before it
/// executes anything: it moves the head of the run's checkpoint chain, so
/// every earlier attempt's next checkpoint write is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub run_id: RunId,
    pub attempt: u32,
    pub worker_id: WorkerId,
    pub fencing_token: u64,
    pub ts_ms: i64,
}
