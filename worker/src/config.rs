//! Worker configuration.
//!
//! A [`WorkerConfig`] is plain serde data so the binary can layer it (defaults →
//! TOML → `RUNFLEET_` environment → flags) with figment; durations are
//! humantime strings such as `"30s"` or `"500ms"`. Call
//! [`WorkerConfig::validate`] before [`crate::Worker::start`] (which calls it
//! too) to get an error that names the offending key.

use std::time::Duration;

use runfleet_protocol::names::Prefix;
use runfleet_protocol::{QueueName, WorkerId};
use serde::{Deserialize, Serialize};

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
}

/// Configuration of one worker process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// NATS server URL(s) to connect to, comma separated. Default
    /// `"nats://127.0.0.1:4222"`.
    pub nats_url: String,
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
    /// jobs are redelivered. Shared by every worker of the fleet (the consumers
    /// are durable; the last worker to start wins). Default `30s`.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How often an idle worker re-checks its consumers even without a
    /// wake-up, which is how it notices redelivered jobs. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub idle_poll: Duration,
    /// Delay of the NAK sent for a job whose run is leased by another worker,
    /// so such a job does not bounce in a hot loop. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub lease_held_delay: Duration,
    /// On shutdown, how long running runs may take to finish before they are
    /// handed off (lease released, job NAKed for immediate redelivery).
    /// Default `10s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            prefix: Prefix::default().as_str().to_owned(),
            queues: vec![QueueName::default_queue()],
            slots: 4,
            worker_id: None,
            ack_wait: Duration::from_secs(30),
            idle_poll: Duration::from_secs(1),
            lease_held_delay: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
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
            ("ack_wait", self.ack_wait),
            ("idle_poll", self.idle_poll),
            ("lease_held_delay", self.lease_held_delay),
        ] {
            if value.is_zero() {
                return Err(Error::ZeroDuration { key });
            }
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
        let bad = WorkerConfig { ack_wait: Duration::ZERO, ..WorkerConfig::default() };
        assert_eq!(bad.validate(), Err(Error::ZeroDuration { key: "ack_wait" }));
        let q = QueueName::default_queue();
        let bad = WorkerConfig { queues: vec![q.clone(), q], ..WorkerConfig::default() };
        assert!(matches!(bad.validate(), Err(Error::DuplicateQueue(_))));
    }

    #[test]
    fn durations_are_humantime_strings() {
        let json = serde_json::json!({ "ack_wait": "2s", "idle_poll": "250ms", "slots": 1 });
        let config: WorkerConfig = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.ack_wait, Duration::from_secs(2));
        assert_eq!(config.idle_poll, Duration::from_millis(250));
        assert_eq!(config.slots, 1);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    }
}
