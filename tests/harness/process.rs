//! Real `runfleet` processes (coordinator, workers, CLI) started from the
//! binary cargo built for this test run, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::{NatsServer, TestDb};

pub fn runfleet_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_runfleet"))
}

/// A long-running `runfleet` subcommand (coordinator or worker).
pub struct RunfleetProcess {
    pub name: String,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl RunfleetProcess {
    pub fn spawn(name: &str, args: &[String]) -> Self {
        Self::spawn_with_env(name, args, &[])
    }

    /// [`RunfleetProcess::spawn`] with extra environment variables.
    pub fn spawn_with_env(name: &str, args: &[String], env: &[(String, String)]) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("log file: {e}"));
        let stderr = log.reopen().unwrap_or_else(|e| panic!("log file: {e}"));
        let child = Command::new(runfleet_binary())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn runfleet {args:?}: {e}"));
        Self { name: name.to_owned(), child: Some(child), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends a signal (e.g. `libc::SIGKILL`, `SIGTERM`, `SIGSTOP`, `SIGCONT`).
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            let pid = i32::try_from(child.id()).unwrap_or_else(|e| panic!("pid: {e}"));
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status()
                .unwrap_or_else(|e| panic!("kill: {e}"));
            assert!(status.success(), "kill -{signal} {pid} failed");
        }
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|child| matches!(child.try_wait(), Ok(Some(_))))
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The process's stderr so far (its logs).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for RunfleetProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("---- {} logs ----\n{}", self.name, self.logs());
            }
        }
    }
}

/// Runs a client command to completion.
pub fn run_cli(args: &[String]) -> Output {
    Command::new(runfleet_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run runfleet {args:?}: {e}"))
}

/// How [`Fleet::start_with`] configures the fleet.
#[derive(Debug, Clone, Default)]
pub struct FleetOptions {
    pub workers: usize,
    pub slots: u32,
    /// The coordinator's `--lease-ttl` (e.g. `"2s"`); the default when `None`.
    pub lease_ttl: Option<String>,
    /// Workers register the test agents (`crash`, journaling `steps`).
    pub test_agents: bool,
    /// With `test_agents`: the journal the `steps` agent appends to.
    pub journal: Option<PathBuf>,
    /// Extra environment of the coordinator, e.g.
    /// `RUNFLEET_COORDINATOR__RECOVERY_INTERVAL`.
    pub coordinator_env: Vec<(String, String)>,
    /// Extra arguments of every worker, e.g. `--shutdown-grace 1s`.
    pub worker_args: Vec<String>,
    /// Extra environment of every worker, e.g. `RUNFLEET_WORKER__ACK_WAIT`.
    pub worker_env: Vec<(String, String)>,
}

/// A NATS server, a registry database, one coordinator and some workers, all
/// real processes.
pub struct Fleet {
    pub workers: Vec<RunfleetProcess>,
    pub coordinator: RunfleetProcess,
    pub db: TestDb,
    pub nats: NatsServer,
    /// Extra arguments every worker of this fleet gets.
    worker_extra: Vec<String>,
    /// Extra environment every worker of this fleet gets.
    worker_env: Vec<(String, String)>,
    /// How the coordinator was started, to restart it the same way.
    coordinator_args: Vec<String>,
    coordinator_env: Vec<(String, String)>,
}

impl Fleet {
    pub fn nats_url(&self) -> String {
        self.nats.url()
    }

    /// The coordinator command line for this fleet.
    pub fn coordinator_args(nats: &NatsServer, db: &TestDb) -> Vec<String> {
        vec!["coordinator".into(), "--nats-url".into(), nats.url(), "--database-url".into(), db.url.clone()]
    }

    /// A worker command line serving `queues` with `slots` slots.
    pub fn worker_args(nats: &NatsServer, queues: &[&str], slots: u32) -> Vec<String> {
        let mut args =
            vec!["worker".into(), "--nats-url".into(), nats.url(), "--slots".into(), slots.to_string()];
        for q in queues {
            args.push("--queue".into());
            args.push((*q).into());
        }
        args
    }

    /// Starts nats-server, the coordinator and `workers` workers serving the
    /// `default` queue, and waits until the coordinator answers and every
    /// worker has registered.
    pub async fn start(db: TestDb, workers: usize, slots: u32) -> Self {
        Self::start_with(db, FleetOptions { workers, slots, ..Default::default() }).await
    }

    /// [`Fleet::start`] with a lease TTL and test agents.
    pub async fn start_with(db: TestDb, options: FleetOptions) -> Self {
        let nats = NatsServer::start();
        let mut coordinator_args = Self::coordinator_args(&nats, &db);
        if let Some(ttl) = &options.lease_ttl {
            coordinator_args.extend(["--lease-ttl".to_owned(), ttl.clone()]);
        }
        let coordinator =
            RunfleetProcess::spawn_with_env("coordinator", &coordinator_args, &options.coordinator_env);
        let mut worker_extra = options.worker_args.clone();
        if options.test_agents {
            worker_extra.push("--test-agents".to_owned());
            if let Some(journal) = &options.journal {
                worker_extra.extend(["--test-journal".to_owned(), journal.display().to_string()]);
            }
        }
        let mut fleet = Self {
            workers: Vec::new(),
            coordinator,
            db,
            nats,
            worker_extra,
            worker_env: options.worker_env,
            coordinator_args,
            coordinator_env: options.coordinator_env,
        };
        for _ in 0..options.workers {
            fleet.add_worker(&["default"], options.slots);
        }
        fleet.wait_ready().await;
        fleet
    }

    /// Kills the coordinator (SIGKILL) and starts a new one the same way.
    pub fn restart_coordinator(&mut self) {
        self.coordinator.signal(9);
        self.coordinator.wait_exit(Duration::from_secs(10));
        self.coordinator =
            RunfleetProcess::spawn_with_env("coordinator", &self.coordinator_args, &self.coordinator_env);
    }

    /// A client of this fleet for `tenant`.
    pub async fn client(&self, tenant: &str) -> runfleet::client::Client {
        let tenant = runfleet_protocol::TenantId::new(tenant).unwrap_or_else(|e| panic!("{e}"));
        runfleet::client::Client::connect(&self.nats.url(), tenant, runfleet_protocol::Names::default())
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"))
    }

    /// Submits a run of `agent` with `input` to the default queue of the
    /// `default` tenant, with every other field left to the coordinator.
    pub async fn submit(&self, agent: &str, input: serde_json::Value) -> runfleet_protocol::RunId {
        let request = runfleet_protocol::api::SubmitRequest {
            agent: agent.to_owned(),
            input,
            queue: None,
            priority: None,
            idempotency_key: None,
            max_attempts: None,
        };
        let client = self.client("default").await;
        client.submit(request).await.unwrap_or_else(|e| panic!("submit {agent}: {e}")).run_id
    }

    /// Waits (up to 60 s) until the coordinator answers and all workers are registered.
    pub async fn wait_ready(&self) {
        let client = self.client("default").await;
        let expected = self.workers.len();
        super::stream::eventually(Duration::from_secs(60), "the fleet to be ready", || {
            let client = client.clone();
            async move {
                client.list(runfleet_protocol::api::ListRequest::default()).await.ok()?;
                let live = if expected == 0 { 0 } else { client.workers().await.ok()?.len() };
                (live >= expected).then_some(())
            }
        })
        .await;
    }

    pub fn add_worker(&mut self, queues: &[&str], slots: u32) {
        let name = format!("worker-{}", self.workers.len());
        let mut args = Self::worker_args(&self.nats, queues, slots);
        args.extend(self.worker_extra.iter().cloned());
        self.workers.push(RunfleetProcess::spawn_with_env(&name, &args, &self.worker_env));
    }

    /// The index in `workers` of the process registered as `worker_id`.
    pub async fn worker_index(&self, worker_id: &runfleet_protocol::WorkerId) -> Option<usize> {
        let infos = self.client("default").await.workers().await.ok()?;
        let pid = infos.iter().find(|w| &w.worker_id == worker_id)?.pid;
        self.workers.iter().position(|w| w.pid() == pid)
    }

    /// A client command with this fleet's `--nats-url` appended.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut full: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        full.push("--nats-url".into());
        full.push(self.nats.url());
        run_cli(&full)
    }
}
