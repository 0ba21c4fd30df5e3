//! The runfleet coordinator: the API service, submission and idempotency,
//! the SQL registry and the event projector.
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
//! ([`registry`]); [`Coordinator::run`] serves the API ([`api`]) and projects
//! events ([`projector`]) until cancelled. Any number of replicas may run
//! against the same NATS account and database.
//!
//! Architecture invariant: this is the only crate that talks SQL.

pub mod api;
pub mod config;
pub mod projector;
pub mod registry;
pub mod setup;

pub use config::CoordinatorConfig;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{Api, ApiLimits};
use crate::projector::Projector;
use crate::registry::Registry;

/// The coordinator could not start, or a component failed while running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; the message names the key.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// NATS is unreachable or refused the connection. Retryable.
    #[error("could not connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error(transparent)]
    Setup(#[from] setup::Error),
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(transparent)]
    Projector(#[from] projector::Error),
    #[error(transparent)]
    Api(#[from] api::Error),
    /// A component's task panicked: a bug.
    #[error("coordinator {component} task failed: {reason}")]
    Task { component: &'static str, reason: String },
}

/// A started coordinator replica: connected, topology ensured, registry
/// migrated. Call [`Coordinator::run`] to serve.
#[derive(Debug)]
pub struct Coordinator {
    client: async_nats::Client,
    registry: Registry,
    api: Api,
    projector: Projector,
}

impl Coordinator {
    /// Validates `config`, connects to NATS, creates or updates the streams
    /// and buckets, connects to the registry and applies its migrations.
    pub async fn start(config: CoordinatorConfig) -> Result<Self, Error> {
        config.validate()?;
        let names = config.names()?;
        let client = async_nats::ConnectOptions::new()
            .name("runfleet-coordinator")
            .connect(config.nats_url.as_str())
            .await
            .map_err(|source| Error::Connect { url: config.nats_url.clone(), source })?;
        let js = jetstream::new(client.clone());
        let topology = setup::ensure(&js, &names, &config).await?;
        let registry = Registry::connect(&config.database_url).await?;
        let projector =
            Projector::new(&topology.events, names.clone(), registry.clone(), config.projector_batch).await?;
        let limits = ApiLimits {
            max_input_bytes: config.max_input_bytes,
            default_max_attempts: config.default_max_attempts,
            concurrency: config.api_concurrency,
        };
        let api = Api::new(client.clone(), names, &topology, registry.clone(), limits);
        info!(prefix = %config.prefix, "coordinator started");
        Ok(Self { client, registry, api, projector })
    }

    /// The coordinator's NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The registry this coordinator projects into.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves the API and runs the projector until `shutdown` is cancelled,
    /// then stops in order: the API stops taking requests and answers those
    /// in flight, the projector finishes its batch, the NATS connection is
    /// flushed and the registry closed. If one component fails, the other is
    /// stopped too and the failure returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let stop = shutdown.child_token();
        let api = tokio::spawn(self.api.run(stop.clone()));
        let projector = tokio::spawn(self.projector.run(stop.clone()));
        let (api, projector) = tokio::join!(
            supervise("api", api, &shutdown, &stop),
            supervise("projector", projector, &shutdown, &stop),
        );
        if let Err(error) = self.client.flush().await {
            warn!(error = %error, "could not flush the nats connection");
        }
        self.registry.close().await;
        info!("coordinator stopped");
        api.and(projector)
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
