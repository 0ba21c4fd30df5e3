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
        let log = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("log file: {e}"));
        let stderr = log.reopen().unwrap_or_else(|e| panic!("log file: {e}"));
        let child = Command::new(runfleet_binary())
            .args(args)
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

/// A NATS server, a registry database, one coordinator and some workers, all
/// real processes.
pub struct Fleet {
    pub workers: Vec<RunfleetProcess>,
    pub coordinator: RunfleetProcess,
    pub db: TestDb,
    pub nats: NatsServer,
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
        let nats = NatsServer::start();
        let coordinator = RunfleetProcess::spawn("coordinator", &Self::coordinator_args(&nats, &db));
        let workers = (0..workers)
            .map(|i| {
                RunfleetProcess::spawn(&format!("worker-{i}"), &Self::worker_args(&nats, &["default"], slots))
            })
            .collect();
        let fleet = Self { workers, coordinator, db, nats };
        fleet.wait_ready().await;
        fleet
    }

    /// A client of this fleet for `tenant`.
    pub async fn client(&self, tenant: &str) -> runfleet::client::Client {
        let tenant = runfleet_protocol::TenantId::new(tenant).unwrap_or_else(|e| panic!("{e}"));
        runfleet::client::Client::connect(&self.nats.url(), tenant, runfleet_protocol::Names::default())
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"))
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
        self.workers.push(RunfleetProcess::spawn(&name, &Self::worker_args(&self.nats, queues, slots)));
    }

    /// A client command with this fleet's `--nats-url` appended.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut full: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        full.push("--nats-url".into());
        full.push(self.nats.url());
        run_cli(&full)
    }
}
