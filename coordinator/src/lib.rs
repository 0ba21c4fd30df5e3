//! The runfleet coordinator: the API service, submission and idempotency,
//! signals and cancellation, the SQL registry, the event projector, the
//! recovery of runs nothing owns and the retention of ended runs.
//!
//! ```no_run
//! # async fn example() -> Result<(), runfleet_coordinator::Error> {
//! use runfleet_coordinator::{Coordinator, CoordinatorConfig};
//! let coordinator = Coordinator::start(CoordinatorConfig::default()).await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! coordinator.run(shutdown).await
//! # }
//! ```
//!
//! [`Coordinator::start`] connects to NATS, creates or updates the JetStream
//! topology ([`setup`]), connects to the registry and migrates it
//! ([`registry`]); [`Coordinator::run`] serves the API ([`api`]), projects
//! events ([`projector`]), recovers runs nothing owns ([`recovery`]) and
//! removes what ended runs left in JetStream ([`retention`]) until cancelled.
//! Any number of replicas may run against the same NATS account and
//! database. [`runs`] reads and writes one run's JetStream state for the API
//! and the recovery loop.
//!
//! Architecture invariant: this is the only crate that talks SQL.

pub mod api;
pub mod config;
pub mod projector;
pub mod recovery;
pub mod registry;
pub mod retention;
pub mod runs;
pub mod setup;

pub use config::CoordinatorConfig;

use std::sync::Arc;

use async_nats::jetstream;
use futures::future::BoxFuture;
use futures::StreamExt;
use runfleet_ops::http::Probe;
use runfleet_ops::redact::Redactor;
use runfleet_protocol::Names;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{Api, ApiLimits, Listening};
use crate::projector::Projector;
use crate::recovery::{Recovery, RecoveryConfig};
use crate::registry::Registry;
use crate::retention::{Retention, RetentionConfig};
use crate::runs::Runs;

/// The coordinator could not start, or a component failed while running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; the message names the key.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// NATS refused the credentials or the TLS handshake failed.
    #[error(transparent)]
    Connect(#[from] runfleet_ops::nats::Error),
    #[error(transparent)]
    Setup(#[from] setup::Error),
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(transparent)]
    Projector(#[from] projector::Error),
    #[error(transparent)]
    Api(#[from] api::Error),
    #[error(transparent)]
    Recovery(#[from] recovery::Error),
    #[error(transparent)]
    Retention(#[from] retention::Error),
    /// A component's task panicked: a bug.
    #[error("coordinator {component} task failed: {reason}")]
    Task { component: &'static str, reason: String },
}

/// A started coordinator replica: connected, topology ensured, registry
/// migrated, API subscribed. Call [`Coordinator::run`] to serve.
#[derive(Debug)]
pub struct Coordinator {
    client: async_nats::Client,
    names: Names,
    topology: setup::Topology,
    registry: Registry,
    api: Api,
    listening: Listening,
    projector: Projector,
    recovery: Recovery,
    retention: Retention,
}

impl Coordinator {
    /// Validates `config`, connects to NATS, creates or updates the streams
    /// and buckets, connects to the registry and applies its migrations,
    /// and subscribes the API: a request sent once this returns is answered
    /// as soon as [`Coordinator::run`] starts.
    ///
    /// While NATS is unreachable it keeps trying (logging each attempt);
    /// refused credentials or a failed TLS handshake fail at once. Cancel by
    /// dropping the future.
    pub async fn start(config: CoordinatorConfig) -> Result<Self, Error> {
        config.validate()?;
        let names = config.names()?;
        let redactor = Redactor::new(&config.redaction).map_err(config::Error::from)?;
        let client = runfleet_ops::nats::connect_waiting(
            &config.nats_url,
            &config.nats,
            "runfleet-coordinator",
            &CancellationToken::new(),
        )
        .await?;
        let js = jetstream::new(client.clone());
        let topology = setup::ensure(&js, &names, &config).await?;
        let registry = Registry::connect(&config.database_url).await?;
        let projector =
            Projector::new(topology.events.clone(), names.clone(), registry.clone(), config.projector_batch);
        let limits = ApiLimits {
            max_input_bytes: config.max_input_bytes,
            default_max_attempts: config.default_max_attempts,
            max_signal_bytes: config.max_signal_bytes,
            concurrency: config.api_concurrency,
        };
        let recovery = Recovery::new(
            client.clone(),
            Runs::new(js.clone(), names.clone(), &topology),
            registry.clone(),
            RecoveryConfig { interval: config.recovery_interval, min_age: config.recovery_min_age },
        );
        let retention = Retention::open(
            &js,
            names.clone(),
            &topology,
            registry.clone(),
            projector.owner().to_owned(),
            RetentionConfig { retention: config.ended_run_retention, interval: config.recovery_interval },
        )
        .await?;
        let api = Api::new(client.clone(), names.clone(), &topology, registry.clone(), limits, redactor);
        let listening = api.listen().await?;
        info!(prefix = %config.prefix, "coordinator started");
        Ok(Self { client, names, topology, registry, api, listening, projector, recovery, retention })
    }

    /// What `/readyz` and `/metrics` ask this coordinator: ready when
    /// connected to NATS with every stream and bucket in place and the
    /// registry reachable and migrated; refreshes the jobs-pending and
    /// projector-lag gauges at scrape time.
    pub fn probe(&self) -> Arc<dyn Probe> {
        Arc::new(CoordinatorProbe {
            client: self.client.clone(),
            names: self.names.clone(),
            jobs: self.topology.jobs.clone(),
            events: self.topology.events.clone(),
            registry: self.registry.clone(),
        })
    }

    /// The coordinator's NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The registry this coordinator projects into.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The owner id this coordinator's projector writes into the position
    /// row while it is the fleet's active projector (see [`projector`]).
    pub fn projector_owner(&self) -> &str {
        self.projector.owner()
    }

    /// Serves the API, runs the projector, the recovery loop and the
    /// retention sweep until `shutdown` is cancelled, then stops in order:
    /// the API stops taking requests and answers those in flight, the
    /// projector finishes its batch, the recovery loop finishes the run it
    /// is examining, the sweep the page it is purging, the NATS connection
    /// is flushed and the registry closed. If one component
    /// fails, the others are stopped too and the failure returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let stop = shutdown.child_token();
        let api = tokio::spawn(self.api.run(self.listening, stop.clone()));
        let projector = self.projector.spawn_thread(stop.clone());
        let recovery = tokio::spawn(self.recovery.run(stop.clone()));
        let retention = tokio::spawn(self.retention.run(stop.clone()));
        let (api, projector, recovery, retention) = tokio::join!(
            supervise("api", api, &shutdown, &stop),
            supervise("projector", projector, &shutdown, &stop),
            supervise("recovery", recovery, &shutdown, &stop),
            supervise("retention", retention, &shutdown, &stop),
        );
        if let Err(error) = self.client.flush().await {
            warn!(error = %error, "could not flush the nats connection");
        }
        self.registry.close().await;
        info!("coordinator stopped");
        api.and(projector).and(recovery).and(retention)
    }
}

struct CoordinatorProbe {
    client: async_nats::Client,
    names: Names,
    jobs: jetstream::stream::Stream,
    events: jetstream::stream::Stream,
    registry: Registry,
}

impl Probe for CoordinatorProbe {
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async {
            runfleet_ops::ready::nats(&self.client, &self.names, runfleet_ops::ready::Needs::Coordinator)
                .await?;
            runfleet_ops::ready::within("the registry database", self.registry.ready()).await
        })
    }

    fn refresh(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            // Sampled from JetStream: skipped while disconnected and bounded,
            // so a scrape during an outage still returns the other metrics.
            if self.client.connection_state() != async_nats::connection::State::Connected {
                return;
            }
            if tokio::time::timeout(REFRESH_TIMEOUT, self.sample()).await.is_err() {
                warn!("sampling jobs pending and projector lag timed out");
            }
        })
    }
}

/// How long `/metrics` waits for the gauges sampled from JetStream.
const REFRESH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl CoordinatorProbe {
    async fn sample(&self) {
        {
            let metrics = runfleet_ops::metrics::get();
            let mut consumers = self.jobs.consumers();
            while let Some(Ok(info)) = consumers.next().await {
                if let Some((queue, band)) = self.names.parse_job_consumer(&info.name) {
                    let pending = i64::try_from(info.num_pending).unwrap_or(i64::MAX);
                    metrics.jobs_pending.with_label_values(&[queue.as_str(), &band.to_string()]).set(pending);
                }
            }
            // The same on every replica: the stream's last sequence minus
            // the position stored in the registry.
            match projector::lag(&self.events, &self.registry, &self.names).await {
                Ok(lag) => metrics.projector_lag.set(i64::try_from(lag).unwrap_or(i64::MAX)),
                Err(error) => warn!(error = %error, "could not sample the projector lag"),
            }
        }
    }
}

/// Awaits one component; when it ends (normally because `stop` was
/// cancelled) cancels `stop` so the others end too.
async fn supervise<E>(
    component: &'static str,
    task: tokio::task::JoinHandle<Result<(), E>>,
    shutdown: &CancellationToken,
    stop: &CancellationToken,
) -> Result<(), Error>
where
    Error: From<E>,
{
    let result = match task.await {
        Ok(result) => result.map_err(Error::from),
        Err(error) => Err(Error::Task { component, reason: error.to_string() }),
    };
    if !shutdown.is_cancelled() {
        match &result {
            Ok(()) => {
                warn!(component, "coordinator component stopped on its own; stopping the others")
            }
            Err(error) => {
                warn!(component, error = %error, "coordinator component failed; stopping the others")
            }
        }
    }
    stop.cancel();
    result
}
