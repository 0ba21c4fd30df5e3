//! The `failover` scenario: SIGKILL of a worker process → `run.resumed` on
//! another, as a function of the lease TTL.
//!
//! Each trial starts a fresh fleet: a child nats-server, an in-process
//! coordinator with `lease_ttl` = the TTL under test, and two worker
//! *processes* (this binary's `worker --slots 4 --test-agents`, with default
//! worker settings: job ack wait = lease TTL, heartbeat every TTL/3, idle
//! poll 1 s), the second started a random fraction of an idle poll after the
//! first so that their timers are not in phase. It submits `--failover-runs` runs of the built-in `steps` agent
//! (200 steps of 100 ms, far longer than any trial) and waits until every run
//! has `run.started`, noting which worker wrote it. After [`SETTLE`] plus a
//! random delay of up to one heartbeat period or one idle poll, whichever is
//! longer (so the kill lands at a random phase of the killed worker's lease
//! renewals and of the survivor's polling, rather than always at the same
//! one), the worker holding the most runs gets SIGKILL; the bench takes the
//! kill instant just before sending the signal. For each run that was on
//! the killed worker it measures, on its own clock:
//!
//! - **failover**: kill → the bench's subscription receives the run's
//!   `run.resumed` (written by the surviving worker);
//! - **lease age at kill**: how long before the kill the bench saw the
//!   claim last renewed: the lease's last write in a watch of the leases
//!   bucket, or, for a run killed before the heartbeat's first beat (a
//!   submission's first claim takes no lease until then), its
//!   `run.started`. The lease, or the job's ack wait, runs out TTL after
//!   that, so `TTL − age` is the least failover possible;
//! - **kill → lease expiry**: when the watch shows the lease's `MaxAge`
//!   expiry marker (none for a run that had no lease), and **expiry →
//!   resumed**, the rest.
//!
//! A run's failover is then about `TTL − age` + the time the server takes
//! to expire the lease and redeliver the job + up to one idle poll of the
//! survivor (a redelivered job wakes no one: the survivor finds it when it
//! next polls). Each TTL is tried `--repeat` times;
//! the report gives, per TTL, the median and range over the trials of each
//! trial's median and max failover, and checks the target from the issue
//! tracker: failover ≤ TTL + 1 s for every run of every trial.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::event::EventBody;
use runfleet_protocol::{RunId, WorkerId};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::fleet::Fleet;
use super::observe::{observe, Observation};
use super::procs::WorkerProcesses;
use super::{millis, progress, random_fraction, BenchArgs, Spread};

/// Worker processes per trial.
const WORKERS: usize = 2;
/// Slots of each worker process.
const SLOTS: u32 = 4;
/// Input of the runs: long enough that no run ends during a trial.
const STEPS: u32 = 200;
const STEP_MS: u64 = 100;
/// From the last `run.started` to the kill, at least; a random delay of up
/// to [`phase_window`] is added.
const SETTLE: Duration = Duration::from_secs(1);
/// The worker processes' idle poll: they run with the default.
fn idle_poll() -> Duration {
    runfleet_worker::WorkerConfig::default().idle_poll
}
/// The target from the issue tracker: failover ≤ TTL + this.
const TARGET_SLACK: Duration = Duration::from_secs(1);
/// How long to wait for the workers to register and the runs to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time to wait for a run's `run.resumed` after the kill (at least 4
/// TTLs), so a failover far off its target is measured rather than cut off.
const MIN_RESUME_TIMEOUT: Duration = Duration::from_secs(60);

/// What the `failover` scenario measured.
#[derive(Debug, Serialize)]
pub struct FailoverResult {
    pub runs_per_trial: u32,
    pub repeat: u32,
    pub target_slack_ms: f64,
    pub ttls: Vec<TtlResult>,
}

/// One lease TTL over its trials. Times in milliseconds.
#[derive(Debug, Serialize)]
pub struct TtlResult {
    pub ttl_ms: f64,
    /// Each trial's median failover: median and range over the trials.
    pub median_ms: Spread,
    /// Each trial's longest failover: median and range over the trials.
    pub max_ms: Spread,
    /// The longest failover of all trials minus the TTL.
    pub worst_max_minus_ttl_ms: f64,
    /// Every run of every trial resumed within TTL + `target_slack_ms`.
    pub meets_target: bool,
    pub trials: Vec<FailoverTrial>,
}

/// One trial: one fleet, one kill.
#[derive(Debug, Serialize)]
pub struct FailoverTrial {
    /// Runs the killed worker held.
    pub killed_runs: usize,
    /// Kill → `run.resumed`, per killed run (sorted).
    pub failover_ms: Vec<f64>,
    pub median_ms: f64,
    pub max_ms: f64,
    /// Last lease write (or, for a run not leased yet, `run.started`) seen
    /// → kill, per killed run (same order as the runs, not sorted).
    pub lease_age_at_kill_ms: Vec<f64>,
    /// Kill → lease expiry marker seen, per killed run (same order); none
    /// for a run that held no lease.
    pub kill_to_lease_expiry_ms: Vec<Option<f64>>,
    /// Kill → `run.resumed`, per killed run (same order).
    pub kill_to_resumed_ms: Vec<f64>,
    /// Last `run.started` → kill: [`SETTLE`] plus the random delay.
    pub killed_after_start_ms: f64,
}

pub(super) async fn measure(args: &BenchArgs) -> anyhow::Result<FailoverResult> {
    let mut ttls = Vec::with_capacity(args.ttls.len());
    for &ttl in &args.ttls {
        let mut trials = Vec::new();
        for trial in 1..=args.repeat {
            progress(args, format!("failover: ttl {} trial {trial}/{}", humantime(ttl), args.repeat));
            let result = trial_on_fresh_fleet(args, ttl)
                .await
                .with_context(|| format!("ttl {} trial {trial}", humantime(ttl)))?;
            progress(
                args,
                format!(
                    "failover: ttl {} trial {trial}: {} runs on the killed worker, failover {:?} ms",
                    humantime(ttl),
                    result.killed_runs,
                    result.failover_ms.iter().map(|ms| ms.round()).collect::<Vec<_>>()
                ),
            );
            trials.push(result);
        }
        ttls.push(summarize(ttl, trials)?);
    }
    Ok(FailoverResult {
        runs_per_trial: args.failover_runs,
        repeat: args.repeat,
        target_slack_ms: millis(TARGET_SLACK),
        ttls,
    })
}

fn summarize(ttl: Duration, trials: Vec<FailoverTrial>) -> anyhow::Result<TtlResult> {
    let medians: Vec<f64> = trials.iter().map(|t| t.median_ms).collect();
    let maxes: Vec<f64> = trials.iter().map(|t| t.max_ms).collect();
    let max_ms = Spread::of(&maxes).context("no trial")?;
    Ok(TtlResult {
        ttl_ms: millis(ttl),
        median_ms: Spread::of(&medians).context("no trial")?,
        worst_max_minus_ttl_ms: max_ms.max - millis(ttl),
        meets_target: max_ms.max <= millis(ttl + TARGET_SLACK),
        max_ms,
        trials,
    })
}

/// One trial on a fleet of its own, stopped afterwards whatever happened.
/// The worker processes are killed on every way out (on drop at the latest).
async fn trial_on_fresh_fleet(args: &BenchArgs, ttl: Duration) -> anyhow::Result<FailoverTrial> {
    let mut fleet = Fleet::start(ttl).await?;
    let mut workers = WorkerProcesses::default();
    let result = trial(args, ttl, &fleet, &mut workers).await;
    workers.kill_all().await;
    if result.is_err() {
        // The error names the directory; the logs there tell what happened.
        fleet.keep_files();
    }
    fleet.stop().await?;
    result
}

async fn trial(
    args: &BenchArgs,
    ttl: Duration,
    fleet: &Fleet,
    workers: &mut WorkerProcesses,
) -> anyhow::Result<FailoverTrial> {
    let client = fleet.client().await?;
    for i in 0..WORKERS {
        if i > 0 {
            // A worker polls and heartbeats on timers started when it
            // starts: workers started together would keep one's lease
            // expiries and the other's polls at the same few phases.
            tokio::time::sleep(idle_poll().mul_f64(random_fraction())).await;
        }
        workers.spawn(&fleet.url(), &fleet.dir().join(format!("worker-{i}.log")), SLOTS, &[])?;
    }
    let ids = workers.await_registered(&client).await?;

    // Observe before submitting, so nothing about the runs is missed.
    let stop_observing = CancellationToken::new();
    let _stop_on_exit = stop_observing.clone().drop_guard();
    let mut observed = observe(&client, stop_observing).await?;

    let mut runs = Vec::new();
    for _ in 0..args.failover_runs {
        let reply = client
            .submit(SubmitRequest {
                agent: "steps".to_owned(),
                input: serde_json::json!({ "steps": STEPS, "ms": STEP_MS }),
                queue: None,
                priority: None,
                idempotency_key: None,
                max_attempts: None,
            })
            .await?;
        runs.push(reply.run_id);
    }

    let mut log = Observations::default();
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while !runs.iter().all(|run| log.started.contains_key(run)) {
        let next = tokio::time::timeout_at(deadline, observed.recv())
            .await
            .with_context(|| format!("the runs did not all start within {}s", START_TIMEOUT.as_secs()))?;
        log.note(next.context("the event subscription ended")?);
    }

    // Let the runs checkpoint some steps and the heartbeat renew the
    // leases, still noting everything observed meanwhile.
    let settle_for = SETTLE + phase_window(ttl).mul_f64(random_fraction());
    let settle = tokio::time::Instant::now() + settle_for;
    while let Ok(next) = tokio::time::timeout_at(settle, observed.recv()).await {
        log.note(next.context("the event subscription ended")?);
    }
    while let Ok(next) = observed.try_recv() {
        log.note(next);
    }

    // The worker holding the most runs (on a tie, the last in id order).
    let mut held: BTreeMap<&WorkerId, Vec<RunId>> = BTreeMap::new();
    for run in &runs {
        if let Some(worker) = log.started.get(run) {
            held.entry(worker).or_default().push(*run);
        }
    }
    let (victim, victim_runs) = held
        .into_iter()
        .max_by_key(|(_, runs)| runs.len())
        .map(|(worker, runs)| (worker.clone(), runs))
        .context("no run started")?;
    let index = ids
        .iter()
        .position(|id| *id == victim)
        .with_context(|| format!("runs started on worker {victim}, which is none of the bench's"))?;

    let ages: Vec<f64> = victim_runs
        .iter()
        .map(|run| log.renewed.get(run).map_or(f64::NAN, |renewed| millis(renewed.elapsed())))
        .collect();
    let killed_at = workers.kill(index).await?;
    let resume_timeout = (ttl * 4).max(MIN_RESUME_TIMEOUT);
    let deadline = tokio::time::Instant::from_std(killed_at + resume_timeout);
    let resumed = |log: &Observations| victim_runs.iter().all(|run| log.resumed.contains_key(run));
    while !resumed(&log) {
        match tokio::time::timeout_at(deadline, observed.recv()).await {
            Ok(next) => log.note(next.context("the event subscription ended")?),
            Err(_) => {
                let missing = victim_runs.iter().filter(|run| !log.resumed.contains_key(run)).count();
                anyhow::bail!(
                    "{missing} of the killed worker's {} runs did not resume within {}s of the kill; \
                     the worker and nats-server logs are kept in {}",
                    victim_runs.len(),
                    resume_timeout.as_secs(),
                    fleet.dir().display()
                );
            }
        }
    }

    let since_kill = |at: &Instant| millis(at.saturating_duration_since(killed_at));
    let kill_to_resumed: Vec<f64> =
        victim_runs.iter().filter_map(|run| log.resumed.get(run)).map(since_kill).collect();
    let kill_to_expiry =
        victim_runs.iter().map(|run| log.expired.get(run).map(since_kill)).collect::<Vec<_>>();
    let mut sorted = kill_to_resumed.clone();
    sorted.sort_by(f64::total_cmp);
    let spread = Spread::of(&sorted).context("no run resumed")?;
    Ok(FailoverTrial {
        killed_runs: victim_runs.len(),
        failover_ms: sorted,
        median_ms: spread.median,
        max_ms: spread.max,
        lease_age_at_kill_ms: ages,
        kill_to_lease_expiry_ms: kill_to_expiry,
        kill_to_resumed_ms: kill_to_resumed,
        killed_after_start_ms: millis(settle_for),
    })
}

/// The window the kill's random delay is drawn from: the longer of the
/// workers' heartbeat period (TTL/3 by default) and their idle poll, so
/// every phase of the one and at least a whole period of the other is
/// sampled.
fn phase_window(ttl: Duration) -> Duration {
    (ttl / 3).max(idle_poll())
}

/// What the bench saw of the trial's runs, by run.
#[derive(Default)]
struct Observations {
    /// The worker that wrote `run.started`.
    started: HashMap<RunId, WorkerId>,
    /// When `run.resumed` arrived.
    resumed: HashMap<RunId, Instant>,
    /// When the claim was last seen renewed: the latest lease write (by
    /// lease key = run id), or `run.started` before any.
    renewed: HashMap<RunId, Instant>,
    /// When the first removal of the lease arrived (its expiry, for a run
    /// of the killed worker).
    expired: HashMap<RunId, Instant>,
}

impl Observations {
    fn note(&mut self, observation: Observation) {
        match observation {
            Observation::Event(at, event) => match event.body {
                EventBody::Started(_) => {
                    if let Some(worker) = event.worker_id {
                        self.started.entry(event.run_id).or_insert(worker);
                    }
                    // A slow claim writes its lease before `run.started`.
                    self.renewed.entry(event.run_id).or_insert(at);
                }
                EventBody::Resumed(_) => {
                    self.resumed.entry(event.run_id).or_insert(at);
                }
                _ => {}
            },
            Observation::LeaseWritten(at, key) => {
                if let Ok(run) = key.parse::<RunId>() {
                    self.renewed.insert(run, at);
                }
            }
            Observation::LeaseRemoved(at, key) => {
                if let Ok(run) = key.parse::<RunId>() {
                    self.expired.entry(run).or_insert(at);
                }
            }
            Observation::JobAcked(_) => {}
        }
    }
}

fn humantime(duration: Duration) -> String {
    humantime_serde::re::humantime::format_duration(duration).to_string()
}

pub(super) fn print(result: &FailoverResult) {
    let secs = |ms: f64| format!("{:.2}", ms / 1e3);
    let median = |values: &[f64]| Spread::of(values).map_or_else(|| "-".to_owned(), |s| secs(s.median));
    println!(
        "failover  SIGKILL → run.resumed: {} `steps` runs per trial on 2 worker processes, {} trials per TTL",
        result.runs_per_trial, result.repeat
    );
    println!(
        "{:<6}{:<7}{:>7}{:>20}{:>20}{:>10}   {:>9}{:>9}{:>9}  (medians over the killed runs, s)",
        "ttl",
        "trial",
        "killed",
        "failover median s",
        "failover max s",
        "max−ttl",
        "age@kill",
        "→expiry",
        "→resumed"
    );
    for ttl in &result.ttls {
        let ttl_label = format!("{}s", ttl.ttl_ms / 1e3);
        for (i, trial) in ttl.trials.iter().enumerate() {
            let expiry_to_resumed: Vec<f64> = trial
                .kill_to_lease_expiry_ms
                .iter()
                .zip(&trial.kill_to_resumed_ms)
                .filter_map(|(expiry, resumed)| expiry.map(|expiry| resumed - expiry))
                .collect();
            let expiries: Vec<f64> = trial.kill_to_lease_expiry_ms.iter().flatten().copied().collect();
            println!(
                "{:<6}{:<7}{:>7}{:>20}{:>20}{:>+10.2}   {:>9}{:>9}{:>9}",
                ttl_label,
                format!("#{}", i + 1),
                trial.killed_runs,
                secs(trial.median_ms),
                secs(trial.max_ms),
                (trial.max_ms - ttl.ttl_ms) / 1e3,
                median(&trial.lease_age_at_kill_ms),
                median(&expiries),
                median(&expiry_to_resumed),
            );
        }
        let spread = |s: &Spread| format!("{} ({}–{})", secs(s.median), secs(s.min), secs(s.max));
        println!(
            "{:<6}{:<7}{:>7}{:>20}{:>20}{:>+10.2}   {} (every run ≤ ttl + {} s)",
            ttl_label,
            "all",
            "",
            spread(&ttl.median_ms),
            spread(&ttl.max_ms),
            ttl.worst_max_minus_ttl_ms / 1e3,
            if ttl.meets_target { "meets target" } else { "MISSES target" },
            result.target_slack_ms / 1e3,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(failover_ms: &[f64]) -> FailoverTrial {
        let spread = Spread::of(failover_ms).unwrap_or_else(|| panic!("empty"));
        FailoverTrial {
            killed_runs: failover_ms.len(),
            failover_ms: failover_ms.to_vec(),
            median_ms: spread.median,
            max_ms: spread.max,
            lease_age_at_kill_ms: vec![0.0; failover_ms.len()],
            kill_to_lease_expiry_ms: vec![None; failover_ms.len()],
            kill_to_resumed_ms: failover_ms.to_vec(),
            killed_after_start_ms: 1000.0,
        }
    }

    #[test]
    fn target_holds_only_if_every_run_of_every_trial_is_within_ttl_plus_slack() {
        let ttl = Duration::from_secs(2);
        let within = summarize(ttl, vec![trial(&[2100.0, 2900.0]), trial(&[2500.0])])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(within.meets_target);
        assert_eq!(within.max_ms, Spread { median: 2700.0, min: 2500.0, max: 2900.0 });
        assert!((within.worst_max_minus_ttl_ms - 900.0).abs() < 1e-9);
        let beyond =
            summarize(ttl, vec![trial(&[2100.0]), trial(&[3100.0])]).unwrap_or_else(|e| panic!("{e}"));
        assert!(!beyond.meets_target);
        assert!(summarize(ttl, Vec::new()).is_err());
    }

    #[test]
    fn kill_phase_is_drawn_from_a_heartbeat_period_or_an_idle_poll() {
        // A short TTL's heartbeat period is shorter than the idle poll.
        assert_eq!(phase_window(Duration::from_millis(900)), idle_poll());
        assert_eq!(phase_window(Duration::from_secs(6)), Duration::from_secs(2));
        for _ in 0..1000 {
            let x = random_fraction();
            assert!((0.0..1.0).contains(&x), "{x}");
        }
    }

    #[test]
    fn observations_keep_last_renewal_and_first_removal() {
        let run = RunId::generate();
        let key = run.to_string();
        let mut seen = Observations::default();
        let (t0, t1) = (Instant::now(), Instant::now() + Duration::from_millis(5));
        seen.note(Observation::LeaseWritten(t0, key.clone()));
        seen.note(Observation::LeaseWritten(t1, key.clone()));
        seen.note(Observation::LeaseRemoved(t1, key.clone()));
        seen.note(Observation::LeaseRemoved(t0, key.clone()));
        seen.note(Observation::LeaseWritten(t0, "not-a-run".to_owned()));
        assert_eq!(seen.renewed.get(&run), Some(&t1));
        assert_eq!(seen.expired.get(&run), Some(&t1));
        assert_eq!(seen.renewed.len(), 1);
    }

    #[test]
    fn a_claim_not_leased_yet_counts_from_its_start() {
        use runfleet_protocol::event::{Event, RunStarted};
        let started = |run: RunId| {
            let body = EventBody::Started(RunStarted { delivery: 1 });
            let (tenant, worker) = (runfleet_protocol::TenantId::default_tenant(), WorkerId::generate());
            let event = Event {
                run_id: run,
                tenant,
                seq: 2,
                ts_ms: 0,
                attempt: 1,
                worker_id: Some(worker),
                trace_id: None,
                body,
            };
            Box::new(event)
        };
        let (fast, slow) = (RunId::generate(), RunId::generate());
        let mut seen = Observations::default();
        let (t0, t1, t2) = (
            Instant::now(),
            Instant::now() + Duration::from_millis(5),
            Instant::now() + Duration::from_millis(9),
        );
        // A fast claim: `run.started`, then the first beat's lease.
        seen.note(Observation::Event(t0, started(fast)));
        assert_eq!(seen.renewed.get(&fast), Some(&t0));
        seen.note(Observation::LeaseWritten(t2, fast.to_string()));
        assert_eq!(seen.renewed.get(&fast), Some(&t2));
        // A slow claim: the lease, then `run.started`.
        seen.note(Observation::LeaseWritten(t0, slow.to_string()));
        seen.note(Observation::Event(t1, started(slow)));
        assert_eq!(seen.renewed.get(&slow), Some(&t0));
        assert!(seen.expired.is_empty());
    }
}
