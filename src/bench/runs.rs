//! The `runs` scenario: pushes N `echo` runs through a [`DevFleet`] of its
//! own (child nats-server, coordinator on SQLite, `--workers` in-process
//! workers of `--slots` slots) and reports throughput and latency.
//!
//! Latencies are measured on the bench's own clock: from just before the
//! submit request is sent to the moment the bench's subscription to the
//! tenant's events receives `run.started` / the terminal event. The load is
//! closed-loop (at most `--concurrency` submits in flight), so latencies at
//! saturation include queueing; the throughput is first submit → last
//! terminal event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use hdrhistogram::Histogram;
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::{codec, RunId};
use serde::Serialize;

use super::{BenchArgs, Latency};
use crate::client::Client;
use crate::dev::DevFleet;
use crate::embedded;

/// What the `runs` scenario measured. The field names are the bench's JSON
/// output from before scenarios existed; keep them stable.
#[derive(Debug, Serialize)]
pub struct RunsResult {
    pub runs: u32,
    pub workers: u32,
    pub slots: u32,
    pub concurrency: usize,
    pub seconds: f64,
    pub runs_per_sec: f64,
    pub submit_to_start: Latency,
    pub submit_to_complete: Latency,
    pub failed: u32,
}

#[derive(Default)]
struct Seen {
    started: HashMap<RunId, Instant>,
    finished: HashMap<RunId, (Instant, bool)>,
}

/// Starts the fleet, measures, and stops the fleet whether or not the
/// measurement succeeded.
pub(super) async fn measure(args: &BenchArgs) -> anyhow::Result<RunsResult> {
    let data = tempfile::tempdir().context("temp dir")?;
    let port = embedded::free_port()?;
    let fleet = DevFleet::start(None, data.path(), port, args.workers, args.slots).await?;
    let result = measure_on(args, &fleet.nats.url()).await;
    fleet.stop().await?;
    result
}

pub(super) fn print(result: &RunsResult) {
    println!(
        "runs {}  workers {}x{}  concurrency {}\nthroughput      {:>10.0} runs/s  ({:.2}s)\nsubmit→start    p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms\nsubmit→complete p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms\nfailed          {}",
        result.runs, result.workers, result.slots, result.concurrency, result.runs_per_sec, result.seconds,
        result.submit_to_start.p50_ms, result.submit_to_start.p99_ms, result.submit_to_start.max_ms,
        result.submit_to_complete.p50_ms, result.submit_to_complete.p99_ms, result.submit_to_complete.max_ms,
        result.failed,
    );
}

async fn measure_on(args: &BenchArgs, url: &str) -> anyhow::Result<RunsResult> {
    let client = Client::connect(
        url,
        runfleet_protocol::TenantId::default_tenant(),
        runfleet_protocol::Names::default(),
    )
    .await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();

    // Every event of the tenant, as an external subscriber sees it.
    let mut events = client
        .nats()
        .subscribe(client.names().tenant_events(client.tenant()))
        .await
        .context("subscribe to events")?;
    // Stopped through a token, not `JoinHandle::abort`, once every run ended.
    let stop_recorder = tokio_util::sync::CancellationToken::new();
    let recorder = {
        let seen = seen.clone();
        let stop = stop_recorder.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    message = events.next() => message,
                };
                let Some(message) = message else { return };
                let now = Instant::now();
                let Ok(event) = codec::decode::<Event>(&message.payload) else { continue };
                let Ok(mut seen) = seen.lock() else { return };
                match event.body {
                    EventBody::Started(_) => {
                        seen.started.entry(event.run_id).or_insert(now);
                    }
                    EventBody::Completed(_) | EventBody::Failed(_) => {
                        let ok = matches!(event.body, EventBody::Completed(_));
                        if seen.finished.insert(event.run_id, (now, ok)).is_none() {
                            let _ = done_tx.send(());
                        }
                    }
                    _ => {}
                }
            }
        })
    };

    let begin = Instant::now();
    let submitted: Vec<(RunId, Instant)> = futures::stream::iter(0..args.runs)
        .map(|i| {
            let client = client.clone();
            async move {
                let sent = Instant::now();
                let reply = client
                    .submit(SubmitRequest {
                        agent: "echo".into(),
                        input: serde_json::json!({ "i": i }),
                        queue: None,
                        priority: None,
                        idempotency_key: None,
                        max_attempts: None,
                    })
                    .await?;
                Ok::<_, anyhow::Error>((reply.run_id, sent))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    let mut finished = 0;
    while finished < args.runs {
        tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
            .await
            .with_context(|| format!("no run finished for 120s ({finished}/{} done)", args.runs))?;
        finished += 1;
    }
    let elapsed = begin.elapsed();
    stop_recorder.cancel();
    recorder.await.context("bench event recorder panicked")?;

    let seen = seen.lock().map_err(|_| anyhow::anyhow!("recorder panicked"))?;
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
    Ok(RunsResult {
        runs: args.runs,
        workers: args.workers,
        slots: args.slots,
        concurrency: args.concurrency,
        seconds: elapsed.as_secs_f64(),
        runs_per_sec: f64::from(args.runs) / elapsed.as_secs_f64(),
        submit_to_start: Latency::from_micros(&start_hist),
        submit_to_complete: Latency::from_micros(&complete_hist),
        failed,
    })
}
