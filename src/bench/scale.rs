//! The `scale` scenario: what many runs in flight cost the fleet, in memory
//! and in heartbeat traffic, and where per-run heartbeats stop scaling.
//!
//! Each trial starts a fleet of its own out of separate *processes*, so
//! that each component's memory and CPU can be read from `/proc`: a child
//! nats-server, this binary's `runfleet coordinator` (SQLite registry,
//! lease TTL [`LEASE_TTL`], so the workers' heartbeat period, a third of
//! it, fits short windows) and [`WORKERS`] `runfleet worker --test-agents`
//! processes with `⌈--scale-running / 2⌉ +` [`SLOT_HEADROOM`] slots each.
//! Then, on the same fleet:
//!
//! 1. **Idle.** RSS (`VmRSS`) of every process, and a heartbeat window
//!    (below): the baseline.
//! 2. **Running.** `--scale-running` runs of the built-in `sleep` agent
//!    (one step of an hour: each holds a slot and its lease for the whole
//!    trial), submitted in two halves; after each half, once every run of
//!    it has `run.started` and a lease (written by the heartbeat's first
//!    beat: a submission's first claim takes none before), the RSS again. Then a heartbeat
//!    window. Worker bytes per running run are (RSS − idle RSS) / runs,
//!    which also counts what claiming left in the allocator (an upper
//!    bound), and the *marginal* figure of the second half alone, (RSS −
//!    RSS at half) / second half, which such one-time growth does not
//!    inflate. Target (from the issue tracker): ≤ 64 KiB per running run.
//! 3. **Waiting.** With the running runs still held, `--scale-runs` runs of
//!    the test agent `await` (a key of their own, no timeout: they wait for
//!    a signal that never comes), again in two halves, each complete once
//!    every run of it has `run.waiting`, none of them is left in the
//!    leases bucket and the jobs stream holds the running runs' jobs alone
//!    (the worker releases the lease, if the run had one yet, and acks the
//!    job after `run.waiting`, so only then is a run parked). RSS after each half, then a heartbeat
//!    window, and the sizes (messages, bytes) of the events and jobs
//!    streams and of the checkpoints, leases, control and signals buckets,
//!    with every run in flight. Target: nothing per waiting run. RSS says
//!    little about that: having claimed and parked thousands of runs, a
//!    worker's allocator keeps some of what that took, and RSS moves by
//!    pages, so the RSS growth per run swings by ±1.5 KB between trials.
//!    The workers therefore run with heap accounting
//!    (`RUNFLEET_HEAP_ACCOUNTING=1`, `runfleet_ops::heap`): the bench
//!    scrapes each one's `runfleet_heap_bytes`, the bytes its allocator
//!    has handed out and not taken back, exact and falling when memory is
//!    freed, alongside every RSS reading. The heap growth over the second
//!    half of the waiting runs, per run, is judged against
//!    [`WAITING_TARGET_BYTES`]; the growth over all of them (which also
//!    holds what the first claims grew once) is reported. As a control,
//!    as many `echo` runs as the second half are then run to completion:
//!    a finished run leaves nothing behind, so their growth per run is the
//!    noise. The RSS figures are reported as well (the marginal RSS figure
//!    minus the control's as "held by RSS").
//! 4. **Simulated leases.** The fleet is stopped. On a fresh nats-server
//!    (so that its memory and CPU are the simulation's alone) the bench
//!    makes a bucket ([`SIM_BUCKET`], configured like the leases bucket:
//!    one entry of history, file storage, `max_age` = the TTL) with the
//!    fleet's *default* lease TTL (15 s: heartbeat every 5 s), KV-creates
//!    `--simulated-leases` leases (real lease records under run-id keys)
//!    and renews every one of them by CAS update once per heartbeat period
//!    for [`SIM_ROUNDS`] periods, pipelined ([`SIM_IN_FLIGHT`] in flight,
//!    like a worker's heartbeat, which sends them all at once). It measures
//!    each round's duration against the period (a round longer than the
//!    period means heartbeats no longer keep up; one longer than the TTL
//!    loses leases, which are counted), the updates/s and the bytes/s its
//!    connection wrote and read (updates and PubAcks, protocol framing
//!    included), nats-server's CPU over the rounds, and its RSS and the
//!    bucket's stored bytes per lease once all are created. nats-server's
//!    CPU time per update then gives the lease count at which heartbeats
//!    alone would take one whole nats-server core at the default TTL:
//!    where per-run heartbeats stop scaling on this machine.
//!
//! A **heartbeat window** lasts [`WINDOW_PERIODS`] heartbeat periods. The
//! bench subscribes (core NATS) to the leases bucket's subjects,
//! `$KV.<bucket>.>`, where every lease write is published, and to
//! `$JS.ACK.>`, where in-progress acks (`+WPI`) go, and counts messages and
//! bytes (subject, reply, headers and payload) per second; lease writes of
//! waiting runs are counted apart (expected: none). CPU of nats-server, the
//! workers and the coordinator over the window is given in percent of one
//! core: the sum of every thread's time on a CPU
//! (`/proc/<pid>/task/<tid>/schedstat`, nanoseconds), or, if a thread
//! exited during the window (its time would be lost), utime + stime from
//! `/proc/<pid>/stat` (clock ticks, per second from `getconf CLK_TCK`, else
//! assumed 100: 10 ms steps, coarse over a few seconds). The bench's own
//! subscriptions add one delivery per heartbeat message to nats-server's
//! work.
//!
//! The figures asked for then follow: lease updates/s per 1,000 running
//! runs at the default TTL (1,000 / 5 s = 200, plus as many in-progress
//! acks), and the running runs one nats-server core can keep leased: from
//! the simulation (KV updates only) and from the fleet (a lease update and
//! an in-progress ack per run and period, nats-server's idle CPU
//! subtracted). Beyond that, what replaces per-run renewals (DESIGN.md's
//! suggestion) is one *session* lease per worker, renewed every period,
//! fencing all of the worker's runs (a run's lease is written once, naming
//! the session and its revision), so lease heartbeats cost O(workers), not
//! O(running runs); a lost session stops every run of the worker, as a
//! lost run lease stops one. The in-progress acks, one per running job and
//! period as well, need the same treatment (a longer ack wait, or the job
//! acked at claim and re-dispatched when its session expires).
//!
//! Every figure is reported as the median and range over `--repeat`
//! trials. The machine is usually shared and noisy; targets are reported,
//! never asserted.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use runfleet_coordinator::registry::Registry;
use runfleet_coordinator::{projector, CoordinatorConfig};
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::event::EventBody;
use runfleet_protocol::lease::Lease;
use runfleet_protocol::names::KV_SUBJECT_PREFIX;
use runfleet_protocol::{codec, time, Names, RunId, TenantId, WorkerId};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::procs::{clock_ticks, cpu_ticks, CoordinatorProcess, WorkerProcesses};
use super::{millis, progress, BenchArgs, Spread};
use crate::client::Client;
use crate::embedded::{self, EmbeddedNats};

/// The lease TTL of the trials' fleets: short, so that the heartbeat
/// period (a third of it) fits several times in a short window.
const LEASE_TTL: Duration = Duration::from_secs(3);
/// Worker processes per trial.
const WORKERS: usize = 2;
/// Slots per worker beyond its share of the running runs: what the
/// `await` runs are claimed and parked through while the running runs
/// hold the rest.
const SLOT_HEADROOM: u32 = 64;
/// How long each `sleep` run sleeps: far longer than a trial.
const SLEEP_MS: u64 = 3_600_000;
/// Submits in flight at once.
const SUBMIT_CONCURRENCY: usize = 256;
/// Heartbeat periods per heartbeat window.
const WINDOW_PERIODS: u32 = 3;
/// After a phase's runs are settled, how long to wait before reading RSS
/// (the projector and the allocator catch up).
const SETTLE: Duration = Duration::from_secs(1);
/// How long any one phase (submitting and settling one half) may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(180);
/// Target from the issue tracker: a worker's own state per running run.
const TARGET_BYTES_PER_RUNNING_RUN: f64 = 64.0 * 1024.0;
/// What counts as "nothing" per waiting run: the workers' heap growth
/// (heap accounting, exact to the byte asked for) over the second half of
/// the waiting runs, per run, up to this, less than a run id: no record of
/// any kind per waiting run stays in the worker. The growth over all of
/// them is reported too; it also holds what the first thousands of claims
/// grew once (maps' capacity, the libraries' caches) and will not grow
/// again, a few hundred KiB in all.
const WAITING_TARGET_BYTES: f64 = 16.0;
/// The simulated leases' bucket, the bench's own.
const SIM_BUCKET: &str = "bench-sim-leases";
/// Renewal rounds of the simulated leases, one per heartbeat period.
const SIM_ROUNDS: u32 = 3;
/// KV creates and updates of the simulation in flight at once.
const SIM_IN_FLIGHT: usize = 1024;
/// The payload of an in-progress ack (JetStream's `AckKind::Progress`).
const PROGRESS_ACK: &[u8] = b"+WPI";
/// Where JetStream acks are published: `$JS.ACK.<stream>.<consumer>.…`.
const JS_ACK_SUBJECTS: &str = "$JS.ACK.>";

/// The heartbeat period of a worker with default settings: a third of the
/// shorter of the lease TTL and the job ack wait, which defaults to the
/// lease TTL (`runfleet_worker`'s `heartbeat::period`).
fn heartbeat_period(lease_ttl: Duration) -> Duration {
    lease_ttl / 3
}

/// The coordinator's default lease TTL.
fn default_lease_ttl() -> Duration {
    CoordinatorConfig::default().lease_ttl
}

/// What the `scale` scenario measured: medians and ranges over the trials.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    pub repeat: u32,
    pub waiting_runs: u32,
    pub running_runs: u32,
    pub simulated_leases: u32,
    pub workers: usize,
    pub slots_per_worker: u32,
    pub lease_ttl_ms: f64,
    pub heartbeat_period_ms: f64,
    pub window_ms: f64,
    /// Clock ticks per second of `/proc/<pid>/stat`, and where that came
    /// from (`getconf CLK_TCK` or `assumed`).
    pub clock_ticks_per_sec: u64,
    pub clock_ticks_source: String,
    /// Resident memory of each component, MiB: idle, with the running
    /// runs, and with the waiting runs added.
    pub rss_idle_mib: RssSpread,
    pub rss_running_mib: RssSpread,
    pub rss_waiting_mib: RssSpread,
    /// Worker RSS growth per running run: over idle (an upper bound) and
    /// over the second half only (marginal).
    pub worker_bytes_per_running_run: Spread,
    pub worker_bytes_per_running_run_marginal: Spread,
    pub target_bytes_per_running_run: f64,
    /// The upper bound meets the target in the median trial.
    pub meets_running_target: bool,
    /// Worker RSS growth per waiting run: over the RSS before them, and
    /// over the second half only (marginal).
    pub worker_bytes_per_waiting_run: Spread,
    pub worker_bytes_per_waiting_run_marginal: Spread,
    /// Worker RSS growth per control run (as many as the second half, all
    /// finished): the allocator's drift over that many claims.
    pub worker_bytes_per_finished_run: Spread,
    /// Marginal per waiting run minus per finished run: an estimate from
    /// RSS of what the worker holds per waiting run, noisy (see
    /// [`WAITING_TARGET_BYTES`]).
    pub worker_bytes_held_per_waiting_run: Spread,
    /// The workers' heap growth (heap accounting) per running run over
    /// idle, per waiting run over the running runs, and per finished
    /// control run.
    pub worker_heap_bytes_per_running_run: Spread,
    pub worker_heap_bytes_per_waiting_run: Spread,
    /// Over the second half of the waiting runs only, which one-time
    /// growth (maps' capacity, the libraries' caches, sized by the peak of
    /// runs being claimed and parked at once) does not inflate: the figure
    /// judged.
    pub worker_heap_bytes_per_waiting_run_marginal: Spread,
    pub worker_heap_bytes_per_finished_run: Spread,
    pub waiting_target_bytes_per_run: f64,
    /// The marginal heap growth per waiting run is within the target in
    /// the median trial.
    pub meets_waiting_target: bool,
    /// Coordinator RSS growth (idle → everything in flight) per run.
    pub coordinator_bytes_per_run: Spread,
    /// nats-server RSS growth per running run and per waiting run.
    pub nats_bytes_per_running_run: Spread,
    pub nats_bytes_per_waiting_run: Spread,
    /// Heartbeat windows: idle, with the running runs, with the waiting
    /// runs added.
    pub window_idle: WindowSpread,
    pub window_running: WindowSpread,
    pub window_waiting: WindowSpread,
    /// Running runs / heartbeat period.
    pub expected_lease_updates_per_sec: f64,
    /// Lease writes of waiting runs seen in the waiting windows, summed
    /// over the trials (expected 0).
    pub lease_updates_of_waiting_runs: u64,
    /// Streams and buckets with every run in flight.
    pub streams: Vec<StreamSpread>,
    pub simulation: SimSpread,
    pub default_lease_ttl_ms: f64,
    pub default_heartbeat_period_ms: f64,
    /// Lease updates per second 1,000 running runs need at the default
    /// TTL (each with an in-progress ack besides).
    pub lease_updates_per_sec_per_1000_running: f64,
    /// Leases one nats-server core keeps renewed at the default TTL, from
    /// the simulation's CPU per update.
    pub leases_per_nats_core: Spread,
    /// Running runs one nats-server core keeps leased at the default TTL,
    /// from the fleet's CPU per heartbeat (lease update + in-progress ack,
    /// idle CPU subtracted).
    pub running_runs_per_nats_core: Spread,
    pub trials: Vec<ScaleTrial>,
}

/// RSS of each component, MiB, median and range over the trials.
#[derive(Debug, Clone, Serialize)]
pub struct RssSpread {
    pub coordinator: Spread,
    /// Both workers together.
    pub workers: Spread,
    pub nats_server: Spread,
    /// Both workers' heap (heap accounting), MiB.
    pub workers_heap: Spread,
}

/// A heartbeat window, median and range over the trials.
#[derive(Debug, Clone, Serialize)]
pub struct WindowSpread {
    pub lease_updates_per_sec: Spread,
    pub progress_acks_per_sec: Spread,
    /// Lease writes and in-progress acks together.
    pub bytes_per_sec: Spread,
    /// Percent of one core.
    pub nats_cpu_percent: Spread,
    pub workers_cpu_percent: Spread,
    pub coordinator_cpu_percent: Spread,
}

/// One stream or bucket, median and range over the trials.
#[derive(Debug, Clone, Serialize)]
pub struct StreamSpread {
    pub name: String,
    pub messages: Spread,
    pub bytes: Spread,
    /// Bytes over the runs in flight (running + waiting).
    pub bytes_per_run: Spread,
}

/// The simulated leases, median and range over the trials.
#[derive(Debug, Clone, Serialize)]
pub struct SimSpread {
    pub leases: u32,
    pub lease_ttl_ms: f64,
    pub period_ms: f64,
    pub rounds: u32,
    pub creates_per_sec: Spread,
    /// Each trial's longest renewal round.
    pub max_round_ms: Spread,
    /// Each trial's longest round over the period (> 1: heartbeats do not
    /// keep up).
    pub max_round_per_period: Spread,
    /// Every round of every trial took at most the period.
    pub keeps_up: bool,
    /// Leases lost (a failed CAS: the lease expired before its renewal),
    /// summed over the trials.
    pub lost: u64,
    pub updates_per_sec: Spread,
    /// What the bench's connection wrote and read on its socket per
    /// second: updates and their PubAcks, protocol framing included.
    pub bytes_per_sec: Spread,
    pub nats_cpu_percent: Spread,
    pub nats_cpu_us_per_update: Spread,
    /// nats-server RSS growth per lease created.
    pub nats_bytes_per_lease: Spread,
    /// The bucket's stream bytes per lease.
    pub stored_bytes_per_lease: Spread,
    /// The shortest TTL at which nats-server could renew the simulated
    /// leases with one core (3 × leases × CPU per update).
    pub min_ttl_for_leases_on_one_core_ms: Spread,
}

/// Resident memory of each component, bytes; and the workers' heap.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rss {
    pub coordinator: u64,
    /// Both workers together.
    pub workers: u64,
    pub nats_server: u64,
    /// Bytes both workers' allocators have handed out and not taken back
    /// (`runfleet_heap_bytes`, heap accounting on): unlike RSS it falls
    /// when memory is freed.
    pub workers_heap: i64,
}

/// What one heartbeat window counted.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Window {
    pub seconds: f64,
    pub lease_updates: u64,
    /// Lease writes of waiting runs (the waiting window only).
    pub lease_updates_of_waiting_runs: u64,
    pub progress_acks: u64,
    pub bytes: u64,
    pub lease_updates_per_sec: f64,
    pub progress_acks_per_sec: f64,
    pub bytes_per_sec: f64,
    pub nats_cpu_percent: f64,
    pub workers_cpu_percent: f64,
    pub coordinator_cpu_percent: f64,
    /// nats-server CPU over the window, seconds.
    pub nats_cpu_secs: f64,
}

/// One stream or bucket's size.
#[derive(Debug, Clone, Serialize)]
pub struct StreamSize {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
}

/// One trial's simulated leases.
#[derive(Debug, Clone, Serialize)]
pub struct SimTrial {
    pub create_secs: f64,
    pub creates_per_sec: f64,
    pub round_ms: Vec<f64>,
    pub max_round_ms: f64,
    pub updates: u64,
    pub lost: u64,
    /// Updates that failed otherwise (retried next round).
    pub errors: u64,
    pub window_secs: f64,
    pub updates_per_sec: f64,
    pub bytes_per_sec: f64,
    pub nats_cpu_percent: f64,
    pub nats_cpu_us_per_update: f64,
    pub nats_rss_before: u64,
    pub nats_rss_created: u64,
    pub nats_bytes_per_lease: f64,
    /// The bucket's stream bytes per lease, once all are created.
    pub stored_bytes_per_lease: f64,
}

/// One trial: one fleet.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleTrial {
    pub rss_idle: Rss,
    pub rss_running_half: Rss,
    pub rss_running: Rss,
    pub rss_waiting_half: Rss,
    pub rss_waiting: Rss,
    /// After the control runs finished.
    pub rss_finished: Rss,
    pub window_idle: Window,
    pub window_running: Window,
    pub window_waiting: Window,
    pub streams: Vec<StreamSize>,
    pub simulation: SimTrial,
    /// Seconds from the first submit of a phase to its last run settled.
    pub running_submit_secs: f64,
    pub waiting_submit_secs: f64,
    pub worker_bytes_per_running_run: f64,
    pub worker_bytes_per_running_run_marginal: f64,
    pub worker_bytes_per_waiting_run: f64,
    pub worker_bytes_per_waiting_run_marginal: f64,
    /// Worker RSS growth per control run (finished, holding nothing).
    pub worker_bytes_per_finished_run: f64,
    /// The marginal figure per waiting run minus the one per finished run.
    pub worker_bytes_held_per_waiting_run: f64,
    /// The workers' heap growth per running run (over idle), per waiting
    /// run (over the running runs) and per finished control run.
    pub worker_heap_bytes_per_running_run: f64,
    pub worker_heap_bytes_per_waiting_run: f64,
    pub worker_heap_bytes_per_waiting_run_marginal: f64,
    pub worker_heap_bytes_per_finished_run: f64,
    pub coordinator_bytes_per_run: f64,
    pub nats_bytes_per_running_run: f64,
    pub nats_bytes_per_waiting_run: f64,
    /// nats-server CPU per heartbeat in the running window, idle CPU
    /// subtracted, µs.
    pub nats_cpu_us_per_heartbeat: f64,
}

pub(super) async fn measure(args: &BenchArgs) -> anyhow::Result<ScaleResult> {
    let (ticks, source) = clock_ticks();
    let mut trials = Vec::new();
    for trial in 1..=args.repeat {
        progress(args, format!("scale: trial {trial}/{}", args.repeat));
        let mut dir = tempfile::tempdir().context("could not create a temp dir for the bench fleets")?;
        match run_trial(args, dir.path(), ticks).await {
            Ok(result) => {
                progress(
                    args,
                    format!(
                        "scale: trial {trial}: worker {:.1} KiB per running run, {:.0} B of heap per \
                         waiting run (marginal), {:.0} lease updates/s running, simulated round {:.0} ms",
                        result.worker_bytes_per_running_run / 1024.0,
                        result.worker_heap_bytes_per_waiting_run_marginal,
                        result.window_running.lease_updates_per_sec,
                        result.simulation.max_round_ms,
                    ),
                );
                trials.push(result);
            }
            Err(error) => {
                // The logs of the fleet's processes tell what happened.
                dir.disable_cleanup(true);
                return Err(error.context(format!(
                    "trial {trial}; the fleet's logs are kept in {}",
                    dir.path().display()
                )));
            }
        }
    }
    summarize(args, ticks, source, trials)
}

/// The processes of one trial's fleet. Dropping it kills them all
/// (workers first, nats-server last).
struct ScaleFleet {
    workers: WorkerProcesses,
    coordinator: CoordinatorProcess,
    nats: EmbeddedNats,
    client: Client,
    /// The coordinator's registry, read for the projector's position.
    registry: Registry,
    pids: Pids,
    /// Where each worker serves `/metrics` (heap accounting on).
    worker_metrics: Vec<String>,
}

impl ScaleFleet {
    async fn start(args: &BenchArgs, dir: &Path) -> anyhow::Result<Self> {
        let nats = EmbeddedNats::start(dir, embedded::free_port()?).await?;
        let mut coordinator = CoordinatorProcess::spawn(
            &nats.url(),
            &dir.join("runfleet.db"),
            LEASE_TTL,
            &dir.join("coordinator.log"),
        )?;
        let client = Client::connect(&nats.url(), TenantId::default_tenant(), Names::default()).await?;
        coordinator.await_serving(&client).await?;
        let database_url = format!("sqlite:{}", dir.join("runfleet.db").display());
        let registry = Registry::connect(&database_url).await.context("could not open the registry")?;
        let mut workers = WorkerProcesses::with_heap_accounting();
        let mut worker_metrics = Vec::new();
        for (i, port) in embedded::free_ports(WORKERS)?.into_iter().enumerate() {
            let addr = format!("127.0.0.1:{port}");
            let log = dir.join(format!("worker-{i}.log"));
            workers.spawn(&nats.url(), &log, slots_per_worker(args), &["--metrics-addr", &addr])?;
            worker_metrics.push(addr);
        }
        workers.await_registered(&client).await?;
        let pids = Pids {
            coordinator: coordinator.pid().context("the coordinator process exited")?,
            workers: (0..WORKERS)
                .map(|i| workers.pid(i).context("a worker process exited"))
                .collect::<anyhow::Result<_>>()?,
            nats_server: nats.pid().context("nats-server exited")?,
        };
        Ok(Self { workers, coordinator, nats, client, registry, pids, worker_metrics })
    }

    /// Every component's RSS, and the workers' heap.
    async fn memory(&self) -> anyhow::Result<Rss> {
        let mut memory = self.pids.rss()?;
        for addr in &self.worker_metrics {
            memory.workers_heap += heap_bytes(addr).await?;
        }
        Ok(memory)
    }
}

/// A worker's `runfleet_heap_bytes`, scraped from its `/metrics` at `addr`.
/// A worker that does not answer within [`SCRAPE_TIMEOUT`] fails the trial
/// instead of hanging the bench.
async fn heap_bytes(addr: &str) -> anyhow::Result<i64> {
    tokio::time::timeout(SCRAPE_TIMEOUT, scrape_heap_bytes(addr)).await.with_context(|| {
        format!("the worker's /metrics on {addr} did not answer within {SCRAPE_TIMEOUT:?}")
    })?
}

/// How long one scrape of a worker's `/metrics` may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

async fn scrape_heap_bytes(addr: &str) -> anyhow::Result<i64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("could not reach the worker's /metrics on {addr}"))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n").await?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .with_context(|| format!("could not read /metrics from {addr}"))?;
    let name = runfleet_protocol::semconv::HEAP_BYTES.name;
    response
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as i64)
        .with_context(|| format!("{addr}/metrics has no {name}"))
}

fn slots_per_worker(args: &BenchArgs) -> u32 {
    args.scale_running.div_ceil(WORKERS as u32) + SLOT_HEADROOM
}

async fn run_trial(args: &BenchArgs, dir: &Path, ticks: u64) -> anyhow::Result<ScaleTrial> {
    let mut fleet = ScaleFleet::start(args, &dir.join("fleet")).await?;
    let result = fleet_phases(args, &fleet, ticks).await;
    fleet.workers.kill_all().await;
    fleet.coordinator.kill().await;
    fleet.nats.stop().await;
    let mut trial = result?;

    // A nats-server of its own, so that its memory and CPU are the
    // simulation's alone.
    progress(args, format!("scale: {} simulated leases", args.simulated_leases));
    let nats = EmbeddedNats::start(&dir.join("simulation"), embedded::free_port()?).await?;
    let pid = nats.pid().context("nats-server exited")?;
    let result = simulate(args, &nats.url(), pid, ticks).await;
    nats.stop().await;
    trial.simulation = result?;
    Ok(trial)
}

/// Phases 1–3 of the module documentation on a started fleet; the
/// simulation is left empty.
async fn fleet_phases(args: &BenchArgs, fleet: &ScaleFleet, ticks: u64) -> anyhow::Result<ScaleTrial> {
    let client = &fleet.client;
    let pids = &fleet.pids;
    let window = heartbeat_period(LEASE_TTL) * WINDOW_PERIODS;
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let tracker = Tracker::start(client, stop).await?;
    let none = HashSet::new();

    settle(client, &fleet.registry).await?;
    let window_idle = heartbeat_window(client, pids, ticks, window, &none).await?;
    let rss_idle = fleet.memory().await?;

    // Running runs, in two halves.
    progress(args, format!("scale: {} running runs", args.scale_running));
    let started_at = Instant::now();
    let first = args.scale_running / 2;
    let mut running = Vec::new();
    let mut rss_running_half = rss_idle;
    for (i, count) in [first, args.scale_running - first].into_iter().enumerate() {
        if count == 0 {
            continue;
        }
        let runs = submit_all(client, count, |_| sleep_request()).await?;
        tracker.wait_for(&runs, Milestone::Started).await?;
        await_leases(client, &runs, true).await?;
        running.extend(runs);
        settle(client, &fleet.registry).await?;
        if i == 0 {
            rss_running_half = fleet.memory().await?;
        }
    }
    let running_submit_secs = started_at.elapsed().as_secs_f64();
    let rss_running = fleet.memory().await?;
    let window_running = heartbeat_window(client, pids, ticks, window, &none).await?;

    // Waiting runs, in two halves, the running ones still held.
    progress(args, format!("scale: {} waiting runs", args.scale_runs));
    let started_at = Instant::now();
    let first = args.scale_runs / 2;
    let mut waiting = Vec::new();
    let mut rss_waiting_half = rss_running;
    let mut offset = 0;
    for (i, count) in [first, args.scale_runs - first].into_iter().enumerate() {
        if count == 0 {
            continue;
        }
        let runs = submit_all(client, count, |n| await_request(offset + n)).await?;
        offset += count;
        tracker.wait_for(&runs, Milestone::Waiting).await?;
        await_leases(client, &runs, false).await?;
        await_jobs(client, running.len()).await?;
        waiting.extend(runs);
        settle(client, &fleet.registry).await?;
        if i == 0 {
            rss_waiting_half = fleet.memory().await?;
        }
    }
    let waiting_submit_secs = started_at.elapsed().as_secs_f64();
    let rss_waiting = fleet.memory().await?;
    let waiting_keys: HashSet<String> = waiting.iter().map(|run| client.names().lease_key(*run)).collect();
    let window_waiting = heartbeat_window(client, pids, ticks, window, &waiting_keys).await?;
    let streams = stream_sizes(client).await?;

    // The control: as many runs as the waiting runs' second half, of
    // `echo`, which finish. A finished run leaves nothing in the worker,
    // so what they add to its RSS is the allocator's drift over that many
    // claims, the noise the waiting runs' figure is judged against.
    let (running_n, waiting_n) = (args.scale_running, args.scale_runs);
    let (running_second, waiting_second) = (running_n - running_n / 2, waiting_n - waiting_n / 2);
    progress(args, format!("scale: {waiting_second} finished runs (control)"));
    let finished = submit_all(client, waiting_second, echo_request).await?;
    tracker.wait_for(&finished, Milestone::Completed).await?;
    await_leases(client, &finished, false).await?;
    await_jobs(client, running.len()).await?;
    settle(client, &fleet.registry).await?;
    let rss_finished = fleet.memory().await?;
    tracker.ensure_none_ended(&[running, waiting].concat())?;

    let per_run =
        |after: u64, before: u64, runs: u32| (after as f64 - before as f64) / f64::from(runs.max(1));
    let heap_per_run = |after: Rss, before: Rss, runs: u32| {
        (after.workers_heap - before.workers_heap) as f64 / f64::from(runs.max(1))
    };
    let worker_bytes_per_waiting_run_marginal =
        per_run(rss_waiting.workers, rss_waiting_half.workers, waiting_second);
    let worker_bytes_per_finished_run = per_run(rss_finished.workers, rss_waiting.workers, waiting_second);
    let idle_nats_rate = window_idle.nats_cpu_secs / window_idle.seconds;
    let heartbeat_cpu = window_running.nats_cpu_secs - idle_nats_rate * window_running.seconds;
    Ok(ScaleTrial {
        worker_bytes_per_running_run: per_run(rss_running.workers, rss_idle.workers, running_n),
        worker_bytes_per_running_run_marginal: per_run(
            rss_running.workers,
            rss_running_half.workers,
            running_second,
        ),
        worker_bytes_per_waiting_run: per_run(rss_waiting.workers, rss_running.workers, waiting_n),
        worker_bytes_per_waiting_run_marginal,
        worker_bytes_per_finished_run,
        worker_bytes_held_per_waiting_run: worker_bytes_per_waiting_run_marginal
            - worker_bytes_per_finished_run,
        worker_heap_bytes_per_running_run: heap_per_run(rss_running, rss_idle, running_n),
        worker_heap_bytes_per_waiting_run: heap_per_run(rss_waiting, rss_running, waiting_n),
        worker_heap_bytes_per_waiting_run_marginal: heap_per_run(
            rss_waiting,
            rss_waiting_half,
            waiting_second,
        ),
        worker_heap_bytes_per_finished_run: heap_per_run(rss_finished, rss_waiting, waiting_second),
        coordinator_bytes_per_run: per_run(
            rss_waiting.coordinator,
            rss_idle.coordinator,
            running_n + waiting_n,
        ),
        nats_bytes_per_running_run: per_run(rss_running.nats_server, rss_idle.nats_server, running_n),
        nats_bytes_per_waiting_run: per_run(rss_waiting.nats_server, rss_running.nats_server, waiting_n),
        nats_cpu_us_per_heartbeat: heartbeat_cpu.max(0.0) * 1e6 / window_running.lease_updates.max(1) as f64,
        rss_idle,
        rss_running_half,
        rss_running,
        rss_waiting_half,
        rss_waiting,
        rss_finished,
        window_idle,
        window_running,
        window_waiting,
        streams,
        simulation: SimTrial::default(),
        running_submit_secs,
        waiting_submit_secs,
    })
}

fn sleep_request() -> SubmitRequest {
    SubmitRequest {
        agent: "sleep".to_owned(),
        input: serde_json::json!({ "steps": 1, "ms": SLEEP_MS }),
        queue: None,
        priority: None,
        idempotency_key: None,
        max_attempts: None,
    }
}

fn echo_request(n: u32) -> SubmitRequest {
    SubmitRequest {
        agent: "echo".to_owned(),
        input: serde_json::json!({ "n": n }),
        queue: None,
        priority: None,
        idempotency_key: None,
        max_attempts: None,
    }
}

fn await_request(n: u32) -> SubmitRequest {
    SubmitRequest {
        agent: "await".to_owned(),
        input: serde_json::json!({ "key": format!("scale-{n}") }),
        queue: None,
        priority: None,
        idempotency_key: None,
        max_attempts: None,
    }
}

/// Submits `count` runs with at most [`SUBMIT_CONCURRENCY`] in flight.
async fn submit_all(
    client: &Client,
    count: u32,
    request: impl Fn(u32) -> SubmitRequest,
) -> anyhow::Result<Vec<RunId>> {
    let request = &request;
    futures::stream::iter(0..count)
        .map(|n| async move { Ok::<_, anyhow::Error>(client.submit(request(n)).await?.run_id) })
        .buffer_unordered(SUBMIT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Waits until every one of `runs` holds a lease (`held`) or none does.
async fn await_leases(client: &Client, runs: &[RunId], held: bool) -> anyhow::Result<()> {
    let js = jetstream::new(client.nats().clone());
    let leases =
        js.get_key_value(client.names().leases_bucket()).await.context("could not open the leases bucket")?;
    let wanted: HashSet<String> = runs.iter().map(|run| client.names().lease_key(*run)).collect();
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        let mut keys = leases.keys().await.context("could not list the leases")?;
        let mut found = 0;
        while let Some(key) = keys.next().await {
            if wanted.contains(&key.context("could not list the leases")?) {
                found += 1;
            }
        }
        let missing = if held { wanted.len() - found } else { found };
        if missing == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{missing} of {} runs {} after {}s",
            wanted.len(),
            if held { "held no lease" } else { "still held a lease" },
            PHASE_TIMEOUT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the jobs stream holds `jobs` messages: those of the running
/// runs alone once every other run's job is acked (a work-queue stream
/// drops a job when it is acked).
async fn await_jobs(client: &Client, jobs: usize) -> anyhow::Result<()> {
    let js = jetstream::new(client.nats().clone());
    let name = client.names().jobs_stream();
    let mut stream = js.get_stream(&name).await.with_context(|| format!("could not read stream {name}"))?;
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        let held =
            stream.info().await.with_context(|| format!("could not read stream {name}"))?.state.messages;
        if held == jobs as u64 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the jobs stream held {held} jobs, not the {jobs} of the running runs, after {}s",
            PHASE_TIMEOUT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the bench waits for a run to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Milestone {
    Started,
    Waiting,
    Completed,
}

impl Milestone {
    fn event(self) -> &'static str {
        match self {
            Self::Started => "run.started",
            Self::Waiting => "run.waiting",
            Self::Completed => "run.completed",
        }
    }
}

/// Which runs the bench saw reach which state.
#[derive(Default)]
struct Seen {
    started: HashSet<RunId>,
    waiting: HashSet<RunId>,
    completed: HashSet<RunId>,
    /// Runs that ended otherwise (failed, cancelled).
    ended_otherwise: HashSet<RunId>,
}

impl Seen {
    fn reached(&self, milestone: Milestone) -> &HashSet<RunId> {
        match milestone {
            Milestone::Started => &self.started,
            Milestone::Waiting => &self.waiting,
            Milestone::Completed => &self.completed,
        }
    }

    fn ended(&self, run: &RunId) -> bool {
        self.completed.contains(run) || self.ended_otherwise.contains(run)
    }
}

/// A subscriber to the tenant's events noting, in a task of its own, which
/// runs started, parked and ended.
struct Tracker {
    seen: Arc<Mutex<Seen>>,
}

impl Tracker {
    async fn start(client: &Client, stop: CancellationToken) -> anyhow::Result<Self> {
        let mut events = client
            .nats()
            .subscribe(client.names().tenant_events(client.tenant()))
            .await
            .context("could not subscribe to the run events")?;
        client.nats().flush().await.context("could not subscribe to the run events")?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let noted = seen.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    message = events.next() => message,
                };
                let Some(message) = message else { return };
                let Ok(events) = runfleet_protocol::event::decode_log_message(&message.payload) else {
                    continue;
                };
                for event in events {
                    let mut seen = noted.lock().unwrap_or_else(PoisonError::into_inner);
                    match &event.body {
                        EventBody::Started(_) => {
                            seen.started.insert(event.run_id);
                        }
                        EventBody::Waiting(_) => {
                            seen.waiting.insert(event.run_id);
                        }
                        EventBody::Completed(_) => {
                            seen.completed.insert(event.run_id);
                        }
                        body if body.is_terminal() => {
                            seen.ended_otherwise.insert(event.run_id);
                        }
                        _ => {}
                    }
                }
            }
        });
        Ok(Self { seen })
    }

    /// Waits until every one of `runs` reached `milestone`; fails at once
    /// if one of them ended otherwise.
    async fn wait_for(&self, runs: &[RunId], milestone: Milestone) -> anyhow::Result<()> {
        let deadline = Instant::now() + PHASE_TIMEOUT;
        loop {
            let missing = {
                let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
                let reached = seen.reached(milestone);
                if let Some(run) = runs.iter().find(|run| !reached.contains(run) && seen.ended(run)) {
                    anyhow::bail!("run {run} ended while the bench waited for its {}", milestone.event());
                }
                runs.iter().filter(|run| !reached.contains(run)).count()
            };
            if missing == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{missing} of {} runs had no {} after {}s",
                runs.len(),
                milestone.event(),
                PHASE_TIMEOUT.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails if any of `runs` ended: every one should still be in flight.
    fn ensure_none_ended(&self, runs: &[RunId]) -> anyhow::Result<()> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let ended = runs.iter().filter(|run| seen.ended(run)).count();
        anyhow::ensure!(ended == 0, "{ended} runs ended during the trial; all should still be in flight");
        Ok(())
    }
}

/// Waits until the coordinator's projector has taken in every event
/// written so far (the position stored in its registry reached the events
/// stream's last sequence), then [`SETTLE`]s: the fleet is quiet when its
/// memory is read.
async fn settle(client: &Client, registry: &Registry) -> anyhow::Result<()> {
    let js = jetstream::new(client.nats().clone());
    let names = client.names();
    let events = js.get_stream(names.events_stream()).await.context("could not open the events stream")?;
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        let lag =
            projector::lag(&events, registry, names).await.context("could not read the projector lag")?;
        if lag == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the projector still had {lag} events to take in after {}s",
            PHASE_TIMEOUT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(SETTLE).await;
    Ok(())
}

/// The processes whose memory and CPU are read.
struct Pids {
    coordinator: u32,
    workers: Vec<u32>,
    nats_server: u32,
}

/// CPU samples of each component at one instant.
struct Cpu {
    coordinator: CpuSample,
    workers: Vec<CpuSample>,
    nats_server: CpuSample,
}

impl Pids {
    fn rss(&self) -> anyhow::Result<Rss> {
        let mut workers = 0;
        for pid in &self.workers {
            workers += rss_bytes(*pid)?;
        }
        Ok(Rss {
            coordinator: rss_bytes(self.coordinator)?,
            workers,
            nats_server: rss_bytes(self.nats_server)?,
            // Read over HTTP by `ScaleFleet::memory`.
            workers_heap: 0,
        })
    }

    fn cpu(&self) -> anyhow::Result<Cpu> {
        Ok(Cpu {
            coordinator: CpuSample::read(self.coordinator)?,
            workers: self.workers.iter().map(|pid| CpuSample::read(*pid)).collect::<anyhow::Result<_>>()?,
            nats_server: CpuSample::read(self.nats_server)?,
        })
    }
}

/// The CPU time of one process at one instant, two ways: each live
/// thread's time on a CPU in nanoseconds (`/proc/<pid>/task/<tid>/schedstat`),
/// and utime + stime of the whole process in clock ticks
/// (`/proc/<pid>/stat`, 10 ms each at the usual 100 Hz: coarse over a
/// window of a few seconds, but it keeps the time of threads that exited).
struct CpuSample {
    threads: HashMap<u32, u64>,
    ticks: u64,
}

impl CpuSample {
    fn read(pid: u32) -> anyhow::Result<Self> {
        let mut threads = HashMap::new();
        // A kernel without schedstat, or a thread that exits while it is
        // read, leaves a gap that `secs_since` notices.
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let Some(tid) = task.file_name().to_str().and_then(|tid| tid.parse::<u32>().ok()) else {
                    continue;
                };
                let ns = std::fs::read_to_string(task.path().join("schedstat"))
                    .ok()
                    .and_then(|line| line.split_whitespace().next()?.parse::<u64>().ok());
                if let Some(ns) = ns {
                    threads.insert(tid, ns);
                }
            }
        }
        Ok(Self { threads, ticks: cpu_ticks(pid)? })
    }

    /// CPU seconds from `before` to this sample: from the threads' times
    /// if every thread of `before` is still there (then no CPU time went
    /// missing with an exited thread; threads started since count whole),
    /// else from clock ticks.
    fn secs_since(&self, before: &Self, ticks_per_sec: u64) -> f64 {
        let complete = !before.threads.is_empty()
            && before.threads.iter().all(|(tid, ns)| self.threads.get(tid).is_some_and(|now| now >= ns));
        if complete {
            let now: u64 = self.threads.values().sum();
            let then: u64 = before.threads.values().sum();
            now.saturating_sub(then) as f64 / 1e9
        } else {
            self.ticks.saturating_sub(before.ticks) as f64 / ticks_per_sec as f64
        }
    }
}

/// `VmRSS` of a process, bytes.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("could not read {path}"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path} has no VmRSS"))?;
    Ok(kib * 1024)
}

/// Counts lease writes and in-progress acks for `length`, and the CPU the
/// fleet's processes used meanwhile. Lease writes whose key is in
/// `waiting_keys` are counted apart too.
async fn heartbeat_window(
    client: &Client,
    pids: &Pids,
    ticks: u64,
    length: Duration,
    waiting_keys: &HashSet<String>,
) -> anyhow::Result<Window> {
    let nats = client.nats();
    let lease_prefix = format!("{KV_SUBJECT_PREFIX}.{}.", client.names().leases_bucket());
    let mut leases = nats
        .subscribe(format!("{lease_prefix}>"))
        .await
        .context("could not subscribe to the lease writes")?;
    let mut acks = nats.subscribe(JS_ACK_SUBJECTS).await.context("could not subscribe to the acks")?;
    nats.flush().await.context("could not subscribe to the lease writes")?;

    let (mut lease_updates, mut of_waiting, mut progress_acks, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    let cpu_before = pids.cpu()?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + length;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            Some(message) = leases.next() => {
                lease_updates += 1;
                bytes += message.length as u64;
                let key = message.subject.as_str().strip_prefix(&lease_prefix).unwrap_or_default();
                if waiting_keys.contains(key) {
                    of_waiting += 1;
                }
            }
            Some(message) = acks.next() => {
                if message.payload.as_ref() == PROGRESS_ACK {
                    progress_acks += 1;
                    bytes += message.length as u64;
                }
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = pids.cpu()?;
    let nats_cpu_secs = cpu_after.nats_server.secs_since(&cpu_before.nats_server, ticks);
    let workers_cpu_secs: f64 = cpu_after
        .workers
        .iter()
        .zip(&cpu_before.workers)
        .map(|(after, before)| after.secs_since(before, ticks))
        .sum();
    let coordinator_cpu_secs = cpu_after.coordinator.secs_since(&cpu_before.coordinator, ticks);
    let percent = |secs: f64| 100.0 * secs / seconds;
    Ok(Window {
        seconds,
        lease_updates,
        lease_updates_of_waiting_runs: of_waiting,
        progress_acks,
        bytes,
        lease_updates_per_sec: lease_updates as f64 / seconds,
        progress_acks_per_sec: progress_acks as f64 / seconds,
        bytes_per_sec: bytes as f64 / seconds,
        nats_cpu_percent: percent(nats_cpu_secs),
        workers_cpu_percent: percent(workers_cpu_secs),
        coordinator_cpu_percent: percent(coordinator_cpu_secs),
        nats_cpu_secs,
    })
}

/// Messages and bytes of the fleet's streams and of the buckets runs
/// write to.
async fn stream_sizes(client: &Client) -> anyhow::Result<Vec<StreamSize>> {
    let js = jetstream::new(client.nats().clone());
    let names = client.names();
    let mut sizes = Vec::new();
    for name in [names.events_stream(), names.jobs_stream()] {
        let stream = js.get_stream(&name).await.with_context(|| format!("could not read stream {name}"))?;
        let state = &stream.cached_info().state;
        sizes.push(StreamSize { name, messages: state.messages, bytes: state.bytes });
    }
    for name in
        [names.checkpoints_bucket(), names.leases_bucket(), names.control_bucket(), names.signals_bucket()]
    {
        let bucket =
            js.get_key_value(&name).await.with_context(|| format!("could not read bucket {name}"))?;
        let state = &bucket.stream.cached_info().state;
        sizes.push(StreamSize { name, messages: state.messages, bytes: state.bytes });
    }
    Ok(sizes)
}

impl Default for SimTrial {
    fn default() -> Self {
        Self {
            create_secs: f64::NAN,
            creates_per_sec: f64::NAN,
            round_ms: Vec::new(),
            max_round_ms: f64::NAN,
            updates: 0,
            lost: 0,
            errors: 0,
            window_secs: f64::NAN,
            updates_per_sec: f64::NAN,
            bytes_per_sec: f64::NAN,
            nats_cpu_percent: f64::NAN,
            nats_cpu_us_per_update: f64::NAN,
            nats_rss_before: 0,
            nats_rss_created: 0,
            nats_bytes_per_lease: f64::NAN,
            stored_bytes_per_lease: f64::NAN,
        }
    }
}

/// Phase 4 of the module documentation, on nats-server alone.
async fn simulate(args: &BenchArgs, url: &str, nats_pid: u32, ticks: u64) -> anyhow::Result<SimTrial> {
    let ttl = default_lease_ttl();
    let period = heartbeat_period(ttl);
    // A connection of its own, so its statistics count the simulation only.
    let nats = async_nats::connect(url).await.context("could not connect to nats-server")?;
    let js = jetstream::new(nats.clone());
    let config = kv::Config {
        bucket: SIM_BUCKET.to_owned(),
        description: "runfleet bench: simulated leases".to_owned(),
        history: 1,
        max_age: ttl,
        storage: jetstream::stream::StorageType::File,
        limit_markers: Some(ttl),
        ..Default::default()
    };
    let bucket =
        js.create_key_value(config).await.context("could not create the simulated leases' bucket")?;

    // One real lease record: every key gets the same bytes, encoded once a
    // round, so the bench spends its CPU on the updates, not on encoding.
    let mut lease = Lease {
        run_id: RunId::generate(),
        worker_id: WorkerId::generate(),
        attempt: 1,
        acquired_ms: time::now_ms(),
        renewed_ms: time::now_ms(),
    };
    let keys: Vec<String> = (0..args.simulated_leases).map(|_| RunId::generate().to_string()).collect();
    let nats_rss_before = rss_bytes(nats_pid)?;

    let value = bytes::Bytes::from(codec::encode(&lease)?);
    let created_at = Instant::now();
    let created: Vec<_> = futures::stream::iter(&keys)
        .map(|key| bucket.create(key, value.clone()))
        .buffered(SIM_IN_FLIGHT)
        .collect()
        .await;
    let create_secs = created_at.elapsed().as_secs_f64();
    let mut revisions = Vec::with_capacity(keys.len());
    for (key, result) in keys.iter().zip(created) {
        revisions.push(Some(result.with_context(|| format!("could not create simulated lease {key}"))?));
    }
    let nats_rss_created = rss_bytes(nats_pid)?;
    let stored = js
        .get_key_value(SIM_BUCKET)
        .await
        .context("could not read the simulated leases' bucket")?
        .stream
        .cached_info()
        .state
        .bytes;

    let stats = nats.statistics();
    let bytes_before = stats.out_bytes.load(std::sync::atomic::Ordering::Relaxed)
        + stats.in_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let cpu_before = CpuSample::read(nats_pid)?;
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(started, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut round_ms, mut updates, mut lost, mut errors) = (Vec::new(), 0u64, 0u64, 0u64);
    let bucket = &bucket;
    for _ in 0..SIM_ROUNDS {
        tick.tick().await;
        lease.renewed_ms = time::now_ms();
        let value = bytes::Bytes::from(codec::encode(&lease)?);
        let round_started = Instant::now();
        let results: Vec<_> = futures::stream::iter(keys.iter().zip(&revisions))
            .map(|(key, revision)| {
                let value = value.clone();
                async move {
                    match revision {
                        Some(revision) => Some(bucket.update(key, value, *revision).await),
                        None => None,
                    }
                }
            })
            .buffered(SIM_IN_FLIGHT)
            .collect()
            .await;
        round_ms.push(millis(round_started.elapsed()));
        for (revision, result) in revisions.iter_mut().zip(results) {
            match result {
                None => {}
                Some(Ok(renewed)) => {
                    updates += 1;
                    *revision = Some(renewed);
                }
                Some(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    lost += 1;
                    *revision = None;
                }
                Some(Err(_)) => errors += 1,
            }
        }
    }
    // The window is the rounds' periods, or longer if a round overran.
    tokio::time::sleep_until(started + period * SIM_ROUNDS).await;
    let window_secs = started.elapsed().as_secs_f64();
    let cpu_secs = CpuSample::read(nats_pid)?.secs_since(&cpu_before, ticks);
    let bytes_after = stats.out_bytes.load(std::sync::atomic::Ordering::Relaxed)
        + stats.in_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let leases = f64::from(args.simulated_leases);
    Ok(SimTrial {
        create_secs,
        creates_per_sec: leases / create_secs,
        max_round_ms: round_ms.iter().copied().fold(0.0, f64::max),
        round_ms,
        updates,
        lost,
        errors,
        window_secs,
        updates_per_sec: updates as f64 / window_secs,
        bytes_per_sec: bytes_after.saturating_sub(bytes_before) as f64 / window_secs,
        nats_cpu_percent: 100.0 * cpu_secs / window_secs,
        nats_cpu_us_per_update: cpu_secs * 1e6 / updates.max(1) as f64,
        nats_rss_before,
        nats_rss_created,
        nats_bytes_per_lease: (nats_rss_created as f64 - nats_rss_before as f64) / leases,
        stored_bytes_per_lease: stored as f64 / leases,
    })
}

fn summarize(
    args: &BenchArgs,
    ticks: u64,
    source: String,
    trials: Vec<ScaleTrial>,
) -> anyhow::Result<ScaleResult> {
    let spread = |pick: &dyn Fn(&ScaleTrial) -> f64| -> anyhow::Result<Spread> {
        let values: Vec<f64> = trials.iter().map(pick).collect();
        Spread::of(&values).context("no trial")
    };
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let rss = |pick: fn(&ScaleTrial) -> Rss| -> anyhow::Result<RssSpread> {
        Ok(RssSpread {
            coordinator: spread(&|t| mib(pick(t).coordinator))?,
            workers: spread(&|t| mib(pick(t).workers))?,
            nats_server: spread(&|t| mib(pick(t).nats_server))?,
            workers_heap: spread(&|t| pick(t).workers_heap as f64 / (1024.0 * 1024.0))?,
        })
    };
    let window = |pick: fn(&ScaleTrial) -> Window| -> anyhow::Result<WindowSpread> {
        Ok(WindowSpread {
            lease_updates_per_sec: spread(&|t| pick(t).lease_updates_per_sec)?,
            progress_acks_per_sec: spread(&|t| pick(t).progress_acks_per_sec)?,
            bytes_per_sec: spread(&|t| pick(t).bytes_per_sec)?,
            nats_cpu_percent: spread(&|t| pick(t).nats_cpu_percent)?,
            workers_cpu_percent: spread(&|t| pick(t).workers_cpu_percent)?,
            coordinator_cpu_percent: spread(&|t| pick(t).coordinator_cpu_percent)?,
        })
    };
    let in_flight = f64::from(args.scale_runs + args.scale_running);
    let mut streams = Vec::new();
    if let Some(first) = trials.first() {
        for (i, stream) in first.streams.iter().enumerate() {
            let size = |t: &ScaleTrial| {
                t.streams.get(i).map_or((f64::NAN, f64::NAN), |s| (s.messages as f64, s.bytes as f64))
            };
            streams.push(StreamSpread {
                name: stream.name.clone(),
                messages: spread(&|t| size(t).0)?,
                bytes: spread(&|t| size(t).1)?,
                bytes_per_run: spread(&|t| size(t).1 / in_flight)?,
            });
        }
    }

    let default_ttl = default_lease_ttl();
    let default_period = heartbeat_period(default_ttl).as_secs_f64();
    let sim_ttl = default_ttl;
    let sim_period = heartbeat_period(sim_ttl);
    let leases = f64::from(args.simulated_leases);
    let simulation = SimSpread {
        leases: args.simulated_leases,
        lease_ttl_ms: millis(sim_ttl),
        period_ms: millis(sim_period),
        rounds: SIM_ROUNDS,
        creates_per_sec: spread(&|t| t.simulation.creates_per_sec)?,
        max_round_ms: spread(&|t| t.simulation.max_round_ms)?,
        max_round_per_period: spread(&|t| t.simulation.max_round_ms / millis(sim_period))?,
        keeps_up: trials.iter().all(|t| t.simulation.max_round_ms <= millis(sim_period)),
        lost: trials.iter().map(|t| t.simulation.lost).sum(),
        updates_per_sec: spread(&|t| t.simulation.updates_per_sec)?,
        bytes_per_sec: spread(&|t| t.simulation.bytes_per_sec)?,
        nats_cpu_percent: spread(&|t| t.simulation.nats_cpu_percent)?,
        nats_cpu_us_per_update: spread(&|t| t.simulation.nats_cpu_us_per_update)?,
        nats_bytes_per_lease: spread(&|t| t.simulation.nats_bytes_per_lease)?,
        stored_bytes_per_lease: spread(&|t| t.simulation.stored_bytes_per_lease)?,
        min_ttl_for_leases_on_one_core_ms: spread(&|t| {
            3.0 * leases * t.simulation.nats_cpu_us_per_update / 1e3
        })?,
    };

    let worker_bytes_per_running_run = spread(&|t| t.worker_bytes_per_running_run)?;
    let worker_heap_bytes_per_waiting_run_marginal =
        spread(&|t| t.worker_heap_bytes_per_waiting_run_marginal)?;
    let period = heartbeat_period(LEASE_TTL);
    Ok(ScaleResult {
        repeat: args.repeat,
        waiting_runs: args.scale_runs,
        running_runs: args.scale_running,
        simulated_leases: args.simulated_leases,
        workers: WORKERS,
        slots_per_worker: slots_per_worker(args),
        lease_ttl_ms: millis(LEASE_TTL),
        heartbeat_period_ms: millis(period),
        window_ms: millis(period * WINDOW_PERIODS),
        clock_ticks_per_sec: ticks,
        clock_ticks_source: source,
        rss_idle_mib: rss(|t| t.rss_idle)?,
        rss_running_mib: rss(|t| t.rss_running)?,
        rss_waiting_mib: rss(|t| t.rss_waiting)?,
        meets_running_target: worker_bytes_per_running_run.median <= TARGET_BYTES_PER_RUNNING_RUN,
        worker_bytes_per_running_run,
        worker_bytes_per_running_run_marginal: spread(&|t| t.worker_bytes_per_running_run_marginal)?,
        target_bytes_per_running_run: TARGET_BYTES_PER_RUNNING_RUN,
        worker_bytes_per_waiting_run: spread(&|t| t.worker_bytes_per_waiting_run)?,
        worker_bytes_per_waiting_run_marginal: spread(&|t| t.worker_bytes_per_waiting_run_marginal)?,
        worker_bytes_per_finished_run: spread(&|t| t.worker_bytes_per_finished_run)?,
        worker_bytes_held_per_waiting_run: spread(&|t| t.worker_bytes_held_per_waiting_run)?,
        worker_heap_bytes_per_running_run: spread(&|t| t.worker_heap_bytes_per_running_run)?,
        meets_waiting_target: worker_heap_bytes_per_waiting_run_marginal.median <= WAITING_TARGET_BYTES,
        worker_heap_bytes_per_waiting_run: spread(&|t| t.worker_heap_bytes_per_waiting_run)?,
        worker_heap_bytes_per_waiting_run_marginal,
        worker_heap_bytes_per_finished_run: spread(&|t| t.worker_heap_bytes_per_finished_run)?,
        waiting_target_bytes_per_run: WAITING_TARGET_BYTES,
        coordinator_bytes_per_run: spread(&|t| t.coordinator_bytes_per_run)?,
        nats_bytes_per_running_run: spread(&|t| t.nats_bytes_per_running_run)?,
        nats_bytes_per_waiting_run: spread(&|t| t.nats_bytes_per_waiting_run)?,
        window_idle: window(|t| t.window_idle)?,
        window_running: window(|t| t.window_running)?,
        window_waiting: window(|t| t.window_waiting)?,
        expected_lease_updates_per_sec: f64::from(args.scale_running) / period.as_secs_f64(),
        lease_updates_of_waiting_runs: trials
            .iter()
            .map(|t| t.window_waiting.lease_updates_of_waiting_runs)
            .sum(),
        streams,
        simulation,
        default_lease_ttl_ms: millis(default_ttl),
        default_heartbeat_period_ms: default_period * 1e3,
        lease_updates_per_sec_per_1000_running: 1000.0 / default_period,
        leases_per_nats_core: spread(&|t| default_period * 1e6 / t.simulation.nats_cpu_us_per_update)?,
        running_runs_per_nats_core: spread(&|t| default_period * 1e6 / t.nats_cpu_us_per_heartbeat)?,
        trials,
    })
}

pub(super) fn print(result: &ScaleResult) {
    let range =
        |s: &Spread, f: &dyn Fn(f64) -> String| format!("{} ({}–{})", f(s.median), f(s.min), f(s.max));
    let mib = |v: f64| format!("{v:.1}");
    let kib = |v: f64| format!("{:.1}", v / 1024.0);
    let bytes = |v: f64| format!("{v:.0}");
    let rate = |v: f64| format!("{v:.0}");
    let pct = |v: f64| format!("{v:.1}");
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    let thousands = |v: f64| {
        if !v.is_finite() {
            return "-".to_owned();
        }
        let v = v.round() as u64;
        let s = v.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    };

    println!(
        "scale  {} waiting + {} running runs on {} worker processes ({} slots each), lease TTL {} s \
         (heartbeat {} s), {} trials; median (min–max)",
        result.waiting_runs,
        result.running_runs,
        result.workers,
        result.slots_per_worker,
        result.lease_ttl_ms / 1e3,
        result.heartbeat_period_ms / 1e3,
        result.repeat
    );
    println!("{:<28}{:>24}{:>24}{:>24}", "RSS, MiB", "coordinator", "workers (sum)", "nats-server");
    for (label, rss) in [
        ("idle".to_owned(), &result.rss_idle_mib),
        (format!("{} running", result.running_runs), &result.rss_running_mib),
        (format!("+ {} waiting", result.waiting_runs), &result.rss_waiting_mib),
    ] {
        println!(
            "{:<28}{:>24}{:>24}{:>24}",
            label,
            range(&rss.coordinator, &mib),
            range(&rss.workers, &mib),
            range(&rss.nats_server, &mib)
        );
    }
    println!(
        "worker KiB per running run: {} over idle, {} marginal   target ≤ {} KiB: {}",
        range(&result.worker_bytes_per_running_run, &kib),
        range(&result.worker_bytes_per_running_run_marginal, &kib),
        result.target_bytes_per_running_run / 1024.0,
        met(result.meets_running_target)
    );
    println!(
        "worker B per waiting run: {} over running, {} marginal; per finished run (control) {}",
        range(&result.worker_bytes_per_waiting_run, &bytes),
        range(&result.worker_bytes_per_waiting_run_marginal, &bytes),
        range(&result.worker_bytes_per_finished_run, &bytes),
    );
    println!(
        "worker B held per waiting run by RSS (marginal − control): {}",
        range(&result.worker_bytes_held_per_waiting_run, &bytes)
    );
    println!(
        "workers' heap, MiB: idle {}, running {}, + waiting {}",
        range(&result.rss_idle_mib.workers_heap, &mib),
        range(&result.rss_running_mib.workers_heap, &mib),
        range(&result.rss_waiting_mib.workers_heap, &mib),
    );
    println!(
        "worker heap B per running run: {}; per finished run (control): {}",
        range(&result.worker_heap_bytes_per_running_run, &bytes),
        range(&result.worker_heap_bytes_per_finished_run, &bytes),
    );
    println!(
        "worker heap B per waiting run: {} marginal ({} over all)   target nothing (≤ {} B marginal): {}",
        range(&result.worker_heap_bytes_per_waiting_run_marginal, &bytes),
        range(&result.worker_heap_bytes_per_waiting_run, &bytes),
        result.waiting_target_bytes_per_run,
        met(result.meets_waiting_target)
    );
    println!(
        "coordinator B per run: {}   nats-server B per running run: {}, per waiting run: {}",
        range(&result.coordinator_bytes_per_run, &bytes),
        range(&result.nats_bytes_per_running_run, &bytes),
        range(&result.nats_bytes_per_waiting_run, &bytes)
    );

    println!(
        "{:<28}{:>20}{:>20}{:>20}{:>18}{:>18}{:>18}",
        format!("heartbeats ({} s windows)", result.window_ms / 1e3),
        "lease updates/s",
        "progress acks/s",
        "KB/s",
        "nats CPU %",
        "workers CPU %",
        "coord. CPU %"
    );
    for (label, window) in [
        ("idle".to_owned(), &result.window_idle),
        (format!("{} running", result.running_runs), &result.window_running),
        (format!("+ {} waiting", result.waiting_runs), &result.window_waiting),
    ] {
        println!(
            "{:<28}{:>20}{:>20}{:>20}{:>18}{:>18}{:>18}",
            label,
            range(&window.lease_updates_per_sec, &rate),
            range(&window.progress_acks_per_sec, &rate),
            range(&window.bytes_per_sec, &|v| format!("{:.1}", v / 1e3)),
            range(&window.nats_cpu_percent, &pct),
            range(&window.workers_cpu_percent, &pct),
            range(&window.coordinator_cpu_percent, &pct),
        );
    }
    println!(
        "expected lease updates/s with {} running: {:.0}; lease writes of waiting runs seen: {} (expected 0)",
        result.running_runs, result.expected_lease_updates_per_sec, result.lease_updates_of_waiting_runs
    );

    println!("{:<28}{:>24}{:>24}{:>24}", "streams, all runs in flight", "messages", "MiB", "B per run");
    for stream in &result.streams {
        println!(
            "{:<28}{:>24}{:>24}{:>24}",
            stream.name,
            range(&stream.messages, &rate),
            range(&stream.bytes, &|v| format!("{:.2}", v / (1024.0 * 1024.0))),
            range(&stream.bytes_per_run, &bytes)
        );
    }

    let sim = &result.simulation;
    println!(
        "simulated leases: {} leases, TTL {} s, renewed every {} s for {} rounds on nats-server alone",
        thousands(f64::from(sim.leases)),
        sim.lease_ttl_ms / 1e3,
        sim.period_ms / 1e3,
        sim.rounds
    );
    println!(
        "  creates/s {}   longest round {} ms = {} of the period: {}   leases lost {}",
        range(&sim.creates_per_sec, &rate),
        range(&sim.max_round_ms, &rate),
        range(&sim.max_round_per_period, &|v| format!("{v:.2}")),
        if sim.keeps_up { "keeps up" } else { "DOES NOT keep up" },
        sim.lost
    );
    println!(
        "  updates/s {}   KB/s {}   nats CPU % {}   nats CPU µs per update {}",
        range(&sim.updates_per_sec, &rate),
        range(&sim.bytes_per_sec, &|v| format!("{:.0}", v / 1e3)),
        range(&sim.nats_cpu_percent, &pct),
        range(&sim.nats_cpu_us_per_update, &|v| format!("{v:.1}")),
    );
    println!(
        "  nats-server RSS B per lease {}   stored B per lease {}",
        range(&sim.nats_bytes_per_lease, &bytes),
        range(&sim.stored_bytes_per_lease, &bytes)
    );
    println!(
        "at the default TTL {} s (heartbeat {} s): 1,000 running runs need {:.0} lease updates/s (+ as many \
         in-progress acks)",
        result.default_lease_ttl_ms / 1e3,
        result.default_heartbeat_period_ms / 1e3,
        result.lease_updates_per_sec_per_1000_running
    );
    println!(
        "one nats-server core keeps {} leases renewed (simulated, KV updates only), {} running runs \
         (fleet, lease update + in-progress ack); {} leases need a TTL ≥ {} s on one core",
        range(&result.leases_per_nats_core, &thousands),
        range(&result.running_runs_per_nats_core, &thousands),
        thousands(f64::from(sim.leases)),
        range(&sim.min_ttl_for_leases_on_one_core_ms, &|v| format!("{:.1}", v / 1e3)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::procs::parse_cpu_ticks;

    #[test]
    fn cpu_ticks_are_utime_plus_stime() {
        let stat = "4242 (nats server) S 1 4242 4242 0 -1 4194560 3123 0 0 0 150 25 0 0 20 0 12 0 5000 \
                    1000000 2000 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(175));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn cpu_time_falls_back_to_ticks_when_a_thread_exited() {
        let before = CpuSample { threads: HashMap::from([(1, 1_000_000_000), (2, 500_000_000)]), ticks: 100 };
        let grown = CpuSample {
            threads: HashMap::from([(1, 1_250_000_000), (2, 500_000_000), (3, 250_000_000)]),
            ticks: 160,
        };
        assert!((grown.secs_since(&before, 100) - 0.5).abs() < 1e-9);
        let exited = CpuSample { threads: HashMap::from([(1, 1_250_000_000)]), ticks: 160 };
        assert!((exited.secs_since(&before, 100) - 0.6).abs() < 1e-9);
        let unreadable = CpuSample { threads: HashMap::new(), ticks: 100 };
        assert!((grown.secs_since(&unreadable, 100) - 0.6).abs() < 1e-9);
    }

    #[test]
    fn heartbeat_period_is_a_third_of_the_ttl() {
        assert_eq!(heartbeat_period(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(heartbeat_period(Duration::from_secs(15)), Duration::from_secs(5));
    }
}
