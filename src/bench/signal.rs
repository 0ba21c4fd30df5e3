//! The `signal` scenario: how long a parked run takes to resume once it is
//! signalled.
//!
//! A fleet of its own (child nats-server, in-process coordinator on SQLite,
//! one in-process worker with the built-in and test agents) runs
//! `--signal-runs` trials one after the other, after [`WARMUP`] unrecorded
//! ones. Each trial is two runs, one at a time on an otherwise idle fleet:
//!
//! - an `await` run (input `{"key": "go"}`: waits for signal `go` without
//!   timeout). Once the bench has seen its `run.waiting` *and* the worker's
//!   ack of its job (the worker acks the job after writing `run.waiting`
//!   and letting go of the lease, if the run had one yet: only then is the
//!   run fully parked, holding no slot, no lease and no job; a signal sent
//!   earlier takes another path, where the coordinator finds the job still
//!   queued), the bench notes t0 and sends signal `go` with the client. It
//!   measures, on its own clock, t0 → the signal API's reply (which comes
//!   once the payload is stored and the wake job published), t0 →
//!   `run.resumed` received (coordinator → JetStream → job wake-up → fetch
//!   → lease → `run.resumed`) and t0 → `run.completed` received (plus
//!   replaying the wait, recording its outcome as a durable step and
//!   completing);
//! - the baseline, measured on the same fleet in the same trial: an `echo`
//!   run, from just before its submit request is sent to `run.started`
//!   received, the plain dispatch path (coordinator → JetStream → job
//!   wake-up → fetch → `run.started`: a submission's first claim takes no
//!   lease); t0 → the submit API's reply is noted too, the API half of the
//!   baseline to set beside the signal's.
//!
//! Each run's end (its terminal event and the ack of its job) is awaited
//! before the next run starts, so runs never overlap. Acks name no run, so
//! the bench counts them: a trial's `await` run acks twice (its park, then
//! its end) and its `echo` run once. Events are
//! received through a core-NATS subscription to the tenant's events, as an
//! external subscriber sees them, and stamped on arrival by a task of their
//! own. The report gives p50 / p90 / p99 / max of each, and signal→resumed
//! p50 / baseline p50: near 1 means resuming a parked run costs what
//! dispatching a new one does.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::event::EventBody;
use runfleet_protocol::RunId;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::fleet::Fleet;
use super::observe::{observe, Observation};
use super::{progress, BenchArgs, Quantiles};
use crate::client::Client;

/// Unrecorded trials first (connections, first stream and bucket writes).
const WARMUP: u32 = 5;
/// The signal key the `await` runs wait on.
const KEY: &str = "go";
/// The lease TTL of the scenario's fleet: the default.
const LEASE_TTL: Duration = Duration::from_secs(15);
/// How long to wait for any one thing a trial waits for.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What the `signal` scenario measured. Latencies in milliseconds.
#[derive(Debug, Serialize)]
pub struct SignalResult {
    pub runs: u32,
    pub warmup_runs: u32,
    /// The agent of the signalled runs.
    pub agent: &'static str,
    /// Signal request sent → `run.resumed` received.
    pub signal_to_resumed: Quantiles,
    /// Signal request sent → `run.completed` received.
    pub signal_to_completed: Quantiles,
    /// Signal request sent → the signal API's reply received.
    pub signal_reply: Quantiles,
    /// The baseline: `echo` submit request sent → `run.started` received.
    pub submit_to_started: Quantiles,
    /// `echo` submit request sent → the submit API's reply received: the
    /// API half of the baseline, to set beside `signal_reply`.
    pub submit_reply: Quantiles,
    /// `signal_to_resumed` p50 over `submit_to_started` p50.
    pub resumed_per_started_p50: f64,
    /// `run.waiting` received → the job's ack received: how long after
    /// `run.waiting` the worker is done parking the run.
    pub waiting_to_parked: Quantiles,
    /// Signals whose reply said the run was not woken (expected 0).
    pub not_woken: u32,
    /// Signalled runs that did not complete (expected 0).
    pub failed: u32,
}

/// Everything the bench saw of one run, stamped on arrival.
#[derive(Default)]
struct Seen {
    started: Option<Instant>,
    waiting: Option<Instant>,
    resumed: Option<Instant>,
    /// The terminal event: when it arrived and whether it was `run.completed`.
    ended: Option<(Instant, bool)>,
}

/// The observations of the scenario's runs, by run, and every job ack.
struct Tracker {
    observed: mpsc::UnboundedReceiver<Observation>,
    runs: HashMap<RunId, Seen>,
    /// Every job ack, in arrival order (one run at a time: a trial's runs
    /// own the acks after those of the trials before).
    acks: Vec<Instant>,
}

impl Tracker {
    fn note(&mut self, observation: Observation) {
        match observation {
            Observation::Event(at, event) => {
                let seen = self.runs.entry(event.run_id).or_default();
                match &event.body {
                    EventBody::Started(_) => {
                        seen.started.get_or_insert(at);
                    }
                    EventBody::Waiting(_) => {
                        seen.waiting.get_or_insert(at);
                    }
                    EventBody::Resumed(_) => {
                        seen.resumed.get_or_insert(at);
                    }
                    body if body.is_terminal() => {
                        seen.ended.get_or_insert((at, matches!(body, EventBody::Completed(_))));
                    }
                    _ => {}
                }
            }
            Observation::JobAcked(at) => self.acks.push(at),
            Observation::LeaseWritten(..) | Observation::LeaseRemoved(..) => {}
        }
    }

    /// Notes observations until `run` has `done` and `acks` jobs have been
    /// acked in all, or fails after [`STEP_TIMEOUT`] naming `what` was
    /// awaited.
    async fn until(
        &mut self,
        run: RunId,
        acks: usize,
        what: &str,
        done: impl Fn(&Seen) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        while !(self.runs.get(&run).is_some_and(&done) && self.acks.len() >= acks) {
            let next = tokio::time::timeout_at(deadline, self.observed.recv())
                .await
                .with_context(|| format!("run {run}: no {what} within {}s", STEP_TIMEOUT.as_secs()))?;
            self.note(next.context("the event subscription ended")?);
        }
        Ok(())
    }

    fn seen(&self, run: RunId) -> anyhow::Result<&Seen> {
        self.runs.get(&run).with_context(|| format!("nothing seen of run {run}"))
    }
}

/// The recorded trials' figures, in microseconds.
struct Samples {
    resumed: Histogram<u64>,
    completed: Histogram<u64>,
    reply: Histogram<u64>,
    started: Histogram<u64>,
    submit_reply: Histogram<u64>,
    parked: Histogram<u64>,
}

impl Samples {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            resumed: Histogram::new(3)?,
            completed: Histogram::new(3)?,
            reply: Histogram::new(3)?,
            started: Histogram::new(3)?,
            submit_reply: Histogram::new(3)?,
            parked: Histogram::new(3)?,
        })
    }
}

/// One trial's figures, in microseconds.
struct Trial {
    resumed: u64,
    completed: u64,
    reply: u64,
    started: u64,
    submit_reply: u64,
    parked: u64,
    woke: bool,
    ok: bool,
}

/// Starts the scenario's fleet, measures, and stops the fleet whether or
/// not the measurement succeeded.
pub(super) async fn measure(args: &BenchArgs) -> anyhow::Result<SignalResult> {
    let agents = runfleet_worker::agents::with_test_agents(runfleet_worker::agents::TestAgents::default());
    let mut fleet = Fleet::start(LEASE_TTL).await?;
    let result = match fleet.add_worker(1, agents).await {
        Ok(()) => measure_on(args, &fleet).await,
        Err(e) => Err(e),
    };
    fleet.stop().await?;
    result
}

async fn measure_on(args: &BenchArgs, fleet: &Fleet) -> anyhow::Result<SignalResult> {
    let client = fleet.client().await?;
    let stop_observing = CancellationToken::new();
    let _stop_on_exit = stop_observing.clone().drop_guard();
    let observed = observe(&client, stop_observing).await?;
    let mut tracker = Tracker { observed, runs: HashMap::new(), acks: Vec::new() };

    let mut samples = Samples::new()?;
    let (mut not_woken, mut failed) = (0, 0);
    progress(
        args,
        format!(
            "signal: {WARMUP} warm-up trials, then {} trials (an `await` run and an `echo` run each)",
            args.signal_runs
        ),
    );
    for i in 0..WARMUP + args.signal_runs {
        let trial = trial(&client, &mut tracker, i).await?;
        if i < WARMUP {
            continue;
        }
        samples.resumed.record(trial.resumed)?;
        samples.completed.record(trial.completed)?;
        samples.reply.record(trial.reply)?;
        samples.started.record(trial.started)?;
        samples.submit_reply.record(trial.submit_reply)?;
        samples.parked.record(trial.parked)?;
        not_woken += u32::from(!trial.woke);
        failed += u32::from(!trial.ok);
    }

    let resumed = Quantiles::from_micros(&samples.resumed);
    let started = Quantiles::from_micros(&samples.started);
    Ok(SignalResult {
        runs: args.signal_runs,
        warmup_runs: WARMUP,
        agent: "await",
        signal_to_resumed: resumed,
        signal_to_completed: Quantiles::from_micros(&samples.completed),
        signal_reply: Quantiles::from_micros(&samples.reply),
        submit_to_started: started,
        submit_reply: Quantiles::from_micros(&samples.submit_reply),
        resumed_per_started_p50: resumed.p50_ms / started.p50_ms,
        waiting_to_parked: Quantiles::from_micros(&samples.parked),
        not_woken,
        failed,
    })
}

/// One `await` run signalled once parked, then one `echo` run.
async fn trial(client: &Client, tracker: &mut Tracker, i: u32) -> anyhow::Result<Trial> {
    let acked = tracker.acks.len();
    let run = submit(client, "await", json!({ "key": KEY })).await?;
    // The trial's first ack is the park's.
    tracker.until(run, acked + 1, "park", |seen| seen.waiting.is_some()).await?;
    let signalled = Instant::now();
    let woke = client.signal(run, KEY, json!({ "trial": i })).await?.woke;
    let replied = Instant::now();
    // The end of the run: its terminal event and the resumed attempt's ack.
    tracker.until(run, acked + 2, "end", |seen| seen.ended.is_some()).await?;
    let seen = tracker.seen(run)?;
    let since = |at: Instant| micros(at.saturating_duration_since(signalled));
    let resumed = since(seen.resumed.with_context(|| format!("run {run} ended without run.resumed"))?);
    let (ended, ok) = seen.ended.context("no terminal event")?;
    let parked =
        micros(tracker.acks[acked].saturating_duration_since(seen.waiting.context("no run.waiting")?));
    let (completed, reply) = (since(ended), since(replied));

    let submitted = Instant::now();
    let echo = submit(client, "echo", json!({ "trial": i })).await?;
    let submit_reply = micros(submitted.elapsed());
    tracker.until(echo, acked + 3, "end", |seen| seen.ended.is_some()).await?;
    let started =
        tracker.seen(echo)?.started.with_context(|| format!("run {echo} ended without run.started"))?;
    let started = micros(started.saturating_duration_since(submitted));
    Ok(Trial { resumed, completed, reply, started, parked, submit_reply, woke, ok })
}

async fn submit(client: &Client, agent: &str, input: serde_json::Value) -> anyhow::Result<RunId> {
    let request = SubmitRequest {
        agent: agent.to_owned(),
        input,
        queue: None,
        priority: None,
        idempotency_key: None,
        max_attempts: Some(1),
    };
    Ok(client.submit(request).await?.run_id)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

pub(super) fn print(result: &SignalResult) {
    println!(
        "signal  {} trials, one run at a time on 1 worker (after {} warm-up trials): an `{}` run signalled once parked, then an `echo` run",
        result.runs, result.warmup_runs, result.agent
    );
    println!("{:<20}{:>10}{:>10}{:>10}{:>10}", "ms", "p50", "p90", "p99", "max");
    for (name, q) in [
        ("signal→resumed", &result.signal_to_resumed),
        ("signal→completed", &result.signal_to_completed),
        ("signal reply", &result.signal_reply),
        ("submit→started", &result.submit_to_started),
        ("submit reply", &result.submit_reply),
        ("waiting→parked", &result.waiting_to_parked),
    ] {
        println!("{name:<20}{:>10.2}{:>10.2}{:>10.2}{:>10.2}", q.p50_ms, q.p90_ms, q.p99_ms, q.max_ms);
    }
    println!(
        "signal→resumed p50 = {:.2} x submit→started p50 (the baseline: an `echo` run's dispatch on the same fleet)",
        result.resumed_per_started_p50
    );
    if result.not_woken > 0 || result.failed > 0 {
        println!("not woken by their signal: {}; not completed: {}", result.not_woken, result.failed);
    }
}

#[cfg(test)]
mod tests {
    use runfleet_protocol::event::{Event, RunCompleted, RunResumed, RunWaiting};
    use runfleet_protocol::TenantId;

    use super::*;

    fn event(run: RunId, body: EventBody) -> Event {
        Event {
            run_id: run,
            tenant: TenantId::default_tenant(),
            seq: 1,
            ts_ms: 0,
            attempt: 1,
            worker_id: None,
            trace_id: None,
            body,
        }
    }

    #[test]
    fn tracker_keeps_first_arrivals_and_every_ack() {
        let (_tx, observed) = mpsc::unbounded_channel();
        let mut tracker = Tracker { observed, runs: HashMap::new(), acks: Vec::new() };
        let run = RunId::generate();
        let t: Vec<Instant> = (0..4).map(|ms| Instant::now() + Duration::from_millis(ms)).collect();
        let waiting = || EventBody::Waiting(RunWaiting { key: None, deadline_ms: None, failures: 0 });
        tracker.note(Observation::Event(t[0], Box::new(event(run, waiting()))));
        tracker.note(Observation::Event(t[1], Box::new(event(run, waiting()))));
        tracker.note(Observation::JobAcked(t[1]));
        tracker.note(Observation::LeaseWritten(t[2], run.to_string()));
        let resumed = EventBody::Resumed(RunResumed { delivery: 2, steps_replayed: 0, failures: 0 });
        tracker.note(Observation::Event(t[2], Box::new(event(run, resumed))));
        let completed = EventBody::Completed(RunCompleted { output: json!({}) });
        tracker.note(Observation::Event(t[3], Box::new(event(run, completed))));
        tracker.note(Observation::LeaseRemoved(t[3], run.to_string()));
        tracker.note(Observation::JobAcked(t[3]));

        let seen = tracker.seen(run).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seen.waiting, Some(t[0]));
        assert_eq!(seen.resumed, Some(t[2]));
        assert_eq!(seen.ended, Some((t[3], true)));
        assert_eq!(tracker.acks, vec![t[1], t[3]]);
        assert_eq!(tracker.runs.len(), 1);
    }
}
