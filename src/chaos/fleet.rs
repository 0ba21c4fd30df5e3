//! The fleet `runfleet chaos` abuses, and reading back what it stored.
//!
//! [`ChaosFleet`] is a child nats-server, an in-process coordinator and
//! worker *processes* (`runfleet worker --test-agents`, each with its own log
//! file), which it SIGKILLs and replaces, SIGSTOPs and SIGCONTs, and whose
//! nats-server it restarts on the same port and store; it also notices
//! workers (or the coordinator) that stop on their own. Its children are
//! killed when it is dropped.
//!
//! Once the workers are stopped, [`ChaosFleet::collect`] reads the events
//! stream, the checkpoints bucket and the side-effect journal into one
//! [`RunRecord`] per run, for the checker.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use runfleet_coordinator::config::CoordinatorConfig;
use runfleet_coordinator::Coordinator;
use runfleet_protocol::checkpoint::{Checkpoint, Fence};
use runfleet_protocol::names::parse_run_events_subject;
use runfleet_protocol::{codec, Names, RunId};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::check::{parse_journal, RunRecord, StoredCheckpoint, StoredFence};
use super::{ChaosArgs, Narrator, Progress, TICK};
use crate::client::Client;
use crate::embedded::{self, EmbeddedNats};

/// How long the workers may take to register at start.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
/// Upper bound on waiting for the next message when reading a stream.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The NATS KV header marking deletes and purges (a NATS name, not runfleet's).
const KV_OPERATION: &str = "KV-Operation";

/// A worker process of the chaos fleet, killed if dropped.
struct WorkerProcess {
    id: String,
    child: Child,
    log: PathBuf,
    /// Set while SIGSTOPped: when to SIGCONT it.
    paused_until: Option<Instant>,
}

impl WorkerProcess {
    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("worker process already reaped")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("could not send {signal} to {}", self.id))
    }
}

/// nats-server, an in-process coordinator and the worker processes, with
/// the tally of what was done to them and the problems seen meanwhile.
pub(super) struct ChaosFleet {
    pub(super) dir: PathBuf,
    exe: PathBuf,
    pub(super) names: Names,
    port: u16,
    pub(super) url: String,
    journal: PathBuf,
    slots: u32,
    /// `None` only while restarting.
    nats: Option<EmbeddedNats>,
    coordinator: Option<JoinHandle<Result<(), runfleet_coordinator::Error>>>,
    coordinator_stop: CancellationToken,
    workers: Vec<WorkerProcess>,
    /// Worker processes started so far (names the next one).
    spawned: u32,
    /// Workers ever SIGKILLed / SIGSTOPped.
    pub(super) killed: HashSet<String>,
    pub(super) paused: HashSet<String>,
    pub(super) kills: u32,
    pub(super) pauses: u32,
    pub(super) restarts: u32,
    pub(super) problems: Vec<String>,
}

impl ChaosFleet {
    /// Starts nats-server, the coordinator (which creates the streams and
    /// buckets, with the chaos' lease TTL) and the worker processes.
    pub(super) async fn start(args: &ChaosArgs, dir: &Path, narrator: &Narrator) -> anyhow::Result<Self> {
        let port = embedded::free_port()?;
        let nats = EmbeddedNats::start(dir, port).await?;
        let url = nats.url();
        let config = CoordinatorConfig {
            nats_url: url.clone(),
            database_url: format!("sqlite:{}", dir.join("runfleet.db").display()),
            lease_ttl: args.lease_ttl,
            // Workers refresh their registry entry (and its `running`
            // count, which picks whom to pause) every third of this.
            worker_ttl: Duration::from_secs(3),
            ..Default::default()
        };
        config.validate().context("invalid coordinator configuration")?;
        let coordinator = Coordinator::start(config).await.context("coordinator failed to start")?;
        let coordinator_stop = CancellationToken::new();
        let coordinator = tokio::spawn(coordinator.run(coordinator_stop.clone()));
        narrator.say(format!("nats-server on {url}, coordinator started"));

        let mut fleet = Self {
            dir: dir.to_path_buf(),
            exe: std::env::current_exe().context("cannot find the runfleet executable")?,
            names: Names::default(),
            port,
            url,
            journal: dir.join("journal.txt"),
            slots: args.slots,
            nats: Some(nats),
            coordinator: Some(coordinator),
            coordinator_stop,
            workers: Vec::new(),
            spawned: 0,
            killed: HashSet::new(),
            paused: HashSet::new(),
            kills: 0,
            pauses: 0,
            restarts: 0,
            problems: Vec::new(),
        };
        for _ in 0..args.workers {
            let worker = fleet.spawn_worker()?;
            fleet.workers.push(worker);
        }
        Ok(fleet)
    }

    /// Starts one worker process with the test agents, journaling to the
    /// shared journal, its id fixed (`chaos-w<n>`) so logs, events and the
    /// journal name the same process.
    fn spawn_worker(&mut self) -> anyhow::Result<WorkerProcess> {
        self.spawned += 1;
        let id = format!("chaos-w{}", self.spawned);
        let log = self.dir.join(format!("{id}.log"));
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("could not create {}", log.display()))?;
        let child = Command::new(&self.exe)
            .arg("worker")
            .args(["--nats-url", &self.url, "--slots", &self.slots.to_string(), "--test-agents"])
            .arg("--test-journal")
            .arg(&self.journal)
            .env("RUNFLEET_WORKER__WORKER_ID", &id)
            .env("RUST_LOG", std::env::var("RUNFLEET_CHAOS_WORKER_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("could not start worker {id}"))?;
        Ok(WorkerProcess { id, child, log, paused_until: None })
    }

    /// Waits until every worker registered, so the first kill hits a worker
    /// that has runs.
    pub(super) async fn wait_for_workers(&mut self, client: &Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            self.tick().await?;
            let live: HashSet<String> = client
                .workers()
                .await
                .map(|list| list.into_iter().map(|w| w.worker_id.to_string()).collect())
                .unwrap_or_default();
            if self.workers.iter().all(|w| live.contains(&w.id)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tails: Vec<String> =
                    self.workers.iter().map(|w| format!("--- {} ---\n{}", w.id, tail(&w.log, 20))).collect();
                bail!("workers did not register within {STARTUP_DEADLINE:?}:\n{}", tails.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Resumes paused workers whose pause is over, and replaces workers that
    /// exited without being killed (reported as a problem: a worker must
    /// survive anything the chaos does to the others and to the server).
    async fn tick(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for worker in &mut self.workers {
            if worker.paused_until.is_some_and(|until| now >= until) {
                worker.signal(Signal::SIGCONT)?;
                worker.paused_until = None;
            }
        }
        for i in 0..self.workers.len() {
            if let Some(status) = self.workers[i].child.try_wait()? {
                let worker = &self.workers[i];
                self.problems.push(format!(
                    "worker {} exited on its own ({status}); the end of its log:\n{}",
                    worker.id,
                    tail(&worker.log, 30)
                ));
                self.workers[i] = self.spawn_worker()?;
            }
        }
        if self.coordinator.as_ref().is_some_and(JoinHandle::is_finished) {
            if let Some(task) = self.coordinator.take() {
                let result = task.await;
                self.problems.push(format!("the coordinator stopped on its own: {result:?}"));
            }
        }
        Ok(())
    }

    /// Waits `duration`, ticking the fleet and polling the runs meanwhile.
    pub(super) async fn idle(&mut self, duration: Duration, progress: &mut Progress) -> anyhow::Result<()> {
        let until = Instant::now() + duration;
        loop {
            self.tick().await?;
            if self.nats.is_some() {
                progress.poll_if_due().await;
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            tokio::time::sleep(TICK.min(until - now)).await;
        }
    }

    fn running_workers(&self) -> Vec<usize> {
        (0..self.workers.len()).filter(|&i| self.workers[i].paused_until.is_none()).collect()
    }

    /// SIGKILLs a random running (not paused) worker and starts its
    /// replacement. Workers that were paused are spared while others are
    /// available, so a worker is seen going back to work after its SIGCONT
    /// (and a resume is attributed to one cause).
    pub(super) async fn kill_random(&mut self, rng: &mut StdRng) -> anyhow::Result<String> {
        let running = self.running_workers();
        let never_paused: Vec<usize> =
            running.iter().copied().filter(|&i| !self.paused.contains(&self.workers[i].id)).collect();
        let pool = if never_paused.is_empty() { running } else { never_paused };
        let Some(&i) = pool.choose(rng) else {
            bail!("no running worker to kill");
        };
        let victim = &mut self.workers[i];
        victim.signal(Signal::SIGKILL)?;
        victim.child.wait().await.with_context(|| format!("waiting for killed {}", victim.id))?;
        let victim = victim.id.clone();
        self.killed.insert(victim.clone());
        self.kills += 1;
        self.workers[i] = self.spawn_worker()?;
        Ok(format!("kill #{}: SIGKILL {victim}, started {}", self.kills, self.workers[i].id))
    }

    /// SIGSTOPs a random running worker for `pause`; `tick` SIGCONTs it.
    /// Prefers a worker the registry reports running something (pausing an
    /// idle one tests nothing). At least one worker keeps running (waits for
    /// a running pause to end if needed).
    pub(super) async fn pause_random(
        &mut self,
        rng: &mut StdRng,
        pause: Duration,
        client: &Client,
        progress: &mut Progress,
    ) -> anyhow::Result<String> {
        while self.running_workers().len() < 2 {
            self.idle(TICK, progress).await?;
        }
        let busy: HashSet<String> = client
            .workers()
            .await
            .map(|list| list.into_iter().filter(|w| w.running > 0).map(|w| w.worker_id.to_string()).collect())
            .unwrap_or_default();
        let running = self.running_workers();
        let busy: Vec<usize> =
            running.iter().copied().filter(|&i| busy.contains(&self.workers[i].id)).collect();
        let pool = if busy.is_empty() { running } else { busy };
        let Some(&i) = pool.choose(rng) else {
            bail!("no running worker to pause");
        };
        let worker = &mut self.workers[i];
        worker.signal(Signal::SIGSTOP)?;
        worker.paused_until = Some(Instant::now() + pause);
        self.paused.insert(worker.id.clone());
        self.pauses += 1;
        Ok(format!("pause #{}: SIGSTOP {} for {pause:?}", self.pauses, worker.id))
    }

    /// Stops nats-server (SIGTERM), keeps it down for `downtime`, and starts
    /// it again on the same port with the same store.
    pub(super) async fn restart_server(
        &mut self,
        downtime: Duration,
        progress: &mut Progress,
    ) -> anyhow::Result<String> {
        if let Some(nats) = self.nats.take() {
            nats.stop().await;
        }
        self.restarts += 1;
        // `EmbeddedNats::start` truncates its log: keep the previous one.
        let log = self.dir.join("nats-server.log");
        let kept = self.dir.join(format!("nats-server.{}.log", self.restarts));
        std::fs::rename(&log, &kept).with_context(|| format!("could not rename {}", log.display()))?;
        self.idle(downtime, progress).await?;
        self.nats = Some(EmbeddedNats::start(&self.dir, self.port).await.context("nats-server restart")?);
        Ok(format!("restart #{}: nats-server stopped, down {downtime:?}, started again", self.restarts))
    }

    /// Kills every worker (resuming a paused one first), so nothing writes
    /// while the fleet's state is read.
    pub(super) async fn stop_workers(&mut self) {
        for worker in &mut self.workers {
            if worker.paused_until.take().is_some() {
                let _ = worker.signal(Signal::SIGCONT);
            }
            let _ = worker.child.start_kill();
            let _ = worker.child.wait().await;
        }
    }

    /// Stops the coordinator (through its token) and nats-server.
    pub(super) async fn shutdown(mut self) {
        self.stop_workers().await;
        self.coordinator_stop.cancel();
        if let Some(task) = self.coordinator.take() {
            match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => eprintln!("chaos: the coordinator stopped with an error: {e:#}"),
                Ok(Err(e)) => eprintln!("chaos: the coordinator task failed: {e}"),
                Err(_) => eprintln!("chaos: the coordinator did not stop within 30s"),
            }
        }
        if let Some(nats) = self.nats.take() {
            nats.stop().await;
        }
    }

    /// Whether a worker is SIGSTOPped (until `tick` SIGCONTs it).
    pub(super) fn any_paused(&self) -> bool {
        self.workers.iter().any(|w| w.paused_until.is_some())
    }

    /// The log file of worker `id`.
    pub(super) fn worker_log(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }
}

/// The last `lines` lines of a file (empty if unreadable).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// Reading what the fleet stored
// ---------------------------------------------------------------------------

impl ChaosFleet {
    /// Reads the events, checkpoints and journal into a record per run of
    /// `runs`; what belongs to none of them (or cannot be placed) goes to
    /// `problems`. Call it once the workers are stopped, so nothing writes
    /// meanwhile.
    pub(super) async fn collect(
        &self,
        runs: &[RunId],
        problems: &mut Vec<String>,
    ) -> anyhow::Result<BTreeMap<RunId, RunRecord>> {
        let client = async_nats::ConnectOptions::new()
            .name("runfleet-chaos-checker")
            .connect(self.url.as_str())
            .await
            .context("connect to read the fleet's state")?;
        let js = jetstream::new(client);
        let mut records: BTreeMap<RunId, RunRecord> =
            runs.iter().map(|&run_id| (run_id, RunRecord::new(run_id))).collect();

        let events = js.get_stream(self.names.events_stream()).await.context("events stream")?;
        for message in read_stream(events).await.context("reading the events stream")? {
            let Some((_, run_id)) = parse_run_events_subject(&self.names, &message.subject) else {
                problems.push(format!("event on an unexpected subject {}", message.subject));
                continue;
            };
            let Some(record) = records.get_mut(&run_id) else {
                problems.push(format!("event of run {run_id}, which the chaos did not submit"));
                continue;
            };
            match runfleet_protocol::event::decode_log_message(&message.payload) {
                Ok(events) => {
                    for event in events {
                        if event.run_id == run_id {
                            record.events.push(event);
                        } else {
                            record.undecodable.push(format!(
                                "event at stream seq {} names run {} on run {run_id}'s subject",
                                message.sequence, event.run_id
                            ));
                        }
                    }
                }
                Err(e) => record.undecodable.push(format!("event at stream seq {}: {e}", message.sequence)),
            }
        }

        let checkpoints =
            js.get_key_value(self.names.checkpoints_bucket()).await.context("checkpoints bucket")?;
        for message in read_stream(checkpoints.stream).await.context("reading the checkpoints bucket")? {
            if message.deleted {
                continue;
            }
            let Some(key) = self.names.checkpoint_key_of(&message.subject) else {
                problems.push(format!("checkpoint on an unexpected subject {}", message.subject));
                continue;
            };
            let Some(run_id) = key.split_once('.').and_then(|(run, _)| run.parse::<RunId>().ok()) else {
                problems.push(format!("checkpoint key {key} names no run"));
                continue;
            };
            let Some(record) = records.get_mut(&run_id) else {
                problems.push(format!("checkpoint {key} of run {run_id}, which the chaos did not submit"));
                continue;
            };
            if let Some(index) = self.names.parse_checkpoint_step(run_id, key) {
                match codec::decode::<Checkpoint>(&message.payload) {
                    Ok(checkpoint) => record.checkpoints.push(StoredCheckpoint {
                        key_index: index,
                        stream_seq: message.sequence,
                        checkpoint,
                    }),
                    Err(e) => record.undecodable.push(format!("checkpoint {key}: {e}")),
                }
            } else if key == self.names.checkpoint_fence_key(run_id) {
                match codec::decode::<Fence>(&message.payload) {
                    Ok(fence) => record.fence = Some(StoredFence { stream_seq: message.sequence, fence }),
                    Err(e) => record.undecodable.push(format!("fence {key}: {e}")),
                }
            } else {
                record.undecodable.push(format!("unexpected checkpoint key {key}"));
            }
        }

        let journal = match std::fs::read_to_string(&self.journal) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("could not read {}", self.journal.display())),
        };
        let (executions, bad_lines) = parse_journal(&journal);
        for line in bad_lines {
            problems.push(format!("malformed journal line {line:?}"));
        }
        for execution in executions {
            match records.get_mut(&execution.run_id) {
                Some(record) => record.executions.push(execution),
                None => problems.push(format!(
                    "journal line of run {}, which the chaos did not submit",
                    execution.run_id
                )),
            }
        }
        Ok(records)
    }
}

/// One message read from a stream.
struct StoredMessage {
    subject: String,
    sequence: u64,
    /// A KV delete or purge marker.
    deleted: bool,
    payload: bytes::Bytes,
}

/// Every message of a stream, in order, through an ordered consumer. Fails
/// rather than returning a partial read (which would look like lost data).
async fn read_stream(mut stream: jetstream::stream::Stream) -> anyhow::Result<Vec<StoredMessage>> {
    let info = stream.info().await?;
    let (name, count, last) = (info.config.name.clone(), info.state.messages, info.state.last_sequence);
    if count == 0 {
        return Ok(Vec::new());
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await
        .with_context(|| format!("ordered consumer on {name}"))?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    loop {
        let message = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
            Ok(Some(message)) => message.with_context(|| format!("reading {name}"))?,
            Ok(None) => bail!("{name} ended after {} of {count} messages", out.len()),
            Err(_) => {
                bail!("{name}: no message for {READ_TIMEOUT:?} after {} of {count} messages", out.len())
            }
        };
        let sequence = message.info().map_err(|e| anyhow::anyhow!("{e}"))?.stream_sequence;
        let deleted = message.headers.as_ref().is_some_and(|h| h.get(KV_OPERATION).is_some());
        out.push(StoredMessage {
            subject: message.subject.to_string(),
            sequence,
            deleted,
            payload: message.payload.clone(),
        });
        if sequence >= last || out.len() as u64 >= count {
            return Ok(out);
        }
    }
}
