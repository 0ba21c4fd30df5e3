//! Typed error codes shared by the API and by failed runs.

use serde::{Deserialize, Serialize};

/// A machine-readable error code. Clients branch on this, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request payload is not a decodable runfleet envelope of the verb's type.
    MalformedRequest,
    /// A field (or the tenant in the subject) failed validation; `field` names it.
    InvalidArgument,
    /// The run input exceeds the coordinator's limit.
    PayloadTooLarge,
    /// The run does not exist (for this tenant).
    NotFound,
    /// The idempotency key is already bound to a different request.
    Conflict,
    /// The envelope version is not supported by this coordinator.
    UnsupportedVersion,
    /// NATS/JetStream or the registry is unreachable or refused; retry later.
    Unavailable,
    /// A bug: the coordinator hit something it did not expect.
    Internal,
    /// Run failure: no worker that took the job has the agent.
    UnknownAgent,
    /// Run failure: the agent returned an error.
    AgentFailed,
    /// Run failure: the agent panicked.
    AgentPanicked,
    /// Run failure: the run's input could not be decoded by the agent.
    InvalidInput,
    /// Run failure: a durable step failed after its retries.
    StepFailed,
    /// Run failure: the agent's steps no longer match the run's checkpoints
    /// (a different step name, or an output that no longer decodes, at a
    /// recorded position). Changed agent code must not replay wrong results.
    Divergence,
    /// Run failure: the run used up its `max_attempts` (crashes, lost
    /// leases and failed attempts together).
    MaxAttemptsExceeded,
    /// Run end: the run was cancelled (`run.cancelled` carries the reason).
    Cancelled,
    /// The request needs a run that is not terminal, and the run is.
    RunTerminal,
    /// A code this version does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedRequest => "malformed_request",
            Self::InvalidArgument => "invalid_argument",
            Self::PayloadTooLarge => "payload_too_large",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::UnsupportedVersion => "unsupported_version",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::UnknownAgent => "unknown_agent",
            Self::AgentFailed => "agent_failed",
            Self::AgentPanicked => "agent_panicked",
            Self::InvalidInput => "invalid_input",
            Self::StepFailed => "step_failed",
            Self::Divergence => "divergence",
            Self::MaxAttemptsExceeded => "max_attempts_exceeded",
            Self::Cancelled => "cancelled",
            Self::RunTerminal => "run_terminal",
            Self::Unknown => "unknown",
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Unavailable | Self::Internal)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it crosses the wire: a code, a human message, and for
/// `invalid_argument` the offending field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), field: None }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self { code: ErrorCode::InvalidArgument, message: message.into(), field: Some(field.to_owned()) }
    }
}
