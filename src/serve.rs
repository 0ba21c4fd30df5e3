//! `runfleet coordinator` and `runfleet worker`: load the layered config,
//! start the component, run it until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use clap::Args;
use runfleet_coordinator::config::CoordinatorConfig;
use runfleet_coordinator::Coordinator;
use runfleet_ops::http::Health;
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
    /// Serve `/metrics`, `/healthz` and `/readyz` on HOST:PORT [default: not served].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    /// Load and validate the configuration (file, environment, flags), print
    /// it with secrets hidden and exit.
    #[arg(long)]
    #[serde(skip)]
    pub check: bool,
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
    /// Serve `/metrics`, `/healthz` and `/readyz` on HOST:PORT [default: not served].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    /// Load and validate the configuration (file, environment, flags), print
    /// it with secrets hidden and exit.
    #[arg(long)]
    #[serde(skip)]
    pub check: bool,
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

/// Says so when the runtime kept tokio's LIFO slot ([`runfleet_ops::runtime`]):
/// it works, but every NATS connection writes in smaller chunks.
fn warn_if_lifo_slot() {
    if runfleet_ops::runtime::lifo_slot().unwrap_or(true) {
        tracing::warn!(
            "tokio's LIFO slot is on ({}=1, or a build without --cfg tokio_unstable): \
             NATS writes are batched less and each run costs more CPU",
            runfleet_ops::runtime::LIFO_SLOT_ENV
        );
    }
}

pub async fn coordinator(file: Option<&Path>, args: CoordinatorArgs) -> anyhow::Result<()> {
    let config = coordinator_config(file, &args)?;
    if args.check {
        return print_checked(&config);
    }
    let telemetry = runfleet_ops::telemetry::init(&config.telemetry, "runfleet-coordinator", "info")?;
    let metrics = runfleet_ops::metrics::get();
    metrics.set_component("coordinator");
    warn_if_lifo_slot();
    let shutdown = shutdown_on_signals();
    let health = Health::new();
    let endpoint = serve_endpoint(config.metrics_addr, &health).await?;
    health.starting(format!(
        "connecting to NATS at {} and the registry",
        runfleet_ops::nats::redact_url(&config.nats_url)
    ));
    let started = tokio::select! {
        started = Coordinator::start(config) => started.context("coordinator failed to start")?,
        () = shutdown.cancelled() => return stop(endpoint, telemetry).await,
    };
    health.set_probe(started.probe());
    let result = started.run(shutdown.clone()).await.context("coordinator stopped with an error");
    health.stopping();
    stop(endpoint, telemetry).await?;
    result
}

pub async fn worker(file: Option<&Path>, args: WorkerArgs) -> anyhow::Result<()> {
    let config = worker_config(file, &args)?;
    if args.check {
        return print_checked(&config);
    }
    let telemetry = runfleet_ops::telemetry::init(&config.telemetry, "runfleet-worker", "info")?;
    runfleet_ops::metrics::get().set_component("worker");
    warn_if_lifo_slot();
    let shutdown = shutdown_on_signals();
    let health = Health::new();
    let endpoint = serve_endpoint(config.metrics_addr, &health).await?;
    health.starting(format!(
        "connecting to NATS at {} and waiting for the fleet's streams",
        runfleet_ops::nats::redact_url(&config.nats_url)
    ));
    let started = tokio::select! {
        started = Worker::start(config, args.agents()) => started.context("worker failed to start")?,
        () = shutdown.cancelled() => return stop(endpoint, telemetry).await,
    };
    health.set_probe(started.probe());
    // Not ready once draining starts: no new work should be routed here.
    let draining = shutdown.clone();
    let drain_health = health.clone();
    tokio::spawn(async move {
        draining.cancelled().await;
        drain_health.stopping();
    });
    let result = started.run(shutdown.clone()).await.context("worker stopped with an error");
    stop(endpoint, telemetry).await?;
    result
}

/// A running operations endpoint: its task and the token that stops it.
type Endpoint = Option<(tokio::task::JoinHandle<Result<(), runfleet_ops::http::Error>>, CancellationToken)>;

/// Binds `/metrics`, `/healthz` and `/readyz` on `addr` (if set) before
/// anything connects, so probes answer while NATS is still unreachable.
async fn serve_endpoint(addr: Option<SocketAddr>, health: &Health) -> anyhow::Result<Endpoint> {
    let Some(addr) = addr else { return Ok(None) };
    let server = runfleet_ops::http::Server::bind(addr, health.clone()).await?;
    tracing::info!(addr = %server.local_addr().unwrap_or(addr), "serving /metrics, /healthz and /readyz");
    // Its own token: it keeps answering (not ready) while the component
    // drains, and stops after it.
    let stop = CancellationToken::new();
    Ok(Some((tokio::spawn(server.run(stop.clone())), stop)))
}

/// Stops the endpoint and flushes the spans still buffered.
async fn stop(endpoint: Endpoint, telemetry: runfleet_ops::telemetry::Telemetry) -> anyhow::Result<()> {
    if let Some((task, stop)) = endpoint {
        stop.cancel();
        match task.await {
            Ok(result) => result?,
            Err(error) => tracing::warn!(%error, "operations endpoint task failed"),
        }
    }
    telemetry.shutdown().await;
    Ok(())
}

/// `--check`: the effective configuration as TOML-like JSON, secrets hidden.
fn print_checked<C: Serialize>(config: &C) -> anyhow::Result<()> {
    let mut value = serde_json::to_value(config)?;
    hide_secrets(&mut value);
    println!("{}", serde_json::to_string_pretty(&value)?);
    eprintln!("configuration is valid");
    Ok(())
}

/// Replaces passwords, tokens, seeds and database passwords with `***`.
fn hide_secrets(value: &mut serde_json::Value) {
    if let Some(nats) = value.get_mut("nats").and_then(|n| n.as_object_mut()) {
        for key in ["password", "token", "nkey_seed"] {
            if let Some(v) = nats.get_mut(key) {
                *v = "***".into();
            }
        }
    }
    if let Some(url) = value.get_mut("nats_url") {
        if let Some(text) = url.as_str() {
            *url = runfleet_ops::nats::redact_url(text).into();
        }
    }
    if let Some(url) = value.get_mut("database_url") {
        if let Some(text) = url.as_str() {
            *url = hide_url_password(text).into();
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn hide_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((credentials, host)) = rest.rsplit_once('@') else { return url.to_owned() };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_passwords_are_hidden() {
        assert_eq!(hide_url_password("postgres://rf:s3cret@db:5432/rf"), "postgres://rf:***@db:5432/rf");
        assert_eq!(hide_url_password("sqlite:runfleet.db"), "sqlite:runfleet.db");
        let mut v =
            serde_json::json!({"nats": {"password": "p", "user": "u"}, "database_url": "postgres://a:b@c/d"});
        hide_secrets(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"nats": {"password": "***", "user": "u"}, "database_url": "postgres://a:***@c/d"})
        );
    }
}
