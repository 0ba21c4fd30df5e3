//! What every runfleet process shares to be operated in production:
//!
//! - [`nats`]: connecting with the fleet's credentials (user/password, token,
//!   NKey, credentials file, TLS with a custom CA and client certificates);
//! - [`telemetry`]: text or JSON logs, OpenTelemetry traces exported over
//!   OTLP, and W3C trace context carried in NATS headers;
//! - [`metrics`]: the Prometheus metrics, named once in
//!   `runfleet_protocol::semconv`;
//! - [`http`]: `/metrics`, `/healthz` and `/readyz`;
//! - [`heap`]: heap accounting, the bytes the allocator has handed out;
//! - [`redact`]: secrets removed from event payloads before they are published;
//! - [`runtime`]: the tokio runtime, without its LIFO slot.

pub mod heap;
pub mod http;
pub mod metrics;
pub mod nats;
pub mod ready;
pub mod redact;
pub mod runtime;
pub mod telemetry;
