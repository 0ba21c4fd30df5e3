//! `runfleet bench`: starts a fleet of its own (child nats-server, coordinator
//! on SQLite, in-process workers), pushes N runs through it and reports
//! throughput and latency.
//!
//! Latencies are measured on the bench's own clock: from just before the
//! submit request is sent to the moment the bench's subscription to the
//! tenant's events receives `run.started` / the terminal event. The load is
//! closed-loop (at most `--concurrency` submits in flight), so latencies at
//! saturation include queueing; the throughput is first submit → last
//! terminal event.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use futures::StreamExt;
use hdrhistogram::Histogram;
use runfleet_protocol::api::SubmitRequest;
use runfleet_protocol::event::{Event, EventBody};
use runfleet_protocol::{codec, RunId};
use serde::Serialize;

use crate::client::Client;
use crate::dev::DevFleet;
use crate::embedded;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Runs to push through the fleet.
    #[arg(long, default_value_t = 2000)]
    pub runs: u32,
    /// In-process workers.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Slots per worker.
    #[arg(long, default_value_t = 32)]
    pub slots: u32,
    /// Submits in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
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

fn latency(hist: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        p50_ms: ms(hist.value_at_quantile(0.50)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        max_ms: ms(hist.max()),
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0 && args.concurrency > 0, "--runs and --concurrency must be positive");
    let data = tempfile::tempdir().context("temp dir")?;
    let port = embedded::free_port()?;
    let fleet = DevFleet::start(None, data.path(), port, args.workers, args.slots).await?;
    let result = measure(&args, &fleet.nats.url()).await;
    fleet.stop().await?;
    let result = result?;

    let json = serde_json::to_string_pretty(&result)?;
    if let Some(path) = &args.output {
        std::fs::write(path, &json).with_context(|| format!("could not write {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        println!(
            "runs {}  workers {}x{}  concurrency {}\nthroughput      {:>10.0} runs/s  ({:.2}s)\nsubmit→start    p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms\nsubmit→complete p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms\nfailed          {}",
            result.runs, result.workers, result.slots, result.concurrency, result.runs_per_sec, result.seconds,
            result.submit_to_start.p50_ms, result.submit_to_start.p99_ms, result.submit_to_start.max_ms,
            result.submit_to_complete.p50_ms, result.submit_to_complete.p99_ms, result.submit_to_complete.max_ms,
            result.failed,
        );
    }
    Ok(())
}

async fn measure(args: &BenchArgs, url: &str) -> anyhow::Result<BenchResult> {
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
    Ok(BenchResult {
        runs: args.runs,
        workers: args.workers,
        slots: args.slots,
        concurrency: args.concurrency,
        seconds: elapsed.as_secs_f64(),
        runs_per_sec: f64::from(args.runs) / elapsed.as_secs_f64(),
        submit_to_start: latency(&start_hist),
        submit_to_complete: latency(&complete_hist),
        failed,
    })
}
