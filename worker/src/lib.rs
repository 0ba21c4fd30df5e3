//! The runfleet worker: runtime and agent SDK.
//!
//! A worker is stateless: it pulls jobs from the queues it serves (highest
//! priority band first, never more than it has free slots), claims each run
//! with a lease, executes the run's agent and writes the run's events with
//! optimistic concurrency, so at most one worker commits for a run even when
//! a paused or partitioned worker comes back. Build your own worker binary by
//! registering your [`sdk::Agent`]s in an [`sdk::Agents`] and calling
//! [`Worker::start`] then [`Worker::run`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), runfleet_worker::Error> {
//! use runfleet_worker::{agents, config::WorkerConfig, Worker};
//! use tokio_util::sync::CancellationToken;
//!
//! let worker = Worker::start(WorkerConfig::default(), agents::builtin()).await?;
//! let shutdown = CancellationToken::new();
//! // Cancel `shutdown` on SIGTERM; `run` then drains and returns.
//! worker.run(shutdown).await?;
//! # Ok(())
//! # }
//! ```

pub mod agents;
pub mod config;
pub mod runtime;
pub mod sdk;

pub use config::WorkerConfig;
pub use runtime::{Error, Worker};
pub use sdk::{Agent, AgentError, Agents, RunContext};

/// The tests' real nats-server, for unit tests that need one.
#[cfg(test)]
#[path = "../../tests/harness/nats.rs"]
#[allow(dead_code)]
mod test_nats;
