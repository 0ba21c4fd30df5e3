//! Worker configuration.
//!
//! A [`WorkerConfig`] is plain serde data so the binary can layer it (defaults →
//! TOML → `RUNFLEET_` environment → flags) with figment; durations are
//! humantime strings such as `"30s"` or `"500ms"`. Call
//! [`WorkerConfig::validate`] before [`crate::Worker::start`] (which calls it
//! too) to get an error that names the offending key.

use std::net::SocketAddr;
use std::time::Duration;

use runfleet_ops::nats::NatsConfig;
use runfleet_ops::redact::RedactionConfig;
use runfleet_ops::telemetry::TelemetryConfig;
use runfleet_protocol::names::Prefix;
use runfleet_protocol::{QueueName, WorkerId};
use serde::{Deserialize, Serialize};

/// Default of [`WorkerConfig::checkpoint_inline_limit`].
pub const DEFAULT_INLINE_LIMIT: usize = 64 * 1024;
/// Largest [`WorkerConfig::checkpoint_inline_limit`]: below the default NATS
/// `max_payload` (1 MiB) with room for headers.
pub const MAX_INLINE_LIMIT: usize = 900 * 1024;
/// Longest `idle_pull`: a stopping worker waits for its request to expire.
pub const MAX_IDLE_PULL: Duration = Duration::from_secs(10);

/// Why a configuration was rejected. Each variant names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("worker.nats_url must not be empty")]
    EmptyNatsUrl,
    #[error("worker.prefix is invalid: {0}")]
    InvalidPrefix(runfleet_protocol::ids::Error),
    #[error("worker.queues must name at least one queue")]
    NoQueues,
    #[error("worker.queues names queue {0} twice")]
    DuplicateQueue(QueueName),
    #[error("worker.slots must be at least 1")]
    NoSlots,
    #[error("worker.{key} must be greater than zero")]
    ZeroDuration { key: &'static str },
    #[error("worker.checkpoint_inline_limit must be between 1 KiB and {max} bytes (got {got})")]
    InlineLimit { got: usize, max: usize },
    #[error("worker.retry_backoff_max must not be below worker.retry_backoff_min")]
    BackoffOrder,
    /// A stopping worker waits for its idle pull request to expire.
    #[error("worker.idle_pull must be at most {max:?} (got {got:?}): a stopping worker waits for its pull request to expire")]
    IdlePullTooLong { got: Duration, max: Duration },
    /// A shared table (`[nats]`, `[telemetry]`, `[redaction]`) is invalid;
    /// the message names the key.
    #[error("{0}")]
    Shared(String),
}

/// Configuration of one worker process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// NATS server URL(s) to connect to, comma separated. Default
    /// `"nats://127.0.0.1:4222"`.
    pub nats_url: String,
    /// NATS credentials and TLS (the shared `[nats]` table).
    pub nats: NatsConfig,
    /// Logs and traces (the shared `[telemetry]` table).
    pub telemetry: TelemetryConfig,
    /// Key patterns redacted from event payloads (the shared `[redaction]` table).
    pub redaction: RedactionConfig,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, e.g.
    /// `0.0.0.0:9090`. Default: not served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// Prefix of every subject, stream and bucket name; must match the
    /// coordinator's. Lowercase letters, digits, `-` and `_`. Default
    /// `"runfleet"`.
    pub prefix: String,
    /// Job queues this worker serves. Default `["default"]`.
    pub queues: Vec<QueueName>,
    /// How many runs this worker executes at once (at least 1). The worker
    /// never pulls more jobs than it has free slots. Default `4`.
    pub slots: u32,
    /// The worker's identity in leases, events and the worker registry. When
    /// absent a fresh `w-<uuidv7>` is generated at start. Default: none.
    pub worker_id: Option<WorkerId>,
    /// Ack wait of the job consumers: how long a delivered job may go without
    /// an ack or in-progress ack before JetStream redelivers it. Running jobs
    /// are kept alive by heartbeats, so this bounds how fast a crashed worker's
    /// jobs are redelivered: with the default (the lease TTL, read from the
    /// leases bucket) a crashed worker's runs resume about one lease TTL
    /// after its last heartbeat. Shared by every worker of the fleet (the
    /// consumers are durable; the last worker to start wins). Default: the
    /// lease TTL.
    #[serde(default, with = "humantime_serde::option")]
    pub ack_wait: Option<Duration>,
    /// How often the worker renews its leases (one CAS per running run) and
    /// sends in-progress acks. Shorter means more KV updates per second;
    /// it must stay well below the lease TTL (the coordinator's
    /// `lease_ttl`) so a lease survives a missed beat. Default: a third of
    /// the shorter of the lease TTL and the ack wait.
    #[serde(default, with = "humantime_serde::option")]
    pub heartbeat_interval: Option<Duration>,
    /// Step outputs whose checkpoint would exceed this many bytes are stored
    /// in the blobs object store and the checkpoint keeps a reference. Must
    /// stay below the NATS `max_payload`. Default `65536` (64 KiB).
    pub checkpoint_inline_limit: usize,
    /// Backoff before the next attempt of a run whose attempt failed with a
    /// retryable error: `retry_backoff_min` doubled per attempt, at most
    /// `retry_backoff_max`. Defaults `1s` and `60s`.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// How often an idle worker re-checks its consumers even without a
    /// wake-up, which is how it notices redelivered jobs: a crashed worker's
    /// runs resume within about `lease_ttl + idle_poll` of its last
    /// heartbeat. Each check is one fetch per served queue and band.
    /// Default `500ms`.
    #[serde(with = "humantime_serde")]
    pub idle_poll: Duration,
    /// How long the pull request of an idle worker waits at the server for
    /// jobs of its first queue's default band (`DEFAULT_PRIORITY`), as a
    /// plain JetStream consumer does, before the worker asks again. A job
    /// published meanwhile is delivered to the waiting request at once,
    /// without the wake-up and fetch round trip. The request asks for one
    /// job fewer than the free slots (so a worker with one free slot does
    /// not make it), keeping a slot for wake-ups of every other band; a
    /// higher band's burst larger than that can wait behind up to this long.
    /// Each request costs the server two messages (the request and its
    /// expiry) per period while the worker is idle, and a stopping worker
    /// waits for its request to expire. `0s` disables it: an idle worker then
    /// waits for wake-ups alone. At most `10s`. Default `100ms`.
    #[serde(with = "humantime_serde")]
    pub idle_pull: Duration,
    /// Delay of the NAK sent for a job whose run is leased by another worker
    /// when the lease cannot be read; otherwise the delay is the lease's
    /// remaining lifetime. Also the delay before retrying a job whose claim
    /// failed on a transient error. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub lease_held_delay: Duration,
    /// On shutdown, how long running runs may take to finish before they are
    /// handed off (lease released, job NAKed for immediate redelivery).
    /// Default `10s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// After `shutdown_grace`, how long the remaining runs get to reach a
    /// step boundary, where they are handed off without redoing any work;
    /// a run still inside a step after this is stopped there (that step
    /// runs again on the next worker). Set Kubernetes'
    /// `terminationGracePeriodSeconds` above `shutdown_grace +
    /// handoff_timeout`. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub handoff_timeout: Duration,
    /// How long a step's `step.completed`, and a fresh run's `run.started`,
    /// wait for the run's next event to travel with it in one message (one
    /// round trip fewer per step and per run); after this it is sent alone. `0s` sends every event alone, as releases
    /// before multi-event log messages did: use it while processes of such a
    /// release (coordinators, workers, clients) are still running, or before
    /// rolling back to one (`docs/operations.md`). Default `20ms`.
    #[serde(with = "humantime_serde")]
    pub step_completed_hold: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            nats: NatsConfig::default(),
            telemetry: TelemetryConfig::default(),
            redaction: RedactionConfig::default(),
            metrics_addr: None,
            prefix: Prefix::default().as_str().to_owned(),
            queues: vec![QueueName::default_queue()],
            slots: 4,
            worker_id: None,
            ack_wait: None,
            heartbeat_interval: None,
            checkpoint_inline_limit: DEFAULT_INLINE_LIMIT,
            retry_backoff_min: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(60),
            idle_poll: Duration::from_millis(500),
            idle_pull: Duration::from_millis(100),
            lease_held_delay: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
            handoff_timeout: Duration::from_secs(10),
            step_completed_hold: crate::runtime::events::HOLD_FOR,
        }
    }
}

impl WorkerConfig {
    /// Rejects a configuration that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), Error> {
        if self.nats_url.trim().is_empty() {
            return Err(Error::EmptyNatsUrl);
        }
        self.prefix()?;
        self.nats.validate().map_err(|e| Error::Shared(e.to_string()))?;
        self.telemetry.validate().map_err(|e| Error::Shared(e.to_string()))?;
        runfleet_ops::redact::Redactor::new(&self.redaction).map_err(|e| Error::Shared(e.to_string()))?;
        if self.queues.is_empty() {
            return Err(Error::NoQueues);
        }
        for (i, queue) in self.queues.iter().enumerate() {
            if self.queues[..i].contains(queue) {
                return Err(Error::DuplicateQueue(queue.clone()));
            }
        }
        if self.slots == 0 {
            return Err(Error::NoSlots);
        }
        for (key, value) in [
            ("ack_wait", self.ack_wait.unwrap_or(Duration::MAX)),
            ("heartbeat_interval", self.heartbeat_interval.unwrap_or(Duration::MAX)),
            ("idle_poll", self.idle_poll),
            ("lease_held_delay", self.lease_held_delay),
            ("retry_backoff_min", self.retry_backoff_min),
        ] {
            if value.is_zero() {
                return Err(Error::ZeroDuration { key });
            }
        }
        if self.retry_backoff_max < self.retry_backoff_min {
            return Err(Error::BackoffOrder);
        }
        if self.idle_pull > MAX_IDLE_PULL {
            return Err(Error::IdlePullTooLong { got: self.idle_pull, max: MAX_IDLE_PULL });
        }
        if !(1024..=MAX_INLINE_LIMIT).contains(&self.checkpoint_inline_limit) {
            return Err(Error::InlineLimit { got: self.checkpoint_inline_limit, max: MAX_INLINE_LIMIT });
        }
        Ok(())
    }

    /// The validated prefix.
    pub fn prefix(&self) -> Result<Prefix, Error> {
        Prefix::new(self.prefix.clone()).map_err(Error::InvalidPrefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(WorkerConfig::default().validate(), Ok(()));
    }

    #[test]
    fn rejects_nonsense_naming_the_key() {
        let bad = WorkerConfig { slots: 0, ..WorkerConfig::default() };
        assert_eq!(bad.validate(), Err(Error::NoSlots));
        let bad = WorkerConfig { queues: vec![], ..WorkerConfig::default() };
        assert_eq!(bad.validate(), Err(Error::NoQueues));
        let bad = WorkerConfig { prefix: "Bad.Prefix".to_owned(), ..WorkerConfig::default() };
        assert!(matches!(bad.validate(), Err(Error::InvalidPrefix(_))));
        let bad = WorkerConfig { ack_wait: Some(Duration::ZERO), ..WorkerConfig::default() };
        assert_eq!(bad.validate(), Err(Error::ZeroDuration { key: "ack_wait" }));
        let bad = WorkerConfig { idle_pull: Duration::from_secs(11), ..WorkerConfig::default() };
        assert_eq!(
            bad.validate(),
            Err(Error::IdlePullTooLong { got: Duration::from_secs(11), max: MAX_IDLE_PULL })
        );
        let bad = WorkerConfig { checkpoint_inline_limit: 10, ..WorkerConfig::default() };
        assert!(matches!(bad.validate(), Err(Error::InlineLimit { .. })));
        let bad = WorkerConfig {
            retry_backoff_min: Duration::from_secs(5),
            retry_backoff_max: Duration::from_secs(1),
            ..WorkerConfig::default()
        };
        assert_eq!(bad.validate(), Err(Error::BackoffOrder));
        let q = QueueName::default_queue();
        let bad = WorkerConfig { queues: vec![q.clone(), q], ..WorkerConfig::default() };
        assert!(matches!(bad.validate(), Err(Error::DuplicateQueue(_))));
    }

    #[test]
    fn durations_are_humantime_strings() {
        let json =
            serde_json::json!({ "ack_wait": "2s", "idle_poll": "250ms", "idle_pull": "0s", "slots": 1 });
        let config: WorkerConfig = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.ack_wait, Some(Duration::from_secs(2)));
        assert_eq!(config.heartbeat_interval, None);
        assert_eq!(config.idle_poll, Duration::from_millis(250));
        assert_eq!(config.idle_pull, Duration::ZERO, "0s is valid: it disables the idle pull");
        assert!(config.validate().is_ok());
        assert_eq!(config.slots, 1);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    }
}
