//! The `floor` scenario: the least a durable run can cost on JetStream,
//! done with bare async-nats calls and no runfleet code, as the baseline the
//! other scenarios are divided by.
//!
//! On a child nats-server of its own (the same binary, file storage, like a
//! fleet's), the bench creates a work-queue stream for jobs with one pull
//! consumer, an events stream, a leases bucket (`max_age` = TTL, history 1)
//! and a checkpoints bucket. It publishes N jobs (pipelined, acknowledged),
//! then `--slots × --workers` concurrent handlers each take a job from the
//! consumer and do the minimal lifecycle, every call awaited in order as a
//! fenced run needs it:
//!
//! KV create the lease → publish 3 events to the run's subject → KV create a
//! checkpoint → KV delete the lease → ack (double ack, acknowledged by the
//! server).
//!
//! Runs/s at saturation is N over first job publish → last ack. The same N,
//! slots and workers as `throughput`, so the two are comparable.
//!
//! [`open_loop`] runs the same lifecycle under `latency`'s open-loop load
//! instead (jobs published at fixed intended times), as that scenario's
//! baseline at each offered rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::latency::{micros, Tail};
use super::procs::{CpuClock, CpuMeter, CpuPerRun};
use super::{progress, BenchArgs, ServerTraffic};
use crate::embedded::{self, EmbeddedNats};

const JOBS_STREAM: &str = "FLOOR_JOBS";
const EVENTS_STREAM: &str = "FLOOR_EVENTS";
const LEASES: &str = "floor-leases";
const CHECKPOINTS: &str = "floor-checkpoints";
/// About the size of a runfleet job, event and checkpoint.
const PAYLOAD_BYTES: usize = 256;
/// The lease TTL of the floor's bucket: runfleet's default.
const LEASE_TTL: Duration = Duration::from_secs(15);
/// No run may take longer than this.
const STALL: Duration = Duration::from_secs(120);

/// One trial of the floor.
#[derive(Debug, Clone, Serialize)]
pub struct FloorTrial {
    pub runs: u32,
    pub seconds: f64,
    pub runs_per_sec: f64,
    /// nats-server's traffic per run, first job publish → last ack.
    pub server: ServerTraffic,
    /// CPU per run over the same window: the bench's process (the floor's
    /// client) and nats-server.
    pub cpu: CpuPerRun,
}

/// Measures one trial on a fresh server (so every trial starts from empty
/// streams, like a fresh fleet).
pub(super) async fn trial(args: &BenchArgs, runs: u32) -> anyhow::Result<FloorTrial> {
    let data = tempfile::tempdir().context("could not create a temp dir for the floor")?;
    let nats = EmbeddedNats::start_monitored(data.path(), embedded::free_port()?).await?;
    let result = measure_on(&nats, runs, args.workers.saturating_mul(args.slots)).await;
    nats.stop().await;
    let trial = result?;
    progress(
        args,
        format!("floor: {:.0} runs/s ({} runs, {:.2}s)", trial.runs_per_sec, trial.runs, trial.seconds),
    );
    Ok(trial)
}

/// The floor under an open-loop load (for `latency`): one trial.
#[derive(Debug, Clone, Serialize)]
pub struct FloorLatencyTrial {
    pub offered_per_sec: f64,
    pub runs: u32,
    /// Intended job publish → the job's first event stored: the floor's
    /// "started".
    pub job_to_start: Tail,
    /// Intended job publish → the job's ack confirmed: its completion.
    pub job_to_complete: Tail,
    /// CPU per run over the trial (the floor's client and nats-server).
    pub cpu: CpuPerRun,
}

/// The floor's lifecycle at `offered` jobs/s for `duration`, open loop, on
/// a fresh server: a pacing thread publishes job `i` at `begin + i / rate`
/// on the OS timer (as `latency` sends its submits), and latencies count
/// from that intended time. What the machine itself takes for the durable
/// part of a run at the rate `latency` offers the fleet.
pub(super) async fn open_loop(
    args: &BenchArgs,
    offered: f64,
    duration: Duration,
) -> anyhow::Result<FloorLatencyTrial> {
    let data = tempfile::tempdir().context("could not create a temp dir for the floor")?;
    let nats = EmbeddedNats::start_monitored(data.path(), embedded::free_port()?).await?;
    let result = open_loop_on(&nats, args.workers.saturating_mul(args.slots), offered, duration).await;
    nats.stop().await;
    result
}

async fn open_loop_on(
    server: &EmbeddedNats,
    concurrency: u32,
    offered: f64,
    duration: Duration,
) -> anyhow::Result<FloorLatencyTrial> {
    anyhow::ensure!(offered > 0.0, "floor: nothing offered");
    let (js, consumer, lifecycle) = prepare(server, concurrency).await?;
    let runs = (offered * duration.as_secs_f64()).round().max(1.0) as u32;
    let interval = Duration::from_secs_f64(1.0 / offered);
    let clock = CpuClock::read();
    let cpu =
        CpuMeter { clock: &clock, nats_pid: server.pid().context("floor: nats-server is not running")? };
    let messages = consumer.messages().await.context("floor: pull")?;
    let cpu_before = cpu.mark()?;
    let begin = Instant::now();
    let pacer = {
        let (js, payload) = (js.clone(), lifecycle.payload.clone());
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut acks = Vec::with_capacity(runs as usize);
            for i in 0..runs {
                let intended = begin + interval.mul_f64(f64::from(i));
                if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let (js, payload) = (js.clone(), payload.clone());
                acks.push(
                    runtime.spawn(async move { js.publish(format!("floor.jobs.{i}"), payload).await?.await }),
                );
            }
            acks
        })
    };
    let mut handled = messages
        .take(runs as usize)
        .map(|message| {
            let lifecycle = lifecycle.clone();
            async move {
                let message = message?;
                let index = message.subject.rsplit('.').next().and_then(|i| i.parse::<u32>().ok());
                let index = index.context("floor: a job subject without its index")?;
                let started = lifecycle.run(message).await?;
                anyhow::Ok((index, started, Instant::now()))
            }
        })
        .buffer_unordered(concurrency.max(1) as usize);
    let mut start = Histogram::<u64>::new(3)?;
    let mut complete = Histogram::<u64>::new(3)?;
    for done in 0..runs {
        let next = tokio::time::timeout(STALL, handled.next())
            .await
            .with_context(|| format!("floor: no run finished for {}s ({done}/{runs})", STALL.as_secs()))?;
        let Some(result) = next else {
            anyhow::bail!("floor: the pull stream ended after {done}/{runs} runs")
        };
        let (index, started, completed) = result?;
        let intended = begin + interval.mul_f64(f64::from(index));
        start.record(micros(started, intended))?;
        complete.record(micros(completed, intended))?;
    }
    let cpu = cpu.per_run(&cpu_before, runs)?;
    for ack in pacer.await.context("floor: the pacer panicked")? {
        ack.await.context("floor: a job publish panicked")?.context("floor: a job publish failed")?;
    }
    Ok(FloorLatencyTrial {
        offered_per_sec: offered,
        runs,
        job_to_start: Tail::of(&start),
        job_to_complete: Tail::of(&complete),
        cpu,
    })
}

/// Creates the floor's streams, buckets and consumer on `server`.
async fn prepare(
    server: &EmbeddedNats,
    concurrency: u32,
) -> anyhow::Result<(jetstream::Context, consumer::PullConsumer, Arc<Lifecycle>)> {
    let nats = async_nats::connect(server.url()).await.context("floor: could not connect")?;
    let js = jetstream::new(nats);
    let jobs = js
        .create_stream(stream::Config {
            name: JOBS_STREAM.to_owned(),
            subjects: vec!["floor.jobs.>".to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("floor: jobs stream")?;
    js.create_stream(stream::Config {
        name: EVENTS_STREAM.to_owned(),
        subjects: vec!["floor.runs.>".to_owned()],
        storage: stream::StorageType::File,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .context("floor: events stream")?;
    let bucket = |name: &str, max_age: Duration| kv::Config {
        bucket: name.to_owned(),
        history: 1,
        max_age,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let leases = js.create_key_value(bucket(LEASES, LEASE_TTL)).await.context("floor: leases bucket")?;
    let checkpoints = js
        .create_key_value(bucket(CHECKPOINTS, Duration::ZERO))
        .await
        .context("floor: checkpoints bucket")?;
    let consumer = jobs
        .create_consumer(consumer::pull::Config {
            durable_name: Some("floor".to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: i64::from(concurrency.max(1)) * 2,
            ..Default::default()
        })
        .await
        .context("floor: consumer")?;

    let payload = Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    let lifecycle = Arc::new(Lifecycle { js: js.clone(), leases, checkpoints, payload });
    Ok((js, consumer, lifecycle))
}

async fn measure_on(server: &EmbeddedNats, runs: u32, concurrency: u32) -> anyhow::Result<FloorTrial> {
    let (js, consumer, lifecycle) = prepare(server, concurrency).await?;
    let payload = lifecycle.payload.clone();
    let clock = CpuClock::read();
    let cpu =
        CpuMeter { clock: &clock, nats_pid: server.pid().context("floor: nats-server is not running")? };
    let cpu_before = cpu.mark()?;
    let traffic_before = server.traffic().await?;
    let begin = Instant::now();
    // Publish every job, pipelined, then take them as fast as handlers free up.
    let publisher = {
        let (js, payload) = (js.clone(), payload.clone());
        tokio::spawn(async move {
            let acks = futures::stream::iter(0..runs)
                .map(|i| {
                    let (js, payload) = (js.clone(), payload.clone());
                    async move { js.publish(format!("floor.jobs.{i}"), payload).await?.await }
                })
                .buffer_unordered(256);
            acks.fold(Ok(()), |ok, ack| async move { ok.and(ack.map(drop)) }).await
        })
    };

    let messages = consumer.messages().await.context("floor: pull")?;
    let mut done = 0u32;
    let mut handled = messages
        .take(runs as usize)
        .map(|message| {
            let lifecycle = lifecycle.clone();
            async move { lifecycle.run(message?).await.map(drop) }
        })
        .buffer_unordered(concurrency.max(1) as usize);
    while done < runs {
        let next = tokio::time::timeout(STALL, handled.next())
            .await
            .with_context(|| format!("floor: no run finished for {}s ({done}/{runs})", STALL.as_secs()))?;
        let Some(result) = next else {
            anyhow::bail!("floor: the pull stream ended after {done}/{runs} runs")
        };
        result?;
        done += 1;
    }
    let elapsed = begin.elapsed();
    let cpu = cpu.per_run(&cpu_before, runs)?;
    let traffic = server.traffic().await?.since(&traffic_before);
    publisher.await.context("floor: publisher panicked")?.context("floor: a job publish failed")?;
    Ok(FloorTrial {
        runs,
        seconds: elapsed.as_secs_f64(),
        runs_per_sec: f64::from(runs) / elapsed.as_secs_f64(),
        server: ServerTraffic::per_run(traffic, runs),
        cpu,
    })
}

struct Lifecycle {
    js: jetstream::Context,
    leases: kv::Store,
    checkpoints: kv::Store,
    payload: Bytes,
}

impl Lifecycle {
    /// Runs one job's lifecycle; the instant its first event was stored
    /// (the floor's "started").
    async fn run(&self, message: jetstream::Message) -> anyhow::Result<Instant> {
        let id = message.subject.rsplit('.').next().unwrap_or_default().to_owned();
        let revision = self.leases.create(&id, self.payload.clone()).await.context("floor: lease create")?;
        let subject = format!("floor.runs.{id}.events");
        let mut started = None;
        for _ in 0..3 {
            self.js
                .publish(subject.clone(), self.payload.clone())
                .await
                .context("floor: event publish")?
                .await
                .context("floor: event ack")?;
            started.get_or_insert_with(Instant::now);
        }
        self.checkpoints
            .create(format!("{id}.0"), self.payload.clone())
            .await
            .context("floor: checkpoint")?;
        self.leases.delete_expect_revision(&id, Some(revision)).await.context("floor: lease delete")?;
        message.double_ack().await.map_err(|e| anyhow::anyhow!("floor: ack: {e}"))?;
        Ok(started.unwrap_or_else(Instant::now))
    }
}

pub(super) fn print(trials: &[FloorTrial]) {
    let rates: Vec<f64> = trials.iter().map(|t| t.runs_per_sec).collect();
    let messages: Vec<f64> = trials.iter().map(|t| t.server.messages_per_run()).collect();
    let cpu: Vec<f64> = trials.iter().map(|t| t.cpu.total_ms()).collect();
    if let (Some(rate), Some(messages), Some(cpu)) =
        (super::Spread::of(&rates), super::Spread::of(&messages), super::Spread::of(&cpu))
    {
        println!(
            "floor (bare JetStream lifecycle)  {:.0} runs/s  (min {:.0}, max {:.0}; {} trials), \
             {:.1} nats-server messages and {:.3} ms of CPU per run",
            rate.median,
            rate.min,
            rate.max,
            trials.len(),
            messages.median,
            cpu.median
        );
    }
}
