//! The coordinator's configuration section.
//!
//! Loaded by the binary (figment: defaults → TOML → `RUNFLEET_` environment →
//! flags); durations are humantime strings such as `"15s"` or `"24h"`. Call
//! [`CoordinatorConfig::validate`] before use: it rejects nonsense with a
//! message naming the key.

use std::net::SocketAddr;
use std::time::Duration;

use runfleet_ops::nats::NatsConfig;
use runfleet_ops::redact::RedactionConfig;
use runfleet_ops::telemetry::TelemetryConfig;
use runfleet_protocol::limits;
use runfleet_protocol::names::{Names, Prefix};
use serde::{Deserialize, Serialize};

/// The largest `max_input_bytes` accepted: NATS' own maximum payload.
pub const MAX_INPUT_BYTES_LIMIT: usize = 8 * 1024 * 1024;

/// A configuration value that makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("coordinator.{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error(transparent)]
    Nats(#[from] runfleet_ops::nats::Error),
    #[error(transparent)]
    Telemetry(#[from] runfleet_ops::telemetry::Error),
    #[error(transparent)]
    Redaction(#[from] runfleet_ops::redact::Error),
}

fn invalid(key: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid { key, reason: reason.into() }
}

/// Configuration of one coordinator replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// NATS server URL(s), comma-separated. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// NATS credentials and TLS (the shared `[nats]` table).
    pub nats: NatsConfig,
    /// Logs and traces (the shared `[telemetry]` table).
    pub telemetry: TelemetryConfig,
    /// Key patterns redacted from event payloads (the shared `[redaction]` table).
    pub redaction: RedactionConfig,
    /// Replicas of every stream, bucket and object store the coordinator
    /// creates (applied again at every start, so a change takes effect on
    /// the next rollout). `3` on a 3-node NATS cluster survives the loss of
    /// a node; a single server supports only `1`. Default `1`, 1 ..= 5.
    pub stream_replicas: usize,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, e.g.
    /// `0.0.0.0:9090`. Default: not served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// Registry database: `sqlite:PATH` (created if missing) or
    /// `postgres://user:pass@host/db`. Default `sqlite:runfleet.db`.
    pub database_url: String,
    /// First token of every subject and stem of every stream and bucket name,
    /// so several fleets can share one NATS account. Lowercase letters, digits,
    /// `-` and `_`. Default `runfleet`.
    pub prefix: String,
    /// Lease time-to-live: the `max_age` of the leases bucket. A worker that
    /// stops heartbeating loses its runs after this long. Default `15s`, at least `1s`.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Worker registry time-to-live: the `max_age` of the workers bucket.
    /// Default `15s`, at least `1s`.
    #[serde(with = "humantime_serde")]
    pub worker_ttl: Duration,
    /// How long an idempotency key stays bound to its run: the `max_age` of the
    /// idempotency bucket. Default `24h`, at least `1s`.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// Largest accepted run input, in MessagePack-encoded bytes. Default
    /// 262144 (256 KiB), 1 ..= 8 MiB (and it must fit the server's `max_payload`).
    pub max_input_bytes: usize,
    /// `max_attempts` of a run whose submitter names none. Default 3,
    /// 1 ..= `protocol::limits::MAX_ATTEMPTS_LIMIT`.
    pub default_max_attempts: u32,
    /// Most API requests one replica handles at once; further requests wait
    /// in the subscription. Default 256, at least 1.
    pub api_concurrency: usize,
    /// Most events the projector fetches and writes in one transaction.
    /// Default 512, 1 ..= 10000.
    pub projector_batch: usize,
    /// How long the events stream keeps events; `0s` keeps them forever
    /// (the SQL registry keeps its copy regardless). Default `0s`.
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// Largest accepted signal payload, in MessagePack-encoded bytes. Signals
    /// live in a KV bucket and are read by every attempt of the run, so they
    /// are bounded like inputs. Default 262144 (256 KiB), 1 ..= 8 MiB.
    pub max_signal_bytes: usize,
    /// How often the recovery loop looks for runs nothing owns (no job,
    /// lease, timer or signal) and re-dispatches them. Default `30s`, more
    /// than `0s`.
    #[serde(with = "humantime_serde")]
    pub recovery_interval: Duration,
    /// Only runs whose registry row has not changed for this long are
    /// examined by the recovery loop, so runs in the middle of a transition
    /// (submitted, claimed, parked a moment ago) are left alone. Default
    /// `60s`, more than `0s`.
    #[serde(with = "humantime_serde")]
    pub recovery_min_age: Duration,
    /// How long after a run ends the retention sweep leaves its checkpoints
    /// (and their large outputs), signals, cancel request and real input in
    /// JetStream; `0s` keeps them for good. The sweep runs every
    /// `recovery_interval` on the replica that projects
    /// ([`crate::retention`]). The run's events and registry row stay.
    #[serde(with = "humantime_serde")]
    pub ended_run_retention: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            nats: NatsConfig::default(),
            telemetry: TelemetryConfig::default(),
            redaction: RedactionConfig::default(),
            stream_replicas: 1,
            metrics_addr: None,
            database_url: "sqlite:runfleet.db".to_owned(),
            prefix: Prefix::default().as_str().to_owned(),
            lease_ttl: Duration::from_secs(15),
            worker_ttl: Duration::from_secs(15),
            idempotency_ttl: Duration::from_secs(24 * 60 * 60),
            max_input_bytes: limits::DEFAULT_MAX_INPUT_BYTES,
            default_max_attempts: limits::DEFAULT_MAX_ATTEMPTS,
            api_concurrency: 256,
            projector_batch: 512,
            events_max_age: Duration::ZERO,
            max_signal_bytes: limits::DEFAULT_MAX_INPUT_BYTES,
            recovery_interval: Duration::from_secs(30),
            recovery_min_age: Duration::from_secs(60),
            ended_run_retention: Duration::from_secs(7 * 24 * 60 * 60),
        }
    }
}

impl CoordinatorConfig {
    /// Rejects values that make no sense, naming the key.
    pub fn validate(&self) -> Result<(), Error> {
        if self.nats_url.trim().is_empty() {
            return Err(invalid("nats_url", "must not be empty"));
        }
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database_url",
                format!("{:?} is neither sqlite:PATH nor postgres://…", self.database_url),
            ));
        }
        Prefix::new(self.prefix.clone()).map_err(|e| invalid("prefix", e.to_string()))?;
        at_least_a_second("lease_ttl", self.lease_ttl)?;
        at_least_a_second("worker_ttl", self.worker_ttl)?;
        at_least_a_second("idempotency_ttl", self.idempotency_ttl)?;
        if !(1..=MAX_INPUT_BYTES_LIMIT).contains(&self.max_input_bytes) {
            return Err(invalid(
                "max_input_bytes",
                format!("{} is outside 1..={MAX_INPUT_BYTES_LIMIT}", self.max_input_bytes),
            ));
        }
        if !(1..=limits::MAX_ATTEMPTS_LIMIT).contains(&self.default_max_attempts) {
            return Err(invalid(
                "default_max_attempts",
                format!("{} is outside 1..={}", self.default_max_attempts, limits::MAX_ATTEMPTS_LIMIT),
            ));
        }
        if self.api_concurrency == 0 {
            return Err(invalid("api_concurrency", "must be at least 1"));
        }
        if !(1..=10_000).contains(&self.projector_batch) {
            return Err(invalid("projector_batch", format!("{} is outside 1..=10000", self.projector_batch)));
        }
        if !(1..=MAX_INPUT_BYTES_LIMIT).contains(&self.max_signal_bytes) {
            return Err(invalid(
                "max_signal_bytes",
                format!("{} is outside 1..={MAX_INPUT_BYTES_LIMIT}", self.max_signal_bytes),
            ));
        }
        if self.recovery_interval.is_zero() {
            return Err(invalid("recovery_interval", "must be longer than 0s"));
        }
        if self.recovery_min_age.is_zero() {
            return Err(invalid("recovery_min_age", "must be longer than 0s"));
        }
        if !self.ended_run_retention.is_zero() {
            at_least_a_second("ended_run_retention", self.ended_run_retention)?;
        }
        if !(1..=5).contains(&self.stream_replicas) {
            return Err(invalid("stream_replicas", format!("{} is outside 1..=5", self.stream_replicas)));
        }
        self.nats.validate()?;
        self.telemetry.validate()?;
        runfleet_ops::redact::Redactor::new(&self.redaction)?;
        Ok(())
    }

    /// The validated prefix's names.
    pub fn names(&self) -> Result<Names, Error> {
        let prefix = Prefix::new(self.prefix.clone()).map_err(|e| invalid("prefix", e.to_string()))?;
        Ok(Names::new(prefix))
    }
}

fn at_least_a_second(key: &'static str, value: Duration) -> Result<(), Error> {
    if value < Duration::from_secs(1) {
        return Err(invalid(key, format!("{value:?} is shorter than 1s")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(CoordinatorConfig::default().validate().is_ok());
    }

    #[test]
    fn rejects_nonsense_naming_the_key() {
        let cases: Vec<(&str, CoordinatorConfig)> = vec![
            ("lease_ttl", CoordinatorConfig { lease_ttl: Duration::from_millis(10), ..Default::default() }),
            ("max_input_bytes", CoordinatorConfig { max_input_bytes: 0, ..Default::default() }),
            ("max_input_bytes", CoordinatorConfig { max_input_bytes: 9 << 20, ..Default::default() }),
            ("prefix", CoordinatorConfig { prefix: "a.b".into(), ..Default::default() }),
            ("database_url", CoordinatorConfig { database_url: "mysql://x".into(), ..Default::default() }),
            ("api_concurrency", CoordinatorConfig { api_concurrency: 0, ..Default::default() }),
            ("stream_replicas", CoordinatorConfig { stream_replicas: 0, ..Default::default() }),
            ("default_max_attempts", CoordinatorConfig { default_max_attempts: 0, ..Default::default() }),
            ("max_signal_bytes", CoordinatorConfig { max_signal_bytes: 0, ..Default::default() }),
            (
                "recovery_interval",
                CoordinatorConfig { recovery_interval: Duration::ZERO, ..Default::default() },
            ),
            (
                "recovery_min_age",
                CoordinatorConfig { recovery_min_age: Duration::ZERO, ..Default::default() },
            ),
            (
                "ended_run_retention",
                CoordinatorConfig { ended_run_retention: Duration::from_millis(500), ..Default::default() },
            ),
        ];
        for (key, config) in cases {
            match config.validate() {
                Err(Error::Invalid { key: got, .. }) => assert_eq!(got, key),
                other => panic!("{key} should be rejected as invalid: {other:?}"),
            }
        }
    }

    #[test]
    fn durations_are_humantime_strings() {
        let json =
            serde_json::json!({"lease_ttl": "20s", "events_max_age": "7days", "recovery_interval": "200ms"});
        let config: CoordinatorConfig = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.lease_ttl, Duration::from_secs(20));
        assert_eq!(config.recovery_interval, Duration::from_millis(200));
        assert_eq!(config.recovery_min_age, Duration::from_secs(60));
        assert_eq!(config.events_max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(config.ended_run_retention, Duration::from_secs(7 * 24 * 3600));
        let keep: CoordinatorConfig =
            serde_json::from_value(serde_json::json!({"ended_run_retention": "0s"}))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keep.ended_run_retention, Duration::ZERO);
        assert!(keep.validate().is_ok(), "0s keeps ended runs' leftovers for good");
        assert_eq!(config.worker_ttl, Duration::from_secs(15));
    }
}
