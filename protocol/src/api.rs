//! API requests and replies, served on `<prefix>.api.<tenant>.<verb>`.
//!
//! Requests carry identifiers as plain strings so that a bad one is answered
//! with `invalid_argument` naming the field, not a generic decode error; the
//! `validate` methods turn them into the typed ids.
//!
//! Every reply is an envelope around [`Reply`]: `{"ok": <response>}` or
//! `{"error": {"code", "message", "field"?}}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::codec;
use crate::error::{ApiError, ErrorCode};
use crate::event::{Event, RunError};
use crate::ids::{self, AgentName, IdempotencyKey, QueueName, RunId, SignalKey, TenantId, WorkerId};
use crate::limits;
use crate::state::RunState;

/// A reply to any API request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply<T> {
    #[serde(rename = "ok")]
    Ok(T),
    #[serde(rename = "error")]
    Err(ApiError),
}

impl<T> From<Result<T, ApiError>> for Reply<T> {
    fn from(result: Result<T, ApiError>) -> Self {
        match result {
            Ok(value) => Self::Ok(value),
            Err(error) => Self::Err(error),
        }
    }
}

impl<T> From<Reply<T>> for Result<T, ApiError> {
    fn from(reply: Reply<T>) -> Self {
        match reply {
            Reply::Ok(value) => Ok(value),
            Reply::Err(error) => Err(error),
        }
    }
}

/// Deserializes a field that is present as `Some`, even when its value is
/// `nil`, so `Some(Value::Null)` survives the round trip (absent → `None`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

fn invalid(field: &str, error: ids::Error) -> ApiError {
    ApiError::invalid(field, error.to_string())
}

/// Validates the tenant token of a request subject.
pub fn validate_tenant(token: &str) -> Result<TenantId, ApiError> {
    TenantId::new(token).map_err(|e| invalid("tenant", e))
}

/// Validates a run id field.
pub fn validate_run_id(field: &str, value: &str) -> Result<RunId, ApiError> {
    value.parse().map_err(|e| invalid(field, e))
}

/// Maps a codec error on a request to the API error answered for it.
pub fn request_decode_error(verb: &str, error: codec::Error) -> ApiError {
    match error {
        codec::Error::UnsupportedVersion { .. } => {
            ApiError::new(ErrorCode::UnsupportedVersion, error.to_string())
        }
        other => ApiError::new(
            ErrorCode::MalformedRequest,
            format!("{verb} request could not be decoded: {other}"),
        ),
    }
}

// ---- submit ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitRequest {
    pub agent: String,
    #[serde(default)]
    pub input: Value,
    /// Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Priority band 0 (highest) .. `PRIORITY_BANDS - 1`; defaults to `DEFAULT_PRIORITY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// 1 ..= `MAX_ATTEMPTS_LIMIT`; defaults to the coordinator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// A submit request whose every field passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSubmit {
    pub agent: AgentName,
    pub input: Value,
    pub queue: QueueName,
    pub priority: u8,
    pub idempotency_key: Option<IdempotencyKey>,
    pub max_attempts: u32,
}

impl SubmitRequest {
    /// Checks every field against the protocol rules and the coordinator's
    /// input limit and default attempt count.
    pub fn validate(
        self,
        max_input_bytes: usize,
        default_max_attempts: u32,
    ) -> Result<ValidSubmit, ApiError> {
        let agent = AgentName::new(self.agent).map_err(|e| invalid("agent", e))?;
        let queue = match self.queue {
            Some(queue) => QueueName::new(queue).map_err(|e| invalid("queue", e))?,
            None => QueueName::default_queue(),
        };
        let priority = self.priority.unwrap_or(limits::DEFAULT_PRIORITY);
        if priority >= limits::PRIORITY_BANDS {
            return Err(ApiError::invalid(
                "priority",
                format!(
                    "priority band {priority} does not exist; use 0 (highest) to {}",
                    limits::PRIORITY_BANDS - 1
                ),
            ));
        }
        let max_attempts = self.max_attempts.unwrap_or(default_max_attempts);
        if !(1..=limits::MAX_ATTEMPTS_LIMIT).contains(&max_attempts) {
            return Err(ApiError::invalid(
                "max_attempts",
                format!("max_attempts {max_attempts} is outside 1..={}", limits::MAX_ATTEMPTS_LIMIT),
            ));
        }
        let idempotency_key = self
            .idempotency_key
            .map(IdempotencyKey::new)
            .transpose()
            .map_err(|e| invalid("idempotency_key", e))?;
        let input_len =
            codec::encoded_len(&self.input).map_err(|e| ApiError::invalid("input", e.to_string()))?;
        if input_len > max_input_bytes {
            return Err(ApiError {
                code: ErrorCode::PayloadTooLarge,
                message: format!(
                    "input is {input_len} bytes encoded, the limit is {max_input_bytes}; \
                     pass large data by reference"
                ),
                field: Some("input".to_owned()),
            });
        }
        Ok(ValidSubmit { agent, input: self.input, queue, priority, idempotency_key, max_attempts })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub run_id: RunId,
    /// The run's state as of the reply (`queued` for a new run).
    pub state: RunState,
    /// False when an idempotency key matched an existing run.
    pub created: bool,
}

// ---- get ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetRequest {
    pub run_id: String,
}

/// A run as the registry (and the run's last event) sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub run_id: RunId,
    pub tenant: TenantId,
    pub agent: AgentName,
    pub queue: QueueName,
    pub priority: u8,
    pub state: RunState,
    pub attempt: u32,
    pub max_attempts: u32,
    pub input: Value,
    /// Present once the run completed (and may then be `null`).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<WorkerId>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The seq of the last event reflected in this view.
    pub last_seq: u64,
}

// ---- list ----

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Page size, 1 ..= `MAX_LIST_PAGE_SIZE`; defaults to `DEFAULT_PAGE_SIZE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// A list filter whose every field passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    pub state: Option<RunState>,
    pub queue: Option<QueueName>,
    pub agent: Option<AgentName>,
    pub limit: u32,
    /// Only runs with an id strictly below this one (pages go newest first).
    pub before: Option<RunId>,
}

fn page_size(field: &str, limit: Option<u32>, max: u32) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(limits::DEFAULT_PAGE_SIZE.min(max));
    if !(1..=max).contains(&limit) {
        return Err(ApiError::invalid(field, format!("{field} {limit} is outside 1..={max}")));
    }
    Ok(limit)
}

impl ListRequest {
    pub fn validate(self) -> Result<ListFilter, ApiError> {
        let state = self
            .state
            .map(|s| s.parse::<RunState>())
            .transpose()
            .map_err(|e| ApiError::invalid("state", e.to_string()))?;
        let queue = self.queue.map(QueueName::new).transpose().map_err(|e| invalid("queue", e))?;
        let agent = self.agent.map(AgentName::new).transpose().map_err(|e| invalid("agent", e))?;
        let limit = page_size("limit", self.limit, limits::MAX_LIST_PAGE_SIZE)?;
        let before = self.cursor.map(|c| validate_run_id("cursor", &c)).transpose()?;
        Ok(ListFilter { state, queue, agent, limit, before })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListResponse {
    /// Newest first.
    pub runs: Vec<RunView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

// ---- events ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsRequest {
    pub run_id: String,
    /// Return events with `seq > after_seq`; 0 for the whole log.
    #[serde(default)]
    pub after_seq: u64,
    /// Page size, 1 ..= `MAX_EVENTS_PAGE_SIZE`; defaults to `DEFAULT_PAGE_SIZE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl EventsRequest {
    pub fn validate(self) -> Result<(RunId, u64, u32), ApiError> {
        let run_id = validate_run_id("run_id", &self.run_id)?;
        let limit = page_size("limit", self.limit, limits::MAX_EVENTS_PAGE_SIZE)?;
        Ok((run_id, self.after_seq, limit))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsResponse {
    /// In seq order.
    pub events: Vec<Event>,
    /// Whether more events follow the last one returned (as of the reply).
    pub has_more: bool,
}

// ---- signal ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalRequest {
    pub run_id: String,
    /// The key the run awaits (`[A-Za-z0-9_-]{1,64}`).
    pub key: String,
    #[serde(default)]
    pub payload: Value,
}

impl SignalRequest {
    /// Validates the ids and the payload's encoded size.
    pub fn validate(self, max_payload_bytes: usize) -> Result<(RunId, SignalKey, Value), ApiError> {
        let run_id = validate_run_id("run_id", &self.run_id)?;
        let key = SignalKey::new(self.key).map_err(|e| invalid("key", e))?;
        let len =
            codec::encoded_len(&self.payload).map_err(|e| ApiError::invalid("payload", e.to_string()))?;
        if len > max_payload_bytes {
            return Err(ApiError {
                code: ErrorCode::PayloadTooLarge,
                message: format!("signal payload is {len} bytes encoded, the limit is {max_payload_bytes}"),
                field: Some("payload".to_owned()),
            });
        }
        Ok((run_id, key, self.payload))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalResponse {
    pub run_id: RunId,
    pub key: SignalKey,
    /// False when the same signal was already stored (a retry).
    pub created: bool,
    /// Whether this request re-dispatched the run (it was waiting on `key`).
    /// A run that is not waiting on the key yet consumes the signal when it
    /// gets there.
    pub woke: bool,
    /// The run's state as of the reply.
    pub state: RunState,
}

// ---- cancel ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Longest accepted cancel reason, in bytes.
pub const MAX_CANCEL_REASON_BYTES: usize = 1024;

impl CancelRequest {
    pub fn validate(self) -> Result<(RunId, Option<String>), ApiError> {
        let run_id = validate_run_id("run_id", &self.run_id)?;
        if let Some(reason) = &self.reason {
            if reason.len() > MAX_CANCEL_REASON_BYTES {
                return Err(ApiError::invalid(
                    "reason",
                    format!("reason is {} bytes, the limit is {MAX_CANCEL_REASON_BYTES}", reason.len()),
                ));
            }
        }
        Ok((run_id, self.reason))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelResponse {
    pub run_id: RunId,
    /// The run's state as of the reply: `cancelled` when the coordinator
    /// cancelled it (queued or waiting), the terminal state when it had
    /// already ended, `running` when the worker running it was told to stop
    /// (it writes `run.cancelled` within moments).
    pub state: RunState,
    /// Whether this request cancelled the run or asked its worker to.
    /// False for a run that had already ended.
    pub cancelled: bool,
}
