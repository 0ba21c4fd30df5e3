//! The `steps` scenario: what one durable step costs.
//!
//! A fleet of its own (child nats-server, in-process coordinator on SQLite,
//! one in-process worker with one slot) gets the [`NoopSteps`] agent
//! registered beside the built-ins. For each of `--steps` steps the agent
//! times, with [`Instant`]:
//!
//! - `ctx.step("noop-i", |_| async move { Ok(i) })`: a new durable step
//!   whose work is nothing, so its time is the SDK's and JetStream's: append
//!   `step.started` (in one message with the previous step's held
//!   `step.completed`), run the closure, write the checkpoint (fenced by the
//!   run's checkpoint chain), hold `step.completed` for the next append; two
//!   round trips to the server;
//! - `noop(i).await`, a plain async function returning `i`: the same work
//!   without durability, the baseline,
//!
//! and records both (nanoseconds) in histograms it shares with the bench.
//! The bench submits `--step-runs` runs one after the other (each waits for
//! the previous one's terminal event, so steps never compete with each
//! other), after one unrecorded warm-up run (connections, first stream and
//! bucket writes). The overhead of a step is step minus baseline, taken at
//! the same quantile. The step names are formatted before the clock starts.
//!
//! For scale, after each run the bench also times as many acknowledged
//! JetStream publishes (256 bytes, one at a time, to a scratch file-storage
//! stream of the same server) as the run had steps: a step costs two such
//! round trips plus the SDK's own work, so `step p50 / publish p50` near 2
//! means the round trips are the cost.
//!
//! It also times as many JetStream atomic batches of two such messages (a
//! second scratch stream, `allow_atomic`): the price of joining two appends
//! in an atomic batch, which is why steps join them in one message instead
//! (`docs/performance.md`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream::stream;
use hdrhistogram::Histogram;
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::event::EventBody;
use runfleet_protocol::AgentName;
use runfleet_worker::sdk::{async_trait, Agent, AgentError, RunContext};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::fleet::Fleet;
use super::{progress, BenchArgs, Latency, Spread};

/// The name the bench registers [`NoopSteps`] under.
const AGENT: &str = "bench_noop_steps";
/// Targets from the issue tracker, reported against, never asserted.
const TARGET_OVERHEAD_P50_MS: f64 = 0.5;
const TARGET_OVERHEAD_P99_MS: f64 = 2.0;
/// The scratch stream of the publish round-trip reference; the bench's
/// own, on the bench's own server, never part of a runfleet topology.
const RTT_STREAM: &str = "BENCH_PUBLISH_RTT";
const RTT_SUBJECT: &str = "bench.publish.rtt";
const RTT_PAYLOAD_BYTES: usize = 256;
/// The scratch stream of the atomic-batch reference.
const BATCH_STREAM: &str = "BENCH_ATOMIC_BATCH_RTT";
const BATCH_SUBJECT: &str = "bench.atomic.rtt";
/// The lease TTL of the scenario's fleet: the default, so the heartbeat
/// (one KV update per TTL/3) runs at its usual rate beside the steps.
const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(15);

/// Durations of one run's steps and baseline calls, in nanoseconds.
struct Samples {
    step: Histogram<u64>,
    plain: Histogram<u64>,
}

impl Samples {
    fn new() -> anyhow::Result<Self> {
        Ok(Self { step: Histogram::new(3)?, plain: Histogram::new(3)? })
    }
}

/// Input of [`NoopSteps`].
#[derive(Serialize, Deserialize)]
struct NoopInput {
    steps: u32,
    /// Whether to record the timings (false for the warm-up run).
    record: bool,
}

/// The bench's agent: `steps` no-op durable steps, each followed by the
/// same no-op as a plain call, both timed into the shared [`Samples`].
struct NoopSteps {
    samples: Arc<Mutex<Samples>>,
}

/// The baseline: the work of a step's closure, as a plain async call. Not
/// inlined and behind a black box so the call is really made.
#[inline(never)]
async fn noop(i: u32) -> u32 {
    std::hint::black_box(i)
}

#[async_trait]
impl Agent for NoopSteps {
    async fn run(&self, ctx: &mut RunContext, input: Value) -> Result<Value, AgentError> {
        let NoopInput { steps, record } = serde_json::from_value(input).map_err(|e| {
            AgentError::invalid_input(format!("expected {{\"steps\": N, \"record\": bool}}: {e}"))
        })?;
        for i in 0..steps {
            let name = format!("noop-{i}");
            let begin = Instant::now();
            let stepped: u32 = ctx.step(&name, |_| async move { Ok(i) }).await?;
            let step = begin.elapsed();
            let begin = Instant::now();
            let plain = noop(i).await;
            let plain_time = begin.elapsed();
            if stepped != i || plain != i {
                return Err(AgentError::failed(format!(
                    "step {i} returned {stepped}, the plain call {plain}"
                )));
            }
            if record {
                let nanos = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
                // `record`, not `saturating_record`: the histograms grow as
                // needed, while saturating would clamp to their initial range.
                let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
                let recorded = samples.step.record(nanos(step)).and(samples.plain.record(nanos(plain_time)));
                recorded.map_err(|e| AgentError::failed(format!("could not record a timing: {e}")))?;
            }
        }
        Ok(json!({ "steps": steps }))
    }
}

/// What one trial of the `steps` scenario measured. Latencies in
/// milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct StepsTrial {
    pub runs: u32,
    pub steps_per_run: u32,
    /// One `ctx.step` of a no-op step.
    pub step: Latency,
    /// One plain `noop(i).await`.
    pub baseline: Latency,
    /// One acknowledged JetStream publish, measured between the runs.
    pub publish_round_trip: Latency,
    /// One acknowledged atomic batch of two such messages, measured between
    /// the runs.
    pub atomic_batch_round_trip: Latency,
    /// `step` p50 over `publish_round_trip` p50.
    pub step_per_round_trip_p50: f64,
    /// `step` minus `baseline` at p50.
    pub overhead_p50_ms: f64,
    /// `step` minus `baseline` at p99.
    pub overhead_p99_ms: f64,
    /// The p50 of a step within each run: its median and range over the runs
    /// shows how noisy the machine was.
    pub step_p50_per_run_ms: Spread,
    pub target_overhead_p50_ms: f64,
    pub target_overhead_p99_ms: f64,
    pub meets_p50_target: bool,
    pub meets_p99_target: bool,
}

/// What the `steps` scenario measured: `--repeat` trials, each on a fresh
/// fleet, and the median and range of their overheads.
#[derive(Debug, Clone, Serialize)]
pub struct StepsResult {
    pub overhead_p50_ms: Spread,
    pub overhead_p99_ms: Spread,
    pub step_per_round_trip_p50: Spread,
    pub target_overhead_p50_ms: f64,
    pub target_overhead_p99_ms: f64,
    /// On the medians over the trials.
    pub meets_p50_target: bool,
    pub meets_p99_target: bool,
    pub trials: Vec<StepsTrial>,
}

pub(super) async fn measure(args: &BenchArgs) -> anyhow::Result<StepsResult> {
    let mut trials = Vec::new();
    for trial in 1..=args.repeat {
        progress(args, format!("steps: trial {trial}/{}", args.repeat));
        trials.push(measure_trial(args).await?);
    }
    let spread = |field: fn(&StepsTrial) -> f64| {
        let values: Vec<f64> = trials.iter().map(field).collect();
        Spread::of(&values).context("no trial ran")
    };
    let overhead_p50_ms = spread(|t| t.overhead_p50_ms)?;
    let overhead_p99_ms = spread(|t| t.overhead_p99_ms)?;
    Ok(StepsResult {
        step_per_round_trip_p50: spread(|t| t.step_per_round_trip_p50)?,
        target_overhead_p50_ms: TARGET_OVERHEAD_P50_MS,
        target_overhead_p99_ms: TARGET_OVERHEAD_P99_MS,
        meets_p50_target: overhead_p50_ms.median <= TARGET_OVERHEAD_P50_MS,
        meets_p99_target: overhead_p99_ms.median <= TARGET_OVERHEAD_P99_MS,
        overhead_p50_ms,
        overhead_p99_ms,
        trials,
    })
}

/// Starts a fleet, measures one trial, and stops the fleet whether or not
/// the measurement succeeded.
async fn measure_trial(args: &BenchArgs) -> anyhow::Result<StepsTrial> {
    let samples = Arc::new(Mutex::new(Samples::new()?));
    let mut agents = runfleet_worker::agents::builtin();
    agents.register(AgentName::new(AGENT)?, NoopSteps { samples: samples.clone() });

    let mut fleet = Fleet::start(LEASE_TTL).await?;
    let result = match fleet.add_worker(1, agents).await {
        Ok(()) => measure_on(args, &fleet, &samples).await,
        Err(e) => Err(e),
    };
    fleet.stop().await?;
    result
}

async fn measure_on(args: &BenchArgs, fleet: &Fleet, samples: &Mutex<Samples>) -> anyhow::Result<StepsTrial> {
    let client = fleet.client().await?;
    let js = async_nats::jetstream::new(client.nats().clone());
    js.create_stream(stream::Config {
        name: RTT_STREAM.to_owned(),
        subjects: vec![RTT_SUBJECT.to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("could not create the publish round-trip stream")?;
    js.create_stream(stream::Config {
        name: BATCH_STREAM.to_owned(),
        subjects: vec![BATCH_SUBJECT.to_owned()],
        storage: stream::StorageType::File,
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await
    .context("could not create the atomic batch stream")?;
    let payload = bytes::Bytes::from(vec![b'x'; RTT_PAYLOAD_BYTES]);
    let mut step = Histogram::<u64>::new(3)?;
    let mut plain = Histogram::<u64>::new(3)?;
    let mut round_trip = Histogram::<u64>::new(3)?;
    let mut batch_round_trip = Histogram::<u64>::new(3)?;
    let mut batches = 0u64;
    let mut step_p50_per_run = Vec::new();

    progress(args, format!("steps: 1 warm-up run, then {} runs of {} steps", args.step_runs, args.steps));
    for run in 0..=args.step_runs {
        let record = run > 0;
        let input = serde_json::to_value(NoopInput { steps: args.steps, record })?;
        let request = SubmitRequest {
            agent: AGENT.to_owned(),
            input,
            queue: None,
            priority: None,
            idempotency_key: None,
            max_attempts: Some(1),
        };
        let reply = client.submit(request).await?;
        let last = tokio::time::timeout(std::time::Duration::from_secs(300), client.wait(reply.run_id))
            .await
            .with_context(|| format!("run {} did not finish within 300s", reply.run_id))??;
        match &last.body {
            EventBody::Completed(_) => {}
            EventBody::Failed(failed) => {
                anyhow::bail!("run {} failed: {}: {}", reply.run_id, failed.error.code, failed.error.message)
            }
            other => anyhow::bail!("run {} ended with {}", reply.run_id, other.type_name()),
        }
        if !record {
            continue;
        }
        // The agent recorded before it returned, so before the terminal event.
        let this_run =
            std::mem::replace(&mut *samples.lock().unwrap_or_else(PoisonError::into_inner), Samples::new()?);
        step_p50_per_run.push(Latency::from_nanos(&this_run.step).p50_ms);
        step.add(&this_run.step)?;
        plain.add(&this_run.plain)?;

        for _ in 0..args.steps {
            let begin = Instant::now();
            js.publish(RTT_SUBJECT, payload.clone())
                .await
                .context("publish failed")?
                .await
                .context("publish was not acknowledged")?;
            round_trip.record(u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
        }
        for _ in 0..args.steps {
            batches += 1;
            let begin = Instant::now();
            atomic_batch_of_two(&js, &format!("bench-{batches}"), &payload).await?;
            batch_round_trip.record(u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
        }
    }

    let step_latency = Latency::from_nanos(&step);
    let baseline = Latency::from_nanos(&plain);
    let publish_round_trip = Latency::from_nanos(&round_trip);
    let atomic_batch_round_trip = Latency::from_nanos(&batch_round_trip);
    let overhead_p50_ms = step_latency.p50_ms - baseline.p50_ms;
    let overhead_p99_ms = step_latency.p99_ms - baseline.p99_ms;
    Ok(StepsTrial {
        runs: args.step_runs,
        steps_per_run: args.steps,
        step: step_latency,
        baseline,
        publish_round_trip,
        atomic_batch_round_trip,
        step_per_round_trip_p50: step_latency.p50_ms / publish_round_trip.p50_ms,
        overhead_p50_ms,
        overhead_p99_ms,
        step_p50_per_run_ms: Spread::of(&step_p50_per_run).context("no run was measured")?,
        target_overhead_p50_ms: TARGET_OVERHEAD_P50_MS,
        target_overhead_p99_ms: TARGET_OVERHEAD_P99_MS,
        meets_p50_target: overhead_p50_ms <= TARGET_OVERHEAD_P50_MS,
        meets_p99_target: overhead_p99_ms <= TARGET_OVERHEAD_P99_MS,
    })
}

/// Publishes one atomic batch of two messages on [`BATCH_SUBJECT`] (the
/// first without a reply, the second committing) and waits for its
/// acknowledgement.
async fn atomic_batch_of_two(
    js: &async_nats::jetstream::Context,
    batch: &str,
    payload: &bytes::Bytes,
) -> anyhow::Result<()> {
    let headers = |sequence: &str, commit: bool| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Batch-Id", batch);
        headers.insert("Nats-Batch-Sequence", sequence);
        if commit {
            headers.insert("Nats-Batch-Commit", "1");
        }
        headers
    };
    js.client()
        .publish_with_headers(BATCH_SUBJECT, headers("1", false), payload.clone())
        .await
        .context("atomic batch: first message not sent")?;
    let ack = js
        .publish_with_headers(BATCH_SUBJECT, headers("2", true), payload.clone())
        .await
        .context("atomic batch: commit not sent")?
        .await
        .context("atomic batch was not acknowledged")?;
    anyhow::ensure!(ack.batch_size == Some(2), "atomic batch stored {:?} messages, not 2", ack.batch_size);
    Ok(())
}

pub(super) fn print(result: &StepsResult) {
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    let us = |ms: f64| format!("{:.1} µs", ms * 1e3);
    if let Some(last) = result.trials.last() {
        println!(
            "steps  {} runs x {} no-op steps, one run at a time on 1 worker (after 1 warm-up run); last of {} trials:",
            last.runs,
            last.steps_per_run,
            result.trials.len()
        );
        println!("{:<14}{:>12}{:>12}{:>12}", "", "p50", "p99", "max");
        for (name, l) in [("ctx.step", &last.step), ("plain call", &last.baseline)] {
            println!("{name:<14}{:>12}{:>12}{:>12}", us(l.p50_ms), us(l.p99_ms), us(l.max_ms));
        }
        let rtt = &last.publish_round_trip;
        println!(
            "{:<14}{:>12}{:>12}{:>12}   (one acked JetStream publish)",
            "js publish",
            us(rtt.p50_ms),
            us(rtt.p99_ms),
            us(rtt.max_ms),
        );
        let batch = &last.atomic_batch_round_trip;
        println!(
            "{:<14}{:>12}{:>12}{:>12}   (one acked atomic batch of two: {:.1}x a publish at p50)",
            "atomic batch",
            us(batch.p50_ms),
            us(batch.p99_ms),
            us(batch.max_ms),
            batch.p50_ms / rtt.p50_ms,
        );
    }
    let row = |name: &str, s: &Spread| {
        println!("{name:<22} median {:>10}  (min {}, max {})", us(s.median), us(s.min), us(s.max));
    };
    row("overhead p50", &result.overhead_p50_ms);
    row("overhead p99", &result.overhead_p99_ms);
    let ratio = &result.step_per_round_trip_p50;
    println!(
        "step p50 / publish p50 median {:.2} (min {:.2}, max {:.2})",
        ratio.median, ratio.min, ratio.max
    );
    println!(
        "target overhead: p50 ≤ {} ms {}, p99 ≤ {} ms {}",
        result.target_overhead_p50_ms,
        verdict(result.meets_p50_target),
        result.target_overhead_p99_ms,
        verdict(result.meets_p99_target),
    );
}
