//! `runfleet coordinator` and `runfleet worker`: load the layered config,
//! start the component, run it until SIGINT/SIGTERM.

use std::path::Path;

use anyhow::Context as _;
use clap::Args;
use runfleet_coordinator::config::CoordinatorConfig;
use runfleet_coordinator::Coordinator;
use runfleet_worker::config::WorkerConfig;
use runfleet_worker::Worker;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config;

/// Flags of `runfleet coordinator`; each overrides the same key of the file and environment.
#[derive(Debug, Clone, Args, Serialize)]
pub struct CoordinatorArgs {
    /// NATS server URL [default: nats://127.0.0.1:4222].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// Registry database: `sqlite:PATH` or `postgres://…` [default: sqlite:runfleet.db].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Subject/stream prefix [default: runfleet].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Lease TTL, e.g. `15s`: how long a crashed worker's runs wait before
    /// another worker resumes them [default: 15s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<String>,
}

/// Flags of `runfleet worker`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct WorkerArgs {
    /// NATS server URL [default: nats://127.0.0.1:4222].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// Queue to serve; repeat for several [default: default].
    #[arg(long = "queue")]
    #[serde(rename = "queues", skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<String>,
    /// Concurrent runs [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Subject/stream prefix [default: runfleet].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// On SIGTERM, how long running runs may take to finish before they are
    /// handed off at their next step, e.g. `30s` [default: 10s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<String>,
    /// After the grace, how long runs get to reach a step boundary before
    /// they are stopped where they are and handed off [default: 10s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff_timeout: Option<String>,
    /// Also register the test agents: `crash` (aborts this worker), a
    /// `steps` agent that journals every step execution and `await` (waits
    /// for a signal with a timeout). For runfleet's own
    /// crash tests and `runfleet chaos`; never on a production fleet.
    #[arg(long)]
    #[serde(skip)]
    pub test_agents: bool,
    /// With --test-agents: the file the `steps` agent appends
    /// `<run> <step> <attempt> <worker> <fencing token>` lines to.
    #[arg(long, requires = "test_agents")]
    #[serde(skip)]
    pub test_journal: Option<std::path::PathBuf>,
    /// With --test-agents: the `steps` agent's step name prefix (default
    /// `step`); another prefix simulates changed agent code.
    #[arg(long, requires = "test_agents")]
    #[serde(skip)]
    pub test_step_prefix: Option<String>,
}

impl WorkerArgs {
    /// The agents this worker registers.
    pub fn agents(&self) -> runfleet_worker::Agents {
        if self.test_agents {
            runfleet_worker::agents::with_test_agents(runfleet_worker::agents::TestAgents {
                journal: self.test_journal.clone(),
                step_prefix: self.test_step_prefix.clone(),
            })
        } else {
            runfleet_worker::agents::builtin()
        }
    }
}

pub fn coordinator_config(file: Option<&Path>, flags: &CoordinatorArgs) -> anyhow::Result<CoordinatorConfig> {
    let config: CoordinatorConfig = config::load("coordinator", file, flags)?;
    config.validate().context("invalid coordinator configuration")?;
    Ok(config)
}

pub fn worker_config(file: Option<&Path>, flags: &WorkerArgs) -> anyhow::Result<WorkerConfig> {
    let config: WorkerConfig = config::load("worker", file, flags)?;
    config.validate().context("invalid worker configuration")?;
    Ok(config)
}

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            tracing::error!("could not install signal handlers; stop with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        cancel.cancel();
    });
    token
}

pub async fn coordinator(file: Option<&Path>, args: CoordinatorArgs) -> anyhow::Result<()> {
    let config = coordinator_config(file, &args)?;
    let shutdown = shutdown_on_signals();
    let coordinator = Coordinator::start(config).await.context("coordinator failed to start")?;
    coordinator.run(shutdown).await.context("coordinator stopped with an error")?;
    Ok(())
}

pub async fn worker(file: Option<&Path>, args: WorkerArgs) -> anyhow::Result<()> {
    let config = worker_config(file, &args)?;
    let shutdown = shutdown_on_signals();
    let worker = Worker::start(config, args.agents()).await.context("worker failed to start")?;
    worker.run(shutdown).await.context("worker stopped with an error")?;
    Ok(())
}
