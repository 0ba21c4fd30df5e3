//! The `throughput` scenario: `--runs` one-step no-op runs through the whole
//! fleet (API submit → coordinator → job → worker → step checkpoint →
//! events → projection into the SQL registry), against the bare JetStream
//! floor measured right before it, trial by trial.
//!
//! Each trial starts a fleet of its own ([`Fleet`]: child nats-server,
//! in-process coordinator on SQLite, `--workers` in-process workers of
//! `--slots` slots serving [`fleet::NOOP_AGENT`]), pushes a warm-up batch
//! through it, then submits `--runs` runs closed-loop (at most
//! `--concurrency` submits in flight). Two figures per trial:
//!
//! - **terminal**: runs over first submit → the last run's terminal event,
//!   as an external subscriber to the tenant's events sees it;
//! - **registry**: runs over first submit → the moment the registry holds
//!   every run in a terminal state (polled every 5 ms with one indexed
//!   count per state).
//!
//! Each is divided by the runs/s of the floor trial run just before it on
//! the same machine (same runs, same workers × slots), so the ratio is
//! comparable across noisy runs. Latencies here are at saturation (closed
//! loop) and include queueing; `latency` measures them open-loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use hdrhistogram::Histogram;
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::{AgentName, RunId, RunState};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::fleet::{self, Fleet};
use super::procs::{CpuClock, CpuMeter, CpuPerRun};
use super::{floor, progress, BenchArgs, FloorTrial, Latency, ServerTraffic, Spread};
use crate::client::Client;

/// Target from the issue tracker: both figures at least half the floor's.
pub const TARGET_RATIO: f64 = 0.5;
/// Runs pushed through a fresh fleet before the clock starts.
const WARM_UP: u32 = 200;
/// No run may take longer than this to finish, nor the registry to catch up.
const STALL: Duration = Duration::from_secs(120);

/// One trial: the floor, then the fleet.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputTrial {
    pub floor_runs_per_sec: f64,
    pub terminal_runs_per_sec: f64,
    pub registry_runs_per_sec: f64,
    /// terminal / floor.
    pub terminal_ratio: f64,
    /// registry / floor.
    pub registry_ratio: f64,
    /// At saturation (closed loop): includes queueing.
    pub submit_to_start: Latency,
    pub submit_to_complete: Latency,
    pub failed: u32,
    /// nats-server's traffic per run, first submit → the registry caught up.
    pub server: ServerTraffic,
    /// CPU per run over the same window: the bench's process (the fleet,
    /// the submitter, the subscriber) and nats-server.
    pub cpu: CpuPerRun,
}

/// What the `throughput` scenario measured over its trials.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputResult {
    pub runs: u32,
    pub workers: u32,
    pub slots: u32,
    pub concurrency: usize,
    pub floor_runs_per_sec: Spread,
    pub terminal_runs_per_sec: Spread,
    pub registry_runs_per_sec: Spread,
    pub terminal_ratio: Spread,
    pub registry_ratio: Spread,
    /// nats-server messages (in + out) per run: the floor's and the fleet's.
    pub floor_messages_per_run: Spread,
    pub fleet_messages_per_run: Spread,
    /// CPU milliseconds per run, the bench's process and nats-server
    /// together: the floor's and the fleet's.
    pub floor_cpu_ms_per_run: Spread,
    pub fleet_cpu_ms_per_run: Spread,
    pub target_ratio: f64,
    /// The floor trials, one before each fleet trial.
    pub floor: Vec<FloorTrial>,
    pub trials: Vec<ThroughputTrial>,
}

pub(super) async fn measure(args: &BenchArgs) -> anyhow::Result<ThroughputResult> {
    let mut floors = Vec::new();
    let mut trials = Vec::new();
    for trial in 1..=args.repeat {
        progress(args, format!("throughput: trial {trial}/{}: floor", args.repeat));
        let floor = floor::trial(args, args.runs).await?;
        progress(args, format!("throughput: trial {trial}/{}: fleet", args.repeat));
        let fleet = fleet_trial(args, args.runs).await?;
        let ratio = |rate: f64| rate / floor.runs_per_sec;
        progress(
            args,
            format!(
                "throughput: {:.0} runs/s to terminal ({:.2} of floor), {:.0} to registry ({:.2})",
                fleet.terminal_runs_per_sec,
                ratio(fleet.terminal_runs_per_sec),
                fleet.registry_runs_per_sec,
                ratio(fleet.registry_runs_per_sec)
            ),
        );
        trials.push(ThroughputTrial {
            floor_runs_per_sec: floor.runs_per_sec,
            terminal_ratio: ratio(fleet.terminal_runs_per_sec),
            registry_ratio: ratio(fleet.registry_runs_per_sec),
            ..fleet
        });
        floors.push(floor);
    }
    let spread = |field: fn(&ThroughputTrial) -> f64| {
        let values: Vec<f64> = trials.iter().map(field).collect();
        Spread::of(&values).context("no trial ran")
    };
    Ok(ThroughputResult {
        runs: args.runs,
        workers: args.workers,
        slots: args.slots,
        concurrency: args.concurrency,
        floor_runs_per_sec: spread(|t| t.floor_runs_per_sec)?,
        terminal_runs_per_sec: spread(|t| t.terminal_runs_per_sec)?,
        registry_runs_per_sec: spread(|t| t.registry_runs_per_sec)?,
        terminal_ratio: spread(|t| t.terminal_ratio)?,
        registry_ratio: spread(|t| t.registry_ratio)?,
        floor_messages_per_run: Spread::of(
            &floors.iter().map(|f| f.server.messages_per_run()).collect::<Vec<_>>(),
        )
        .context("no floor trial ran")?,
        fleet_messages_per_run: spread(|t| t.server.messages_per_run())?,
        floor_cpu_ms_per_run: Spread::of(&floors.iter().map(|f| f.cpu.total_ms()).collect::<Vec<_>>())
            .context("no floor trial ran")?,
        fleet_cpu_ms_per_run: spread(|t| t.cpu.total_ms())?,
        target_ratio: TARGET_RATIO,
        floor: floors,
        trials,
    })
}

/// The terminal runs/s of one fleet trial: the base of `latency`'s offered
/// rates when `throughput` did not run in the same bench.
pub(super) async fn base_rate(args: &BenchArgs) -> anyhow::Result<f64> {
    progress(args, "latency: measuring throughput first (one trial)");
    Ok(fleet_trial(args, args.runs).await?.terminal_runs_per_sec)
}

pub(super) fn print(result: &ThroughputResult) {
    println!(
        "throughput: {} one-step runs, workers {}x{} slots, {} submits in flight, {} trials",
        result.runs,
        result.workers,
        result.slots,
        result.concurrency,
        result.trials.len()
    );
    let row = |name: &str, s: &Spread, unit: &str| {
        println!("  {name:<24} {:>9.2} {unit:<7} (min {:.2}, max {:.2})", s.median, s.min, s.max);
    };
    row("floor", &result.floor_runs_per_sec, "runs/s");
    row("to terminal event", &result.terminal_runs_per_sec, "runs/s");
    row("to registry row", &result.registry_runs_per_sec, "runs/s");
    row("terminal / floor", &result.terminal_ratio, "");
    row("registry / floor", &result.registry_ratio, "");
    row("floor msgs/run", &result.floor_messages_per_run, "in+out");
    row("fleet msgs/run", &result.fleet_messages_per_run, "in+out");
    row("floor CPU/run", &result.floor_cpu_ms_per_run, "ms");
    row("fleet CPU/run", &result.fleet_cpu_ms_per_run, "ms");
    let verdict = |ratio: f64| if ratio >= result.target_ratio { "met" } else { "MISSED" };
    println!(
        "  target ≥ {:.2} of floor: terminal {}, registry {} (medians)",
        result.target_ratio,
        verdict(result.terminal_ratio.median),
        verdict(result.registry_ratio.median)
    );
    if let Some(last) = result.trials.last() {
        println!(
            "  at saturation (last trial): submit→start p50 {:.2} ms p99 {:.2} ms, submit→complete p50 {:.2} ms p99 {:.2} ms, failed {}",
            last.submit_to_start.p50_ms,
            last.submit_to_start.p99_ms,
            last.submit_to_complete.p50_ms,
            last.submit_to_complete.p99_ms,
            last.failed
        );
    }
}

/// One fleet trial; the floor fields are left at zero.
async fn fleet_trial(args: &BenchArgs, runs: u32) -> anyhow::Result<ThroughputTrial> {
    let mut fleet = Fleet::start(fleet::DEFAULT_LEASE_TTL).await?;
    for _ in 0..args.workers {
        fleet.add_worker(args.slots, fleet::noop_agents()).await?;
    }
    let result = trial_on(args, &fleet, runs).await;
    fleet.stop().await?;
    result
}

async fn trial_on(args: &BenchArgs, fleet: &Fleet, runs: u32) -> anyhow::Result<ThroughputTrial> {
    let client = fleet.client().await?;
    let stop = CancellationToken::new();
    let recorder = Recorder::start(&client, stop.clone()).await?;

    let warm = submit_all(&client, WARM_UP, args.concurrency).await?;
    recorder.wait_finished(&warm).await?;

    let clock = CpuClock::read();
    let cpu = CpuMeter { clock: &clock, nats_pid: fleet.nats_pid().context("nats-server is not running")? };
    let cpu_before = cpu.mark()?;
    let traffic_before = fleet.traffic().await?;
    let begin = Instant::now();
    let submitted = submit_all(&client, runs, args.concurrency).await?;
    recorder.wait_finished(&submitted).await?;
    let terminal = begin.elapsed();
    let expected = u64::from(WARM_UP + runs);
    wait_registry(fleet, expected).await?;
    let registry = begin.elapsed();
    let cpu = cpu.per_run(&cpu_before, runs)?;
    let traffic = fleet.traffic().await?.since(&traffic_before);
    stop.cancel();

    let seen = recorder.seen.lock().unwrap_or_else(PoisonError::into_inner);
    let mut start_hist = Histogram::<u64>::new(3)?;
    let mut complete_hist = Histogram::<u64>::new(3)?;
    let mut failed = 0;
    for (run, sent) in &submitted {
        if let Some(started) = seen.started.get(run) {
            start_hist.record(started.saturating_duration_since(*sent).as_micros() as u64)?;
        }
        if let Some((done, ok)) = seen.finished.get(run) {
            complete_hist.record(done.saturating_duration_since(*sent).as_micros() as u64)?;
            failed += u32::from(!ok);
        }
    }
    let rate = |elapsed: Duration| f64::from(runs) / elapsed.as_secs_f64();
    Ok(ThroughputTrial {
        floor_runs_per_sec: 0.0,
        terminal_runs_per_sec: rate(terminal),
        registry_runs_per_sec: rate(registry),
        terminal_ratio: 0.0,
        registry_ratio: 0.0,
        submit_to_start: Latency::from_micros(&start_hist),
        submit_to_complete: Latency::from_micros(&complete_hist),
        failed,
        server: ServerTraffic::per_run(traffic, runs),
        cpu,
    })
}

/// A one-step no-op run's submission.
pub(super) fn noop_request(i: u32) -> anyhow::Result<SubmitRequest> {
    Ok(SubmitRequest {
        agent: AgentName::new(fleet::NOOP_AGENT)?.to_string(),
        input: serde_json::json!({ "i": i }),
        queue: None,
        priority: None,
        idempotency_key: None,
        max_attempts: None,
    })
}

/// Submits `runs` no-op runs with at most `concurrency` in flight; returns
/// each run with the instant just before its submit was sent.
async fn submit_all(client: &Client, runs: u32, concurrency: usize) -> anyhow::Result<Vec<(RunId, Instant)>> {
    futures::stream::iter(0..runs)
        .map(|i| async move {
            let request = noop_request(i)?;
            let sent = Instant::now();
            let reply = client.submit(request).await?;
            Ok::<_, anyhow::Error>((reply.run_id, sent))
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Polls the registry until it holds `expected` terminal runs.
async fn wait_registry(fleet: &Fleet, expected: u64) -> anyhow::Result<()> {
    let tenant = runfleet_protocol::TenantId::default_tenant();
    let deadline = Instant::now() + STALL;
    loop {
        let mut terminal = 0;
        for state in [RunState::Completed, RunState::Failed] {
            terminal += fleet.registry().count(&tenant, state).await?;
        }
        if terminal >= expected {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the registry held {terminal} of {expected} finished runs after {}s",
            STALL.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// When each run started and finished, as the tenant's event subscriber
/// saw it.
#[derive(Default)]
pub(super) struct Seen {
    pub started: HashMap<RunId, Instant>,
    pub finished: HashMap<RunId, (Instant, bool)>,
}

/// An event's run and type, the rest of it skipped: all the recorder needs,
/// at a fraction of a whole event's decoding (the recorder shares the
/// machine with what it measures).
#[derive(Deserialize)]
struct EventKind {
    run_id: RunId,
    #[serde(rename = "type")]
    kind: String,
}

/// A subscriber to the tenant's events stamping `run.started` and terminal
/// events on arrival, in a task of its own.
pub(super) struct Recorder {
    pub seen: Arc<Mutex<Seen>>,
    finished: tokio::sync::Mutex<mpsc::UnboundedReceiver<RunId>>,
}

impl Recorder {
    pub async fn start(client: &Client, stop: CancellationToken) -> anyhow::Result<Self> {
        let mut events = client
            .nats()
            .subscribe(client.names().tenant_events(client.tenant()))
            .await
            .context("could not subscribe to the run events")?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let recorded = seen.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    message = events.next() => message,
                };
                let Some(message) = message else { return };
                let now = Instant::now();
                let Ok(events) =
                    runfleet_protocol::event::decode_log_message_as::<EventKind>(&message.payload)
                else {
                    continue;
                };
                for event in events {
                    let mut seen = recorded.lock().unwrap_or_else(PoisonError::into_inner);
                    match event.kind.as_str() {
                        "run.started" => {
                            seen.started.entry(event.run_id).or_insert(now);
                        }
                        "run.completed" | "run.failed" => {
                            let ok = event.kind == "run.completed";
                            if seen.finished.insert(event.run_id, (now, ok)).is_none() {
                                let _ = done_tx.send(event.run_id);
                            }
                        }
                        _ => {}
                    }
                }
            }
        });
        Ok(Self { seen, finished: tokio::sync::Mutex::new(done_rx) })
    }

    /// Waits until every run of `runs` has finished (terminal event seen).
    pub async fn wait_finished(&self, runs: &[(RunId, Instant)]) -> anyhow::Result<()> {
        let mut pending: std::collections::HashSet<RunId> = runs.iter().map(|(run, _)| *run).collect();
        {
            let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            pending.retain(|run| !seen.finished.contains_key(run));
        }
        let mut finished = self.finished.lock().await;
        while !pending.is_empty() {
            let run = tokio::time::timeout(STALL, finished.recv())
                .await
                .with_context(|| {
                    format!("no run finished for {}s ({} still running)", STALL.as_secs(), pending.len())
                })?
                .context("the event recorder stopped")?;
            pending.remove(&run);
        }
        Ok(())
    }
}
