//! `runfleet dev`: the whole fleet in one command on one machine — a child
//! nats-server, a coordinator on SQLite and N workers — stopped cleanly on
//! Ctrl-C or SIGTERM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use runfleet_coordinator::Coordinator;
use runfleet_worker::Worker;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::embedded::EmbeddedNats;
use crate::serve::{self, CoordinatorArgs, WorkerArgs};

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Where nats-server's JetStream store, its log and the SQLite registry live.
    #[arg(long, default_value = ".runfleet")]
    pub data_dir: PathBuf,
    /// Port of the child nats-server.
    #[arg(long, default_value_t = 4222)]
    pub nats_port: u16,
    /// Workers to start.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Slots per worker.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
}

/// In-process components (a coordinator, workers) running as tasks under one
/// shutdown token, stopped together. Shared by `dev` and `bench`.
#[derive(Default)]
pub struct Components {
    shutdown: CancellationToken,
    tasks: JoinSet<(String, anyhow::Result<()>)>,
}

impl Components {
    /// How long components get to drain before [`Components::stop`] gives up.
    const STOP_TIMEOUT: Duration = Duration::from_secs(30);

    pub fn spawn_coordinator(&mut self, coordinator: Coordinator) {
        let token = self.shutdown.clone();
        self.tasks.spawn(async move {
            ("coordinator".to_owned(), coordinator.run(token).await.map_err(Into::into))
        });
    }

    pub fn spawn_worker(&mut self, worker: Worker) {
        let token = self.shutdown.clone();
        let name = format!("worker {}", worker.id());
        self.tasks.spawn(async move { (name, worker.run(token).await.map_err(Into::into)) });
    }

    /// Cancels every component and waits (bounded) for them to drain;
    /// returns what failed or did not stop.
    pub async fn stop(&mut self) -> Vec<String> {
        self.shutdown.cancel();
        let mut failed = Vec::new();
        let drained = tokio::time::timeout(Self::STOP_TIMEOUT, async {
            while let Some(joined) = self.tasks.join_next().await {
                match joined {
                    Ok((_, Ok(()))) => {}
                    Ok((name, Err(e))) => failed.push(format!("{name}: {e:#}")),
                    Err(e) => failed.push(format!("a component panicked: {e}")),
                }
            }
        })
        .await;
        if drained.is_err() {
            failed.push(format!("components did not stop within {}s", Self::STOP_TIMEOUT.as_secs()));
            self.tasks.shutdown().await;
        }
        failed
    }

    /// Resolves when a component stopped on its own (an error) before shutdown.
    pub async fn first_exit(&mut self) -> Option<(String, anyhow::Result<()>)> {
        match self.tasks.join_next().await? {
            Ok(result) => Some(result),
            Err(e) => Some(("a component".to_owned(), Err(anyhow::anyhow!("panicked: {e}")))),
        }
    }
}

/// Everything `dev` (and `bench runs`) starts, for orderly shutdown.
pub struct DevFleet {
    pub nats: EmbeddedNats,
    pub database_url: String,
    components: Components,
}

impl DevFleet {
    /// Starts nats-server, then the coordinator (which creates the streams and
    /// buckets), then the workers.
    pub async fn start(
        config_file: Option<&Path>,
        data_dir: &Path,
        nats_port: u16,
        workers: u32,
        slots: u32,
    ) -> anyhow::Result<Self> {
        let nats = EmbeddedNats::start(data_dir, nats_port).await?;
        let database_url = format!("sqlite:{}", data_dir.join("runfleet.db").display());
        let mut components = Components::default();

        let coordinator_args = CoordinatorArgs {
            nats_url: Some(nats.url()),
            database_url: Some(database_url.clone()),
            prefix: None,
            lease_ttl: None,
            metrics_addr: None,
            check: false,
        };
        let config = serve::coordinator_config(config_file, &coordinator_args)?;
        let coordinator = Coordinator::start(config).await.context("coordinator failed to start")?;
        components.spawn_coordinator(coordinator);

        for i in 0..workers {
            let worker_args = WorkerArgs {
                nats_url: Some(nats.url()),
                queues: Vec::new(),
                slots: Some(slots),
                prefix: None,
                shutdown_grace: None,
                handoff_timeout: None,
                metrics_addr: None,
                check: false,
                test_agents: false,
                test_journal: None,
                test_step_prefix: None,
            };
            let config = serve::worker_config(config_file, &worker_args)?;
            let worker = Worker::start(config, runfleet_worker::agents::builtin())
                .await
                .with_context(|| format!("worker {i} failed to start"))?;
            components.spawn_worker(worker);
        }
        Ok(Self { nats, database_url, components })
    }

    /// Cancels every component, waits for them (bounded), then stops nats-server.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let failed = self.components.stop().await;
        self.nats.stop().await;
        if failed.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("shutdown: {}", failed.join("; "))
        }
    }

    /// Resolves when a component stopped on its own (an error) before shutdown.
    pub async fn first_exit(&mut self) -> Option<(String, anyhow::Result<()>)> {
        self.components.first_exit().await
    }
}

pub async fn run(config_file: Option<&Path>, args: DevArgs) -> anyhow::Result<()> {
    let shutdown = serve::shutdown_on_signals();
    let mut fleet =
        DevFleet::start(config_file, &args.data_dir, args.nats_port, args.workers, args.slots).await?;
    eprintln!(
        "runfleet dev ready\n  nats      {}\n  registry  {}\n  workers   {} x {} slots\n  data      {}\nPress Ctrl-C to stop.",
        fleet.nats.url(),
        fleet.database_url,
        args.workers,
        args.slots,
        args.data_dir.display()
    );
    tokio::select! {
        _ = shutdown.cancelled() => {}
        exited = fleet.first_exit() => {
            if let Some((name, result)) = exited {
                // The first failure is the one to report; stopping the rest
                // may fail only as a consequence of it.
                let _ = fleet.stop().await;
                return Err(match result {
                    Ok(()) => anyhow::anyhow!("{name} stopped unexpectedly without an error"),
                    Err(error) => error.context(format!("{name} stopped unexpectedly")),
                });
            }
        }
    }
    eprintln!("stopping runfleet dev…");
    fleet.stop().await?;
    eprintln!("stopped");
    Ok(())
}
