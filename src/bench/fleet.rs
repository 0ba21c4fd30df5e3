//! The fleet the `steps`, `signal`, `failover` and `drain` scenarios measure: a child
//! nats-server in a temp dir, an in-process coordinator on SQLite with a
//! chosen lease TTL, and in-process workers with the agents the scenario
//! registers. Like [`crate::dev::DevFleet`], but the coordinator's lease TTL
//! and the workers' agents are the bench's to choose, and nothing is read
//! from a config file or the environment, so a measurement depends only on
//! the bench's flags.

use std::time::Duration;

use anyhow::Context as _;
use runfleet_coordinator::registry::Registry;
use runfleet_coordinator::{Coordinator, CoordinatorConfig};
use runfleet_protocol::{AgentName, Names, TenantId};
use runfleet_worker::sdk::{async_trait, Agent, AgentError, RunContext, StepError};
use runfleet_worker::{Agents, Worker, WorkerConfig};
use serde_json::Value;
use tempfile::TempDir;

use crate::client::Client;
use crate::dev::Components;
use crate::embedded::{self, EmbeddedNats};

/// The lease TTL of fleets whose scenario does not study it: the default.
pub(super) const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
/// The name [`Noop`] is registered under.
pub(super) const NOOP_AGENT: &str = "bench_noop";

/// The built-in agents and [`Noop`].
pub(super) fn noop_agents() -> Agents {
    let mut agents = runfleet_worker::agents::builtin();
    if let Ok(name) = AgentName::new(NOOP_AGENT) {
        agents.register(name, Noop);
    }
    agents
}

/// The one-step no-op agent of `throughput` and `latency`: one durable step
/// that does nothing, output `null`.
struct Noop;

#[async_trait]
impl Agent for Noop {
    async fn run(&self, ctx: &mut RunContext, _input: Value) -> Result<Value, AgentError> {
        ctx.step("noop", |_| async { Ok::<_, StepError>(Value::Null) }).await
    }
}

pub(super) struct Fleet {
    // Dropped in this order: the server (killed on drop) before its store.
    nats: EmbeddedNats,
    components: Components,
    registry: Registry,
    data: TempDir,
}

impl Fleet {
    /// Starts nats-server, then the coordinator with `lease_ttl` (which
    /// creates the streams and buckets). No workers yet.
    pub async fn start(lease_ttl: Duration) -> anyhow::Result<Self> {
        let data = tempfile::tempdir().context("could not create a temp dir for the bench fleet")?;
        let nats = EmbeddedNats::start_monitored(data.path(), embedded::free_port()?).await?;
        let config = CoordinatorConfig {
            nats_url: nats.url(),
            database_url: format!("sqlite:{}", data.path().join("runfleet.db").display()),
            lease_ttl,
            ..CoordinatorConfig::default()
        };
        let coordinator = Coordinator::start(config).await.context("coordinator failed to start")?;
        let registry = coordinator.registry().clone();
        let mut components = Components::default();
        components.spawn_coordinator(coordinator);
        Ok(Self { nats, components, registry, data })
    }

    /// The coordinator's registry (its connection pool).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// nats-server's message and byte counters since it started.
    pub async fn traffic(&self) -> anyhow::Result<embedded::Traffic> {
        self.nats.traffic().await
    }

    /// nats-server's process id, while it runs.
    pub fn nats_pid(&self) -> Option<u32> {
        self.nats.pid()
    }

    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// Where the fleet's files (nats-server's store and log, the registry)
    /// live until the fleet is dropped.
    pub fn dir(&self) -> &std::path::Path {
        self.data.path()
    }

    /// Keeps the fleet's files (worker and nats-server logs) after it is
    /// stopped or dropped, for a failure to be investigated.
    pub fn keep_files(&mut self) {
        self.data.disable_cleanup(true);
    }

    /// Starts an in-process worker serving the default queue with `agents`.
    pub async fn add_worker(&mut self, slots: u32, agents: Agents) -> anyhow::Result<()> {
        let config = WorkerConfig { nats_url: self.url(), slots, ..WorkerConfig::default() };
        let worker = Worker::start(config, agents).await.context("worker failed to start")?;
        self.components.spawn_worker(worker);
        Ok(())
    }

    /// A client of the default tenant.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.url(), TenantId::default_tenant(), Names::default()).await?)
    }

    /// Cancels every component, waits for them (bounded), then stops
    /// nats-server. Reports components that failed or did not stop.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let failed = self.components.stop().await;
        self.nats.stop().await;
        anyhow::ensure!(failed.is_empty(), "bench fleet shutdown: {}", failed.join("; "));
        Ok(())
    }
}
