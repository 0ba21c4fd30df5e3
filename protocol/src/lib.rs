//! The runfleet wire protocol.
//!
//! This crate is the only place that defines what crosses the wire: validated
//! identifiers ([`ids`]), every subject, stream, consumer, bucket and key name
//! ([`names`]), the versioned MessagePack envelope ([`codec`]), the message types
//! ([`job`], [`event`], [`lease`], [`checkpoint`], [`signal`], [`control`], [`api`], [`worker`],
//! [`idempotency`]) and the typed error codes
//! ([`error`]). It owns no task, opens no socket and knows no SQL.
//!
//! Architecture invariant: a string that becomes a NATS subject token is built
//! here from a validated newtype, never by `format!` at a call site.

pub mod api;
pub mod checkpoint;
pub mod codec;
pub mod control;
pub mod error;
pub mod event;
pub mod idempotency;
pub mod ids;
pub mod job;
pub mod lease;
pub mod limits;
pub mod names;
pub mod semconv;
pub mod signal;
pub mod state;
pub mod time;
pub mod worker;

pub use codec::{decode, encode, CONTENT_TYPE, PROTOCOL_VERSION};
pub use error::{ApiError, ErrorCode};
pub use ids::{AgentName, IdempotencyKey, QueueName, RunId, SignalKey, TenantId, WorkerId};
pub use names::Names;
pub use state::RunState;
