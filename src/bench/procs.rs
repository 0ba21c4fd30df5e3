//! Worker and coordinator *processes* of the bench's fleets (the
//! `failover`, `drain` and `scale` scenarios): this very binary's `runfleet
//! worker --test-agents` and `runfleet coordinator`, each logging to a file
//! of the fleet's directory, SIGKILLed when dropped. They
//! run without the bench's `RUNFLEET_*` environment, so, like the
//! in-process parts of the fleet, they are configured by the bench's flags
//! alone. Also: the CPU time processes used ([`CpuMeter`]), from `/proc`.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::Signal;
use runfleet_protocol::WorkerId;
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::client::Client;

/// How long to wait for the worker processes to register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// The worker processes of one trial, in spawn order, SIGKILLed when
/// dropped (and by [`WorkerProcesses::kill_all`]).
#[derive(Default)]
pub(super) struct WorkerProcesses {
    children: Vec<Child>,
    heap_accounting: bool,
}

impl WorkerProcesses {
    /// Worker processes started with heap accounting on
    /// (`runfleet_ops::heap`), which `/metrics` then serves as
    /// `runfleet_heap_bytes`.
    pub fn with_heap_accounting() -> Self {
        Self { children: Vec::new(), heap_accounting: true }
    }

    /// Starts `runfleet worker --nats-url URL --slots SLOTS --test-agents
    /// EXTRA…` from this very binary, logging to `log`. Returns its index.
    pub fn spawn(&mut self, url: &str, log: &Path, slots: u32, extra: &[&str]) -> anyhow::Result<usize> {
        let exe = std::env::current_exe().context("could not find the runfleet binary")?;
        let log_file =
            std::fs::File::create(log).with_context(|| format!("could not create {}", log.display()))?;
        let slots = slots.to_string();
        let mut command = Command::new(&exe);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RUNFLEET_") {
                command.env_remove(name);
            }
        }
        if self.heap_accounting {
            command.env(runfleet_ops::heap::ENV, "1");
        }
        let child = command
            .args(["worker", "--nats-url", url, "--slots", &slots, "--test-agents"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("could not start {} worker", exe.display()))?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// Waits until every process is in the worker registry; returns their
    /// worker ids, in spawn order.
    pub async fn await_registered(&mut self, client: &Client) -> anyhow::Result<Vec<WorkerId>> {
        let pids: Vec<u32> = self.children.iter().filter_map(Child::id).collect();
        anyhow::ensure!(pids.len() == self.children.len(), "a worker process exited at start");
        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        loop {
            for child in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("a worker process exited at start ({status})");
                }
            }
            // The registry lists every worker of the fleet; ours are told
            // apart by pid (they all run on this host).
            let registered = client.workers().await.unwrap_or_default();
            let ids: Vec<Option<WorkerId>> = pids
                .iter()
                .map(|pid| registered.iter().find(|w| w.pid == *pid).map(|w| w.worker_id.clone()))
                .collect();
            if let Some(ids) = ids.into_iter().collect::<Option<Vec<_>>>() {
                return Ok(ids);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the worker processes did not register within {}s",
                REGISTER_TIMEOUT.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` to worker `index` without waiting for it to exit;
    /// returns the instant taken just before the signal was sent.
    pub fn signal(&mut self, index: usize, signal: Signal) -> anyhow::Result<Instant> {
        let child = self.children.get_mut(index).context("no such worker process")?;
        let pid = child.id().context("the worker process had already exited")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        let at = Instant::now();
        nix::sys::signal::kill(pid, signal)
            .with_context(|| format!("could not send {signal} to the worker"))?;
        Ok(at)
    }

    /// Waits for worker `index` to exit and reaps it. Cancel-safe.
    pub async fn wait(&mut self, index: usize) -> anyhow::Result<ExitStatus> {
        let child = self.children.get_mut(index).context("no such worker process")?;
        child.wait().await.context("could not reap the worker process")
    }

    /// SIGKILLs worker `index` and reaps it; returns the instant taken just
    /// before the signal was sent.
    pub async fn kill(&mut self, index: usize) -> anyhow::Result<Instant> {
        let at = self.signal(index, Signal::SIGKILL)?;
        self.wait(index).await?;
        Ok(at)
    }

    /// SIGKILLs and reaps every process still running.
    pub async fn kill_all(&mut self) {
        for child in &mut self.children {
            // An error means it is gone already.
            let _ = child.kill().await;
        }
    }
}

impl WorkerProcesses {
    /// The process id of worker `index`, while it runs.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.children.get(index).and_then(Child::id)
    }
}

/// How long to wait for a coordinator process to answer API requests.
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A coordinator *process* of a bench fleet (the `scale` scenario, which
/// measures its memory apart from the workers' and nats-server's): this
/// very binary's `runfleet coordinator` on a SQLite registry, logging to a
/// file of the fleet's directory, SIGKILLed when dropped. Like the worker
/// processes it runs without the bench's `RUNFLEET_*` environment.
pub(super) struct CoordinatorProcess {
    child: Child,
    log: std::path::PathBuf,
}

impl CoordinatorProcess {
    /// Starts `runfleet coordinator --nats-url URL --database-url
    /// sqlite:DATABASE --lease-ttl TTL` from this very binary, logging to
    /// `log`.
    pub fn spawn(url: &str, database: &Path, lease_ttl: Duration, log: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("could not find the runfleet binary")?;
        let log_file =
            std::fs::File::create(log).with_context(|| format!("could not create {}", log.display()))?;
        let mut command = Command::new(&exe);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RUNFLEET_") {
                command.env_remove(name);
            }
        }
        let database_url = format!("sqlite:{}", database.display());
        let lease_ttl = humantime_serde::re::humantime::format_duration(lease_ttl).to_string();
        let child = command
            .args([
                "coordinator",
                "--nats-url",
                url,
                "--database-url",
                &database_url,
                "--lease-ttl",
                &lease_ttl,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("could not start {} coordinator", exe.display()))?;
        Ok(Self { child, log: log.to_path_buf() })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits until the coordinator answers API requests: by then it has
    /// created the fleet's streams and buckets. A `get` of a run that does
    /// not exist is the probe; any typed answer means it is serving.
    pub async fn await_serving(&mut self, client: &Client) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + SERVE_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "the coordinator process exited at start ({status}); see {}",
                    self.log.display()
                );
            }
            match client.get(runfleet_protocol::RunId::generate()).await {
                Ok(_) | Err(crate::client::Error::Api(_)) => return Ok(()),
                Err(_) => {}
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the coordinator process did not serve the API within {}s; see {}",
                SERVE_TIMEOUT.as_secs(),
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs and reaps the process, if it still runs.
    pub async fn kill(&mut self) {
        // An error means it is gone already.
        let _ = self.child.kill().await;
    }
}

/// utime + stime of a process (all its threads), clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("could not read {path}"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("{path} is not in the expected format"))
}

/// Fields 14 and 15 (utime, stime) of a `/proc/<pid>/stat` line. The
/// command name (field 2, in parentheses) may hold spaces, so fields are
/// counted from the last `)`: the next one is field 3.
pub(super) fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of `/proc/<pid>/stat` and where the figure came
/// from: `getconf CLK_TCK`, or assumed to be 100 (Linux's usual USER_HZ).
pub(super) fn clock_ticks() -> (u64, String) {
    let measured = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse::<u64>().ok())
        .filter(|ticks| *ticks > 0);
    match measured {
        Some(ticks) => (ticks, "getconf CLK_TCK".to_owned()),
        None => (100, "assumed".to_owned()),
    }
}

/// Clock ticks per second of `/proc/<pid>/stat`.
pub(super) struct CpuClock {
    ticks_per_sec: u64,
}

impl CpuClock {
    pub fn read() -> Self {
        Self { ticks_per_sec: clock_ticks().0 }
    }
}

/// Measures the CPU this process and nats-server use.
pub(super) struct CpuMeter<'a> {
    pub clock: &'a CpuClock,
    pub nats_pid: u32,
}

/// CPU times at a moment, clock ticks.
pub(super) struct CpuMark {
    at: Instant,
    process: u64,
    nats_server: u64,
}

/// CPU used over a stretch of time, in cores (1.0 = one core busy).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuUse {
    /// The bench's process: the in-process worker and coordinator (with the
    /// projector and SQLite), the bench's producers and its subscriber.
    pub process_cores: f64,
    pub nats_server_cores: f64,
}

/// CPU time per run over a measured window, milliseconds: what a run costs
/// the machine, which (unlike runs/s or a latency) does not depend on how
/// busy the machine was with other work, only on how the runs were batched.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuPerRun {
    /// The bench's process: the in-process fleet (or the floor's client)
    /// and the bench's own submitter and subscriber.
    pub process_ms: f64,
    pub nats_server_ms: f64,
}

impl CpuPerRun {
    pub fn total_ms(&self) -> f64 {
        self.process_ms + self.nats_server_ms
    }
}

impl CpuMeter<'_> {
    pub fn mark(&self) -> anyhow::Result<CpuMark> {
        Ok(CpuMark {
            at: Instant::now(),
            process: cpu_ticks(std::process::id())?,
            nats_server: cpu_ticks(self.nats_pid)?,
        })
    }

    pub fn since(&self, began: &CpuMark) -> anyhow::Result<CpuUse> {
        let now = self.mark()?;
        let ticks = now.at.duration_since(began.at).as_secs_f64() * self.clock.ticks_per_sec as f64;
        let cores = |from: u64, to: u64| to.saturating_sub(from) as f64 / ticks;
        Ok(CpuUse {
            process_cores: cores(began.process, now.process),
            nats_server_cores: cores(began.nats_server, now.nats_server),
        })
    }

    /// CPU per run since `began`, for `runs` runs.
    pub fn per_run(&self, began: &CpuMark, runs: u32) -> anyhow::Result<CpuPerRun> {
        let now = self.mark()?;
        let ms = |from: u64, to: u64| {
            to.saturating_sub(from) as f64 * 1000.0 / self.clock.ticks_per_sec as f64 / f64::from(runs.max(1))
        };
        Ok(CpuPerRun {
            process_ms: ms(began.process, now.process),
            nats_server_ms: ms(began.nats_server, now.nats_server),
        })
    }
}
