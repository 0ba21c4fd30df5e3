//! The `drain` scenario: how long a gracefully stopped worker's runs wait
//! before another worker carries on with them.
//!
//! Each trial starts a fresh fleet: a child nats-server and an in-process
//! coordinator with a long lease TTL ([`LEASE_TTL`], so a hand-off that
//! waited for the lease to expire would stand out), then worker A, a
//! *process* (this binary's `worker --slots N --test-agents
//! --shutdown-grace 500ms`, N = `--drain-runs`). It submits `--drain-runs`
//! runs of the built-in `steps` agent ([`STEPS`] steps of [`STEP_MS`] ms,
//! longer than a trial's drain) and waits until every run has `run.started`
//! from A. After a random delay of up to one idle poll it starts worker B
//! (another process, N slots, default settings), waits until B is
//! registered and another such delay (so B's polling has a random phase
//! against the runs' steps, and the SIGTERM lands at a random point of a
//! step, rather than always the same ones), and sends A SIGTERM (the
//! instant is taken just before the signal is sent). A stops fetching, lets
//! its runs go on for the grace, then hands each off at its next step
//! boundary: `run.handoff`, lease released, job NAKed without delay. For
//! each handed-off run the bench measures, on its own clock:
//!
//! - **SIGTERM → `run.handoff`** received: about the grace plus the rest of
//!   the step in progress;
//! - **SIGTERM → `run.resumed`** received (written by B): the hand-off plus
//!   the time B takes to get the redelivered job. A NAK publishes no job
//!   wake-up, so an idle B finds it at its next idle poll, up to one idle
//!   poll later.
//!
//! Once every run has ended, each run's log is read back from the events
//! stream and checked: exactly one terminal event, `run.completed`; a
//! handed-off run has one `run.handoff` from A followed by `run.resumed`
//! from B; every step completed once. Problems are reported, not raised.
//! The figures are reported against the crash alternative: a SIGKILLed
//! worker's runs wait about a lease TTL, so the report gives max(SIGTERM →
//! `run.resumed`) / lease TTL. Nothing is asserted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use nix::sys::signal::Signal;
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::{RunId, WorkerId};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::fleet::Fleet;
use super::observe::{observe, Observation};
use super::procs::WorkerProcesses;
use super::{millis, progress, random_fraction, BenchArgs, Spread};
use crate::client::Client;

/// The lease TTL of the trials' fleets: long, so a hand-off that fell back
/// on lease expiry would be obvious.
const LEASE_TTL: Duration = Duration::from_secs(15);
/// Worker A's `--shutdown-grace`.
const GRACE: Duration = Duration::from_millis(500);
/// Input of the runs: 20 steps of 200 ms, so runs are still going when the
/// grace is over.
const STEPS: u32 = 20;
const STEP_MS: u64 = 200;
/// How long to wait for the runs to start and for every run to end.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const END_TIMEOUT: Duration = Duration::from_secs(60);
/// How long worker A may still take to exit once its runs ended elsewhere:
/// more than its hand-off timeout (the default, 10 s).
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// After the last terminal event, how long to let any stray write land
/// before the logs are read back.
const SETTLE: Duration = Duration::from_millis(500);

/// The worker processes' idle poll: they run with the default.
fn idle_poll() -> Duration {
    runfleet_worker::WorkerConfig::default().idle_poll
}

/// What the `drain` scenario measured. Times in milliseconds.
#[derive(Debug, Serialize)]
pub struct DrainResult {
    pub runs_per_trial: u32,
    pub steps_per_run: u32,
    pub step_ms: u64,
    pub shutdown_grace_ms: f64,
    pub lease_ttl_ms: f64,
    /// The idle poll of worker B: a NAKed job waits up to this for it.
    pub idle_poll_ms: f64,
    /// SIGTERM → `run.handoff`, over every handed-off run of every trial.
    pub sigterm_to_handoff_ms: Spread,
    /// SIGTERM → `run.resumed`, over every handed-off run of every trial.
    pub sigterm_to_resumed_ms: Spread,
    /// `run.handoff` → `run.resumed`, over every handed-off run.
    pub handoff_to_resumed_ms: Spread,
    /// The longest SIGTERM → `run.resumed` over the lease TTL: what a
    /// graceful stop takes relative to a crash's failover (about one TTL).
    pub max_resumed_per_lease_ttl: f64,
    /// Every run of every trial passed the log checks.
    pub verified: bool,
    pub trials: Vec<DrainTrial>,
}

/// One trial: one fleet, one SIGTERM.
#[derive(Debug, Serialize)]
pub struct DrainTrial {
    /// Runs handed off by A (the others ended on A during the grace).
    pub handed_off: usize,
    /// SIGTERM → `run.handoff`, per handed-off run (sorted).
    pub sigterm_to_handoff_ms: Vec<f64>,
    /// SIGTERM → `run.resumed`, per handed-off run (sorted).
    pub sigterm_to_resumed_ms: Vec<f64>,
    /// `run.handoff` → `run.resumed`, per handed-off run (sorted).
    pub handoff_to_resumed_ms: Vec<f64>,
    pub handoff_median_ms: f64,
    pub handoff_max_ms: f64,
    pub resumed_median_ms: f64,
    pub resumed_max_ms: f64,
    /// SIGTERM → worker A's process exited.
    pub sigterm_to_exit_ms: Option<f64>,
    /// Last `run.started` → SIGTERM: two random delays of up to an idle
    /// poll each, around B's start and registration.
    pub started_to_sigterm_ms: f64,
    /// Runs whose resumed attempt started a step an earlier attempt had
    /// already started (none when hand-offs happen at step boundaries).
    pub steps_started_twice: usize,
    /// What the log checks found wrong, one line per problem.
    pub problems: Vec<String>,
}

pub(super) async fn measure(args: &BenchArgs) -> anyhow::Result<DrainResult> {
    let mut trials = Vec::new();
    for trial in 1..=args.repeat {
        progress(args, format!("drain: trial {trial}/{}", args.repeat));
        let result = trial_on_fresh_fleet(args).await.with_context(|| format!("trial {trial}"))?;
        progress(
            args,
            format!(
                "drain: trial {trial}: {} runs handed off, SIGTERM → resumed {:?} ms{}",
                result.handed_off,
                result.sigterm_to_resumed_ms.iter().map(|ms| ms.round()).collect::<Vec<_>>(),
                if result.problems.is_empty() {
                    String::new()
                } else {
                    format!(", {} problems", result.problems.len())
                }
            ),
        );
        trials.push(result);
    }
    summarize(args, trials)
}

fn summarize(args: &BenchArgs, trials: Vec<DrainTrial>) -> anyhow::Result<DrainResult> {
    let pooled = |pick: fn(&DrainTrial) -> &Vec<f64>| -> anyhow::Result<Spread> {
        let all: Vec<f64> = trials.iter().flat_map(|t| pick(t).iter().copied()).collect();
        Spread::of(&all).context("no run was handed off in any trial")
    };
    let sigterm_to_resumed_ms = pooled(|t| &t.sigterm_to_resumed_ms)?;
    Ok(DrainResult {
        runs_per_trial: args.drain_runs,
        steps_per_run: STEPS,
        step_ms: STEP_MS,
        shutdown_grace_ms: millis(GRACE),
        lease_ttl_ms: millis(LEASE_TTL),
        idle_poll_ms: millis(idle_poll()),
        sigterm_to_handoff_ms: pooled(|t| &t.sigterm_to_handoff_ms)?,
        handoff_to_resumed_ms: pooled(|t| &t.handoff_to_resumed_ms)?,
        max_resumed_per_lease_ttl: sigterm_to_resumed_ms.max / millis(LEASE_TTL),
        sigterm_to_resumed_ms,
        verified: trials.iter().all(|t| t.problems.is_empty()),
        trials,
    })
}

/// One trial on a fleet of its own, stopped afterwards whatever happened.
/// The worker processes are killed on every way out (on drop at the latest).
async fn trial_on_fresh_fleet(args: &BenchArgs) -> anyhow::Result<DrainTrial> {
    let mut fleet = Fleet::start(LEASE_TTL).await?;
    let mut workers = WorkerProcesses::default();
    let result = trial(args, &fleet, &mut workers).await;
    workers.kill_all().await;
    if result.as_ref().map_or(true, |trial| !trial.problems.is_empty()) {
        // The error or the problems name no file; the logs tell what happened.
        fleet.keep_files();
        progress(args, format!("drain: worker and nats-server logs kept in {}", fleet.dir().display()));
    }
    fleet.stop().await?;
    result
}

/// What the bench saw of the trial's runs, by run.
#[derive(Default)]
struct Observations {
    started: HashMap<RunId, (Instant, Option<WorkerId>)>,
    handoff: HashMap<RunId, Instant>,
    resumed: HashMap<RunId, Instant>,
    ended: HashMap<RunId, Instant>,
}

impl Observations {
    fn note(&mut self, observation: Observation) {
        let Observation::Event(at, event) = observation else { return };
        match &event.body {
            EventBody::Started(_) => {
                self.started.entry(event.run_id).or_insert((at, event.worker_id.clone()));
            }
            EventBody::Handoff(_) => {
                self.handoff.entry(event.run_id).or_insert(at);
            }
            EventBody::Resumed(_) => {
                self.resumed.entry(event.run_id).or_insert(at);
            }
            body if body.is_terminal() => {
                self.ended.entry(event.run_id).or_insert(at);
            }
            _ => {}
        }
    }
}

async fn trial(args: &BenchArgs, fleet: &Fleet, workers: &mut WorkerProcesses) -> anyhow::Result<DrainTrial> {
    let client = fleet.client().await?;
    let grace = humantime_serde::re::humantime::format_duration(GRACE).to_string();
    let a = workers.spawn(
        &fleet.url(),
        &fleet.dir().join("worker-a.log"),
        args.drain_runs,
        &["--shutdown-grace", &grace],
    )?;
    let worker_a = workers.await_registered(&client).await?.swap_remove(a);

    // Observe before submitting, so nothing about the runs is missed.
    let stop_observing = CancellationToken::new();
    let _stop_on_exit = stop_observing.clone().drop_guard();
    let mut observed = observe(&client, stop_observing).await?;

    let mut runs = Vec::new();
    for _ in 0..args.drain_runs {
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
    let last_started = runs.iter().filter_map(|run| log.started.get(run)).map(|(at, _)| *at).max();
    if let Some(run) =
        runs.iter().find(|run| log.started.get(run).and_then(|(_, w)| w.as_ref()) != Some(&worker_a))
    {
        anyhow::bail!("run {run} did not start on worker A ({worker_a})");
    }

    // The runs' steps are in phase (they started together) and B polls on
    // a timer started when B starts: at fixed delays, every trial would
    // hand off at the same point of a step and meet B's poll at the same
    // phase. A random delay before B starts samples B's phase against the
    // steps; one before the SIGTERM samples the point of the step.
    let phase_window = idle_poll().max(Duration::from_millis(STEP_MS));
    note_for(&mut observed, &mut log, phase_window.mul_f64(random_fraction())).await?;
    let b = workers.spawn(&fleet.url(), &fleet.dir().join("worker-b.log"), args.drain_runs, &[])?;
    let worker_b = workers.await_registered(&client).await?.swap_remove(b);
    note_for(&mut observed, &mut log, phase_window.mul_f64(random_fraction())).await?;

    let sigterm = workers.signal(a, Signal::SIGTERM)?;
    let started_to_sigterm_ms =
        last_started.map_or(f64::NAN, |at| millis(sigterm.saturating_duration_since(at)));
    let mut exited = None;
    let deadline = tokio::time::Instant::from_std(sigterm + END_TIMEOUT);
    while !runs.iter().all(|run| log.ended.contains_key(run)) {
        tokio::select! {
            next = tokio::time::timeout_at(deadline, observed.recv()) => match next {
                Ok(next) => log.note(next.context("the event subscription ended")?),
                Err(_) => {
                    let missing = runs.iter().filter(|run| !log.ended.contains_key(run)).count();
                    anyhow::bail!(
                        "{missing} of {} runs did not end within {}s of SIGTERM; the worker and nats-server logs are kept in {}",
                        runs.len(),
                        END_TIMEOUT.as_secs(),
                        fleet.dir().display()
                    );
                }
            },
            status = workers.wait(a), if exited.is_none() => {
                exited = Some((Instant::now(), status?));
            }
        }
    }
    if exited.is_none() {
        // A hands off before its runs can end, so it should be gone.
        if let Ok(status) = tokio::time::timeout(EXIT_TIMEOUT, workers.wait(a)).await {
            exited = Some((Instant::now(), status?));
        }
    }
    tokio::time::sleep(SETTLE).await;

    let mut problems = Vec::new();
    let mut steps_started_twice = 0;
    for run in &runs {
        let events = read_log(&client, *run).await?;
        let check = check_log(&events, &worker_a, &worker_b, log.handoff.contains_key(run));
        steps_started_twice += usize::from(check.steps_started_twice);
        problems.extend(check.problems.into_iter().map(|problem| format!("run {run}: {problem}")));
    }
    match &exited {
        None => problems.push(format!(
            "worker A did not exit within {}s of the end of its runs (after SIGTERM)",
            EXIT_TIMEOUT.as_secs()
        )),
        Some((_, status)) if !status.success() => problems.push(format!("worker A exited with {status}")),
        Some(_) => {}
    }

    let since_sigterm = |at: &Instant| millis(at.saturating_duration_since(sigterm));
    let handed_off: Vec<RunId> = runs.iter().copied().filter(|run| log.handoff.contains_key(run)).collect();
    let mut to_handoff: Vec<f64> =
        handed_off.iter().filter_map(|run| log.handoff.get(run)).map(since_sigterm).collect();
    let mut to_resumed: Vec<f64> =
        handed_off.iter().filter_map(|run| log.resumed.get(run)).map(since_sigterm).collect();
    let mut handoff_to_resumed: Vec<f64> = handed_off
        .iter()
        .filter_map(|run| {
            Some(millis(log.resumed.get(run)?.saturating_duration_since(*log.handoff.get(run)?)))
        })
        .collect();
    for values in [&mut to_handoff, &mut to_resumed, &mut handoff_to_resumed] {
        values.sort_by(f64::total_cmp);
    }
    let handoff = Spread::of(&to_handoff);
    let resumed = Spread::of(&to_resumed);
    Ok(DrainTrial {
        handed_off: handed_off.len(),
        handoff_median_ms: handoff.map_or(f64::NAN, |s| s.median),
        handoff_max_ms: handoff.map_or(f64::NAN, |s| s.max),
        resumed_median_ms: resumed.map_or(f64::NAN, |s| s.median),
        resumed_max_ms: resumed.map_or(f64::NAN, |s| s.max),
        sigterm_to_handoff_ms: to_handoff,
        sigterm_to_resumed_ms: to_resumed,
        handoff_to_resumed_ms: handoff_to_resumed,
        sigterm_to_exit_ms: exited.as_ref().map(|(at, _)| since_sigterm(at)),
        started_to_sigterm_ms,
        steps_started_twice,
        problems,
    })
}

/// Notes what is observed for `period`.
async fn note_for(
    observed: &mut tokio::sync::mpsc::UnboundedReceiver<Observation>,
    log: &mut Observations,
    period: Duration,
) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + period;
    while let Ok(next) = tokio::time::timeout_at(until, observed.recv()).await {
        log.note(next.context("the event subscription ended")?);
    }
    Ok(())
}

/// Every event of `run`, read back from the events stream (not the
/// registry, which may lag) through an ordered consumer, up to the last one
/// stored.
async fn read_log(client: &Client, run: RunId) -> anyhow::Result<Vec<Event>> {
    let js = async_nats::jetstream::new(client.nats().clone());
    let stream =
        js.get_stream(client.names().events_stream()).await.context("could not open the events stream")?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_subject: client.nats().new_inbox(),
            filter_subject: client.names().run_events(client.tenant(), run),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .with_context(|| format!("could not read the log of run {run}"))?;
    let mut messages =
        consumer.messages().await.with_context(|| format!("could not read the log of run {run}"))?;
    let mut events = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .with_context(|| format!("the log of run {run} stopped coming after {} events", events.len()))?
            .with_context(|| format!("the log of run {run} ended"))?
            .with_context(|| format!("could not read the log of run {run}"))?;
        let pending = message.info().map_err(|e| anyhow::anyhow!("{e}"))?.pending;
        events.extend(runfleet_protocol::event::decode_log_message(&message.payload)?);
        if pending == 0 {
            return Ok(events);
        }
    }
}

/// What [`check_log`] found in one run's log.
#[derive(Debug, Default, PartialEq)]
struct Check {
    /// A step was started by more than one attempt.
    steps_started_twice: bool,
    problems: Vec<String>,
}

/// Checks one run's log after the drain: gapless, exactly one terminal
/// event and it is `run.completed`; every step that started completed once;
/// if the bench saw a hand-off, exactly one `run.handoff`, written by
/// `from`, followed by a `run.resumed` written by `to`.
fn check_log(events: &[Event], from: &WorkerId, to: &WorkerId, handed_off: bool) -> Check {
    let mut check = Check::default();
    if events.iter().enumerate().any(|(i, event)| event.seq != i as u64 + 1) {
        check.problems.push("the log's seq has a gap or a repeat".to_owned());
    }
    let terminals: Vec<&Event> = events.iter().filter(|event| event.body.is_terminal()).collect();
    match terminals.as_slice() {
        [only] if matches!(only.body, EventBody::Completed(_)) => {}
        [only] => check.problems.push(format!("ended with {}, not run.completed", only.body.type_name())),
        more => check.problems.push(format!("{} terminal events, not one", more.len())),
    }

    let mut started: HashMap<u32, u32> = HashMap::new();
    let mut completed: HashMap<u32, u32> = HashMap::new();
    for event in events {
        match &event.body {
            EventBody::StepStarted(step) => *started.entry(step.index).or_default() += 1,
            EventBody::StepCompleted(step) => *completed.entry(step.index).or_default() += 1,
            _ => {}
        }
    }
    check.steps_started_twice = started.values().any(|&n| n > 1);
    if let Some((index, n)) = completed.iter().find(|(_, &n)| n != 1) {
        check.problems.push(format!("step {index} completed {n} times"));
    }
    if started.keys().any(|index| !completed.contains_key(index)) {
        check.problems.push("a step started but never completed".to_owned());
    }

    let handoffs: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.body, EventBody::Handoff(_)))
        .map(|(i, _)| i)
        .collect();
    match (handed_off, handoffs.as_slice()) {
        (false, []) => {}
        (true, [at]) => {
            if events[*at].worker_id.as_ref() != Some(from) {
                check.problems.push("run.handoff was not written by worker A".to_owned());
            }
            let resumed = events[*at..].iter().find(|e| matches!(e.body, EventBody::Resumed(_)));
            match resumed {
                Some(event) if event.worker_id.as_ref() == Some(to) => {}
                Some(_) => {
                    check.problems.push("resumed after the hand-off by a worker other than B".to_owned())
                }
                None => check.problems.push("no run.resumed after run.handoff".to_owned()),
            }
        }
        (_, found) => check.problems.push(format!(
            "{} run.handoff events (the bench saw {})",
            found.len(),
            u8::from(handed_off)
        )),
    }
    check
}

pub(super) fn print(result: &DrainResult) {
    let secs = |ms: f64| format!("{:.2}", ms / 1e3);
    let spread = |s: &Spread| format!("{} ({}–{})", secs(s.median), secs(s.min), secs(s.max));
    println!(
        "drain  SIGTERM → run.handoff → run.resumed on another worker: {} `steps` runs ({} x {} ms) per trial, \
         grace {} s, lease TTL {} s",
        result.runs_per_trial,
        result.steps_per_run,
        result.step_ms,
        secs(result.shutdown_grace_ms),
        secs(result.lease_ttl_ms)
    );
    println!(
        "{:<7}{:>8}{:>18}{:>16}{:>18}{:>16}{:>10}{:>10}",
        "trial",
        "handed",
        "→handoff med s",
        "→handoff max s",
        "→resumed med s",
        "→resumed max s",
        "→exit s",
        "problems"
    );
    for (i, trial) in result.trials.iter().enumerate() {
        println!(
            "{:<7}{:>8}{:>18}{:>16}{:>18}{:>16}{:>10}{:>10}",
            format!("#{}", i + 1),
            trial.handed_off,
            secs(trial.handoff_median_ms),
            secs(trial.handoff_max_ms),
            secs(trial.resumed_median_ms),
            secs(trial.resumed_max_ms),
            trial.sigterm_to_exit_ms.map_or_else(|| "-".to_owned(), secs),
            trial.problems.len(),
        );
    }
    println!("all runs, median (range), s:");
    println!("  SIGTERM → run.handoff   {}", spread(&result.sigterm_to_handoff_ms));
    println!(
        "  run.handoff → resumed   {}   (worker B's idle poll: {} s)",
        spread(&result.handoff_to_resumed_ms),
        secs(result.idle_poll_ms)
    );
    println!("  SIGTERM → run.resumed   {}", spread(&result.sigterm_to_resumed_ms));
    println!(
        "max SIGTERM → run.resumed = {:.2} x the lease TTL (a crashed worker's runs wait about 1 x)",
        result.max_resumed_per_lease_ttl
    );
    println!(
        "log checks (one terminal event, run.completed, steps once, hand-off A → B): {}",
        if result.verified { "all runs pass" } else { "PROBLEMS" }
    );
    for (i, trial) in result.trials.iter().enumerate() {
        for problem in &trial.problems {
            println!("  trial #{}: {problem}", i + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use runfleet_protocol::event::{RunCompleted, RunHandoff, RunResumed, StepCompleted, StepStarted};
    use runfleet_protocol::TenantId;

    use super::*;

    /// A run's log: `bodies` in order, each with the worker that wrote it.
    fn log(bodies: Vec<(&WorkerId, EventBody)>) -> Vec<Event> {
        let run = RunId::generate();
        let events = bodies.into_iter().zip(1..).map(|((worker, body), seq)| Event {
            run_id: run,
            tenant: TenantId::default_tenant(),
            seq,
            ts_ms: 0,
            attempt: 1,
            worker_id: Some(worker.clone()),
            trace_id: None,
            body,
        });
        events.collect()
    }

    fn step(index: u32, done: bool) -> EventBody {
        let name = format!("step-{index}");
        if done {
            EventBody::StepCompleted(StepCompleted { index, name, attempt: 1, duration_ms: 0, blob: false })
        } else {
            EventBody::StepStarted(StepStarted { index, name, attempt: 1 })
        }
    }

    fn handoff() -> EventBody {
        EventBody::Handoff(RunHandoff { failures: 0 })
    }

    fn resumed() -> EventBody {
        EventBody::Resumed(RunResumed { delivery: 2, steps_replayed: 1, failures: 0 })
    }

    fn completed() -> EventBody {
        EventBody::Completed(RunCompleted { output: serde_json::json!({}) })
    }

    #[test]
    fn a_hand_off_at_a_step_boundary_passes() {
        let (a, b) = (WorkerId::generate(), WorkerId::generate());
        let events = log(vec![
            (&a, step(0, false)),
            (&a, step(0, true)),
            (&a, handoff()),
            (&b, resumed()),
            (&b, step(1, false)),
            (&b, step(1, true)),
            (&b, completed()),
        ]);
        assert_eq!(check_log(&events, &a, &b, true), Check::default());
        // Resumed by the wrong worker; a hand-off the bench did not see.
        assert_eq!(check_log(&events, &b, &a, true).problems.len(), 2);
        assert_eq!(check_log(&events, &a, &b, false).problems.len(), 1);
    }

    #[test]
    fn a_second_terminal_event_or_a_repeated_step_is_a_problem() {
        let (a, b) = (WorkerId::generate(), WorkerId::generate());
        let events = log(vec![(&a, handoff()), (&b, resumed()), (&b, completed()), (&a, completed())]);
        let check = check_log(&events, &a, &b, true);
        assert_eq!(check.problems, vec!["2 terminal events, not one".to_owned()]);

        // A step interrupted on A and run again on B: started twice,
        // completed once, which is not a log problem.
        let events = log(vec![
            (&a, step(0, false)),
            (&a, handoff()),
            (&b, resumed()),
            (&b, step(0, false)),
            (&b, step(0, true)),
            (&b, completed()),
        ]);
        let check = check_log(&events, &a, &b, true);
        assert!(check.steps_started_twice);
        assert!(check.problems.is_empty(), "{:?}", check.problems);

        let events = log(vec![(&a, step(0, true)), (&a, step(0, true)), (&a, completed())]);
        assert_eq!(check_log(&events, &a, &b, false).problems, vec!["step 0 completed 2 times".to_owned()]);
    }
}
